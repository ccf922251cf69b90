//! The state machine's unit and property tests, by area, over the [`Log`] fixture
//! and the command builders here.

mod allocations;
mod chain;
mod jobs;
mod metering;
mod nodes;
mod ports;
mod replication;
mod scaling;
mod treasury;

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

/// The address nodes register from in these tests.
const NODE_ADDRESS: &str = "10.0.0.1";

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
        by: None,
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
        protections: None,
        ports: None,
        data_port: None,
        data_tls: false,
        data_csr: None,
        offer: None,
    }
}

fn register(id: &str, gpus: &[&str]) -> Command {
    register_as(registration(id, gpus))
}

/// The registration `reg` as the server proposes it, from the node's address.
fn register_as(reg: NodeRegistration) -> Command {
    Command::RegisterNode {
        node: reg,
        join_token: None,
        address: Some(NODE_ADDRESS.parse().unwrap()),
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
        port: None,
        endpoint: None,
        desired: DesiredState::Run,
        canary: false,
        healthy: None,
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
        address: Some(NODE_ADDRESS.parse().unwrap()),
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

/// Node n1 (H100s g0, g1) offering `offer`, job j1 of circle `ml`, a0 on g0 and a1
/// CPU-only, both running (half a core and 256 MiB each).
fn running_with(offer: Option<aigrid_api::NodeOffer>) -> Log {
    let mut log = Log::new();
    let mut reg = registration("n1", &["g0", "g1"]);
    reg.offer = offer;
    log.apply(register_as(reg)).unwrap();
    let mut ml = spec("api");
    ml.circle = Some("ml".into());
    log.apply(submit("j1", "e1", ml)).unwrap();
    log.apply(upsert(vec![
        alloc("a0", "j1", "n1", 0, &["g0"]),
        alloc("a1", "j1", "n1", 1, &[]),
    ]))
    .unwrap();
    log.apply(report(
        "n1",
        &[("a0", AllocState::Running), ("a1", AllocState::Running)],
    ))
    .unwrap();
    log
}
