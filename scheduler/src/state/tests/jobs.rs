//! Jobs and their evaluations: submit, resubmit, delete, verdicts, history, reads.

use aigrid_api::TaskSpec;

use super::*;

#[test]
fn submit_creates_a_job_and_an_evaluation() {
    let mut log = Log::new();
    let r = submitted(log.apply(submit("j1", "e1", spec("api"))));
    assert_eq!(
        r,
        SubmitJobResponse {
            id: JobId::new("j1"),
            version: 1,
            eval_id: EvalId::new("e1"),
            created: true
        }
    );
    let job = log.state.job(&JobId::new("j1")).unwrap();
    assert_eq!((job.version, job.status), (1, JobStatus::Pending));
    assert_eq!(job.submitted_at, Timestamp::new(100));
    let eval = log.state.evaluation(&EvalId::new("e1")).unwrap();
    assert_eq!(eval.trigger, EvalTrigger::JobSubmit);
    assert_eq!(eval.status, EvalStatus::Pending);
    assert_eq!(log.state.evaluations(EvalStatus::Pending), vec![eval]);
}

#[test]
fn a_replayed_submission_answers_the_same_and_changes_nothing() {
    let mut log = Log::new();
    let first = log.apply(submit("j1", "e1", spec("api")));
    let before = log.bytes();
    assert_eq!(log.apply(submit("j1", "e1", spec("api"))), first);
    assert_eq!(log.bytes(), before);

    let mut changed = spec("api");
    changed.priority = 70;
    let update = submit("j2", "e2", changed);
    let second = log.apply(update.clone());
    let before = log.bytes();
    assert_eq!(log.apply(update), second);
    assert_eq!(log.bytes(), before);
    assert_eq!(log.state.job(&JobId::new("j1")).unwrap().version, 2);
}

#[test]
fn resubmitting_by_name_updates_in_place() {
    let mut log = Log::new();
    log.apply(submit("j1", "e1", spec("api"))).unwrap();
    let mut changed = spec("api");
    changed.groups[0].count = 5;
    let r = submitted(log.apply(submit("ignored", "e2", changed.clone())));
    assert_eq!(
        r,
        SubmitJobResponse {
            id: JobId::new("j1"),
            version: 2,
            eval_id: EvalId::new("e2"),
            created: false
        }
    );
    assert!(log.state.job(&JobId::new("ignored")).is_none());
    let job = log.state.job_by_name("api").unwrap();
    assert_eq!((job.id.as_str(), job.version), ("j1", 2));
    assert_eq!(job.spec, changed);
    let eval = log.state.evaluation(&EvalId::new("e2")).unwrap();
    assert_eq!(
        (eval.trigger, eval.job_version),
        (EvalTrigger::JobUpdate, 2)
    );
    assert_eq!(log.state.jobs().len(), 1);
}

#[test]
fn resubmitting_an_unchanged_spec_is_a_no_op() {
    let mut log = Log::new();
    log.apply(submit("j1", "e1", spec("api"))).unwrap();
    let before = log.bytes();
    let r = submitted(log.apply(submit("j9", "e9", spec("api"))));
    assert_eq!(
        (r.id.as_str(), r.version, r.eval_id.as_str()),
        ("j1", 1, "e1")
    );
    assert!(!r.created);
    assert_eq!(log.bytes(), before);
}

#[test]
fn reused_ids_are_conflicts() {
    let mut log = Log::new();
    log.apply(submit("j1", "e1", spec("api"))).unwrap();
    let before = log.bytes();
    let err = log.apply(submit("j1", "e2", spec("other"))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict);
    let err = log.apply(submit("j2", "e1", spec("other"))).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict);
    let err = log.apply(delete("j1", "e1")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict);
    assert_eq!(log.bytes(), before);
}

#[test]
fn an_invalid_spec_is_rejected_and_changes_nothing() {
    let mut log = with_job_and_node();
    let before = log.bytes();
    let mut bad = spec("api");
    bad.groups[0].resources.cpu_millis = 0.into();
    let err = log.apply(submit("j2", "e2", bad)).unwrap_err();
    match &err {
        StateError::Invalid(v) => assert_eq!(v.field, "groups[0].resources.cpu_millis"),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), ErrorCode::InvalidField);
    let mut bad = spec("api");
    bad.priority = 101;
    assert!(log.apply(submit("j3", "e3", bad)).is_err());
    assert_eq!(log.bytes(), before);
}

#[test]
fn delete_stops_allocations_and_forgets_the_job() {
    let mut log = with_job_and_node();
    log.apply(upsert(vec![
        alloc("a0", "j1", "n1", 0, &["g0"]),
        alloc("a1", "j1", "n1", 1, &[]),
    ]))
    .unwrap();
    log.apply(report(
        "n1",
        &[("a0", AllocState::Running), ("a1", AllocState::Failed)],
    ))
    .unwrap();

    let out = log.apply(delete("j1", "d1"));
    assert_eq!(
        out,
        Ok(Applied::JobDeleted(DeleteJobResponse {
            id: JobId::new("j1"),
            eval_id: EvalId::new("d1")
        }))
    );
    assert!(log.state.job(&JobId::new("j1")).is_none());
    assert!(log.state.job_by_name("api").is_none());
    let a0 = log.state.allocation(&AllocId::new("a0")).unwrap();
    assert_eq!(a0.desired, DesiredState::Stop);
    assert!(
        log.state.allocation(&AllocId::new("a1")).is_none(),
        "finished allocation kept"
    );
    let eval = log.state.evaluation(&EvalId::new("d1")).unwrap();
    assert_eq!(eval.trigger, EvalTrigger::JobDelete);

    let before = log.bytes();
    assert_eq!(log.apply(delete("j1", "d1")), out, "replay");
    assert_eq!(log.bytes(), before);
    let err = log.apply(delete("j1", "d2")).unwrap_err();
    assert_eq!(
        err,
        StateError::NotFound {
            kind: ObjectKind::Job,
            id: "j1".into()
        }
    );
    assert_eq!(err.to_string(), "job `j1` not found");

    log.apply(report("n1", &[("a0", AllocState::Stopped)]))
        .unwrap();
    assert!(log.state.allocation(&AllocId::new("a0")).is_none());
    assert_eq!(log.state.counts().allocations, 0);

    let again = submitted(log.apply(submit("j2", "e2", spec("api"))));
    assert!(again.created, "a deleted name can be reused");
    assert_eq!((again.id.as_str(), again.version), ("j2", 1));
}

#[test]
fn batch_status_follows_its_instances() {
    let mut log = Log::new();
    log.apply(register("n1", &[])).unwrap();
    let mut batch = spec("train");
    batch.kind = JobKind::Batch;
    log.apply(submit("j1", "e1", batch)).unwrap();
    log.apply(upsert(vec![
        alloc("a0", "j1", "n1", 0, &[]),
        alloc("a1", "j1", "n1", 1, &[]),
    ]))
    .unwrap();
    let status = |log: &Log| log.state.job(&JobId::new("j1")).unwrap().status;
    assert_eq!(status(&log), JobStatus::Pending);
    log.apply(report("n1", &[("a0", AllocState::Complete)]))
        .unwrap();
    assert_eq!(status(&log), JobStatus::Running);
    log.apply(report("n1", &[("a1", AllocState::Complete)]))
        .unwrap();
    assert_eq!(status(&log), JobStatus::Complete);
    let summary = &log.state.jobs()[0];
    assert_eq!(
        (summary.status, summary.instances, summary.running),
        (JobStatus::Complete, 2, 0)
    );
}

#[test]
fn evaluation_verdicts_reach_the_job_view() {
    let mut log = with_job_and_node();
    let unplaced = vec![Unplaced {
        group: "web".into(),
        count: 2,
        reason: "no node with 2 free H100".into(),
    }];
    let out = log.apply(Command::UpdateEvaluation {
        eval_id: EvalId::new("e1"),
        status: EvalStatus::Blocked,
        unplaced: unplaced.clone(),
        at: Timestamp::new(700),
    });
    assert_eq!(
        out,
        Ok(Applied::EvaluationUpdated {
            id: EvalId::new("e1")
        })
    );
    assert_eq!(log.state.job(&JobId::new("j1")).unwrap().unplaced, unplaced);
    assert_eq!(log.state.counts().evaluations_blocked, 1);
    let err = log
        .apply(Command::UpdateEvaluation {
            eval_id: EvalId::new("nope"),
            status: EvalStatus::Complete,
            unplaced: vec![],
            at: Timestamp::new(1),
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
}

#[test]
fn batched_verdicts_skip_forgotten_evaluations() {
    let mut log = with_job_and_node();
    let out = log.apply(Command::UpdateEvaluations {
        updates: vec![
            EvaluationUpdate {
                eval_id: EvalId::new("forgotten"),
                status: EvalStatus::Complete,
                unplaced: vec![],
            },
            EvaluationUpdate {
                eval_id: EvalId::new("e1"),
                status: EvalStatus::Complete,
                unplaced: vec![],
            },
        ],
        at: Timestamp::new(800),
    });
    assert_eq!(out, Ok(Applied::EvaluationsUpdated { updated: 1 }));
    let eval = log.state.evaluation(&EvalId::new("e1")).unwrap();
    assert_eq!(eval.status, EvalStatus::Complete);
    assert_eq!(eval.updated_at, Timestamp::new(800));
    assert_eq!(log.state.counts().evaluations_pending, 0);
}

#[test]
fn evaluation_history_is_bounded_completed_first() {
    let mut log = Log::with(ClusterState::with_eval_limit(3));
    for i in 0..3 {
        log.apply(submit(
            &format!("j{i}"),
            &format!("e{i}"),
            spec(&format!("job{i}")),
        ))
        .unwrap();
    }
    log.apply(Command::UpdateEvaluation {
        eval_id: EvalId::new("e1"),
        status: EvalStatus::Complete,
        unplaced: vec![],
        at: Timestamp::new(1),
    })
    .unwrap();
    log.apply(submit("j3", "e3", spec("job3"))).unwrap();
    let kept: Vec<_> = log
        .state
        .evaluations(EvalStatus::Pending)
        .into_iter()
        .map(|e| e.id.0)
        .collect();
    assert_eq!(kept, ["e0", "e2", "e3"], "the completed one goes first");
    log.apply(submit("j4", "e4", spec("job4"))).unwrap();
    let kept: Vec<_> = log
        .state
        .evaluations(EvalStatus::Pending)
        .into_iter()
        .map(|e| e.id.0)
        .collect();
    assert_eq!(kept, ["e2", "e3", "e4"], "then the oldest");
    assert_eq!(log.state.counts().evaluations, 3);
}

#[test]
fn reads_list_jobs_by_name_and_count_objects() {
    let mut log = with_job_and_node();
    log.apply(submit("j0", "e0", spec("zeta"))).unwrap();
    log.apply(submit("j2", "e2", spec("alpha"))).unwrap();
    let names: Vec<_> = log.state.jobs().into_iter().map(|j| j.name).collect();
    assert_eq!(names, ["alpha", "api", "zeta"]);
    log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &[])]))
        .unwrap();
    assert_eq!(log.state.node_allocations(&NodeId::new("n1")).len(), 1);
    assert_eq!(
        log.state.counts(),
        StateCounts {
            jobs: 3,
            nodes: 1,
            nodes_ready: 1,
            allocations: 1,
            allocations_live: 1,
            evaluations: 3,
            evaluations_pending: 3,
            evaluations_blocked: 0,
            models: 0,
        }
    );
}

fn identity(seed: u8) -> aigrid_api::PublicKey {
    aigrid_api::IdentityKey::from_seed(aigrid_api::KeyAlgorithm::Ed25519, [seed; 32]).public()
}

/// A submission by `by`, as the edge proposes it.
fn submit_by(job: &str, eval: &str, spec: JobSpec, by: &aigrid_api::PublicKey) -> Command {
    let Command::SubmitJob {
        job_id,
        eval_id,
        spec,
        at,
        ..
    } = submit(job, eval, spec)
    else {
        unreachable!()
    };
    Command::SubmitJob {
        job_id,
        eval_id,
        spec,
        at,
        by: Some(by.id()),
    }
}

fn in_circle(name: &str, circle: &str) -> JobSpec {
    let mut s = spec(name);
    s.circle = Some(circle.to_owned());
    s
}

/// A log with an admin, and `operator` an operator of circle `lab` only.
fn log_with_operator(operator: &aigrid_api::PublicKey) -> Log {
    let mut log = Log::new();
    let admin = identity(1);
    log.apply(Command::BootstrapAdmins {
        admins: vec![("root".into(), admin)],
        at: Timestamp::new(1),
    })
    .unwrap();
    log.apply(Command::PutIdentity {
        name: "olga".into(),
        public_key: operator.clone(),
        admin: false,
        at: Timestamp::new(2),
    })
    .unwrap();
    log.apply(Command::SetCircleMember {
        circle: "lab".into(),
        identity: operator.id(),
        role: Some(aigrid_api::Role::Operator),
        at: Timestamp::new(3),
    })
    .unwrap();
    log
}

#[test]
fn an_operator_cannot_take_over_another_circles_job_by_its_name() {
    let olga = identity(2);
    let mut log = log_with_operator(&olga);
    // The admins' job in circle `other`, then olga's submission of a job of the same
    // name into her own circle: it would move the job, so `other` must agree.
    submitted(log.apply(submit("j1", "e1", in_circle("api", "other"))));
    let before = log.bytes();
    let refused = log.apply(submit_by("j2", "e2", in_circle("api", "lab"), &olga));
    let Err(StateError::Forbidden(message)) = &refused else {
        panic!("{refused:?}")
    };
    assert!(message.contains("circle `other`"), "{message}");
    assert_eq!(refused.unwrap_err().code(), ErrorCode::Forbidden);
    assert_eq!(
        log.bytes(),
        before,
        "a refused submission changed the state"
    );
    // Her own circle's jobs she submits and updates; a circle she is not in she
    // cannot even create a job in, whatever the edge thought.
    assert!(submitted(log.apply(submit_by("j3", "e3", in_circle("web", "lab"), &olga))).created);
    let mut update = in_circle("web", "lab");
    update.priority = 70;
    assert_eq!(
        submitted(log.apply(submit_by("j4", "e4", update, &olga))).version,
        2
    );
    assert!(matches!(
        log.apply(submit_by("j5", "e5", in_circle("db", "ops"), &olga)),
        Err(StateError::Forbidden(_))
    ));
    // An identity the cluster does not know is refused too.
    assert!(matches!(
        log.apply(submit_by("j6", "e6", in_circle("x", "lab"), &identity(9))),
        Err(StateError::Forbidden(_))
    ));
}

fn with_env(mut s: JobSpec, env: &[(&str, &str)]) -> JobSpec {
    let TaskSpec::Exec(task) = &mut s.groups[0].task else {
        panic!("an exec task")
    };
    task.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    s
}

fn env_of(log: &Log, job: &str) -> Vec<(String, String)> {
    let job = log.state.job_by_name(job).unwrap();
    let TaskSpec::Exec(task) = &job.spec.groups[0].task else {
        panic!("an exec task")
    };
    task.env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn a_spec_read_back_redacted_and_resubmitted_keeps_its_secrets() {
    let redacted = aigrid_api::access::REDACTED;
    let mut log = Log::new();
    submitted(log.apply(submit(
        "j1",
        "e1",
        with_env(spec("api"), &[("TOKEN", "s3cret"), ("MODE", "prod")]),
    )));
    // Everything redacted, nothing else changed: a no-op.
    let same = with_env(spec("api"), &[("TOKEN", redacted), ("MODE", redacted)]);
    let r = submitted(log.apply(submit("j2", "e2", same)));
    assert_eq!((r.version, r.created), (1, false));
    // One value changed, the secret kept.
    let changed = with_env(spec("api"), &[("TOKEN", redacted), ("MODE", "dev")]);
    assert_eq!(submitted(log.apply(submit("j3", "e3", changed))).version, 2);
    assert_eq!(
        env_of(&log, "api"),
        vec![
            ("MODE".to_owned(), "dev".to_owned()),
            ("TOKEN".to_owned(), "s3cret".to_owned())
        ]
    );
    // A placeholder with nothing to keep is refused, naming the field.
    let before = log.bytes();
    let orphan = with_env(spec("api"), &[("TOKEN", redacted), ("NEW", redacted)]);
    let refused = log.apply(submit("j4", "e4", orphan));
    let Err(StateError::Invalid(e)) = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(e.field, "groups[0].task.env.NEW");
    let fresh = with_env(spec("new-job"), &[("TOKEN", redacted)]);
    assert!(matches!(
        log.apply(submit("j5", "e5", fresh)),
        Err(StateError::Invalid(_))
    ));
    assert_eq!(log.bytes(), before);
}

/// Every update keeps the version it replaces, up to `VERSIONS_KEPT` of them, newest
/// first with the running one on top; an unchanged resubmit keeps nothing; every
/// replica keeps the same (the history is part of the snapshot).
#[test]
fn updates_keep_the_versions_they_replace_up_to_a_bound() {
    let mut log = Log::new();
    let with_count = |n: u32| {
        let mut s = spec("web");
        s.groups[0].count = n;
        s
    };
    for n in 1..=13u32 {
        submitted(log.apply(submit("job-1", &format!("eval-{n}"), with_count(n))));
    }
    // An unchanged resubmit is no version.
    submitted(log.apply(submit("job-x", "eval-again", with_count(13))));
    let versions = log.state.job_versions("job-1").unwrap();
    let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, (3..=13).rev().collect::<Vec<u64>>());
    assert!(versions[0].current && versions[1..].iter().all(|v| !v.current));
    assert_eq!(versions[1].spec.groups[0].count, 12);
    assert_eq!(versions.len(), super::super::jobs::VERSIONS_KEPT + 1);
    let mut copy = ClusterState::default();
    copy.restore(&log.bytes()).unwrap();
    assert_eq!(copy.job_versions("job-1"), Some(versions));
}
