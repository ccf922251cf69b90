//! Allocations: the checks before anything is written, GPU reuse.

use super::*;

#[test]
fn allocations_are_checked_before_anything_is_written() {
    let mut log = with_job_and_node();
    log.apply(register("n2", &[])).unwrap();
    log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
        .unwrap();
    let before = log.bytes();
    let good = alloc("a1", "j1", "n1", 1, &["g1"]);
    let cases: Vec<(Allocation, ErrorCode)> = vec![
        (alloc("a2", "nojob", "n1", 1, &[]), ErrorCode::NotFound),
        (alloc("a2", "j1", "nonode", 1, &[]), ErrorCode::NotFound),
        (alloc("a2", "j1", "n1", 2, &[]), ErrorCode::InvalidField),
        (alloc("a2", "j1", "n1", 1, &["g9"]), ErrorCode::InvalidField),
        (
            alloc("a2", "j1", "n1", 1, &["g1", "g1"]),
            ErrorCode::InvalidField,
        ),
        (alloc("a2", "j1", "n1", 1, &["g0"]), ErrorCode::Conflict),
        (alloc("a0", "j1", "n2", 0, &[]), ErrorCode::Conflict),
        (
            Allocation {
                id: AllocId::new("a2"),
                group: "db".into(),
                ..good.clone()
            },
            ErrorCode::InvalidField,
        ),
        (
            Allocation {
                id: AllocId::new("a2"),
                job_version: 2,
                ..good.clone()
            },
            ErrorCode::InvalidField,
        ),
    ];
    for (bad, code) in cases {
        let err = log
            .apply(upsert(vec![good.clone(), bad.clone()]))
            .unwrap_err();
        assert_eq!(err.code(), code, "{bad:?}: {err}");
        assert_eq!(log.bytes(), before, "{bad:?}");
    }
    let err = log
        .apply(upsert(vec![good.clone(), good.clone()]))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidField);

    log.apply(Command::SetNodeStatus {
        node_id: NodeId::new("n1"),
        status: NodeStatus::Draining,
        at: Timestamp::new(1),
    })
    .unwrap();
    let err = log.apply(upsert(vec![good.clone()])).unwrap_err();
    assert_eq!(
        err.code(),
        ErrorCode::Conflict,
        "new work on a draining node"
    );

    let mut moved = alloc("a0", "j1", "n1", 0, &["g0"]);
    moved.desired = DesiredState::Stop;
    // A wanted instance stopped without a replacement goes back in the queue.
    let out = log.apply(upsert(vec![moved])).unwrap();
    let Applied::AllocationsUpserted { count: 1, eval_ids } = out else {
        panic!("{out:?}")
    };
    let eval = log.state.evaluation(&eval_ids[0]).unwrap();
    assert_eq!(
        (eval.trigger, eval.job_id.as_str(), eval.wait_until),
        (EvalTrigger::Preemption, "j1", None)
    );
    let a0 = log.state.allocation(&AllocId::new("a0")).unwrap();
    assert_eq!(
        (a0.desired, a0.created_at),
        (DesiredState::Stop, Timestamp::new(300))
    );
}

#[test]
fn a_stopped_gpu_can_be_reused_and_reports_are_scoped_to_their_node() {
    let mut log = with_job_and_node();
    log.apply(register("n2", &[])).unwrap();
    log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
        .unwrap();
    let err = log
        .apply(report("n2", &[("a0", AllocState::Failed)]))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict);
    let out = log.apply(report(
        "n1",
        &[("a0", AllocState::Complete), ("gone", AllocState::Running)],
    ));
    assert_eq!(
        out,
        Ok(Applied::AllocationsReported {
            updated: 1,
            eval_ids: vec![]
        })
    );
    log.apply(upsert(vec![alloc("a1", "j1", "n1", 1, &["g0"])]))
        .unwrap();
    let err = log.apply(report("nope", &[])).unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
}
