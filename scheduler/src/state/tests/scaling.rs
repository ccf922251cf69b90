//! Scaled groups: the count moves without a new version and only within
//! `min..=max`, a stale decision is dropped, a resubmitted spec keeps the count
//! reached, each change is recorded with its reason, and a scale above the
//! circle's limit applies only through its quorum.

use aigrid_api::{ChangeKind, Decision};

use super::chain::{decide, governed, person, proposal};
use super::*;

/// A scaled `model-server` service `llm` of group `web` in `circle`, starting at
/// `count`, between `min` and `max`.
fn scaled(count: u32, min: u32, max: u32, circle: Option<&str>) -> JobSpec {
    let mut served = spec_json("llm");
    served["groups"][0]["count"] = json!(count);
    served["groups"][0]["task"] = json!({"driver": "model-server", "model": "d1"});
    served["groups"][0]["scaling"] = json!({
        "min": min, "max": max, "target_concurrency": 4, "idle_to_zero": "2m"
    });
    if min > 0 {
        served["groups"][0]["scaling"]
            .as_object_mut()
            .unwrap()
            .remove("idle_to_zero");
    }
    if let Some(circle) = circle {
        served["circle"] = json!(circle);
    }
    serde_json::from_value(served).unwrap()
}

fn scale(from: Option<u32>, to: u32, eval: &str) -> Command {
    Command::ScaleGroup {
        job_id: JobId::new("j1"),
        group: "web".into(),
        from,
        to,
        reason: format!("to {to}"),
        eval_id: EvalId::new(eval),
        at: Timestamp::from_millis(500),
    }
}

fn count(log: &Log) -> u32 {
    log.state.job(&JobId::new("j1")).unwrap().spec.groups[0].count
}

#[test]
fn a_scale_moves_the_count_without_a_version_and_records_why() {
    let mut log = Log::new();
    log.apply(submit("j1", "e1", scaled(1, 0, 4, None)))
        .unwrap();
    let out = log.apply(scale(Some(1), 3, "s1")).unwrap();
    assert_eq!(
        out,
        Applied::Scaled {
            count: 3,
            changed: true
        }
    );
    let job = log.state.job(&JobId::new("j1")).unwrap();
    assert_eq!((job.version, job.spec.groups[0].count), (1, 3));
    let event = job.scale_events.last().unwrap();
    assert_eq!(
        (event.from, event.to, event.reason.as_str()),
        (1, 3, "to 3")
    );
    let eval = log.state.evaluation(&EvalId::new("s1")).unwrap();
    assert_eq!(eval.trigger, EvalTrigger::Scale);

    // A decision made on a count that has since changed is dropped.
    let out = log.apply(scale(Some(1), 2, "s2")).unwrap();
    assert_eq!(
        out,
        Applied::Scaled {
            count: 3,
            changed: false
        }
    );
    assert!(log.state.evaluation(&EvalId::new("s2")).is_none());
    // To zero, within min 0.
    log.apply(scale(Some(3), 0, "s3")).unwrap();
    assert_eq!(count(&log), 0);

    // Outside min..=max, a missing group or one without scaling: refused, nothing
    // changed.
    let before = log.bytes();
    let out = log.apply(scale(None, 5, "s4")).unwrap_err();
    assert_eq!(out.code(), ErrorCode::InvalidField, "{out}");
    assert!(out.to_string().contains("between 0 and 4"), "{out}");
    let mut bad = scale(None, 1, "s5");
    if let Command::ScaleGroup { group, .. } = &mut bad {
        *group = "nope".into();
    }
    assert_eq!(log.apply(bad).unwrap_err().code(), ErrorCode::InvalidField);
    assert_eq!(log.bytes(), before);
    log.apply(submit("j2", "e2", spec("api"))).unwrap();
    let before_fixed = log.bytes();
    let mut fixed = scale(None, 1, "s6");
    if let Command::ScaleGroup { job_id, .. } = &mut fixed {
        *job_id = JobId::new("j2");
    }
    let out = log.apply(fixed).unwrap_err();
    assert!(out.to_string().contains("no scaling block"), "{out}");
    assert_eq!(log.bytes(), before_fixed);
}

#[test]
fn a_resubmitted_spec_keeps_the_count_reached_within_its_new_bounds() {
    let mut log = Log::new();
    log.apply(submit("j1", "e1", scaled(1, 0, 4, None)))
        .unwrap();
    log.apply(scale(Some(1), 4, "s1")).unwrap();
    // The same file again (count 1) is an unchanged resubmit: no new version.
    let out = submitted(log.apply(submit("j9", "e2", scaled(1, 0, 4, None))));
    assert_eq!((out.version, out.created), (1, false));
    assert_eq!(count(&log), 4);
    // A new max keeps the count within it.
    let out = submitted(log.apply(submit("j9", "e3", scaled(1, 0, 2, None))));
    assert_eq!(out.version, 2);
    assert_eq!(count(&log), 2);
    // A new job starts at its count, raised to its min.
    let mut other = scaled(1, 2, 5, None);
    other.name = "other".into();
    log.apply(submit("j3", "e4", other)).unwrap();
    let job = log.state.job(&JobId::new("j3")).unwrap();
    assert_eq!(job.spec.groups[0].count, 2);
}

#[test]
fn a_scale_above_the_circles_limit_applies_only_through_its_quorum() {
    let (a, b) = (person(1), person(2));
    let mut log = governed(&[&a, &b], 2);
    let mut gov = log.state.governance("lab").unwrap().governance;
    gov.policy.guarded = [ChangeKind::JobScale].into();
    gov.policy.scale_limit = Some(2);
    let p = proposal(log.apply(Command::Propose {
        id: "policy".into(),
        command: Box::new(Command::SetGovernance {
            circle: "lab".into(),
            governance: gov,
            create: false,
            by: Some(a.id()),
            at: Timestamp::from_millis(10),
        }),
        by: a.id(),
        at: Timestamp::from_millis(10),
    }));
    decide(&mut log, &p, &a, Decision::Approve, 11).unwrap();
    decide(&mut log, &p, &b, Decision::Approve, 12).unwrap();
    assert_eq!(
        log.state
            .governance("lab")
            .unwrap()
            .governance
            .policy
            .scale_limit,
        Some(2)
    );
    log.apply(submit("j1", "e1", scaled(1, 0, 4, Some("lab"))))
        .unwrap();

    // Within the limit: applied directly.
    log.apply(scale(Some(1), 2, "s1")).unwrap();
    let groups = log.state.scaled_groups();
    assert_eq!((groups[0].count, groups[0].room), (2, Some(2)));
    // Above it: refused as guarded, nothing changed.
    let before = log.bytes();
    let out = log.apply(scale(Some(2), 4, "s2")).unwrap_err();
    assert!(
        matches!(
            out,
            StateError::Guarded {
                kind: ChangeKind::JobScale,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(log.bytes(), before);
    // Scaling down never needs the quorum.
    log.apply(scale(Some(2), 1, "s3")).unwrap();
    log.apply(scale(Some(1), 2, "s4")).unwrap();

    // Proposed (as the autoscaler does), it applies once both approve.
    let p = proposal(log.apply(Command::Propose {
        id: "up".into(),
        command: Box::new(scale(None, 4, "s5")),
        by: IdentityId::new("autoscaler"),
        at: Timestamp::from_millis(600),
    }));
    assert_eq!(p.kind, ChangeKind::JobScale);
    assert!(log.state.scaled_groups()[0].proposed);
    decide(&mut log, &p, &a, Decision::Approve, 601).unwrap();
    assert_eq!(count(&log), 2);
    decide(&mut log, &p, &b, Decision::Approve, 602).unwrap();
    assert_eq!(count(&log), 4);
    assert!(!log.state.scaled_groups()[0].proposed);

    // A resubmission raising the count past the limit is guarded the same way:
    // min 3 of a group at 1.
    log.apply(scale(Some(4), 1, "s6")).unwrap();
    let out = log
        .apply(submit("j9", "e9", scaled(1, 3, 4, Some("lab"))))
        .unwrap_err();
    assert!(matches!(out, StateError::Guarded { .. }), "{out:?}");
}

#[test]
fn scaled_groups_list_their_running_replicas_and_survive_a_snapshot() {
    let mut log = Log::new();
    let mut reg = registration("n1", &[]);
    reg.ports = Some(aigrid_api::PortRange {
        first: 30_000,
        last: 30_009,
    });
    log.apply(register_as(reg)).unwrap();
    log.apply(submit("j1", "e1", scaled(2, 0, 4, None)))
        .unwrap();
    log.apply(upsert(vec![
        alloc("a0", "j1", "n1", 0, &[]),
        alloc("a1", "j1", "n1", 1, &[]),
    ]))
    .unwrap();
    log.apply(report("n1", &[("a0", AllocState::Running)]))
        .unwrap();
    log.apply(scale(Some(2), 3, "s1")).unwrap();
    let groups = log.state.scaled_groups();
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    assert_eq!(
        (g.job.as_str(), g.group.as_str(), g.count),
        ("llm", "web", 3)
    );
    assert_eq!(g.digest, "d1");
    assert_eq!(g.endpoints.len(), 1, "only the running replica: {g:?}");
    assert!(g.endpoints[0].starts_with(&format!("http://{NODE_ADDRESS}:300")));

    let mut restored = ClusterState::default();
    restored.restore(&log.bytes()).unwrap();
    let job = restored.job(&JobId::new("j1")).unwrap();
    assert_eq!(job.scale_events.len(), 1);
    assert_eq!(restored.scaled_groups(), groups);
}

#[test]
fn a_scale_during_a_rollout_moves_what_the_rollout_waits_for() {
    let mut log = Log::new();
    let mut v1 = scaled(2, 0, 4, None);
    v1.groups[0].update = Some(serde_json::from_value(json!({"canary": 1})).unwrap());
    log.apply(submit("j1", "e1", v1.clone())).unwrap();
    let mut v2 = v1.clone();
    v2.groups[0].task =
        serde_json::from_value(json!({"driver": "model-server", "model": "d2"})).unwrap();
    let out = submitted(log.apply(submit("j9", "e2", v2)));
    assert_eq!(out.version, 2);
    let desired = |log: &Log| {
        log.state
            .job(&JobId::new("j1"))
            .unwrap()
            .deployment
            .map(|d| d.desired)
    };
    assert_eq!(desired(&log), Some(2));
    // The leader scales the group mid-rollout: up, then to zero; every state on
    // the way keeps the invariants (checked by `Log`), and the rollout follows.
    log.apply(scale(Some(2), 4, "s1")).unwrap();
    assert_eq!(desired(&log), Some(4));
    log.apply(scale(Some(4), 0, "s2")).unwrap();
    assert_eq!(desired(&log), Some(0));
    assert_eq!(count(&log), 0);
}
