//! Allocations: the checks before anything is written, GPU reuse, reported
//! endpoints.

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

#[test]
fn reported_endpoints_are_kept_checked_and_route_model_servers() {
    let mut log = Log::new();
    log.apply(register("n1", &[])).unwrap();
    let mut served = spec_json("llm");
    served["groups"][0]["task"] = json!({"driver": "model-server", "model": "d1"});
    log.apply(submit("j1", "e1", serde_json::from_value(served).unwrap()))
        .unwrap();
    log.apply(submit("j2", "e2", spec("api"))).unwrap();
    log.apply(upsert(vec![
        alloc("m0", "j1", "n1", 0, &[]),
        alloc("m1", "j1", "n1", 1, &[]),
        alloc("x0", "j2", "n1", 0, &[]),
    ]))
    .unwrap();
    assert!(log.state.model_servers().is_empty(), "pending: nowhere yet");
    let at = |id: &str, endpoint: Option<&str>| {
        let mut r = AllocationReport::new(AllocId::new(id), AllocState::Running);
        r.endpoint = endpoint.map(str::to_owned);
        r
    };
    let reports = vec![
        at("m0", Some("http://10.0.0.1:9000")),
        at("m1", None),
        at("x0", Some("http://10.0.0.1:9001")),
    ];
    let reported = |reports: Vec<AllocationReport>| Command::ReportAllocations {
        node_id: NodeId::new("n1"),
        reports,
        at: Timestamp::new(400),
    };
    log.apply(reported(reports.clone())).unwrap();
    let servers: Vec<(String, String)> = log
        .state
        .model_servers()
        .into_iter()
        .map(|(digest, a)| (digest.to_owned(), a.id.to_string()))
        .collect();
    // m1 reports no endpoint, x0 is not a model server.
    assert_eq!(servers, [("d1".to_owned(), "m0".to_owned())]);
    let x0 = log.state.allocation(&AllocId::new("x0")).unwrap();
    assert_eq!(x0.endpoint.as_deref(), Some("http://10.0.0.1:9001"));
    let hb = Heartbeat {
        gpus: vec![],
        allocations: reports,
        telemetry: None,
        logs: vec![],
    };
    assert!(
        log.state
            .heartbeat_changes(&NodeId::new("n1"), &hb)
            .is_none(),
        "the same endpoints again change nothing"
    );

    // An endpoint that is more than a host and port is refused, changing nothing.
    let before = log.bytes();
    let bad = reported(vec![at("m1", Some("http://10.0.0.1:9000/elsewhere"))]);
    let err = log.apply(bad).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidField);
    assert!(err.to_string().contains("endpoint"), "{err}");
    assert_eq!(log.bytes(), before);

    // Snapshots carry endpoints.
    let mut restored = ClusterState::default();
    restored.restore(&log.bytes()).unwrap();
    assert_eq!(
        restored.allocation(&AllocId::new("m0")).unwrap().endpoint,
        Some("http://10.0.0.1:9000".to_owned())
    );
    assert_eq!(restored.model_servers().len(), 1);
}
