//! The scheduling loop's decisions over simulated time: the real state machine and
//! the real pass (`collect`, `plan_pass`, `expire_nodes`), with commands applied in
//! order as Raft would and agents played by explicit reports.

use std::time::Duration;

use aigrid_api::{
    AllocState, Allocation, AllocationReport, DrainSpec, EvalStatus, EvalTrigger, GpuHealth, Job,
    JobId, JobSpec, NodeId, NodeRegistration, NodeStatus, Timestamp,
};
use aigrid_consensus::state_machine::StateMachine;
use aigrid_scheduler::state::{reschedule_delay_ms, Applied, ClusterState, Command, CommandOutput};
use aigrid_scheduler::worker::{collect, expire_nodes, plan_pass};
use serde_json::{json, Value};

const TTL: Duration = Duration::from_secs(30);

struct Sim {
    state: ClusterState,
    index: u64,
    now: u64,
    /// The capacity epoch blocked evaluations were last planned at, as the loop
    /// keeps it.
    planned_epoch: Option<u64>,
}

impl Sim {
    fn new() -> Self {
        Self {
            state: ClusterState::default(),
            index: 0,
            now: 1_000_000,
            planned_epoch: None,
        }
    }

    fn at(&self) -> Timestamp {
        Timestamp::from_millis(self.now)
    }

    fn apply(&mut self, command: Command) -> CommandOutput {
        self.index += 1;
        let out = self.state.apply(self.index, command);
        self.state.check_invariants().unwrap();
        out
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    /// One scheduling pass at the current time; answers how many commands it made.
    fn pass(&mut self) -> usize {
        let epoch = self.state.capacity_epoch();
        let with_blocked = self.planned_epoch != Some(epoch);
        self.planned_epoch = Some(epoch);
        let input = collect(&self.state, self.at(), with_blocked);
        let mut commands = Vec::new();
        plan_pass(input, |c| commands.push(c));
        let n = commands.len();
        for command in commands {
            let out = self.apply(command).unwrap();
            if let Applied::PlanApplied { refused, .. } = &out {
                assert!(refused.is_empty(), "a plan was refused: {refused:?}");
            }
        }
        n
    }

    /// Passes until nothing changes.
    fn settle(&mut self) {
        for _ in 0..20 {
            if self.pass() == 0 {
                return;
            }
        }
        panic!("the scheduler never settled");
    }

    fn expire(&mut self) {
        for command in expire_nodes(&self.state, self.at(), TTL) {
            self.apply(command).unwrap();
        }
    }

    fn register(&mut self, id: &str, site: &str, gpus: &[(&str, Option<&str>)]) {
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
            at,
        })
        .unwrap();
    }

    fn heartbeat(&mut self, node: &str, gpus: Vec<GpuHealth>) {
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

    fn submit(&mut self, id: &str, spec: Value) -> JobId {
        let spec: JobSpec = serde_json::from_value(spec).unwrap();
        let at = self.at();
        let out = self
            .apply(Command::SubmitJob {
                job_id: JobId::new(id),
                eval_id: aigrid_api::EvalId::new(format!("submit-{id}-{}", self.index)),
                spec,
                at,
            })
            .unwrap();
        let Applied::JobSubmitted(r) = out else {
            panic!("{out:?}")
        };
        r.id
    }

    fn job(&self, id: &JobId) -> Job {
        self.state.job(id).unwrap()
    }

    fn live(&self, id: &JobId) -> Vec<Allocation> {
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
    fn run_all(&mut self) {
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

fn exec() -> Value {
    json!({"driver": "exec", "command": "/bin/server"})
}

fn gpu_job(name: &str, priority: u32, count: u32, gpus: u32) -> Value {
    json!({"name": name, "priority": priority, "groups": [{
        "name": "g", "count": count, "max_unavailable": 8,
        "resources": {"cpu_millis": 1000, "memory_mib": 1024, "gpus": {"count": gpus}},
        "task": exec()}]})
}

fn nodes_of(allocs: &[Allocation]) -> Vec<String> {
    allocs.iter().map(|a| a.node_id.to_string()).collect()
}

#[test]
fn a_fragmented_cluster_is_defragmented_moving_the_fewest_allocations() {
    let mut sim = Sim::new();
    let h100 = [("NVIDIA H100", None); 8];
    sim.register("n1", "a", &h100);
    sim.register("n2", "b", &h100);
    // Three single-GPU instances of one job and one of another, four GPUs used on
    // each node: pinned by hand through a first job that spreads.
    let small = sim.submit(
        "small",
        json!({"name": "small", "priority": 10, "groups": [{
            "name": "g", "count": 8, "max_unavailable": 8, "spread": [{"attribute": "site"}],
            "resources": {"cpu_millis": 1000, "memory_mib": 1024, "gpus": {"count": 1}},
            "task": exec()}]}),
    );
    sim.settle();
    sim.run_all();
    let before = sim.live(&small);
    assert_eq!(before.len(), 8);
    let on = |n: &str| before.iter().filter(|a| a.node_id.as_str() == n).count();
    assert_eq!((on("n1"), on("n2")), (4, 4));

    let big = sim.submit("big", gpu_job("big", 50, 1, 8));
    sim.settle();
    let placed = sim.live(&big);
    assert_eq!(placed.len(), 1, "{:?}", sim.job(&big).unplaced);
    assert_eq!(placed[0].gpus.len(), 8);
    let target = placed[0].node_id.clone();
    let after = sim.live(&small);
    assert_eq!(after.len(), 8, "every moved instance runs elsewhere");
    assert!(after.iter().all(|a| a.node_id != target));
    let moved = after.iter().filter(|a| a.previous.is_some()).count();
    assert_eq!(moved, 4, "only the four allocations on the target moved");
}

#[test]
fn a_silent_node_is_marked_down_and_its_work_rescheduled_after_the_backoff() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 2]);
    let job = sim.submit("svc", gpu_job("svc", 50, 1, 1));
    sim.settle();
    sim.run_all();
    let first = sim.live(&job)[0].clone();
    assert_eq!(first.node_id.as_str(), "n1");
    sim.register("n2", "b", &[("NVIDIA H100", None); 2]);
    let silent_since = sim.now;

    // n2 keeps reporting, n1 goes silent.
    let mut down_at = None;
    while sim.now < silent_since + 2 * TTL.as_millis() as u64 {
        sim.advance(1_000);
        sim.heartbeat("n2", vec![]);
        sim.expire();
        sim.pass();
        if down_at.is_none()
            && sim.state.node(&NodeId::new("n1")).unwrap().status == NodeStatus::Down
        {
            down_at = Some(sim.now);
        }
        if sim.live(&job).iter().any(|a| a.node_id.as_str() == "n2") {
            break;
        }
    }
    let down_at = down_at.expect("the silent node was marked down");
    assert!(down_at - silent_since <= TTL.as_millis() as u64 + 1_000);
    let live = sim.live(&job);
    assert_eq!(nodes_of(&live), ["n2"]);
    let rescheduled_after = sim.now - silent_since;
    assert!(
        rescheduled_after <= TTL.as_millis() as u64 + reschedule_delay_ms(0) + 2_000,
        "rescheduled {rescheduled_after} ms after the node went silent"
    );
    assert_eq!(live[0].previous.as_ref(), Some(&first.id));
    assert_eq!(live[0].reschedules, 1);
    assert!(
        sim.job(&job).allocations.iter().all(|a| a.id != first.id),
        "the lost allocation was replaced"
    );
}

#[test]
fn reschedules_back_off_exponentially() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 1]);
    sim.register("n2", "b", &[("NVIDIA H100", None); 1]);
    let job = sim.submit("svc", gpu_job("svc", 50, 1, 1));
    sim.settle();
    for attempt in 0..4u32 {
        let alloc = sim.live(&job)[0].clone();
        assert_eq!(alloc.reschedules, attempt);
        let at = sim.at();
        sim.apply(Command::ReportAllocations {
            node_id: alloc.node_id.clone(),
            reports: vec![AllocationReport::new(alloc.id.clone(), AllocState::Failed)],
            at,
        })
        .unwrap();
        let eval = sim
            .state
            .evaluations(EvalStatus::Pending)
            .into_iter()
            .find(|e| e.trigger == EvalTrigger::AllocFailed)
            .unwrap();
        let delay = reschedule_delay_ms(attempt);
        assert_eq!(
            eval.wait_until,
            Some(Timestamp::from_millis(sim.now + delay))
        );
        sim.advance(delay - 1);
        sim.pass();
        assert!(sim.live(&job).is_empty(), "not before the backoff");
        sim.advance(1);
        sim.pass();
        assert_eq!(sim.live(&job).len(), 1);
    }
    assert_eq!(reschedule_delay_ms(1), 2 * reschedule_delay_ms(0));
}

#[test]
fn the_backoff_holds_when_something_else_plans_the_job_sooner() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 1]);
    let job = sim.submit("svc", gpu_job("svc", 50, 2, 1));
    sim.settle();
    assert_eq!(
        sim.live(&job).len(),
        1,
        "one GPU, one instance; the other waits"
    );
    let alloc = sim.live(&job)[0].clone();
    let at = sim.at();
    sim.apply(Command::ReportAllocations {
        node_id: alloc.node_id.clone(),
        reports: vec![AllocationReport::new(alloc.id.clone(), AllocState::Failed)],
        at,
    })
    .unwrap();
    // New capacity retries the blocked evaluation at once: it places the instance
    // that never ran, not the one that just failed.
    sim.register("n2", "b", &[("NVIDIA H100", None); 1]);
    sim.settle();
    let live = sim.live(&job);
    assert_eq!(live.len(), 1);
    assert_ne!(live[0].index, alloc.index, "the failed instance waits");
    sim.advance(reschedule_delay_ms(0));
    sim.settle();
    assert_eq!(sim.live(&job).len(), 2);
}

#[test]
fn an_unhealthy_gpu_moves_only_its_allocation() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 4]);
    let job = sim.submit("svc", gpu_job("svc", 50, 3, 1));
    sim.settle();
    sim.run_all();
    let before = sim.live(&job);
    let sick = before[1].clone();
    sim.heartbeat(
        "n1",
        vec![GpuHealth {
            uuid: sick.gpus[0].clone(),
            healthy: false,
            reason: Some("XID 79".into()),
        }],
    );
    let node = sim.state.node(&NodeId::new("n1")).unwrap();
    let gpu = node
        .resources
        .gpus
        .iter()
        .find(|g| g.uuid == sick.gpus[0])
        .unwrap();
    assert!(!gpu.healthy);
    assert_eq!(gpu.health_reason.as_deref(), Some("XID 79"));
    sim.advance(reschedule_delay_ms(0));
    sim.settle();
    let after = sim.live(&job);
    assert_eq!(after.len(), 3);
    for (b, a) in before.iter().zip(&after) {
        if b.id == sick.id {
            assert_ne!(a.gpus, sick.gpus, "moved off the sick GPU");
            assert_eq!(a.previous.as_ref(), Some(&sick.id));
        } else {
            assert_eq!(a.id, b.id, "healthy instances stay put");
        }
    }
    let usage = sim.state.node(&NodeId::new("n1")).unwrap().usage.unwrap();
    assert_eq!((usage.gpus_used, usage.gpus_free), (3, 0));
}

#[test]
fn preemption_evicts_the_lowest_priority_sufficient_set_and_requeues_it() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 2]);
    sim.register("n2", "b", &[("NVIDIA H100", None); 2]);
    let low = sim.submit("low", gpu_job("low", 10, 2, 1));
    let mid = sim.submit("mid", gpu_job("mid", 30, 2, 1));
    sim.settle();
    sim.run_all();
    assert_eq!(sim.live(&low).len() + sim.live(&mid).len(), 4);

    // Within 10 points of `low`: waits instead of evicting.
    let near = sim.submit("near", gpu_job("near", 15, 1, 1));
    sim.settle();
    assert!(sim.live(&near).is_empty());
    assert_eq!(sim.live(&low).len(), 2);

    let high = sim.submit("high", gpu_job("high", 50, 1, 2));
    sim.settle();
    assert_eq!(sim.live(&high).len(), 1, "{:?}", sim.job(&high).unplaced);
    assert_eq!(
        sim.live(&mid).len(),
        2,
        "the higher of the victims is spared"
    );
    assert!(sim.live(&low).is_empty());
    let requeued = sim.job(&low);
    assert!(
        !requeued.unplaced.is_empty(),
        "evicted work is planned again and waits with a reason"
    );
}

#[test]
fn a_drain_migrates_at_most_max_parallel_at_a_time() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 4]);
    let job = sim.submit("svc", gpu_job("svc", 50, 4, 1));
    sim.settle();
    sim.run_all();
    sim.register("n2", "b", &[("NVIDIA H100", None); 4]);
    let at = sim.at();
    sim.apply(Command::DrainNode {
        node_id: NodeId::new("n1"),
        drain: DrainSpec { max_parallel: 2 },
        at,
    })
    .unwrap();
    sim.pass();
    let moved = |sim: &Sim| {
        sim.live(&job)
            .iter()
            .filter(|a| a.node_id.as_str() == "n2")
            .count()
    };
    assert_eq!(moved(&sim), 2);
    sim.pass();
    assert_eq!(moved(&sim), 2, "waits for the stops to be confirmed");
    sim.run_all();
    sim.pass();
    assert_eq!(moved(&sim), 4);
    sim.run_all();
    let node = sim.state.node(&NodeId::new("n1")).unwrap();
    assert_eq!(node.status, NodeStatus::Draining);
    assert_eq!(node.usage.unwrap().allocations, 0);
}

#[test]
fn spread_over_three_sites_puts_three_replicas_on_three_sites() {
    let mut sim = Sim::new();
    for (n, site) in [
        ("n1", "a"),
        ("n2", "a"),
        ("n3", "b"),
        ("n4", "b"),
        ("n5", "c"),
    ] {
        sim.register(n, site, &[("NVIDIA H100", None); 8]);
    }
    let job = sim.submit(
        "web",
        json!({"name": "web", "groups": [{
            "name": "g", "count": 3, "spread": [{"attribute": "site"}],
            "resources": {"cpu_millis": 1000, "memory_mib": 1024, "gpus": {"count": 1}},
            "task": exec()}]}),
    );
    sim.settle();
    let sites: std::collections::BTreeSet<String> = sim
        .live(&job)
        .iter()
        .map(|a| sim.state.node(&a.node_id).unwrap().attributes["site"].clone())
        .collect();
    assert_eq!(sites.len(), 3);
}

#[test]
fn a_sixteen_gpu_gang_lands_on_shared_interconnect_groups() {
    let mut sim = Sim::new();
    // Two nodes whose GPUs are split over two NVLink domains, two with one.
    let split: Vec<(&str, Option<&str>)> = (0..8)
        .map(|i| {
            (
                "NVIDIA H100",
                Some(if i % 2 == 0 { "nvl0" } else { "nvl1" }),
            )
        })
        .collect();
    let whole = [("NVIDIA H100", Some("nvl0")); 8];
    sim.register("a-split", "a", &split);
    sim.register("b-split", "a", &split);
    sim.register("c-whole", "b", &whole);
    sim.register("d-whole", "b", &whole);
    let job = sim.submit(
        "train",
        json!({"name": "train", "kind": "training", "groups": [{
            "name": "workers", "count": 2, "gang": true,
            "resources": {"cpu_millis": 8000, "memory_mib": 65536,
                          "gpus": {"count": 8, "same_interconnect": true}},
            "task": exec()}]}),
    );
    sim.settle();
    let live = sim.live(&job);
    assert_eq!(live.len(), 2, "{:?}", sim.job(&job).unplaced);
    let mut nodes = nodes_of(&live);
    nodes.sort();
    assert_eq!(nodes, ["c-whole", "d-whole"]);
}

#[test]
fn impossible_requests_stay_pending_with_an_explanation() {
    let mut sim = Sim::new();
    sim.register("n1", "a", &[("NVIDIA H100", None); 2]);
    let job = sim.submit(
        "nope",
        json!({"name": "nope", "groups": [{
            "name": "g", "count": 2,
            "constraints": [{"attribute": "country", "op": "in", "value": ["NL", "DE"]}],
            "resources": {"cpu_millis": 1000, "memory_mib": 1024,
                          "gpus": {"count": 4, "model": "B200"}},
            "task": exec()}]}),
    );
    sim.settle();
    let view = sim.job(&job);
    assert!(view.allocations.is_empty());
    assert_eq!(view.unplaced.len(), 1);
    assert_eq!(view.unplaced[0].count, 2);
    assert_eq!(
        view.unplaced[0].reason,
        "0/1 nodes: 1 failed country in [NL, DE]"
    );
}

mod streams {
    //! Random clusters and job streams through the whole loop: submissions,
    //! deletions, node failures, GPU faults, drains and agent reports, each pass
    //! applied as Raft would. After every step the state must hold no GPU, CPU or
    //! memory twice, every live allocation must satisfy its group's constraints, and
    //! a gang must never be placed in part.

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        Submit {
            job: u8,
            priority: u8,
            count: u8,
            gpus: u8,
            slice: bool,
            gang: bool,
            country: Option<u8>,
            spread: bool,
        },
        Delete(u8),
        NodeDown(u8),
        NodeBack(u8),
        GpuFault(u8, u8),
        Drain(u8),
        Run,
        Wait(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..6, 0u8..5, 1u8..5, 0u8..5, any::<bool>(), any::<bool>(),
                  proptest::option::of(0u8..3), any::<bool>())
                .prop_map(|(job, priority, count, gpus, slice, gang, country, spread)| {
                    Step::Submit { job, priority, count, gpus, slice, gang, country, spread }
                }),
            1 => (0u8..6).prop_map(Step::Delete),
            1 => (0u8..6).prop_map(Step::NodeDown),
            1 => (0u8..6).prop_map(Step::NodeBack),
            1 => (0u8..6, 0u8..4).prop_map(|(n, g)| Step::GpuFault(n, g)),
            1 => (0u8..6).prop_map(Step::Drain),
            2 => Just(Step::Run),
            2 => (0u16..40).prop_map(Step::Wait),
        ]
    }

    const COUNTRIES: [&str; 3] = ["BE", "NL", "DE"];

    fn cluster(sizes: &[(u8, bool)]) -> Sim {
        let mut sim = Sim::new();
        for (i, (gpus, linked)) in sizes.iter().enumerate() {
            let link = if *linked { Some("nvl") } else { None };
            let gpus: Vec<(&str, Option<&str>)> = (0..*gpus)
                .map(|g| {
                    (
                        if g % 3 == 2 {
                            "NVIDIA L4"
                        } else {
                            "NVIDIA H100"
                        },
                        link,
                    )
                })
                .collect();
            sim.register(&format!("n{i}"), &format!("s{}", i % 3), &gpus);
            // Countries by node, through a re-registration with the attribute.
            let mut node = sim.state.node(&NodeId::new(format!("n{i}"))).unwrap();
            node.attributes
                .insert("country".into(), COUNTRIES[i % 3].into());
            let reg = NodeRegistration {
                id: node.id.clone(),
                name: node.name.clone(),
                attributes: node.attributes.clone(),
                resources: node.resources.clone(),
                public_key: None,
            };
            let at = sim.at();
            sim.apply(Command::RegisterNode {
                node: reg,
                join_token: None,
                at,
            })
            .unwrap();
        }
        sim
    }

    fn apply_step(sim: &mut Sim, step: &Step) {
        let at = sim.at();
        match step {
            Step::Submit {
                job,
                priority,
                count,
                gpus,
                slice,
                gang,
                country,
                spread,
            } => {
                let mut resources = json!({"cpu_millis": 4000, "memory_mib": 8192});
                if *gpus > 0 {
                    resources["gpus"] = if *slice {
                        json!({"count": 1, "memory_slice_mib": 20000 * u64::from(*gpus)})
                    } else {
                        json!({"count": gpus, "model": "H100"})
                    };
                }
                let mut group = json!({"name": "g", "count": count, "gang": gang,
                    "max_unavailable": 2, "resources": resources, "task": exec()});
                if let Some(c) = country {
                    group["constraints"] = json!([{"attribute": "country", "op": "in",
                        "value": [COUNTRIES[usize::from(*c)]]}]);
                }
                if *spread {
                    group["spread"] = json!([{"attribute": "site"}]);
                }
                let name = format!("job{job}");
                sim.submit(
                    &name,
                    json!({"name": name, "priority": u32::from(*priority) * 20,
                    "groups": [group]}),
                );
            }
            Step::Delete(job) => {
                if let Some(j) = sim.state.job_by_name(&format!("job{job}")) {
                    let eval = aigrid_api::EvalId::new(format!("del-{}", sim.index));
                    sim.apply(Command::DeleteJob {
                        job_id: j.id,
                        eval_id: eval,
                        at,
                    })
                    .unwrap();
                }
            }
            Step::NodeDown(n) | Step::NodeBack(n) | Step::Drain(n) => {
                let node_id = NodeId::new(format!("n{n}"));
                if sim.state.node(&node_id).is_none() {
                    return;
                }
                let command = match step {
                    Step::NodeDown(_) => Command::SetNodeStatus {
                        node_id,
                        status: NodeStatus::Down,
                        at,
                    },
                    Step::NodeBack(_) => Command::SetNodeStatus {
                        node_id,
                        status: NodeStatus::Ready,
                        at,
                    },
                    _ => Command::DrainNode {
                        node_id,
                        drain: DrainSpec { max_parallel: 2 },
                        at,
                    },
                };
                sim.apply(command).unwrap();
            }
            Step::GpuFault(n, g) => {
                let node_id = NodeId::new(format!("n{n}"));
                let Some(node) = sim.state.node(&node_id) else {
                    return;
                };
                let Some(gpu) = node.resources.gpus.get(usize::from(*g)) else {
                    return;
                };
                let health = GpuHealth {
                    uuid: gpu.uuid.clone(),
                    healthy: false,
                    reason: Some("XID 48".into()),
                };
                sim.apply(Command::NodeHeartbeat {
                    node_id,
                    gpus: vec![health],
                    allocations: vec![],
                    logs: Vec::new(),
                    at,
                })
                .unwrap();
            }
            Step::Run => sim.run_all(),
            Step::Wait(s) => sim.advance(u64::from(*s) * 1000),
        }
    }

    /// What must hold after every step.
    fn check(sim: &Sim, jobs_with_losses: &BTreeSet<JobId>) {
        sim.state.check_invariants().unwrap();
        let mut cpu: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut mem: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut live_per_group: BTreeMap<(JobId, String), u32> = BTreeMap::new();
        for alloc in sim.state.live_allocations() {
            let node = sim.state.node(&alloc.node_id).unwrap();
            *cpu.entry(node.id.clone()).or_default() += alloc.resources.cpu_millis.get();
            *mem.entry(node.id.clone()).or_default() += alloc.resources.memory_mib.get();
            assert!(
                cpu[&node.id] <= node.resources.cpu_millis.get(),
                "CPU over-committed"
            );
            assert!(
                mem[&node.id] <= node.resources.memory_mib.get(),
                "memory over-committed"
            );
            let job = sim.state.job(&alloc.job_id).unwrap();
            let group = job.spec.group(&alloc.group).unwrap();
            if alloc.job_version == job.version {
                for c in &group.constraints {
                    let value = serde_json::to_value(&c.value).unwrap();
                    let allowed: Vec<String> = match value {
                        Value::Array(vs) => vs
                            .into_iter()
                            .map(|v| v.as_str().unwrap().to_owned())
                            .collect(),
                        v => vec![v.as_str().unwrap().to_owned()],
                    };
                    assert!(
                        allowed.contains(&node.attributes[&c.attribute]),
                        "{} on {} breaks {c:?}",
                        alloc.id,
                        node.id
                    );
                }
                if let Some(g) = &group.resources.gpus {
                    for uuid in &alloc.gpus {
                        let gpu = node
                            .resources
                            .gpus
                            .iter()
                            .find(|d| &d.uuid == uuid)
                            .unwrap();
                        if let Some(m) = &g.model {
                            assert!(gpu.model.contains(m.as_str()), "wrong GPU model");
                        }
                    }
                }
            }
            if alloc.job_version == job.version {
                *live_per_group
                    .entry((alloc.job_id.clone(), alloc.group.clone()))
                    .or_default() += 1;
            }
        }
        for job in sim.state.jobs() {
            if jobs_with_losses.contains(&job.id) {
                continue;
            }
            let spec = sim.state.job(&job.id).unwrap().spec;
            for group in spec.groups.iter().filter(|g| g.gang) {
                let live = live_per_group
                    .get(&(job.id.clone(), group.name.clone()))
                    .copied()
                    .unwrap_or(0);
                assert!(
                    live == 0 || live >= group.count,
                    "gang {} placed in part: {live}",
                    spec.name
                );
            }
        }
    }

    /// The live allocations of each job's current version.
    fn live_current(sim: &Sim) -> BTreeMap<JobId, BTreeSet<String>> {
        let mut out: BTreeMap<JobId, BTreeSet<String>> = BTreeMap::new();
        for alloc in sim.state.live_allocations() {
            let current = sim
                .state
                .job(&alloc.job_id)
                .is_some_and(|j| j.version == alloc.job_version);
            if current {
                out.entry(alloc.job_id.clone())
                    .or_default()
                    .insert(alloc.id.to_string());
            }
        }
        out
    }

    /// Whether every gang group of `job` has all its instances live, or the job is gone.
    fn gangs_whole(sim: &Sim, job: &JobId) -> bool {
        let Some(j) = sim.state.job(job) else {
            return true;
        };
        let live = sim
            .state
            .live_allocations()
            .filter(|a| &a.job_id == job && a.job_version == j.version)
            .fold(BTreeMap::<String, u32>::new(), |mut m, a| {
                *m.entry(a.group.clone()).or_default() += 1;
                m
            });
        j.spec
            .groups
            .iter()
            .filter(|g| g.gang)
            .all(|g| live.get(&g.name).copied().unwrap_or(0) >= g.count)
    }

    /// A gang updated while instances of its old version are lost: the lost
    /// instances' indices back off, and the new version must still be placed whole
    /// or not at all, not on the indices that are free to go (found by the stream
    /// property below).
    #[test]
    fn a_gang_is_not_placed_in_part_while_some_of_its_instances_back_off() {
        let sub = |job, priority, count, gpus, slice, gang| Step::Submit {
            job,
            priority,
            count,
            gpus,
            slice,
            gang,
            country: None,
            spread: false,
        };
        let steps = [
            sub(0, 0, 1, 0, false, false),
            sub(0, 4, 1, 3, false, false),
            sub(5, 1, 2, 1, true, false),
            sub(1, 3, 4, 4, true, false),
            sub(0, 0, 1, 0, false, false),
            sub(5, 0, 2, 0, false, false),
            sub(0, 0, 1, 0, false, false),
            // job5 becomes a gang of 4 one-GPU instances while its two old
            // instances share GPU 0, which then fails.
            sub(5, 0, 4, 1, false, true),
            Step::GpuFault(0, 0),
            Step::Wait(600),
        ];
        let mut sim = cluster(&[(7, false)]);
        let mut faulted = false;
        for step in &steps {
            apply_step(&mut sim, step);
            sim.pass();
            faulted |= matches!(step, Step::GpuFault(..));
            let Some(job) = sim
                .state
                .job_by_name("job5")
                .filter(|j| j.spec.groups[0].gang)
            else {
                continue;
            };
            let live = live_current(&sim).get(&job.id).map_or(0, BTreeSet::len);
            assert!(
                live == 0 || live >= 4,
                "after {step:?}: gang job5 has {live} of 4"
            );
        }
        assert!(faulted);
        let job = sim.state.job_by_name("job5").unwrap();
        assert!(
            !job.unplaced.is_empty(),
            "two free H100s cannot hold a gang of four, and the job says so"
        );
    }

    /// A drain moves an instance of a gang's old version: moving it alone would
    /// place one instance of the gang's new version (found by the stream property
    /// below); it waits for the whole gang's update instead.
    #[test]
    fn a_drain_does_not_place_a_gang_update_in_part() {
        let sub = |count, gpus, country, gang| Step::Submit {
            job: 5,
            priority: 0,
            count,
            gpus,
            slice: false,
            gang,
            country,
            spread: false,
        };
        let mut sim = cluster(&[(0, false), (5, false)]);
        // An instance on n0; an update that fits nowhere (no node is in the third
        // country); then a gang of two 3-GPU instances, of which n1 holds one.
        for step in [
            sub(1, 0, None, false),
            sub(1, 0, Some(2), false),
            sub(2, 3, None, true),
            Step::Drain(0),
        ] {
            apply_step(&mut sim, &step);
            sim.pass();
            let job = sim.state.job_by_name("job5").unwrap();
            let live = live_current(&sim).get(&job.id).map_or(0, BTreeSet::len);
            if job.spec.groups[0].gang {
                assert!(
                    live == 0 || live >= 2,
                    "after {step:?}: gang job5 has {live} of 2"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_streams_never_overcommit_break_constraints_or_split_gangs(
            sizes in proptest::collection::vec((0u8..9, any::<bool>()), 1..6),
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let mut sim = cluster(&sizes);
            // A job that lost a live instance of its current version (a node down,
            // a GPU fault, a drain, a preemption) may be partly placed until it is
            // rescheduled; its gangs are checked again once they are whole.
            let mut losses = BTreeSet::new();
            for step in &steps {
                let before = live_current(&sim);
                apply_step(&mut sim, step);
                sim.pass();
                let after = live_current(&sim);
                for (job, allocs) in &before {
                    if allocs.iter().any(|a| !after.get(job).is_some_and(|now| now.contains(a))) {
                        losses.insert(job.clone());
                    }
                }
                losses.retain(|job| !gangs_whole(&sim, job));
                check(&sim, &losses);
            }
        }
    }
}
