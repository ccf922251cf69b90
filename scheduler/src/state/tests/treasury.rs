//! Treasuries: use charged at nodes' prices, settled to farmers, spent circles
//! held and then stopped, transfers only through a quorum, a ledger that sums to
//! zero.

use aigrid_api::{Credits, IdentityId, NodeOffer, Prices};

use super::*;
use crate::state::treasury::Settled;

const T0: u64 = 10 * 3_600_000;
const FARMER: &str = "0123456789abcdef0123456789abcdef";

fn credits(text: &str) -> Credits {
    text.parse().unwrap()
}

/// [`running_with`] on a node at 3.6 credits per GPU-hour, 0.72 per core-hour
/// and 0.36 per GiB-hour, paying `FARMER`.
fn priced() -> Log {
    running_with(Some(NodeOffer {
        farmer: Some(IdentityId::new(FARMER)),
        prices: Prices::parse("gpu.H100=3.6,cpu=0.72,memory_gib=0.36").unwrap(),
    }))
}

fn deposit(log: &mut Log, circle: &str, amount: &str, at: u64) -> aigrid_api::TreasuryView {
    match log.apply(Command::Deposit {
        circle: circle.into(),
        amount: credits(amount),
        memo: format!("payment {at}"),
        by: None,
        at: Timestamp::from_millis(at),
    }) {
        Ok(Applied::TreasuryChanged { circle }) => log.state.treasury_view(&circle),
        other => panic!("expected a deposit, got {other:?}"),
    }
}

fn meter(log: &mut Log, at: u64) {
    log.apply(Command::Meter {
        at: Timestamp::from_millis(at),
    })
    .unwrap();
}

fn settle(log: &mut Log, at: u64, grace_ms: u64) -> Settled {
    match log.apply(Command::Settle {
        at: Timestamp::from_millis(at),
        grace_ms,
    }) {
        Ok(Applied::Settled(s)) => s,
        other => panic!("expected a settlement, got {other:?}"),
    }
}

/// Every balance is what the ledger's entries made it, and they sum to zero.
fn assert_balanced(state: &ClusterState) {
    let accounts = state.accounts();
    assert_eq!(accounts.sum, Credits::ZERO, "{accounts:?}");
    for (account, balance) in &accounts.balances {
        let page = state.ledger(account, usize::MAX);
        let replayed = page.entries.iter().fold(Credits::ZERO, |sum, e| {
            if e.to == *account {
                sum.plus(e.amount)
            } else {
                sum.minus(e.amount)
            }
        });
        assert_eq!(replayed, *balance, "{account}");
    }
}

#[test]
fn use_is_charged_at_the_nodes_prices_and_settled_to_its_farmer() {
    let mut log = priced();
    // Before a deposit the circle has no treasury: its use is free.
    meter(&mut log, T0);
    meter(&mut log, T0 + 10_000);
    assert!(!log.state.treasury_view("ml").open);
    let view = deposit(&mut log, "ml", "1", T0 + 10_000);
    assert!(view.open);
    assert_eq!(view.balance, credits("1"));
    assert_eq!(view.accrued, Credits::ZERO);
    // 10 s of: one H100 at 3.6/h (0.01), one core at 0.72/h (0.002), 0.5 GiB at
    // 0.36/h (0.0005).
    meter(&mut log, T0 + 20_000);
    let view = log.state.treasury_view("ml");
    assert_eq!(view.accrued, credits("0.0125"));
    assert_eq!(view.available, credits("0.9875"));
    assert_eq!(view.rate_per_hour, credits("4.5"));
    let s = settle(&mut log, T0 + 20_000, 3_600_000);
    assert_eq!((s.entries, s.amount, s.stopped), (1, credits("0.0125"), 0));
    let view = log.state.treasury_view("ml");
    assert_eq!(view.balance, credits("0.9875"));
    assert_eq!(view.accrued, Credits::ZERO);
    assert_eq!(view.spent_24h, credits("0.0125"));
    let farmer = log.state.ledger(&format!("farmer:{FARMER}"), 10);
    assert_eq!(farmer.balance, credits("0.0125"));
    assert_eq!(farmer.entries[0].from, "circle:ml");
    assert_eq!(
        log.state.accounts().balances["external"],
        credits("-1"),
        "the deposit came from outside"
    );
    assert_balanced(&log.state);
    // A replayed settlement moves nothing.
    let before = log.bytes();
    assert_eq!(settle(&mut log, T0 + 20_000, 3_600_000).entries, 0);
    assert_eq!(log.bytes(), before);
}

#[test]
fn fractions_of_a_micro_credit_are_carried_not_lost() {
    let mut log = priced();
    deposit(&mut log, "ml", "1", T0);
    meter(&mut log, T0);
    // 1 ms at 4.5 credits per hour is 1.25 micro-credits.
    for i in 1..=4 {
        meter(&mut log, T0 + i);
        settle(&mut log, T0 + i, 3_600_000);
    }
    let paid = log.state.ledger(&format!("farmer:{FARMER}"), 10).balance;
    assert_eq!(
        paid,
        Credits::from_micro(5),
        "4 ms at 1.25 micro-credits each"
    );
    assert_balanced(&log.state);
}

#[test]
fn a_spent_circle_is_held_then_stopped_after_its_grace_and_a_deposit_lifts_it() {
    let mut log = priced();
    deposit(&mut log, "ml", "0.02", T0);
    meter(&mut log, T0);
    meter(&mut log, T0 + 10_000);
    assert!(log.state.placement_hold("ml").is_none());
    // The second 10 s take its accrued use to 0.025, above what it holds.
    meter(&mut log, T0 + 20_000);
    let reason = log.state.placement_hold("ml").expect("held");
    assert!(reason.contains("treasury is spent"), "{reason}");
    let view = log.state.treasury_view("ml");
    assert_eq!(
        view.exhausted_since,
        Some(Timestamp::from_millis(T0 + 20_000))
    );
    // New work is refused as the plan applies, with the reason.
    let mut plan = JobPlan::new(JobId::new("j1"), 1);
    plan.place.push(NewAllocation {
        id: AllocId::new("a2"),
        group: "web".into(),
        index: 2,
        node: NodeId::new("n1"),
        gpus: Vec::new(),
        previous: None,
        reschedules: 0,
        canary: false,
    });
    match log.apply(Command::ApplyPlan {
        jobs: vec![plan],
        at: Timestamp::from_millis(T0 + 21_000),
    }) {
        Ok(Applied::PlanApplied {
            placed, refused, ..
        }) => {
            assert_eq!(placed, 0);
            assert!(refused[0].1.contains("treasury is spent"), "{refused:?}");
        }
        other => panic!("expected a refused plan, got {other:?}"),
    }
    // Running work runs on through the grace period...
    let s = settle(&mut log, T0 + 30_000, 60_000);
    assert_eq!(s.stopped, 0);
    assert_eq!(s.amount, credits("0.025"), "what the two meters counted");
    assert_eq!(log.state.treasury_view("ml").balance, credits("-0.005"));
    // ...and is asked to stop once it ends.
    let s = settle(&mut log, T0 + 80_000, 60_000);
    assert_eq!(s.stopped, 2);
    let job = log.state.job(&JobId::new("j1")).unwrap();
    assert!(job
        .allocations
        .iter()
        .all(|a| a.desired == DesiredState::Stop));
    assert_balanced(&log.state);
    // A deposit that leaves something to spend lifts the hold and plans the job.
    deposit(&mut log, "ml", "5", T0 + 90_000);
    assert!(log.state.placement_hold("ml").is_none());
    let pending = log.state.evaluations(EvalStatus::Pending);
    assert!(
        pending
            .iter()
            .any(|e| e.job_id == JobId::new("j1") && e.trigger == EvalTrigger::Treasury),
        "{pending:?}"
    );
}

#[test]
fn credits_leave_a_circle_only_through_its_quorum() {
    let mut log = priced();
    deposit(&mut log, "ml", "10", T0);
    let transfer = |amount: &str| Command::Transfer {
        circle: "ml".into(),
        to: "external".into(),
        amount: credits(amount),
        memo: String::new(),
        by: None,
        at: Timestamp::from_millis(T0 + 1),
    };
    // An ungoverned circle cannot move credits out at all.
    match log.apply(transfer("1")) {
        Err(StateError::Conflict { message }) => assert!(message.contains("not governed")),
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A policy that leaves `treasury.transfer` out still guards it.
    let mut policy = aigrid_api::CirclePolicy::new(2);
    policy.guarded.clear();
    assert!(policy.guards(aigrid_api::ChangeKind::TreasuryTransfer));
    assert_eq!(log.state.treasury_view("ml").balance, credits("10"));
    assert_balanced(&log.state);
}

#[test]
fn treasuries_survive_a_snapshot() {
    let mut log = priced();
    deposit(&mut log, "ml", "0.001", T0);
    meter(&mut log, T0);
    meter(&mut log, T0 + 7_777);
    settle(&mut log, T0 + 7_777, 1_000);
    let bytes = log.bytes();
    let mut restored = ClusterState::default();
    restored.restore(&bytes).unwrap();
    assert_eq!(restored.snapshot().unwrap(), bytes);
    assert_eq!(restored.treasury_view("ml"), log.state.treasury_view("ml"));
    assert!(restored.placement_hold("ml").is_some());
}

#[test]
fn a_job_raising_what_its_circle_may_spend_above_the_limit_needs_the_quorum() {
    use aigrid_api::{ChangeKind, CirclePolicy, Governance, IdentityKey, KeyAlgorithm};
    let mut log = priced();
    let owner = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [7; 32]);
    log.apply(Command::PutIdentity {
        name: "owner".into(),
        public_key: owner.public(),
        admin: false,
        at: Timestamp::new(20),
    })
    .unwrap();
    // Only spending is guarded: up to 2 credits an hour at the highest prices.
    let mut policy = CirclePolicy::new(1);
    policy.guarded = [ChangeKind::TreasurySpend].into_iter().collect();
    policy.spend_limit = Some(credits("2"));
    log.apply(Command::SetGovernance {
        circle: "ml".into(),
        governance: Governance {
            members: vec![aigrid_api::PolicyMember {
                identity: owner.id(),
                weight: 1,
                role: aigrid_api::Role::Owner,
            }],
            policy,
        },
        create: true,
        by: None,
        at: Timestamp::new(21),
    })
    .unwrap();
    // Each instance may cost half a core at 0.72 and a quarter GiB at 0.36: 0.45
    // an hour. Four instances (1.8) stay within the limit and apply at once.
    let scaled = |count: u64, eval: &str| {
        let mut json = spec_json("api");
        json["circle"] = json!("ml");
        json["groups"][0]["count"] = json!(count);
        submit("j-new", eval, serde_json::from_value(json).unwrap())
    };
    submitted(log.apply(scaled(4, "e4")));
    // Five (2.25) need the circle's quorum.
    let five = scaled(5, "e5");
    let change = log.state.change_of(&five).unwrap();
    assert_eq!(change.kind, ChangeKind::TreasurySpend);
    match log.apply(five) {
        Err(StateError::Guarded { kind, .. }) => assert_eq!(kind, ChangeKind::TreasurySpend),
        other => panic!("expected a guarded change, got {other:?}"),
    }
    // Scaling down never is.
    submitted(log.apply(scaled(3, "e3")));
    // A limit without `treasury.spend` guarded means nothing, and is refused.
    let mut loose = CirclePolicy::new(1);
    loose.guarded.clear();
    loose.spend_limit = Some(credits("2"));
    let governance = Governance {
        members: vec![aigrid_api::PolicyMember {
            identity: owner.id(),
            weight: 1,
            role: aigrid_api::Role::Owner,
        }],
        policy: loose,
    };
    assert_eq!(
        governance.validate().unwrap_err().field,
        "policy.spend_limit"
    );
}
