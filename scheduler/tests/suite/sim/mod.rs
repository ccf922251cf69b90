//! The simulation the scenario tests drive: the real state machine and the real
//! scheduling pass (`collect`, `plan_pass`, `expire_nodes`) over simulated time,
//! with commands applied in order as Raft would and agents played by explicit
//! reports.
#![allow(dead_code)]

use std::time::Duration;

use aigrid_api::{
    AllocState, Allocation, AllocationReport, GpuHealth, Job, JobId, JobSpec, NodeId,
    NodeRegistration, Timestamp,
};
use aigrid_consensus::state_machine::StateMachine;
use aigrid_scheduler::state::{Applied, ClusterState, Command, CommandOutput};
use aigrid_scheduler::worker::{collect, expire_nodes, plan_pass};
use serde_json::{json, Value};

pub const TTL: Duration = Duration::from_secs(30);

pub struct Sim {
    pub state: ClusterState,
    pub index: u64,
    pub now: u64,
    /// The capacity epoch blocked evaluations were last planned at, as the loop
    /// keeps it.
    pub planned_epoch: Option<u64>,
    /// Allocations preempted and migrated by the plans applied, as the loop
    /// counts them for its metrics.
    pub preempted: usize,
    pub migrated: usize,
}

impl Sim {
    pub fn new() -> Self {
        Self {
            state: ClusterState::default(),
            index: 0,
            now: 1_000_000,
            planned_epoch: None,
            preempted: 0,
            migrated: 0,
        }
    }

    pub fn at(&self) -> Timestamp {
        Timestamp::from_millis(self.now)
    }

    pub fn apply(&mut self, command: Command) -> CommandOutput {
        self.index += 1;
        let out = self.state.apply(self.index, command);
        self.state.check_invariants().unwrap();
        out
    }

    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    /// One scheduling pass at the current time; answers how many commands it made.
    pub fn pass(&mut self) -> usize {
        let epoch = self.state.capacity_epoch();
        let with_blocked = self.planned_epoch != Some(epoch);
        self.planned_epoch = Some(epoch);
        let input = collect(&self.state, self.at(), with_blocked);
        let mut commands = Vec::new();
        plan_pass(input, |c| commands.push(c));
        let n = commands.len();
        for command in commands {
            let out = self.apply(command).unwrap();
            if let Applied::PlanApplied {
                refused,
                preempted,
                migrated,
                ..
            } = &out
            {
                assert!(refused.is_empty(), "a plan was refused: {refused:?}");
                self.preempted += preempted;
                self.migrated += migrated;
            }
        }
        n
    }

    /// Passes until nothing changes.
    pub fn settle(&mut self) {
        for _ in 0..20 {
            if self.pass() == 0 {
                return;
            }
        }
        panic!("the scheduler never settled");
    }

    pub fn expire(&mut self) {
        for command in expire_nodes(&self.state, self.at(), TTL) {
            self.apply(command).unwrap();
        }
    }

    pub fn register(&mut self, id: &str, site: &str, gpus: &[(&str, Option<&str>)]) {
        let devices: Vec<Value> = gpus
            .iter()
            .enumerate()
            .map(|(i, (model, link))| {
                let mut gpu = json!({"index": i, "uuid": format!("{id}-gpu{i}"),
                    "vendor": "nvidia", "model": model, "memory_mib": 81920, "healthy": true});
                if let Some(link) = link {
                    gpu["interconnect_group"] = json!(format!("{id}-{link}"));
                }
                gpu
            })
            .collect();
        let node: NodeRegistration = serde_json::from_value(json!({
            "id": id, "name": id,
            "attributes": {"country": "BE", "site": site},
            "resources": {"cpu_millis": 64000, "memory_mib": 524288, "disk_mib": 1000000,
                          "gpus": devices}
        }))
        .unwrap();
        let at = self.at();
        self.apply(Command::RegisterNode {
            node,
            join_token: None,
            address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            at,
        })
        .unwrap();
    }

    pub fn heartbeat(&mut self, node: &str, gpus: Vec<GpuHealth>) {
        let at = self.at();
        self.apply(Command::NodeHeartbeat {
            node_id: NodeId::new(node),
            gpus,
            allocations: vec![],
            logs: Vec::new(),
            at,
        })
        .unwrap();
    }

    pub fn submit(&mut self, id: &str, spec: Value) -> JobId {
        let spec: JobSpec = serde_json::from_value(spec).unwrap();
        let at = self.at();
        let out = self
            .apply(Command::SubmitJob {
                job_id: JobId::new(id),
                eval_id: aigrid_api::EvalId::new(format!("submit-{id}-{}", self.index)),
                spec,
                at,
                by: None,
            })
            .unwrap();
        let Applied::JobSubmitted(r) = out else {
            panic!("{out:?}")
        };
        r.id
    }

    pub fn job(&self, id: &JobId) -> Job {
        self.state.job(id).unwrap()
    }

    pub fn live(&self, id: &JobId) -> Vec<Allocation> {
        let mut live: Vec<Allocation> = self
            .job(id)
            .allocations
            .into_iter()
            .filter(Allocation::is_live)
            .collect();
        live.sort_by_key(|a| (a.group.clone(), a.index));
        live
    }

    /// Every live allocation reports running, as agents would.
    pub fn run_all(&mut self) {
        let mut by_node: std::collections::BTreeMap<NodeId, Vec<AllocationReport>> =
            Default::default();
        for alloc in self.state.live_allocations() {
            if alloc.state == AllocState::Pending {
                by_node
                    .entry(alloc.node_id.clone())
                    .or_default()
                    .push(AllocationReport::new(alloc.id.clone(), AllocState::Running));
            }
        }
        // Allocations asked to stop report stopped.
        let stopping: Vec<Allocation> = self
            .state
            .allocations()
            .into_iter()
            .filter(|a| a.desired == aigrid_api::DesiredState::Stop && !a.state.is_terminal())
            .collect();
        for alloc in stopping {
            by_node
                .entry(alloc.node_id.clone())
                .or_default()
                .push(AllocationReport::new(alloc.id.clone(), AllocState::Stopped));
        }
        for (node_id, reports) in by_node {
            let at = self.at();
            self.apply(Command::ReportAllocations {
                node_id,
                reports,
                at,
            })
            .unwrap();
        }
    }
}

pub fn exec() -> Value {
    json!({"driver": "exec", "command": "/bin/server"})
}

pub fn gpu_job(name: &str, priority: u32, count: u32, gpus: u32) -> Value {
    json!({"name": name, "priority": priority, "groups": [{
        "name": "g", "count": count, "max_unavailable": 8,
        "resources": {"cpu_millis": 1000, "memory_mib": 1024, "gpus": {"count": gpus}},
        "task": exec()}]})
}

pub fn nodes_of(allocs: &[Allocation]) -> Vec<String> {
    allocs.iter().map(|a| a.node_id.to_string()).collect()
}
