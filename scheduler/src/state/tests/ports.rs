//! Ports and endpoints: listening allocations get distinct ports of their node's
//! range, a node's address is the one its registration came from, and reported
//! endpoints are believed only where they say what the servers already know.

use super::*;

/// A log with node `n1` (from [`NODE_ADDRESS`], ports `first..=last`), a
/// `model-server` job `j1` of `count` instances of group `web` serving `d1`, and an
/// `exec` job `j2`.
fn serving(first: u16, last: u16, count: u32) -> Log {
    let mut log = Log::new();
    let mut reg = registration("n1", &[]);
    reg.ports = Some(aigrid_api::PortRange { first, last });
    log.apply(register_as(reg)).unwrap();
    let mut served = spec_json("llm");
    served["groups"][0]["count"] = json!(count);
    served["groups"][0]["task"] = json!({"driver": "model-server", "model": "d1"});
    log.apply(submit("j1", "e1", serde_json::from_value(served).unwrap()))
        .unwrap();
    log.apply(submit("j2", "e2", spec("api"))).unwrap();
    log
}

fn port_of(log: &Log, id: &str) -> Option<u16> {
    log.state.allocation(&AllocId::new(id)).unwrap().port
}

#[test]
fn listening_allocations_get_distinct_ports_of_their_nodes_range() {
    let mut log = serving(30_000, 30_002, 4);
    log.apply(upsert(vec![
        alloc("m0", "j1", "n1", 0, &[]),
        alloc("m1", "j1", "n1", 1, &[]),
        alloc("x0", "j2", "n1", 0, &[]),
    ]))
    .unwrap();
    log.apply(upsert(vec![alloc("m2", "j1", "n1", 2, &[])]))
        .unwrap();
    let ports: BTreeSet<u16> = ["m0", "m1", "m2"]
        .iter()
        .map(|id| port_of(&log, id).expect("a model server gets a port"))
        .collect();
    assert_eq!(ports, BTreeSet::from([30_000, 30_001, 30_002]));
    assert_eq!(port_of(&log, "x0"), None, "an exec task listens on nothing");

    let before = log.bytes();
    let with_port = |id: &str, job: &str, index: u32, port: u16| Allocation {
        port: Some(port),
        ..alloc(id, job, "n1", index, &[])
    };
    let taken = port_of(&log, "m0").unwrap();
    let cases = [
        // The range is used up.
        (alloc("m3", "j1", "n1", 3, &[]), ErrorCode::Conflict),
        (with_port("m3", "j1", 3, taken), ErrorCode::Conflict),
        (with_port("m3", "j1", 3, 29_999), ErrorCode::InvalidField),
        (with_port("x1", "j2", 1, 31_000), ErrorCode::InvalidField),
        // An allocation keeps the port it was given.
        (
            with_port("m0", "j1", 0, if taken == 30_000 { 30_001 } else { 30_000 }),
            ErrorCode::Conflict,
        ),
    ];
    for (bad, code) in cases {
        let err = log.apply(upsert(vec![bad.clone()])).unwrap_err();
        assert_eq!(err.code(), code, "{bad:?}: {err}");
        assert_eq!(log.bytes(), before, "{bad:?}");
    }
    // Rewriting an allocation without a port keeps the one it has.
    let mut again = alloc("m0", "j1", "n1", 0, &[]);
    again.state = AllocState::Running;
    log.apply(upsert(vec![again])).unwrap();
    assert_eq!(port_of(&log, "m0"), Some(taken));

    // Asked to stop, it may still listen: its port stays taken until it is
    // confirmed stopped.
    let mut stopping = alloc("m0", "j1", "n1", 0, &[]);
    stopping.desired = DesiredState::Stop;
    log.apply(upsert(vec![stopping])).unwrap();
    let err = log
        .apply(upsert(vec![alloc("m3", "j1", "n1", 3, &[])]))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict, "{err}");
    log.apply(report("n1", &[("m0", AllocState::Stopped)]))
        .unwrap();
    log.apply(upsert(vec![alloc("m3", "j1", "n1", 3, &[])]))
        .unwrap();
    assert_eq!(port_of(&log, "m3"), Some(taken));

    // Snapshots carry ports, and a restored state refuses the same reuse.
    let mut restored = Log::with(ClusterState::default());
    restored.state.restore(&log.bytes()).unwrap();
    restored.state.check_invariants().unwrap();
    assert_eq!(port_of(&restored, "m3"), Some(taken));
    let mut stopping = alloc("m1", "j1", "n1", 1, &[]);
    stopping.desired = DesiredState::Stop;
    restored.apply(upsert(vec![stopping])).unwrap();
    let err = restored
        .apply(upsert(vec![alloc("m9", "j1", "n1", 1, &[])]))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Conflict, "{err}");
}

#[test]
fn plans_assign_ports_and_a_plan_that_finds_none_is_refused_whole() {
    let mut log = serving(30_000, 30_001, 3);
    let place = |id: &str, index: u32| NewAllocation {
        id: AllocId::new(id),
        group: "web".into(),
        index,
        node: NodeId::new("n1"),
        gpus: vec![],
        previous: None,
        reschedules: 0,
        canary: false,
    };
    let plan = |places: Vec<NewAllocation>| Command::ApplyPlan {
        jobs: vec![JobPlan {
            place: places,
            ..JobPlan::new(JobId::new("j1"), 1)
        }],
        at: Timestamp::new(500),
    };
    let out = log
        .apply(plan(vec![place("p0", 0), place("p1", 1)]))
        .unwrap();
    assert!(
        matches!(out, Applied::PlanApplied { placed: 2, ref refused, .. } if refused.is_empty()),
        "{out:?}"
    );
    assert_ne!(port_of(&log, "p0"), port_of(&log, "p1"));
    let before = log.bytes();
    let out = log.apply(plan(vec![place("p2", 2)])).unwrap();
    let Applied::PlanApplied {
        placed: 0, refused, ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(refused[0].1.contains("no free port"), "{refused:?}");
    assert!(log.state.allocation(&AllocId::new("p2")).is_none());
    assert_eq!(log.bytes(), before, "refused whole: nothing written");
}

#[test]
fn a_nodes_address_is_the_one_it_registered_from() {
    let mut log = serving(30_000, 30_010, 2);
    let node = log.state.node(&NodeId::new("n1")).unwrap();
    assert_eq!(node.address, Some(NODE_ADDRESS.parse().unwrap()));
    assert_eq!(
        node.ports,
        aigrid_api::PortRange {
            first: 30_000,
            last: 30_010
        }
    );
    // A re-registration from elsewhere moves it; one without an address (an
    // operator's) leaves it; the ports follow the latest registration.
    let mut reg = registration("n1", &[]);
    log.apply(Command::RegisterNode {
        node: reg.clone(),
        join_token: None,
        address: Some("10.0.0.2".parse().unwrap()),
        at: Timestamp::new(20),
    })
    .unwrap();
    reg.ports = Some(aigrid_api::PortRange {
        first: 40_000,
        last: 40_000,
    });
    log.apply(Command::RegisterNode {
        node: reg,
        join_token: None,
        address: None,
        at: Timestamp::new(30),
    })
    .unwrap();
    let node = log.state.node(&NodeId::new("n1")).unwrap();
    assert_eq!(node.address, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(node.ports.first, 40_000);
}

#[test]
fn model_servers_are_routed_at_their_nodes_address_and_port_whatever_they_report() {
    let mut log = serving(30_000, 30_010, 2);
    log.apply(upsert(vec![
        alloc("m0", "j1", "n1", 0, &[]),
        alloc("m1", "j1", "n1", 1, &[]),
        alloc("x0", "j2", "n1", 0, &[]),
    ]))
    .unwrap();
    assert!(log.state.model_servers().is_empty(), "pending: nowhere yet");
    let (p0, p1) = (port_of(&log, "m0").unwrap(), port_of(&log, "m1").unwrap());
    let at = |id: &str, endpoint: Option<String>| {
        let mut r = AllocationReport::new(AllocId::new(id), AllocState::Running);
        r.endpoint = endpoint;
        r
    };
    let own = format!("http://{NODE_ADDRESS}:{p0}");
    let reports = vec![
        at("m0", Some(own.clone())),
        // Another port of this node, then another host: neither is believed.
        at("m1", Some(format!("http://{NODE_ADDRESS}:{}", p1 + 100))),
        at("x0", Some("http://203.0.113.7:9001".to_owned())),
    ];
    let reported = |reports: Vec<AllocationReport>| Command::ReportAllocations {
        node_id: NodeId::new("n1"),
        reports,
        at: Timestamp::new(400),
    };
    let foreign = log
        .state
        .foreign_endpoints(&NodeId::new("n1"), &reports)
        .into_iter()
        .map(|(id, claimed, actual)| (id.to_string(), claimed, actual))
        .collect::<Vec<_>>();
    assert_eq!(
        foreign,
        [
            (
                "m1".to_owned(),
                format!("http://{NODE_ADDRESS}:{}", p1 + 100),
                Some(format!("http://{NODE_ADDRESS}:{p1}"))
            ),
            ("x0".to_owned(), "http://203.0.113.7:9001".to_owned(), None),
        ]
    );
    log.apply(reported(reports.clone())).unwrap();
    let mut servers = log.state.model_servers();
    servers.sort();
    let mut want = vec![
        ("d1", format!("http://{NODE_ADDRESS}:{p0}")),
        ("d1", format!("http://{NODE_ADDRESS}:{p1}")),
    ];
    want.sort();
    assert_eq!(servers, want, "the assigned ports, never a reported one");
    let shown = |id: &str| log.state.allocation(&AllocId::new(id)).unwrap().endpoint;
    assert_eq!(shown("m0"), Some(own));
    assert_eq!(shown("m1"), None, "a foreign endpoint is dropped");
    assert_eq!(shown("x0"), None);
    let hb = Heartbeat {
        gpus: vec![],
        allocations: reports,
        telemetry: None,
        logs: vec![],
        models: vec![],
    };
    assert!(
        log.state
            .heartbeat_changes(&NodeId::new("n1"), &hb)
            .is_none(),
        "the same claims again change nothing, so they are not committed again"
    );

    // An endpoint that is more than a host and port is refused, changing nothing.
    let before = log.bytes();
    let bad = reported(vec![at(
        "m1",
        Some(format!("http://{NODE_ADDRESS}:{p1}/elsewhere")),
    )]);
    let err = log.apply(bad).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidField);
    assert!(err.to_string().contains("endpoint"), "{err}");
    assert_eq!(log.bytes(), before);

    let mut restored = ClusterState::default();
    restored.restore(&log.bytes()).unwrap();
    assert_eq!(restored.model_servers().len(), 2);
}
