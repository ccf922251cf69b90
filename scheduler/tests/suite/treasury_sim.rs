//! A simulated day of metering, settlements and deposits through the Raft driver
//! with the real cluster state, under message loss, partitions and crashes that
//! change the leader many times: every server ends with the same ledger, every
//! balance is what the ledger's entries made it, the balances sum to zero, and
//! every acknowledged deposit is in the ledger. Rerun one seed with
//! `AIGRID_SIM_SEED=<seed> cargo test -p aigrid-scheduler --test suite treasury_sim::`.

use aigrid_api::{Credits, Timestamp};
use aigrid_consensus::state_machine::StateMachine;
use aigrid_consensus::testkit::{seeds, with_seed, SimConfig, Simulation};
use aigrid_scheduler::state::{ClusterState, Command};
use rand::Rng;
use serde_json::json;

/// Start of the simulated day.
const DAY_START: u64 = 1_800_000_000_000 / 3_600_000 * 3_600_000;
/// Simulated time per step: the faults run 1 600 steps, a little over a day.
const STEP_MS: u64 = 60_000;
const HOUR: u64 = 3_600_000;

fn node(id: &str, farmer: &str, gpu_price: &str) -> Command {
    serde_json::from_value(json!({
        "type": "register_node",
        "node": {
            "id": id, "name": id,
            "resources": {"cpu_millis": 64000, "memory_mib": 262144, "disk_mib": 1,
                "gpus": (0..4).map(|i| json!({"index": i, "uuid": format!("{id}-g{i}"),
                    "vendor": "nvidia", "model": "H100", "memory_mib": 81920, "healthy": true}))
                    .collect::<Vec<_>>()},
            "offer": {"farmer": farmer,
                      "prices": {"gpu_hour": {"H100": gpu_price}, "cpu_core_hour": "0.013",
                                 "memory_gib_hour": "0.0007"}}
        },
        "at": 1
    }))
    .unwrap()
}

/// Three circles' jobs, each with instances running on both nodes.
fn day_start() -> ClusterState {
    let mut state = ClusterState::default();
    let mut index = 0;
    let mut apply = |state: &mut ClusterState, command: Command| {
        index += 1;
        state.apply(index, command).expect("setup applies");
    };
    apply(&mut state, node("n1", &"a".repeat(32), "2.5"));
    apply(&mut state, node("n2", &"b".repeat(32), "1.75"));
    for (c, circle) in ["vision", "speech", "search"].iter().enumerate() {
        let job = format!("job-{circle}");
        apply(
            &mut state,
            serde_json::from_value(json!({
                "type": "submit_job", "job_id": job, "eval_id": format!("eval-{circle}"),
                "at": 2,
                "spec": {"name": circle, "circle": circle, "groups": [{
                    "name": "g", "count": 2,
                    "resources": {"cpu_millis": 3000, "memory_mib": 8192, "gpus": {"count": 1}},
                    "task": {"driver": "exec", "command": "/bin/serve"}}]}
            }))
            .unwrap(),
        );
        let allocs: Vec<_> = ["n1", "n2"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"id": format!("{circle}-{i}"), "job_id": job, "job_version": 1,
                       "node_id": n, "group": "g", "index": i,
                       "resources": {"cpu_millis": 3000, "memory_mib": 8192, "gpus": {"count": 1}},
                       "gpus": [format!("{n}-g{c}")], "state": "pending", "desired": "run",
                       "created_at": 3, "updated_at": 3})
            })
            .collect();
        apply(
            &mut state,
            serde_json::from_value(json!({"type": "upsert_allocations", "allocations": allocs,
                                          "at": 3}))
            .unwrap(),
        );
        for (i, n) in ["n1", "n2"].iter().enumerate() {
            apply(
                &mut state,
                serde_json::from_value(json!({"type": "report_allocations", "node_id": n,
                    "reports": [{"id": format!("{circle}-{i}"), "state": "running"}], "at": 4}))
                .unwrap(),
            );
        }
    }
    state
}

/// What a leader, or a client, proposes at `step`: meters every few minutes,
/// settlements on the hour (sometimes late, sometimes twice), deposits now and
/// then. Commands proposed to a server that is not the leader, or proposed
/// late, arrive out of order: the state must cope.
fn command(rng: &mut rand::rngs::StdRng, step: u64) -> Command {
    let at = Timestamp::from_millis(DAY_START + step * STEP_MS);
    match rng.random_range(0..10) {
        0..=5 => Command::Meter { at },
        6..=7 => Command::Settle {
            at: Timestamp::from_millis(at.as_millis() / HOUR * HOUR),
            grace_ms: 2 * HOUR,
        },
        _ => {
            let circle = ["vision", "speech", "search"][rng.random_range(0..3)];
            let amount = Credits::from_micro(rng.random_range(1..40_000_000));
            Command::Deposit {
                circle: circle.to_owned(),
                amount,
                memo: format!("payment at step {step}"),
                by: None,
                at,
            }
        }
    }
}

/// Every balance is what the ledger's entries made it, and they sum to zero;
/// an acknowledged deposit is in the ledger.
fn holds(state: &ClusterState, command: &Command) -> bool {
    let accounts = state.accounts();
    if accounts.sum != Credits::ZERO {
        return false;
    }
    let replayed = accounts.balances.iter().all(|(account, balance)| {
        let page = state.ledger(account, usize::MAX);
        let sum = page.entries.iter().fold(Credits::ZERO, |sum, e| {
            if e.to == *account {
                sum.plus(e.amount)
            } else {
                sum.minus(e.amount)
            }
        });
        sum == *balance
    });
    let present = match command {
        Command::Deposit { circle, memo, .. } => state
            .ledger(&format!("circle:{circle}"), usize::MAX)
            .entries
            .iter()
            .any(|e| e.memo == *memo),
        _ => true,
    };
    replayed && present
}

#[test]
fn a_simulated_day_of_settlements_balances_to_zero_across_leader_changes() {
    let settled_somewhere = std::cell::Cell::new(false);
    let mut changed = 0;
    for seed in seeds(8) {
        let config = SimConfig {
            servers: 3,
            fault_ticks: 400,
            // Crashes often enough that the leader changes in nearly every run.
            crash_rate: 0.012,
            ..SimConfig::default()
        };
        let report = with_seed(seed, || {
            Simulation::new(seed, config, day_start).run(command, |state, command| {
                let paid = state
                    .accounts()
                    .balances
                    .keys()
                    .any(|a| a.starts_with("farmer:"));
                settled_somewhere.set(settled_somewhere.get() || paid);
                holds(state, command)
            })
        })
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        eprintln!(
            "seed {seed}: {} terms with a leader, {} crashes",
            report.terms_with_leader, report.crashes
        );
        changed += usize::from(report.terms_with_leader >= 2);
    }
    assert!(
        changed >= 6,
        "the leader changed in only {changed} of 8 runs"
    );
    assert!(settled_somewhere.get(), "no run ever paid a farmer");
}
