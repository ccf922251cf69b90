//! What keeps replicas identical: snapshots, stable command JSON, and the same
//! log giving the same bytes.

use super::*;

#[test]
fn snapshot_and_restore_round_trip() {
    let mut log = with_job_and_node();
    log.apply(upsert(vec![alloc("a0", "j1", "n1", 0, &["g0"])]))
        .unwrap();
    let bytes = log.bytes();
    let mut restored = ClusterState::default();
    restored.restore(&bytes).unwrap();
    assert_eq!(restored.snapshot().unwrap(), bytes);
    assert_eq!(restored.job_by_name("api"), log.state.job_by_name("api"));
    assert_eq!(restored.jobs(), log.state.jobs());

    // The restored state keeps applying exactly like the original.
    let mut a = log;
    let mut b = Log::with(restored);
    b.index = a.index;
    let next = submit("j1", "e5", {
        let mut s = spec("api");
        s.priority = 90;
        s
    });
    assert_eq!(a.apply(next.clone()), b.apply(next));
    assert_eq!(a.bytes(), b.bytes());
}

#[test]
fn a_log_entry_reads_as_the_command_written_whichever_way_it_is_read() {
    let mut by = submit("j1", "e1", spec("api"));
    if let Command::SubmitJob { by: who, spec, .. } = &mut by {
        *who = Some(IdentityId::new("ed25519:00ff"));
        spec.circle = Some("vision".into());
    }
    let mut plan = JobPlan::new(JobId::new("j1"), 1);
    plan.stop = vec![AllocId::new("a0")];
    plan.evals = vec![EvaluationUpdate {
        eval_id: EvalId::new("e1"),
        status: EvalStatus::Blocked,
        unplaced: vec![Unplaced {
            group: "g".into(),
            count: 2,
            reason: "no node with 1 free \"H100\" GPU".into(),
        }],
    }];
    let apply_plan = Command::ApplyPlan {
        jobs: vec![plan.clone(), JobPlan::new(JobId::new("j2"), 3)],
        at: Timestamp::new(7),
    };
    let commands = [
        submit("j1", "e1", spec("api")),
        by,
        delete("j1", "e2"),
        apply_plan,
    ];
    for command in commands {
        let bytes = serde_json::to_vec(&command).unwrap();
        let general: Command = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(Command::from_entry(&bytes).unwrap(), general);
        assert_eq!(general, command);
        // Fields in another order (the tag last), and ones this release does not
        // know, read the same way too.
        let mut value = serde_json::to_value(&command).unwrap();
        value["added_later"] = serde_json::json!([1, 2]);
        let reordered = serde_json::to_vec(&value).unwrap();
        assert_eq!(Command::from_entry(&reordered).unwrap(), command);
        let tag_end = bytes.iter().position(|b| *b == b',').unwrap() + 1;
        let extra = [
            &bytes[..tag_end],
            br#""added_later":[1,2],"#,
            &bytes[tag_end..],
        ]
        .concat();
        assert_eq!(Command::from_entry(&extra).unwrap(), command);
    }
    // What the general reading refuses, the entry reading refuses too: a submission
    // cut short, a field of the wrong type, a second tag, an unknown field whose
    // value is no valid JSON number.
    let bytes = serde_json::to_vec(&submit("j1", "e1", spec("api"))).unwrap();
    assert!(bytes.starts_with(br#"{"type":"submit_job","#));
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    value["at"] = "noon".into();
    let wrong_type = serde_json::to_vec(&value).unwrap();
    let body = &bytes[..bytes.len() - 1];
    let refused = [
        body.to_vec(),
        wrong_type,
        [body, br#","type":"delete_job"}"#].concat(),
        [body, br#","added_later":1e999}"#].concat(),
    ];
    // A plan with a job's plan of the wrong shape, or cut short.
    let plan_bytes = serde_json::to_vec(&Command::ApplyPlan {
        jobs: vec![plan],
        at: Timestamp::new(7),
    })
    .unwrap();
    assert!(plan_bytes.starts_with(br#"{"type":"apply_plan","#));
    let plan_body = &plan_bytes[..plan_bytes.len() - 1];
    let refused = refused.into_iter().chain([
        plan_body.to_vec(),
        [plan_body, br#","type":"apply_plan"}"#].concat(),
        br#"{"type":"apply_plan","jobs":[{"job_id":"j1"}],"at":7}"#.to_vec(),
    ]);
    for entry in refused {
        assert!(serde_json::from_slice::<Command>(&entry).is_err());
        assert!(
            Command::from_entry(&entry).is_err(),
            "{}",
            String::from_utf8_lossy(&entry)
        );
    }
}

#[test]
fn restore_refuses_garbage_and_leaves_the_state_alone() {
    let mut log = with_job_and_node();
    let before = log.bytes();
    assert!(log.state.restore(b"not json").is_err());
    let mut truncated = before.clone();
    truncated.truncate(before.len() / 2);
    assert!(log.state.restore(&truncated).is_err());
    let plain = std::io::read_to_string(lz4_flex::frame::FrameDecoder::new(&before[..])).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&plain).unwrap();
    value["format"] = json!(99);
    assert!(log
        .state
        .restore(&serde_json::to_vec(&value).unwrap())
        .is_err());
    let mut value: serde_json::Value = serde_json::from_str(&plain).unwrap();
    value["jobs"]["j1"]["version"] = json!(0);
    let err = log
        .state
        .restore(&serde_json::to_vec(&value).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("version 0"), "{err}");
    assert_eq!(log.bytes(), before);
}

#[test]
fn commands_are_stable_json() {
    let command = submit("j1", "e1", spec("api"));
    let value = serde_json::to_value(&command).unwrap();
    assert_eq!(value["type"], json!("submit_job"));
    assert_eq!(value["at"], json!(100));
    assert_eq!(value["spec"]["groups"][0]["task"]["driver"], json!("exec"));
    let back: Command = serde_json::from_value(value).unwrap();
    assert_eq!(back, command);
    let status: Command = serde_json::from_value(json!({
        "type": "set_node_status", "node_id": "n1", "status": "draining", "at": 5
    }))
    .unwrap();
    assert!(matches!(
        status,
        Command::SetNodeStatus {
            status: NodeStatus::Draining,
            ..
        }
    ));
}

/// A random command over small id spaces, so commands collide often.
fn random_command(rng: &mut StdRng, step: u64) -> Command {
    let job = format!("j{}", rng.random_range(0..4));
    let node = format!("n{}", rng.random_range(0..3));
    let eval = format!("e{}", rng.random_range(0..12));
    let at = Timestamp::new(step);
    match rng.random_range(0..11) {
        0 | 1 => {
            let mut s = spec(&format!("job{}", rng.random_range(0..3)));
            s.priority = rng.random_range(0..3) * 50;
            s.groups[0].count = rng.random_range(1..3);
            Command::SubmitJob {
                job_id: JobId::new(job),
                eval_id: EvalId::new(eval),
                spec: s,
                at,
                by: None,
            }
        }
        2 => Command::DeleteJob {
            job_id: JobId::new(job),
            eval_id: EvalId::new(eval),
            at,
        },
        3 => {
            let gpus: &[&str] = if rng.random_bool(0.5) {
                &["g0", "g1"]
            } else {
                &["g1"]
            };
            Command::RegisterNode {
                node: registration(&node, gpus),
                join_token: None,
                address: Some(std::net::IpAddr::from([10, 0, 0, 1])),
                at,
            }
        }
        4 => Command::NodeHeartbeat {
            node_id: NodeId::new(node),
            gpus: if rng.random_bool(0.5) {
                vec![GpuHealth {
                    uuid: "g1".into(),
                    healthy: rng.random_bool(0.5),
                    reason: Some("XID 79".into()),
                }]
            } else {
                vec![]
            },
            allocations: vec![],
            logs: Vec::new(),
            at,
        },
        9 => Command::DrainNode {
            node_id: NodeId::new(node),
            drain: DrainSpec {
                max_parallel: rng.random_range(0..3),
            },
            at,
        },
        10 => Command::ApplyPlan {
            jobs: vec![JobPlan {
                job_id: JobId::new(job),
                job_version: rng.random_range(1..3),
                place: vec![NewAllocation {
                    id: AllocId::new(format!("a{}", rng.random_range(0..6))),
                    group: "web".into(),
                    index: rng.random_range(0..2),
                    node: NodeId::new(node),
                    gpus: vec![],
                    previous: None,
                    reschedules: 0,
                    canary: false,
                }],
                stop: if rng.random_bool(0.3) {
                    vec![AllocId::new(format!("a{}", rng.random_range(0..6)))]
                } else {
                    vec![]
                },
                moves: vec![],
                evals: vec![EvaluationUpdate {
                    eval_id: EvalId::new(eval),
                    status: EvalStatus::Complete,
                    unplaced: vec![],
                }],
            }],
            at,
        },
        5 => Command::SetNodeStatus {
            node_id: NodeId::new(node),
            status: NodeStatus::ALL[rng.random_range(0..3)],
            at,
        },
        6 => {
            let mut a = alloc(
                &format!("a{}", rng.random_range(0..6)),
                &job,
                &node,
                rng.random_range(0..2),
                if rng.random_bool(0.5) { &["g1"] } else { &[] },
            );
            if rng.random_bool(0.3) {
                a.desired = DesiredState::Stop;
            }
            upsert(vec![a])
        }
        7 => Command::ReportAllocations {
            node_id: NodeId::new(node),
            reports: vec![AllocationReport::new(
                AllocId::new(format!("a{}", rng.random_range(0..6))),
                AllocState::ALL[rng.random_range(0..AllocState::ALL.len())],
            )],
            at,
        },
        _ => Command::UpdateEvaluation {
            eval_id: EvalId::new(eval),
            status: EvalStatus::ALL[rng.random_range(0..3)],
            unplaced: vec![],
            at,
        },
    }
}

#[test]
fn replicas_fed_the_same_log_stay_identical() {
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut a = Log::with(ClusterState::with_eval_limit(8));
        let mut b = Log::with(ClusterState::with_eval_limit(8));
        let mut outputs = 0;
        for step in 0..300 {
            let command = random_command(&mut rng, step);
            let before = a.bytes();
            let out_a = a.apply(command.clone());
            let out_b = b.apply(command.clone());
            assert_eq!(out_a, out_b, "seed {seed} step {step}");
            if out_a.is_err() {
                assert_eq!(
                    a.bytes(),
                    before,
                    "seed {seed} step {step}: rejected {command:?} changed state"
                );
            } else {
                outputs += 1;
            }
            if step % 50 == 49 {
                // A replica that restarts from a snapshot continues identically.
                let mut restored = ClusterState::default();
                restored.restore(&b.bytes()).unwrap();
                b.state = restored;
            }
            assert_eq!(a.bytes(), b.bytes(), "seed {seed} step {step}");
        }
        assert!(outputs > 50, "seed {seed}: too few commands applied");
    }
}
