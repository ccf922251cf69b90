//! The pure planners on small, realistic clusters, through the public API only:
//! placing, spreading and gangs with [`plan`], making room with [`plan_defrag`]
//! and [`plan_preemption`], and keeping one [`PlanSnapshot`] current across plans
//! as a scheduling pass does. Nodes, jobs and allocations are built as the wire
//! carries them, so fields the API gains with defaults need no change here.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::{AllocId, Allocation, JobId, JobSpec, Node, NodeId, TaskGroup};
use aigrid_scheduler::planner::defrag::{plan_defrag, Defrag};
use aigrid_scheduler::planner::preempt::{plan_preemption, Preemption};
use aigrid_scheduler::planner::{plan, GroupDemand, GroupInfo, PlanRequest, PlanSnapshot};
use serde_json::{json, Value};

/// A ready node with `attributes` and one H100 per entry of `links`, each in the
/// interconnect group given, if any.
fn node(id: &str, attributes: Value, links: &[Option<&str>]) -> Node {
    let gpus: Vec<Value> = links
        .iter()
        .enumerate()
        .map(|(i, link)| {
            json!({"index": i, "uuid": format!("{id}-gpu{i}"), "vendor": "nvidia",
                   "model": "NVIDIA H100 80GB HBM3", "memory_mib": 81920, "healthy": true,
                   "interconnect_group": link})
        })
        .collect();
    serde_json::from_value(json!({
        "id": id, "name": id, "attributes": attributes,
        "resources": {"cpu_millis": 128000, "memory_mib": 1048576, "disk_mib": 1000000,
                      "gpus": gpus},
        "status": "ready", "registered_at": 0, "last_seen": 0
    }))
    .unwrap()
}

/// Eight GPUs in one NVLink domain.
fn nvlinked() -> Vec<Option<&'static str>> {
    vec![Some("nvl-0"); 8]
}

/// Eight GPUs linked in pairs only.
fn paired() -> Vec<Option<&'static str>> {
    (0..8)
        .map(|i| Some(["nvl-0", "nvl-1", "nvl-2", "nvl-3"][i / 2]))
        .collect()
}

/// A group of `count` instances of `gpus` whole GPUs, with `extra` fields merged
/// in (`{"movable": false}`).
fn group(name: &str, count: u32, gpus: u32, extra: Value) -> TaskGroup {
    let mut g = json!({
        "name": name, "count": count,
        "resources": {"cpu_millis": 4000, "memory_mib": 16384, "gpus": {"count": gpus}},
        "task": {"driver": "exec", "command": "/usr/bin/python3"}
    });
    let (Value::Object(fields), Value::Object(more)) = (&mut g, extra) else {
        panic!("groups and extras are objects");
    };
    fields.extend(more);
    serde_json::from_value(g).unwrap()
}

fn job(name: &str, priority: u32, groups: Vec<TaskGroup>) -> JobSpec {
    let mut spec: JobSpec =
        serde_json::from_value(json!({"name": name, "priority": priority})).unwrap();
    spec.groups = groups;
    spec
}

/// The running allocation of instance `index` of `job`'s group `group` on
/// `node`, holding the GPUs at `gpus`, as the group asks.
fn running(spec: &JobSpec, group: &str, index: u32, node: &str, gpus: &[usize]) -> Allocation {
    let g = spec.group(group).unwrap();
    serde_json::from_value(json!({
        "id": format!("{}-{group}-{index}", spec.name), "job_id": spec.name,
        "job_version": 1, "node_id": node, "group": group, "index": index,
        "resources": g.resources,
        "gpus": gpus.iter().map(|i| format!("{node}-gpu{i}")).collect::<Vec<_>>(),
        "state": "running", "desired": "run", "created_at": 0, "updated_at": 0
    }))
    .unwrap()
}

/// `count` one-GPU instances of `spec`'s first group on GPUs `0..count` of `node`,
/// numbered from `first`.
fn ones(spec: &JobSpec, node: &str, first: u32, count: usize) -> Vec<Allocation> {
    let group = &spec.groups[0].name;
    (0..count)
        .map(|i| running(spec, group, first + i as u32, node, &[i]))
        .collect()
}

/// The jobs a cluster runs, by id, answering what the planners ask of them.
struct Jobs(BTreeMap<JobId, JobSpec>);

impl Jobs {
    fn new(specs: impl IntoIterator<Item = JobSpec>) -> Self {
        Self(
            specs
                .into_iter()
                .map(|s| (JobId::new(s.name.as_str()), s))
                .collect(),
        )
    }

    fn snapshot(&self, nodes: &[Node], allocs: &[Allocation]) -> PlanSnapshot {
        PlanSnapshot::with_jobs(nodes, allocs, |job, group| self.info(job, group))
    }

    fn info(&self, job: &JobId, group: &str) -> Option<GroupInfo> {
        self.0.get(job).map(|spec| GroupInfo::of(spec, group))
    }

    fn spec(&self, job: &JobId, group: &str) -> Option<&TaskGroup> {
        self.0.get(job)?.group(group)
    }

    /// How many more of a group's instances may be disrupted: its
    /// `max_unavailable` (one by default), as every instance here is running.
    fn budget(&self, job: &JobId, group: &str) -> u32 {
        self.spec(job, group)
            .map_or(0, |g| g.max_unavailable.unwrap_or(1))
    }

    fn defrag(&self, snapshot: &PlanSnapshot, request: &PlanRequest) -> Option<Defrag> {
        let priority = self.0[&request.job_id].priority;
        plan_defrag(
            snapshot,
            request,
            priority,
            |j, g| self.budget(j, g),
            |j, g| self.spec(j, g),
        )
    }
}

fn whole(spec: &JobSpec) -> PlanRequest {
    PlanRequest::whole_job(JobId::new(spec.name.as_str()), spec)
}

/// Two nodes of eight GPUs, four used on each by one-GPU instances of two jobs.
fn half_full(a_movable: bool, max_unavailable: u32) -> (Vec<Node>, Jobs, Vec<Allocation>) {
    let extra = |movable: bool| json!({"movable": movable, "max_unavailable": max_unavailable});
    let x = job("batch-x", 20, vec![group("worker", 4, 1, extra(a_movable))]);
    let y = job("batch-y", 20, vec![group("worker", 4, 1, extra(true))]);
    let trainer = json!({"resources": {"cpu_millis": 16000, "memory_mib": 65536,
                                       "gpus": {"count": 8, "same_interconnect": true}}});
    let train = job("train", 50, vec![group("trainer", 1, 8, trainer)]);
    let nodes = vec![
        node("a", json!({}), &nvlinked()),
        node("b", json!({}), &nvlinked()),
    ];
    let allocs = [ones(&x, "a", 0, 4), ones(&y, "b", 0, 4)].concat();
    (nodes, Jobs::new([x, y, train]), allocs)
}

fn moves(d: &Defrag) -> Vec<(&str, &str, &str)> {
    d.migrations
        .iter()
        .map(|m| (m.alloc_id.as_str(), m.from.as_str(), m.to.node_id.as_str()))
        .collect()
}

#[test]
fn defragmentation_empties_a_node_for_an_eight_gpu_instance_with_the_fewest_moves() {
    let (nodes, jobs, allocs) = half_full(true, 4);
    let mut snapshot = jobs.snapshot(&nodes, &allocs);
    let request = whole(&jobs.0[&JobId::new("train")]);
    // Eight GPUs are free, four on each node: the plain plan cannot place it.
    let planned = plan(&snapshot, &request);
    assert!(planned.placements.is_empty());
    let left = request.without(&planned.placements);
    let d = jobs.defrag(&snapshot, &left).unwrap();
    // Four moves either way; the tie goes to the earlier node id.
    assert_eq!(
        moves(&d),
        [
            ("batch-x-worker-0", "a", "b"),
            ("batch-x-worker-1", "a", "b"),
            ("batch-x-worker-2", "a", "b"),
            ("batch-x-worker-3", "a", "b"),
        ]
    );
    assert!(d
        .migrations
        .iter()
        .all(|m| m.job_id.as_str() == "batch-x" && m.to.group == "worker"));
    assert_eq!(d.placements.len(), 1);
    assert_eq!(d.placements[0].node_id.as_str(), "a");
    assert_eq!(d.placements[0].gpus.len(), 8);
    assert!(d.unplaced.is_empty());

    // The worker commits it as one change: the old allocations stopped, their
    // replacements and the new instance placed. The snapshot follows without a
    // rebuild, and agrees with one.
    let mut after: Vec<Allocation> = allocs.clone();
    for m in &d.migrations {
        snapshot.remove(&m.alloc_id);
        after.retain(|a| a.id != m.alloc_id);
        let spec = &jobs.0[&m.job_id];
        let gpus: Vec<usize> =
            m.to.gpus
                .iter()
                .map(|u| u.rsplit("gpu").next().unwrap().parse().unwrap())
                .collect();
        let mut moved = running(spec, &m.to.group, m.to.index, m.to.node_id.as_str(), &gpus);
        moved.id = AllocId::new(format!("{}-moved", m.alloc_id));
        snapshot.add(&moved, jobs.info(&m.job_id, &m.to.group).unwrap());
        after.push(moved);
    }
    let p = &d.placements[0];
    let train = &jobs.0[&JobId::new("train")];
    let placed = running(
        train,
        &p.group,
        p.index,
        p.node_id.as_str(),
        &[0, 1, 2, 3, 4, 5, 6, 7],
    );
    snapshot.add(&placed, jobs.info(&placed.job_id, &p.group).unwrap());
    after.push(placed);
    let rebuilt = jobs.snapshot(&nodes, &after);
    for id in ["a", "b"] {
        let id = NodeId::new(id);
        assert_eq!(
            snapshot.live_allocations(&id),
            rebuilt.live_allocations(&id)
        );
    }
    assert_eq!(snapshot.live_allocations(&NodeId::new("b")).len(), 8);
    // Nothing is left to place, nor room for more.
    let more = group("more", 1, 1, json!({}));
    let extra = PlanRequest {
        job_id: JobId::new("train"),
        groups: vec![GroupDemand {
            group: more,
            indices: vec![0],
        }],
    };
    assert!(plan(&snapshot, &extra).placements.is_empty());
    assert_eq!(plan(&snapshot, &extra), plan(&rebuilt, &extra));
}

#[test]
fn defragmentation_leaves_non_movable_work_and_empties_the_other_node() {
    let (nodes, jobs, allocs) = half_full(false, 4);
    let snapshot = jobs.snapshot(&nodes, &allocs);
    let request = whole(&jobs.0[&JobId::new("train")]);
    let d = jobs.defrag(&snapshot, &request).unwrap();
    assert_eq!(d.migrations.len(), 4);
    assert!(moves(&d)
        .iter()
        .all(|(id, from, to)| id.starts_with("batch-y") && (*from, *to) == ("b", "a")));
    assert_eq!(d.placements[0].node_id.as_str(), "b");
}

#[test]
fn defragmentation_within_a_budget_too_small_moves_nothing() {
    let (nodes, jobs, allocs) = half_full(true, 3);
    let snapshot = jobs.snapshot(&nodes, &allocs);
    let request = whole(&jobs.0[&JobId::new("train")]);
    assert_eq!(jobs.defrag(&snapshot, &request), None);
}

#[test]
fn preemption_evicts_only_the_lowest_priority_work_that_makes_room() {
    let low = job("batch-low", 10, vec![group("worker", 8, 1, json!({}))]);
    let mid = job("batch-mid", 30, vec![group("worker", 8, 1, json!({}))]);
    let nodes = [
        node("a", json!({}), &nvlinked()),
        node("b", json!({}), &nvlinked()),
    ];
    let allocs = [ones(&low, "a", 0, 8), ones(&mid, "b", 0, 8)].concat();
    let urgent = job("urgent", 50, vec![group("infer", 1, 4, json!({}))]);
    let eager = job("eager", 15, vec![group("infer", 1, 4, json!({}))]);
    let jobs = Jobs::new([low, mid, urgent.clone(), eager.clone()]);
    let snapshot = jobs.snapshot(&nodes, &allocs);
    assert!(plan(&snapshot, &whole(&urgent)).placements.is_empty());

    let Preemption {
        placements,
        evictions,
        unplaced,
    } = plan_preemption(&snapshot, &whole(&urgent), urgent.priority).unwrap();
    assert_eq!(evictions.len(), 4);
    assert!(evictions.iter().all(|e| e.job_id.as_str() == "batch-low"
        && e.priority == 10
        && e.node_id.as_str() == "a"));
    let freed: BTreeSet<String> = evictions
        .iter()
        .map(|e| format!("a-gpu{}", e.index))
        .collect();
    assert_eq!(placements.len(), 1);
    assert_eq!(placements[0].node_id.as_str(), "a");
    assert_eq!(
        placements[0].gpus.iter().cloned().collect::<BTreeSet<_>>(),
        freed
    );
    assert!(unplaced.is_empty());

    // Ten points above nobody: nothing may go.
    assert_eq!(
        plan_preemption(&snapshot, &whole(&eager), eager.priority),
        None
    );
}

#[test]
fn spread_over_three_sites_puts_three_replicas_on_three_sites() {
    let nodes: Vec<Node> = (0..9)
        .map(|i| {
            let site = ["ghent", "delft", "lille"][i % 3];
            node(&format!("n{i}"), json!({"site": site}), &nvlinked())
        })
        .collect();
    let replica = group("replica", 3, 1, json!({"spread": [{"attribute": "site"}]}));
    let serve = job("serve", 50, vec![replica]);
    let p = plan(&PlanSnapshot::new(&nodes, &[]), &whole(&serve));
    let sites: BTreeSet<&str> = p
        .placements
        .iter()
        .map(|p| {
            let n = nodes.iter().find(|n| n.id == p.node_id).unwrap();
            n.attributes["site"].as_str()
        })
        .collect();
    assert_eq!(sites, BTreeSet::from(["delft", "ghent", "lille"]));
}

#[test]
fn a_sixteen_gpu_gang_lands_on_whole_nvlink_domains() {
    // Four nodes whose GPUs are linked in pairs come first by id; two with one
    // NVLink domain each come last.
    let mut nodes: Vec<Node> = (0..4)
        .map(|i| node(&format!("a{i}"), json!({}), &paired()))
        .collect();
    nodes.push(node("b0", json!({}), &nvlinked()));
    nodes.push(node("b1", json!({}), &nvlinked()));
    let linked = json!({"gang": true,
                        "resources": {"cpu_millis": 16000, "memory_mib": 65536,
                                      "gpus": {"count": 8, "same_interconnect": true}}});
    let train = job("train", 50, vec![group("trainer", 2, 8, linked)]);
    let p = plan(&PlanSnapshot::new(&nodes, &[]), &whole(&train));
    let on: Vec<&str> = p.placements.iter().map(|p| p.node_id.as_str()).collect();
    assert_eq!(on, ["b0", "b1"]);
    for placement in &p.placements {
        let n = nodes.iter().find(|n| n.id == placement.node_id).unwrap();
        let domains: BTreeSet<Option<&str>> = placement
            .gpus
            .iter()
            .map(|uuid| {
                let gpu = n.resources.gpus.iter().find(|g| &g.uuid == uuid).unwrap();
                gpu.interconnect_group.as_deref()
            })
            .collect();
        assert_eq!(domains.len(), 1, "{placement:?} spans domains");
    }
    // With one whole domain left, the gang places nothing and says why.
    nodes.pop();
    let p = plan(&PlanSnapshot::new(&nodes, &[]), &whole(&train));
    assert!(p.placements.is_empty());
    let reason = p.unplaced[0].to_unplaced().reason;
    assert!(
        reason.starts_with("gang of 2 placed none: 1 fit, then 0/5 nodes"),
        "{reason}"
    );
}
