//! The Human Chain as commands apply: guarded changes only through proposals, the
//! matrix of refused decisions that need the state (expiry, stale bases, frozen
//! weights, circle versions), old-and-new quorum for governance changes, and the
//! audit log every replica builds alike.

use aigrid_api::{
    ChangeKind, CirclePolicy, Decision, Governance, IdentityKey, KeyAlgorithm, PolicyMember,
    ProposalInfo, ProposalState, Role,
};
use aigrid_consensus::human::sign_decision;

use super::*;

const ROOT: &str = aigrid_api::chain::ROOT_CIRCLE;

pub(super) fn person(seed: u8) -> IdentityKey {
    IdentityKey::from_seed(KeyAlgorithm::Ed25519, [seed; 32])
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn member(k: &IdentityKey, weight: u32) -> PolicyMember {
    PolicyMember {
        identity: k.id(),
        weight,
        role: Role::Owner,
    }
}

/// A cluster with an admin and the identities of `people`, and circle `lab`
/// governed by them (weight 1 each) with `threshold`.
pub(super) fn governed(people: &[&IdentityKey], threshold: u32) -> Log {
    let mut log = Log::new();
    log.apply(Command::InitCluster {
        cluster_id: "c1".into(),
        audit_seed: "ab".repeat(32),
        at: at(1),
    })
    .unwrap();
    log.apply(Command::BootstrapAdmins {
        admins: vec![("admin".into(), person(200).public())],
        at: at(1),
    })
    .unwrap();
    for (i, k) in people.iter().enumerate() {
        log.apply(Command::PutIdentity {
            name: format!("p{i}"),
            public_key: k.public(),
            admin: false,
            at: at(2),
        })
        .unwrap();
    }
    log.apply(Command::SetGovernance {
        circle: "lab".into(),
        governance: Governance {
            members: people.iter().map(|k| member(k, 1)).collect(),
            policy: CirclePolicy::new(threshold),
        },
        create: true,
        by: None,
        at: at(3),
    })
    .unwrap();
    log
}

pub(super) fn proposal(out: CommandOutput) -> ProposalInfo {
    match out {
        Ok(Applied::Proposed(p)) | Ok(Applied::Decided(p)) => p,
        other => panic!("expected a proposal, got {other:?}"),
    }
}

fn propose_job(log: &mut Log, id: &str, name: &str, by: &IdentityKey, t: u64) -> ProposalInfo {
    let mut spec = spec(name);
    spec.circle = Some("lab".into());
    spec.groups[0].task = serde_json::from_value(json!({
        "driver": "exec", "command": "/bin/server", "env": {"TOKEN": "hunter2"}
    }))
    .unwrap();
    let command = submit(&format!("job-{id}"), &format!("eval-{id}"), spec);
    proposal(log.apply(Command::Propose {
        id: id.into(),
        command: Box::new(command),
        by: by.id(),
        at: at(t),
    }))
}

pub(super) fn decide(
    log: &mut Log,
    p: &ProposalInfo,
    k: &IdentityKey,
    d: Decision,
    t: u64,
) -> CommandOutput {
    let digest: [u8; 32] = hex::decode(&p.digest).unwrap().try_into().unwrap();
    log.apply(Command::Decide {
        proposal: p.id.clone(),
        by: k.id(),
        signed: sign_decision(k, &digest, d),
        at: at(t),
    })
}

/// Changes `lab`'s governance through a proposal that `signers` approve.
fn regovern(
    log: &mut Log,
    signers: &[&IdentityKey],
    id: &str,
    t: u64,
    change: impl FnOnce(&mut Governance),
) -> ProposalInfo {
    let mut gov = log.state.governance("lab").unwrap().governance;
    change(&mut gov);
    let mut p = proposal(log.apply(Command::Propose {
        id: id.into(),
        command: Box::new(Command::SetGovernance {
            circle: "lab".into(),
            governance: gov,
            create: false,
            by: Some(signers[0].id()),
            at: at(t),
        }),
        by: signers[0].id(),
        at: at(t),
    }));
    for k in signers {
        p = proposal(decide(log, &p, k, Decision::Approve, t));
    }
    assert_eq!(p.state, ProposalState::Applied, "{p:?}");
    p
}

/// How many members `lab` has now.
fn members(log: &Log) -> usize {
    let lab = log.state.governance("lab").unwrap();
    lab.governance.members.len()
}

fn code(out: CommandOutput) -> ErrorCode {
    out.expect_err("refused").code()
}

#[test]
fn a_guarded_change_applies_only_once_its_quorum_approves() {
    let (a, b, c) = (person(1), person(2), person(3));
    let mut log = governed(&[&a, &b, &c], 2);
    // Sent directly, a job of the governed circle is refused and nothing changes.
    let mut direct = spec("web");
    direct.circle = Some("lab".into());
    assert_eq!(
        code(log.apply(submit("j0", "e0", direct))),
        ErrorCode::Guarded
    );
    assert!(log.state.job_by_name("web").is_none());

    let p = propose_job(&mut log, "p1", "web", &a, 10);
    assert_eq!(p.state, ProposalState::Pending);
    assert_eq!(p.threshold, 2);
    assert_eq!(p.signers.len(), 3);
    // The shown payload commits to the secret without showing it.
    let shown = p.payload.to_string();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("<secret sha256:"), "{shown}");

    // The proposer alone in a 2-of-3 circle: still pending, nothing runs.
    let p = proposal(decide(&mut log, &p, &a, Decision::Approve, 11));
    assert_eq!(p.state, ProposalState::Pending);
    assert_eq!(p.approved_weight, 1);
    assert!(log.state.job_by_name("web").is_none());
    // The same approval again (a replay, as Raft may re-propose it) counts once;
    // another decision by the same identity is refused.
    let again = proposal(decide(&mut log, &p, &a, Decision::Approve, 12));
    assert_eq!(again.approved_weight, 1);
    assert_eq!(again.decisions.len(), 1);
    assert_eq!(
        code(decide(&mut log, &p, &a, Decision::Reject, 12)),
        ErrorCode::AlreadyDecided
    );
    // A stranger.
    assert_eq!(
        code(decide(&mut log, &p, &person(9), Decision::Approve, 12)),
        ErrorCode::NotASigner
    );

    // The second member: it applies, with the secret it carried.
    let p = proposal(decide(&mut log, &p, &b, Decision::Approve, 13));
    assert_eq!(p.state, ProposalState::Applied);
    let job = log.state.job_by_name("web").expect("applied");
    let env = &job.spec.groups[0].task;
    assert!(format!("{env:?}").contains("hunter2"));
    // Applied once: a third approval finds it closed.
    assert_eq!(
        code(decide(&mut log, &p, &c, Decision::Approve, 14)),
        ErrorCode::ProposalClosed
    );
}

#[test]
fn expired_stale_and_vetoed_proposals_are_refused_distinctly() {
    let (a, b, c) = (person(1), person(2), person(3));
    let mut log = governed(&[&a, &b, &c], 2);

    // Expired: past its window (7 days by default).
    let p = propose_job(&mut log, "p1", "web", &a, 10);
    let late = p.expires_at.as_millis() + 1;
    assert_eq!(
        code(decide(&mut log, &p, &b, Decision::Approve, late)),
        ErrorCode::ProposalExpired
    );
    assert!(log.state.proposals_due(at(late)));
    log.apply(Command::SettleProposals { at: at(late) })
        .unwrap();
    assert_eq!(
        log.state.proposal("p1").unwrap().state,
        ProposalState::Expired
    );

    // Stale: two proposals for the same job; the first applied makes the second stale.
    let p2 = propose_job(&mut log, "p2", "api", &a, 20);
    let p3 = propose_job(&mut log, "p3", "api", &b, 21);
    decide(&mut log, &p2, &a, Decision::Approve, 22).unwrap();
    assert_eq!(
        proposal(decide(&mut log, &p2, &b, Decision::Approve, 23)).state,
        ProposalState::Applied
    );
    decide(&mut log, &p3, &a, Decision::Approve, 24).unwrap();
    let p3 = proposal(decide(&mut log, &p3, &c, Decision::Approve, 25));
    assert_eq!(p3.state, ProposalState::Stale, "{p3:?}");
    assert_eq!(
        code(decide(&mut log, &p3, &b, Decision::Approve, 26)),
        ErrorCode::ProposalStale
    );

    // Vetoed: only from the veto set.
    regovern(&mut log, &[&a, &b], "g1", 30, |g| {
        g.policy.veto = vec![c.id()]
    });
    let p4 = propose_job(&mut log, "p4", "db", &a, 31);
    assert_eq!(
        code(decide(&mut log, &p4, &b, Decision::Veto, 32)),
        ErrorCode::NotAVetoer
    );
    assert_eq!(
        proposal(decide(&mut log, &p4, &c, Decision::Veto, 33)).state,
        ProposalState::Vetoed
    );
    assert_eq!(
        code(decide(&mut log, &p4, &b, Decision::Approve, 34)),
        ErrorCode::ProposalVetoed
    );
    assert!(log.state.job_by_name("db").is_none());
}

#[test]
fn weights_and_signers_are_frozen_and_approvals_do_not_carry_over_versions() {
    let (a, b, c) = (person(1), person(2), person(3));
    let mut log = governed(&[&a, &b, &c], 2);
    let p = propose_job(&mut log, "p1", "web", &a, 10);
    // The circle changes under the proposal: c leaves, 2 of 2.
    regovern(&mut log, &[&a, &b], "g1", 11, |g| {
        g.members.retain(|m| m.identity != c.id())
    });
    assert_eq!(log.state.governance("lab").unwrap().version, 2);
    // c is still a signer of p1, with the weight it had.
    decide(&mut log, &p, &a, Decision::Approve, 12).unwrap();
    // An approval of p1 replayed onto a proposal made under version 2 is refused.
    let digest: [u8; 32] = hex::decode(&p.digest).unwrap().try_into().unwrap();
    let p2 = propose_job(&mut log, "p2", "api", &a, 14);
    assert_ne!(p2.digest, p.digest);
    let replayed = log.apply(Command::Decide {
        proposal: "p2".into(),
        by: b.id(),
        signed: sign_decision(&b, &digest, Decision::Approve),
        at: at(15),
    });
    assert_eq!(code(replayed), ErrorCode::DigestMismatch);
    assert_eq!(
        proposal(decide(&mut log, &p, &c, Decision::Approve, 16)).state,
        ProposalState::Applied
    );
}

#[test]
fn changing_members_needs_the_old_and_the_new_quorum() {
    let (a, b, c) = (person(1), person(2), person(3));
    let mut log = governed(&[&a, &b], 2);
    log.apply(Command::PutIdentity {
        name: "c".into(),
        public_key: c.public(),
        admin: false,
        at: at(4),
    })
    .unwrap();
    // Add c and lower nothing: 2 of 3.
    let mut gov = log.state.governance("lab").unwrap().governance;
    gov.members.push(member(&c, 1));
    let direct = Command::SetGovernance {
        circle: "lab".into(),
        governance: gov.clone(),
        create: false,
        by: Some(a.id()),
        at: at(10),
    };
    assert_eq!(code(log.apply(direct.clone())), ErrorCode::Guarded);
    let p = proposal(log.apply(Command::Propose {
        id: "g1".into(),
        command: Box::new(direct),
        by: a.id(),
        at: at(10),
    }));
    assert_eq!(p.kind, ChangeKind::CircleMembers);
    assert_eq!(p.new_threshold, Some(2));
    // The new member and one old member: the new quorum (2 of 3) but not the old (2 of 2).
    decide(&mut log, &p, &c, Decision::Approve, 11).unwrap();
    let p = proposal(decide(&mut log, &p, &a, Decision::Approve, 12));
    assert_eq!(p.state, ProposalState::Pending);
    assert_eq!(members(&log), 2);
    let p = proposal(decide(&mut log, &p, &b, Decision::Approve, 13));
    assert_eq!(p.state, ProposalState::Applied);
    assert_eq!(members(&log), 3);
    assert_eq!(log.state.role_in(&c.id(), "lab"), Some(Role::Owner));

    // Lowering the threshold to one member's weight is refused outright (rule 3).
    let mut weak = log.state.governance("lab").unwrap().governance;
    weak.policy.threshold = 1;
    let out = log.apply(Command::Propose {
        id: "g2".into(),
        command: Box::new(Command::SetGovernance {
            circle: "lab".into(),
            governance: weak,
            create: false,
            by: Some(a.id()),
            at: at(20),
        }),
        by: a.id(),
        at: at(20),
    });
    assert_eq!(code(out), ErrorCode::InvalidField);
    // A governing member cannot be removed from under the circle.
    assert_eq!(
        code(log.apply(Command::RemoveIdentity {
            id: c.id(),
            at: at(21)
        })),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(log.apply(Command::SetCircleMember {
            circle: "lab".into(),
            identity: c.id(),
            role: None,
            at: at(21),
        })),
        ErrorCode::Conflict
    );
}

#[test]
fn the_minimum_window_holds_an_approved_change_until_it_passes() {
    let (a, b) = (person(1), person(2));
    let mut log = governed(&[&a, &b], 2);
    regovern(&mut log, &[&a, &b], "g1", 5, |g| {
        g.policy.min_window_secs = 60
    });
    let p = propose_job(&mut log, "p1", "web", &a, 1_000);
    decide(&mut log, &p, &a, Decision::Approve, 2_000).unwrap();
    let p = proposal(decide(&mut log, &p, &b, Decision::Approve, 3_000));
    assert_eq!(p.state, ProposalState::Approved);
    assert!(log.state.job_by_name("web").is_none());
    assert!(!log.state.proposals_due(at(60_999)));
    assert!(log.state.proposals_due(at(61_000)));
    log.apply(Command::SettleProposals { at: at(61_000) })
        .unwrap();
    assert_eq!(
        log.state.proposal("p1").unwrap().state,
        ProposalState::Applied
    );
    assert!(log.state.job_by_name("web").is_some());
}

#[test]
fn the_audit_log_records_changes_and_events_alike_on_every_replica() {
    let (a, b) = (person(1), person(2));
    let mut log = governed(&[&a, &b], 2);
    let p = propose_job(&mut log, "p1", "web", &a, 10);
    decide(&mut log, &p, &a, Decision::Approve, 11).unwrap();
    decide(&mut log, &p, &b, Decision::Approve, 12).unwrap();
    let audit = log.state.audit_log();
    let events: Vec<serde_json::Value> = audit
        .leaves()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"decision"), "{kinds:?}");
    assert!(kinds.contains(&"proposal_applied"), "{kinds:?}");
    assert!(kinds.contains(&"change"), "{kinds:?}");
    // No secret reaches the log.
    assert!(audit.leaves().iter().all(|l| !l.contains("hunter2")));
    // A snapshot restores the same log and root.
    let mut other = ClusterState::default();
    other.restore(&log.bytes()).unwrap();
    assert_eq!(other.audit_log().root(), audit.root());
    assert_eq!(other.audit_log().len(), audit.len());
}

/// A circle's models: registering and deleting them is guarded like its jobs, the
/// payload shows the model by its digest, and a circle requiring hybrid manifests
/// refuses an ed25519-only one even once its quorum approved it.
#[test]
fn a_circles_models_are_registered_through_its_quorum_and_hybrid_when_it_says() {
    let (a, b, c) = (person(1), person(2), person(3));
    let mut log = governed(&[&a, &b, &c], 2);
    let mut registration = crate::testkit::model_registration("vision", 4, 2);
    registration.circle = Some("lab".into());
    let register = |r: &aigrid_api::manifest::Registration| Command::RegisterModel {
        registration: r.clone(),
        at: at(10),
    };
    // Directly: guarded.
    assert_eq!(code(log.apply(register(&registration))), ErrorCode::Guarded);
    // Proposed: applies on the second approval; the payload names the digest.
    let digest = registration.manifest.manifest.digest().to_string();
    let p = proposal(log.apply(Command::Propose {
        id: "m1".into(),
        command: Box::new(register(&registration)),
        by: a.id(),
        at: at(10),
    }));
    assert_eq!(p.kind, ChangeKind::ModelRegister);
    assert_eq!(p.payload["registration"]["digest"], digest.as_str());
    assert!(p.payload["registration"].get("manifest").is_none());
    // Everything else shows as the command serialises.
    let mut whole = serde_json::to_value(register(&registration)).unwrap();
    whole["registration"] = p.payload["registration"].clone();
    assert_eq!(p.payload, whole);
    assert!(log.state.models(None).is_empty());
    decide(&mut log, &p, &a, Decision::Approve, 11).unwrap();
    let done = proposal(decide(&mut log, &p, &b, Decision::Approve, 12));
    assert_eq!(done.state, ProposalState::Applied);
    let models = log.state.models(None);
    assert_eq!(models[0].circle.as_deref(), Some("lab"));
    assert_eq!(models[0].signature, "ed25519");
    // Deleting it is guarded too.
    let delete = Command::DeleteModel {
        digest: digest.clone(),
        at: at(13),
    };
    assert_eq!(code(log.apply(delete)), ErrorCode::Guarded);

    // Once the circle requires hybrid manifests, an ed25519-only one is refused
    // as it applies, whatever the quorum said; a hybrid one registers.
    regovern(&mut log, &[&a, &b], "g1", 14, |g| {
        g.policy.require_hybrid_manifests = true;
        g.policy.guarded.remove(&ChangeKind::ModelRegister);
    });
    let mut plain = crate::testkit::model_registration("other", 5, 1);
    plain.circle = Some("lab".into());
    assert_eq!(
        code(log.apply(register(&plain))),
        ErrorCode::SignatureInvalid
    );
    let mut hybrid = plain.clone();
    hybrid.manifest = aigrid_api::manifest::SignedManifest::sign_hybrid(
        plain.manifest.manifest.clone(),
        &crate::testkit::publisher(5),
    );
    log.apply(register(&hybrid)).unwrap();
    assert!(log
        .state
        .models(None)
        .iter()
        .any(|m| m.name == "other" && m.signature == "ed25519+ml-dsa-65"));
}

/// Server changes are granted by a command before they are made: directly while the
/// root circle has one member, through the root's quorum once it has more; a grant
/// is used up once.
#[test]
fn server_changes_need_a_grant_that_the_root_quorum_approves() {
    let (a, b) = (person(1), person(2));
    let mut log = Log::new();
    log.apply(Command::InitCluster {
        cluster_id: "c1".into(),
        audit_seed: "ab".repeat(32),
        at: at(1),
    })
    .unwrap();
    log.apply(Command::BootstrapAdmins {
        admins: vec![("a".into(), a.public()), ("b".into(), b.public())],
        at: at(1),
    })
    .unwrap();
    let root = log.state.governance(ROOT).unwrap();
    assert_eq!(root.governance.members.len(), 2);
    assert_eq!(root.governance.policy.threshold, 2);
    let grant = |id| Command::GrantMembership {
        change: crate::state::ServerChange::Remove { id },
        by: Some(a.id()),
        at: at(2),
    };
    // Two admins: the root guards it, so only a proposal grants it.
    assert_eq!(code(log.apply(grant(3))), ErrorCode::Guarded);
    let p = proposal(log.apply(Command::Propose {
        id: "s3".into(),
        command: Box::new(grant(3)),
        by: a.id(),
        at: at(2),
    }));
    assert_eq!(
        (p.kind, p.circle.as_str()),
        (ChangeKind::ClusterMembership, ROOT)
    );
    decide(&mut log, &p, &a, Decision::Approve, 3).unwrap();
    assert!(log.state.membership_grant(3).is_none());
    decide(&mut log, &p, &b, Decision::Approve, 4).unwrap();
    assert_eq!(
        log.state.membership_grant(3),
        Some(&crate::state::ServerChange::Remove { id: 3 })
    );
    let used = |log: &mut Log| log.apply(Command::UseMembershipGrant { id: 3, at: at(5) });
    assert_eq!(used(&mut log), Ok(Applied::MembershipGrantUsed(true)));
    assert_eq!(used(&mut log), Ok(Applied::MembershipGrantUsed(false)));
    let audit = log.state.audit_log().leaves().join("\n");
    assert!(audit.contains("server:3"), "{audit}");
}

#[test]
fn promoting_a_rollout_is_a_change_the_circle_guards_and_pausing_is_not() {
    let (a, b, c) = (person(1), person(2), person(3));
    let mut log = governed(&[&a, &b, &c], 2);
    let p = propose_job(&mut log, "p1", "web", &a, 10);
    decide(&mut log, &p, &a, Decision::Approve, 11).unwrap();
    decide(&mut log, &p, &b, Decision::Approve, 12).unwrap();
    let job = log.state.job_by_name("web").expect("applied").id;
    let steer = |action: aigrid_api::DeploymentAction| Command::SteerDeployment {
        job_id: job.clone(),
        version: 1,
        action,
        eval_id: EvalId::new(format!("steer-{action}")),
        at: at(20),
        by: Some(a.id()),
    };
    let promote = steer(aigrid_api::DeploymentAction::Promote);
    let change = log.state.guarded_change(&promote).expect("guarded");
    assert_eq!(change.kind, ChangeKind::RolloutPromote);
    assert_eq!(change.target, "job:web");
    assert_eq!(code(log.apply(promote)), ErrorCode::Guarded);
    for action in [
        aigrid_api::DeploymentAction::Pause,
        aigrid_api::DeploymentAction::Resume,
        aigrid_api::DeploymentAction::Abort,
    ] {
        assert!(
            log.state.guarded_change(&steer(action)).is_none(),
            "{action}"
        );
    }
}
