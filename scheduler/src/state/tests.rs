//! The state machine's unit and property tests. One file over 800 lines: the
//! tests share the [`Log`] fixture and the command builders at its top.

use super::*;
use aigrid_api::{
    AllocId, AllocState, Allocation, AllocationReport, DeleteJobResponse, DesiredState, DrainSpec,
    ErrorCode, EvalId, EvalStatus, EvalTrigger, GpuHealth, Heartbeat, JobId, JobKind, JobSpec,
    JobStatus, LogTail, MemoryMib, NodeId, NodeRegistration, NodeStatus, SubmitJobResponse,
    Timestamp, Unplaced,
};
use aigrid_api::{GpuDevice, GpuRequest, NodeResources, Resources};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Records the events a state emits, for tests to take.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<StateEvent>>);

impl EventSink for Recorder {
    fn publish(&self, event: StateEvent) {
        self.0.lock().unwrap().push(event);
    }
}

impl Recorder {
    /// Whether `node`'s assignments changed since the last call; forgets what it held.
    fn changed(&self, node: &NodeId) -> bool {
        self.0.lock().unwrap().drain(..).any(
            |event| matches!(event, StateEvent::AssignmentsChanged { node: n, .. } if &n == node),
        )
    }
}

/// A state plus a log index, checking invariants after every command.
struct Log {
    state: ClusterState,
    index: u64,
}

impl Log {
    fn new() -> Self {
        Self::with(ClusterState::default())
    }

    fn with(state: ClusterState) -> Self {
        Self { state, index: 0 }
    }

    fn apply(&mut self, command: Command) -> CommandOutput {
        self.index += 1;
        let out = self.state.apply(self.index, command);
        self.state.check_invariants().unwrap();
        out
    }

    fn bytes(&self) -> Vec<u8> {
        self.state.snapshot().unwrap()
    }
}

fn spec_json(name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "groups": [{
            "name": "web",
            "count": 2,
            "resources": {"cpu_millis": 500, "memory_mib": 256},
            "task": {"driver": "exec", "command": "/bin/server"}
        }]
    })
}

fn spec(name: &str) -> JobSpec {
    serde_json::from_value(spec_json(name)).unwrap()
}

fn submit(job: &str, eval: &str, spec: JobSpec) -> Command {
    Command::SubmitJob {
        job_id: JobId::new(job),
        eval_id: EvalId::new(eval),
        spec,
        at: Timestamp::new(100),
    }
}

fn delete(job: &str, eval: &str) -> Command {
    Command::DeleteJob {
        job_id: JobId::new(job),
        eval_id: EvalId::new(eval),
        at: Timestamp::new(200),
    }
}

fn registration(id: &str, gpus: &[&str]) -> NodeRegistration {
    NodeRegistration {
        id: NodeId::new(id),
        name: format!("host-{id}"),
        attributes: [("site".to_owned(), "ghent".to_owned())].into(),
        resources: NodeResources {
            cpu_millis: 8000.into(),
            memory_mib: 32768.into(),
            disk_mib: 100_000.into(),
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, uuid)| GpuDevice {
                    index: u32::try_from(i).unwrap(),
                    uuid: (*uuid).to_owned(),
                    vendor: "nvidia".to_owned(),
                    model: "H100".to_owned(),
                    memory_mib: MemoryMib::new(81920),
                    healthy: true,
                    health_reason: None,
                    numa_node: None,
                    interconnect_group: None,
                    mig_capable: false,
                })
                .collect(),
        },
        public_key: None,
    }
}

fn register(id: &str, gpus: &[&str]) -> Command {
    Command::RegisterNode {
        node: registration(id, gpus),
        join_token: None,
        at: Timestamp::new(10),
    }
}

fn alloc(id: &str, job: &str, node: &str, index: u32, gpus: &[&str]) -> Allocation {
    Allocation {
        id: AllocId::new(id),
        job_id: JobId::new(job),
        job_version: 1,
        node_id: NodeId::new(node),
        group: "web".to_owned(),
        index,
        resources: Resources {
            cpu_millis: 500.into(),
            memory_mib: 256.into(),
            gpus: (!gpus.is_empty()).then(|| GpuRequest {
                count: u32::try_from(gpus.len()).unwrap(),
                model: None,
                min_memory_mib: None,
                memory_slice_mib: None,
                same_interconnect: false,
            }),
        },
        gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
        previous: None,
        reschedules: 0,
        state: AllocState::Pending,
        reason: None,
        restarts: 0,
        limits: None,
        endpoint: None,
        desired: DesiredState::Run,
        created_at: Timestamp::new(0),
        updated_at: Timestamp::new(0),
    }
}

fn upsert(allocations: Vec<Allocation>) -> Command {
    Command::UpsertAllocations {
        allocations,
        at: Timestamp::new(300),
    }
}

fn report(node: &str, reports: &[(&str, AllocState)]) -> Command {
    Command::ReportAllocations {
        node_id: NodeId::new(node),
        reports: reports
            .iter()
            .map(|(id, state)| AllocationReport::new(AllocId::new(*id), *state))
            .collect(),
        at: Timestamp::new(400),
    }
}

fn submitted(out: CommandOutput) -> SubmitJobResponse {
    match out {
        Ok(Applied::JobSubmitted(r)) => r,
        other => panic!("expected a submission, got {other:?}"),
    }
}

/// A log with node `n1` (GPUs g0, g1) and job `j1` named `api`.
fn with_job_and_node() -> Log {
    let mut log = Log::new();
    log.apply(register("n1", &["g0", "g1"])).unwrap();
    log.apply(submit("j1", "e1", spec("api"))).unwrap();
    log
}

fn keyed(id: &str, seed: u8) -> NodeRegistration {
    let mut reg = registration(id, &["g0"]);
    reg.public_key = Some(aigrid_api::NodeKey::from_secret([seed; 32]).public());
    reg
}

fn join(reg: NodeRegistration, token: Option<(&str, &str)>, at: u64) -> Command {
    Command::RegisterNode {
        node: reg,
        join_token: token.map(|(id, secret)| TokenUse {
            id: id.to_owned(),
            secret_hash: aigrid_api::auth::hash_secret(secret),
        }),
        at: Timestamp::new(at),
    }
}

fn token(id: &str, secret: &str, ttl_secs: u64, max_uses: Option<u32>) -> Command {
    Command::CreateJoinToken {
        id: id.to_owned(),
        secret_hash: aigrid_api::auth::hash_secret(secret),
        ttl_secs,
        max_uses,
        description: None,
        at: Timestamp::new(1_000),
    }
}

fn unauthorized(out: CommandOutput) -> String {
    match out {
        Err(StateError::Unauthorized(m)) => m,
        other => panic!("expected unauthorized, got {other:?}"),
    }
}

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
