//! Nodes: join tokens, keys and revocation, liveness, heartbeats, assignments,
//! drains, lost nodes and GPUs.

use super::*;

#[test]
fn join_tokens_admit_new_keys_until_they_expire_or_run_out() {
    let mut log = Log::new();
    log.apply(token("t1", "s3cret", 10, Some(2))).unwrap();
    let before = log.bytes();
    // No token, a wrong secret, an unknown token: refused, nothing changes.
    assert!(unauthorized(log.apply(join(keyed("a", 1), None, 2_000))).contains("join token"));
    assert!(
        unauthorized(log.apply(join(keyed("a", 1), Some(("t1", "guess")), 2_000)))
            .contains("does not match")
    );
    assert!(
        unauthorized(log.apply(join(keyed("a", 1), Some(("t9", "s3cret")), 2_000)))
            .contains("unknown")
    );
    assert_eq!(log.bytes(), before);

    log.apply(join(keyed("a", 1), Some(("t1", "s3cret")), 2_000))
        .unwrap();
    assert_eq!(log.state.join_tokens()[0].uses, 1);
    // A known node re-registers with its key alone, and cannot swap keys.
    log.apply(join(keyed("a", 1), None, 3_000)).unwrap();
    assert!(
        unauthorized(log.apply(join(keyed("a", 2), Some(("t1", "s3cret")), 3_000)))
            .contains("another key")
    );
    log.apply(join(keyed("b", 2), Some(("t1", "s3cret")), 3_000))
        .unwrap();
    assert!(
        unauthorized(log.apply(join(keyed("c", 3), Some(("t1", "s3cret")), 3_000)))
            .contains("used up")
    );
    log.apply(token("t2", "later", 10, None)).unwrap();
    assert!(
        unauthorized(log.apply(join(keyed("c", 3), Some(("t2", "later")), 11_000)))
            .contains("expired")
    );
    // Deleting a token leaves the nodes that joined with it.
    log.apply(Command::DeleteJoinToken {
        id: "t1".into(),
        at: Timestamp::new(4_000),
    })
    .unwrap();
    assert_eq!(log.state.join_tokens().len(), 1);
    assert!(log.state.node(&NodeId::new("a")).is_some());
    // Tokens and keys survive a snapshot.
    let mut restored = ClusterState::default();
    restored.restore(&log.bytes()).unwrap();
    assert_eq!(restored.join_tokens(), log.state.join_tokens());
    assert_eq!(
        restored.node_key(&NodeId::new("a")),
        Some((keyed("a", 1).public_key, false))
    );
}

#[test]
fn a_revoked_node_loses_its_work_and_rejoins_only_with_a_new_key() {
    let mut log = Log::new();
    log.apply(token("t1", "s", 1_000, None)).unwrap();
    log.apply(join(keyed("a", 1), Some(("t1", "s")), 2_000))
        .unwrap();
    log.apply(submit("j1", "e1", spec("api"))).unwrap();
    log.apply(upsert(vec![alloc("x", "j1", "a", 0, &["g0"])]))
        .unwrap();
    let Applied::NodeUpdated {
        status, eval_ids, ..
    } = log
        .apply(Command::RevokeNode {
            node_id: NodeId::new("a"),
            at: Timestamp::new(3_000),
        })
        .unwrap()
    else {
        panic!("not a node update");
    };
    assert_eq!(status, NodeStatus::Down);
    assert_eq!(eval_ids.len(), 1);
    assert!(log.state.node_key(&NodeId::new("a")).unwrap().1);
    assert_eq!(
        log.state.allocation(&AllocId::new("x")).unwrap().state,
        AllocState::Lost
    );
    // Its heartbeats are refused; its old key cannot come back, even with a token.
    let hb = Command::NodeHeartbeat {
        node_id: NodeId::new("a"),
        gpus: vec![],
        allocations: vec![],
        logs: Vec::new(),
        at: Timestamp::new(3_100),
    };
    assert!(unauthorized(log.apply(hb)).contains("revoked"));
    assert!(
        unauthorized(log.apply(join(keyed("a", 1), Some(("t1", "s")), 3_200))).contains("revoked")
    );
    log.apply(join(keyed("a", 7), Some(("t1", "s")), 3_300))
        .unwrap();
    let node = log.state.node(&NodeId::new("a")).unwrap();
    assert!(!node.revoked);
    assert_eq!(node.status, NodeStatus::Ready);
}

#[test]
fn batched_liveness_moves_last_seen_but_never_revives_a_down_node() {
    let mut log = Log::new();
    log.apply(register("n1", &["g0"])).unwrap();
    log.apply(register("n2", &["g1"])).unwrap();
    log.apply(Command::SetNodeStatus {
        node_id: NodeId::new("n2"),
        status: NodeStatus::Down,
        at: Timestamp::new(20),
    })
    .unwrap();
    let seen = Command::NodesSeen {
        nodes: vec![NodeId::new("n1"), NodeId::new("n2"), NodeId::new("gone")],
        at: Timestamp::new(500),
    };
    assert_eq!(log.apply(seen), Ok(Applied::NodesSeen { updated: 1 }));
    let n1 = log.state.node(&NodeId::new("n1")).unwrap();
    let n2 = log.state.node(&NodeId::new("n2")).unwrap();
    assert_eq!(n1.last_seen, Timestamp::new(500));
    assert_eq!(
        (n2.status, n2.last_seen),
        (NodeStatus::Down, Timestamp::new(10))
    );
    // An older batch never moves last_seen back.
    let old = Command::NodesSeen {
        nodes: vec![NodeId::new("n1")],
        at: Timestamp::new(100),
    };
    assert_eq!(log.apply(old), Ok(Applied::NodesSeen { updated: 0 }));
}

#[test]
fn assignments_carry_the_task_and_wake_only_on_changes_their_agent_acts_on() {
    let mut log = with_job_and_node();
    let n1 = NodeId::new("n1");
    let events = std::sync::Arc::new(Recorder::default());
    log.state = std::mem::take(&mut log.state).with_events(events.clone());
    let registered = log.state.node_assignment_index(&n1);
    log.apply(upsert(vec![alloc("x", "j1", "n1", 0, &[])]))
        .unwrap();
    let a = log.state.assignments(&n1).unwrap();
    assert!(a.index > registered);
    assert!(events.changed(&n1));
    assert_eq!(a.allocations.len(), 1);
    assert!(matches!(
        a.allocations[0].task,
        Some(aigrid_api::TaskSpec::Exec(_))
    ));

    // The agent's own report changes nothing it must act on.
    let mut running = AllocationReport::new(AllocId::new("x"), AllocState::Running);
    running.restarts = 2;
    running.reason = Some("x".repeat(5_000));
    log.apply(Command::ReportAllocations {
        node_id: n1.clone(),
        reports: vec![running],
        at: Timestamp::new(300),
    })
    .unwrap();
    assert_eq!(log.state.node_assignment_index(&n1), a.index);
    assert!(!events.changed(&n1));
    let x = log.state.allocation(&AllocId::new("x")).unwrap();
    assert_eq!(x.restarts, 2);
    assert_eq!(
        x.reason.unwrap().len(),
        aigrid_api::allocation::MAX_REASON_LEN
    );

    // Log tails are kept per allocation and dropped with it.
    log.apply(Command::NodeHeartbeat {
        node_id: n1.clone(),
        gpus: vec![],
        allocations: vec![],
        logs: vec![LogTail {
            id: AllocId::new("x"),
            stdout: "hello\n".into(),
            stderr: String::new(),
        }],
        at: Timestamp::new(400),
    })
    .unwrap();
    let logs = log.state.allocation_logs(&AllocId::new("x")).unwrap();
    assert_eq!(
        (logs.stdout.as_str(), logs.updated_at),
        ("hello\n", Some(Timestamp::new(400)))
    );

    // Deleting the job asks the agent to stop it: that wakes the poll.
    log.apply(delete("j1", "e2")).unwrap();
    assert!(events.changed(&n1));
    let a = log.state.assignments(&n1).unwrap();
    assert_eq!(a.allocations[0].allocation.desired, DesiredState::Stop);
    log.apply(report("n1", &[("x", AllocState::Stopped)]))
        .unwrap();
    assert!(log.state.assignments(&n1).unwrap().allocations.is_empty());
    assert!(log.state.allocation_logs(&AllocId::new("x")).is_none());
}

#[test]
fn only_what_a_heartbeat_changes_is_committed() {
    let mut log = with_job_and_node();
    log.apply(upsert(vec![alloc("x", "j1", "n1", 0, &["g0"])]))
        .unwrap();
    let n1 = NodeId::new("n1");
    let healthy = |uuid: &str| GpuHealth {
        uuid: uuid.into(),
        healthy: true,
        reason: None,
    };
    let same = Heartbeat {
        gpus: vec![healthy("g0"), healthy("g1")],
        allocations: vec![AllocationReport::new(
            AllocId::new("x"),
            AllocState::Pending,
        )],
        ..Heartbeat::default()
    };
    assert_eq!(log.state.heartbeat_changes(&n1, &same), None);
    let mut new = same.clone();
    new.gpus[1].healthy = false;
    new.allocations[0].state = AllocState::Running;
    new.allocations.push(AllocationReport::new(
        AllocId::new("gone"),
        AllocState::Running,
    ));
    let changes = log.state.heartbeat_changes(&n1, &new).unwrap();
    assert_eq!(changes.gpus.len(), 1);
    assert_eq!(changes.gpus[0].uuid, "g1");
    assert_eq!(changes.allocations.len(), 1);
    // A node marked down comes back only through a committed heartbeat.
    log.apply(Command::SetNodeStatus {
        node_id: n1.clone(),
        status: NodeStatus::Down,
        at: Timestamp::new(500),
    })
    .unwrap();
    assert!(log.state.heartbeat_changes(&n1, &same).is_some());
}

#[test]
fn nodes_register_heartbeat_and_keep_a_drain() {
    let mut log = Log::new();
    assert_eq!(
        log.apply(register("n1", &["g0"])),
        Ok(Applied::NodeRegistered {
            id: NodeId::new("n1"),
            created: true,
            eval_ids: vec![]
        })
    );
    let hb = Command::NodeHeartbeat {
        node_id: NodeId::new("n1"),
        gpus: vec![],
        allocations: vec![],
        logs: Vec::new(),
        at: Timestamp::new(50),
    };
    log.apply(hb).unwrap();
    let node = log.state.node(&NodeId::new("n1")).unwrap();
    assert_eq!(
        (node.registered_at, node.last_seen),
        (Timestamp::new(10), Timestamp::new(50))
    );

    let drain = Command::SetNodeStatus {
        node_id: NodeId::new("n1"),
        status: NodeStatus::Draining,
        at: Timestamp::new(60),
    };
    log.apply(drain).unwrap();
    let out = log.apply(register("n1", &["g0"])).unwrap();
    assert!(matches!(
        out,
        Applied::NodeRegistered { created: false, .. }
    ));
    let node = log.state.node(&NodeId::new("n1")).unwrap();
    assert_eq!(node.status, NodeStatus::Draining);
    assert_eq!(
        node.last_seen,
        Timestamp::new(50),
        "last_seen never goes back"
    );

    let err = log
        .apply(Command::NodeHeartbeat {
            node_id: NodeId::new("nope"),
            gpus: vec![],
            allocations: vec![],
            logs: Vec::new(),
            at: Timestamp::new(1),
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    let mut bad = registration("n2", &["g0", "g0"]);
    bad.resources.gpus[1].index = 1;
    let err = log
        .apply(Command::RegisterNode {
            node: bad,
            join_token: None,
            address: None,
            at: Timestamp::new(1),
        })
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidField);
    assert_eq!(log.state.nodes().len(), 1);
}

#[test]
fn a_down_node_loses_its_allocations_and_triggers_evaluations() {
    let mut log = with_job_and_node();
    log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
        .unwrap();
    log.apply(report("n1", &[("a0", AllocState::Running)]))
        .unwrap();
    assert_eq!(
        log.state.job(&JobId::new("j1")).unwrap().status,
        JobStatus::Running
    );

    let down = Command::SetNodeStatus {
        node_id: NodeId::new("n1"),
        status: NodeStatus::Down,
        at: Timestamp::new(500),
    };
    let out = log.apply(down.clone()).unwrap();
    let Applied::NodeUpdated {
        status, eval_ids, ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(status, NodeStatus::Down);
    assert_eq!(
        eval_ids,
        vec![EvalId::new(format!("log-{}-node_update-0", log.index))]
    );
    let eval = log.state.evaluation(&eval_ids[0]).unwrap();
    assert_eq!(
        (eval.trigger, eval.job_id.as_str()),
        (EvalTrigger::NodeUpdate, "j1")
    );
    assert_eq!(
        log.state.allocation(&AllocId::new("a0")).unwrap().state,
        AllocState::Lost
    );
    assert_eq!(
        log.state.job(&JobId::new("j1")).unwrap().status,
        JobStatus::Pending
    );

    let before = log.bytes();
    let again = log.apply(down).unwrap();
    assert!(matches!(again, Applied::NodeUpdated { ref eval_ids, .. } if eval_ids.is_empty()));
    assert_eq!(log.bytes(), before);

    log.apply(report("n1", &[("a0", AllocState::Running)]))
        .unwrap();
    assert_eq!(
        log.state.allocation(&AllocId::new("a0")).unwrap().state,
        AllocState::Lost,
        "finished states never change"
    );
    log.apply(Command::NodeHeartbeat {
        node_id: NodeId::new("n1"),
        gpus: vec![],
        allocations: vec![],
        logs: Vec::new(),
        at: Timestamp::new(600),
    })
    .unwrap();
    assert_eq!(
        log.state.node(&NodeId::new("n1")).unwrap().status,
        NodeStatus::Ready
    );
}

#[test]
fn a_node_that_loses_a_gpu_loses_the_allocations_holding_it() {
    let mut log = with_job_and_node();
    log.apply(upsert(vec![
        alloc("a0", "j1", "n1", 0, &["g0"]),
        alloc("a1", "j1", "n1", 1, &["g1"]),
    ]))
    .unwrap();
    let out = log.apply(register("n1", &["g1"])).unwrap();
    assert!(matches!(out, Applied::NodeRegistered { ref eval_ids, .. } if eval_ids.len() == 1));
    let state = |id: &str| log.state.allocation(&AllocId::new(id)).unwrap().state;
    assert_eq!(
        (state("a0"), state("a1")),
        (AllocState::Lost, AllocState::Pending)
    );
}

#[test]
fn a_node_keeps_the_protections_its_agent_last_registered() {
    let mut log = Log::new();
    log.apply(token("t1", "s3cret", 10, None)).unwrap();
    let mut reg = keyed("a", 1);
    reg.protections = Some(aigrid_api::NodeProtections {
        landlock_abi: Some(7),
        per_allocation_uid: true,
        ..Default::default()
    });
    log.apply(join(reg.clone(), Some(("t1", "s3cret")), 2_000))
        .unwrap();
    let node = log.state.node(&NodeId::new("a")).unwrap();
    assert_eq!(
        node.protections.as_ref().map(|p| p.summary()).as_deref(),
        Some("landlock abi 7, per-allocation uid")
    );
    let mut restored = ClusterState::default();
    restored.restore(&log.bytes()).unwrap();
    assert_eq!(
        restored.node(&NodeId::new("a")).unwrap().protections,
        reg.protections
    );
    // An agent that reports none (an older one) leaves none: nothing stale shows.
    reg.protections = None;
    log.apply(join(reg, None, 3_000)).unwrap();
    assert_eq!(log.state.node(&NodeId::new("a")).unwrap().protections, None);
}
