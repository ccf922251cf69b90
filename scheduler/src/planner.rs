//! The planner: a pure function from a cluster snapshot and a job's unplaced
//! instances to a plan of placements. No I/O, no clock, no randomness: the same
//! [`PlanSnapshot`] and [`PlanRequest`] always give the same [`Plan`].
//!
//! For each task group, in request order:
//!
//! 1. **Feasibility, once per group.** Nodes that are not ready or fail a constraint
//!    are dropped before any instance is considered; a regex is compiled once.
//! 2. **Ranking.** A node's score is bin-packing (fuller after placement is better),
//!    GPU best-fit (the node whose matching free GPUs fit the request most tightly),
//!    and the group's affinities. Spread is a penalty per instance already on the
//!    same attribute value.
//! 3. **Indexing.** Candidates are bucketed by their spread values (one bucket
//!    without spread) and each bucket keeps a max-heap by score. A node's score only
//!    changes when an instance lands on it, and within one group free capacity only
//!    shrinks, so a node that no longer fits is dropped for good and an instance
//!    costs `O(buckets + log nodes)`, not a scan of every node.
//! 4. **Gangs.** A gang group is placed whole or its placements are rolled back.
//!
//! Ties break by node id (the snapshot keeps nodes sorted by id), then by GPU index.
//! When an instance cannot be placed, every node is checked once more to explain
//! why, in counts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;

use aigrid_api::{
    Allocation, ConstraintOp, ConstraintValue, GpuRequest, JobId, JobSpec, MemoryMib, MilliCpu,
    Node, NodeId, NodeStatus, TaskGroup, Unplaced,
};

/// Score of a node whose used share of every resource would be 100% after placement.
const FULL: i64 = 1000;
/// Spread penalty per instance already on a value, per point of spread weight. At
/// the default weight it outweighs bin-packing and GPU best-fit together.
const SPREAD_UNIT: i64 = 40;
/// Spread weight when a spread does not state one.
const DEFAULT_SPREAD_WEIGHT: i64 = 100;
/// Affinity score per point of affinity weight.
const AFFINITY_UNIT: i64 = 10;

/// What the planner knows about the cluster: nodes sorted by id, and what their
/// live allocations hold, indexed once so planning never rescans allocations.
#[derive(Debug, Clone, Default)]
pub struct PlanSnapshot {
    nodes: Vec<SnapNode>,
    usage: Vec<Usage>,
    /// Nodes holding live instances, per job and group, for spreading.
    instances: HashMap<(JobId, String), Vec<usize>>,
}

#[derive(Debug, Clone)]
struct SnapNode {
    id: NodeId,
    attributes: BTreeMap<String, String>,
    status: NodeStatus,
    cpu: u64,
    memory: u64,
    gpus: Vec<SnapGpu>,
}

#[derive(Debug, Clone)]
struct SnapGpu {
    uuid: String,
    model: String,
    memory: u64,
    healthy: bool,
    interconnect: Option<String>,
}

/// What is taken on one node; changes as a plan places instances.
#[derive(Debug, Clone, Default)]
struct Usage {
    cpu: u64,
    memory: u64,
    /// Per GPU (same order as the node's): held whole by one instance.
    exclusive: Vec<bool>,
    /// Per GPU: memory taken by slices.
    sliced: Vec<u64>,
}

impl PlanSnapshot {
    /// Builds the snapshot from nodes and allocations. Only live allocations
    /// (wanted and not finished) hold resources; allocations on unknown nodes or
    /// naming unknown GPUs hold what can be matched and nothing more.
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        allocations: impl IntoIterator<Item = &'a Allocation>,
    ) -> Self {
        let mut nodes: Vec<SnapNode> = nodes
            .into_iter()
            .map(|n| SnapNode {
                id: n.id.clone(),
                attributes: n.attributes.clone(),
                status: n.status,
                cpu: n.resources.cpu_millis.get(),
                memory: n.resources.memory_mib.get(),
                gpus: n
                    .resources
                    .gpus
                    .iter()
                    .map(|g| SnapGpu {
                        uuid: g.uuid.clone(),
                        model: g.model.clone(),
                        memory: g.memory_mib.get(),
                        healthy: g.healthy,
                        interconnect: g.interconnect_group.clone(),
                    })
                    .collect(),
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        let position: HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let mut usage: Vec<Usage> = nodes
            .iter()
            .map(|n| Usage {
                cpu: 0,
                memory: 0,
                exclusive: vec![false; n.gpus.len()],
                sliced: vec![0; n.gpus.len()],
            })
            .collect();
        let mut instances: HashMap<(JobId, String), Vec<usize>> = HashMap::new();
        for alloc in allocations.into_iter().filter(|a| a.is_live()) {
            let Some(&at) = position.get(alloc.node_id.as_str()) else {
                continue;
            };
            let node = &nodes[at];
            let used = &mut usage[at];
            used.cpu += alloc.resources.cpu_millis.get();
            used.memory += alloc.resources.memory_mib.get();
            let slice = alloc
                .resources
                .gpus
                .as_ref()
                .and_then(|g| g.memory_slice_mib);
            for uuid in &alloc.gpus {
                if let Some(g) = node.gpus.iter().position(|g| &g.uuid == uuid) {
                    match slice {
                        Some(slice) => used.sliced[g] += slice.get(),
                        None => used.exclusive[g] = true,
                    }
                }
            }
            instances
                .entry((alloc.job_id.clone(), alloc.group.clone()))
                .or_default()
                .push(at);
        }
        Self {
            nodes,
            usage,
            instances,
        }
    }

    /// How many nodes the snapshot holds.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// One job's instances that still need a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRequest {
    /// The job; its live allocations in the snapshot count for spreading.
    pub job_id: JobId,
    /// The groups to place, placed in this order.
    pub groups: Vec<GroupDemand>,
}

/// The instances of one task group to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDemand {
    /// The group as the job spec states it.
    pub group: TaskGroup,
    /// Indices (`0..count`) of the instances to place.
    pub indices: Vec<u32>,
}

impl PlanRequest {
    /// A request to place every instance of every group of a job.
    pub fn whole_job(job_id: JobId, spec: &JobSpec) -> Self {
        Self {
            job_id,
            groups: spec
                .groups
                .iter()
                .map(|g| GroupDemand {
                    group: g.clone(),
                    indices: (0..g.count).collect(),
                })
                .collect(),
        }
    }
}

/// The planner's answer: where instances go, and why the rest could not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Instances placed, in placement order.
    pub placements: Vec<Placement>,
    /// Groups with instances left unplaced.
    pub unplaced: Vec<UnplacedGroup>,
}

/// One instance bound to a node and, if it asked for them, concrete GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The task group.
    pub group: String,
    /// The instance index within the group.
    pub index: u32,
    /// The node chosen.
    pub node_id: NodeId,
    /// UUIDs of the GPUs reserved, in index order; one for a slice.
    pub gpus: Vec<String>,
    /// For a fractional request, the GPU memory reserved on the one shared GPU.
    pub gpu_memory_slice: Option<MemoryMib>,
}

/// Instances of one group the planner could not place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnplacedGroup {
    /// The task group.
    pub group: String,
    /// How many instances are missing.
    pub missing: u32,
    /// For a gang, how many instances would have fit before one did not; all of
    /// them were withdrawn.
    pub gang_fitted: Option<u32>,
    /// Why the first missing instance fit nowhere.
    pub explanation: Explanation,
}

impl UnplacedGroup {
    /// The wire form the job view carries.
    pub fn to_unplaced(&self) -> Unplaced {
        let reason = match self.gang_fitted {
            Some(fitted) => format!(
                "gang of {} placed none: {fitted} fit, then {}",
                self.missing, self.explanation
            ),
            None => self.explanation.to_string(),
        };
        Unplaced {
            group: self.group.clone(),
            missing: self.missing,
            reason,
        }
    }
}

/// Why an instance fit nowhere, in node counts: each node is counted once, under
/// the first check it failed (status, constraints in order, CPU, memory, GPUs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Nodes in the snapshot.
    pub nodes: u32,
    /// Nodes that could take the instance (0 when it fit nowhere).
    pub feasible: u32,
    /// Rejections with how many nodes each; most frequent first.
    pub rejections: Vec<(Rejection, u32)>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} nodes", self.feasible, self.nodes)?;
        for (i, (rejection, count)) in self.rejections.iter().enumerate() {
            let sep = if i == 0 { ": " } else { ", " };
            write!(f, "{sep}{count} {rejection}")?;
        }
        Ok(())
    }
}

/// The first check a node failed for an instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// The node is down or draining.
    NotReady,
    /// A constraint failed; its rule in words (`country in [BE, NL]`).
    Constraint(String),
    /// Not enough free CPU.
    Cpu(MilliCpu),
    /// Not enough free host memory.
    Memory(MemoryMib),
    /// Not enough free healthy GPUs matching the request; its words (`4 free H100
    /// ≥ 40000 MiB`).
    Gpus(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotReady => f.write_str("not ready"),
            Self::Constraint(rule) => write!(f, "failed {rule}"),
            Self::Cpu(need) => write!(f, "lacked {need} free CPU millis"),
            Self::Memory(need) => write!(f, "lacked {need} MiB free memory"),
            Self::Gpus(what) => write!(f, "lacked {what}"),
        }
    }
}

/// Places `request` on `snapshot`. See the module documentation for the rules.
pub fn plan(snapshot: &PlanSnapshot, request: &PlanRequest) -> Plan {
    let mut usage = snapshot.usage.clone();
    let mut out = Plan::default();
    for demand in &request.groups {
        if demand.indices.is_empty() {
            continue;
        }
        let group = GroupPlanner::new(snapshot, &demand.group);
        let first = out.placements.len();
        let result = group.place(snapshot, request, demand, &mut usage, &mut out.placements);
        if let Err((fitted, explanation)) = result {
            let placed = out.placements.len() - first;
            let missing = demand.indices.len() - placed;
            let gang_fitted = if demand.group.gang {
                for p in out.placements.drain(first..) {
                    group.release(snapshot, &mut usage, &p);
                }
                Some(fitted)
            } else {
                None
            };
            out.unplaced.push(UnplacedGroup {
                group: demand.group.name.clone(),
                missing: u32::try_from(if demand.group.gang {
                    demand.indices.len()
                } else {
                    missing
                })
                .unwrap_or(u32::MAX),
                gang_fitted,
                explanation,
            });
        }
    }
    out
}

/// A constraint or affinity rule, ready to evaluate.
#[derive(Debug)]
struct Rule {
    attribute: String,
    op: ConstraintOp,
    values: Vec<String>,
    regex: Option<regex::Regex>,
    number: Option<f64>,
}

impl Rule {
    fn new(attribute: &str, op: ConstraintOp, value: &ConstraintValue) -> Self {
        let values = match value {
            ConstraintValue::One(v) => vec![v.clone()],
            ConstraintValue::Many(vs) => vs.clone(),
        };
        let single = values.first().map(String::as_str).unwrap_or_default();
        Self {
            attribute: attribute.to_owned(),
            op,
            // Specs are validated on submission; a pattern that does not compile
            // matches nothing rather than everything.
            regex: (op == ConstraintOp::Regex)
                .then(|| {
                    regex::RegexBuilder::new(single)
                        .size_limit(aigrid_api::spec::MAX_REGEX_BYTES)
                        .build()
                        .ok()
                })
                .flatten(),
            number: single.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
            values,
        }
    }

    fn matches(&self, attributes: &BTreeMap<String, String>) -> bool {
        let Some(actual) = attributes.get(&self.attribute) else {
            return matches!(self.op, ConstraintOp::Ne | ConstraintOp::NotIn);
        };
        let number = || actual.trim().parse::<f64>().ok();
        match self.op {
            ConstraintOp::Eq => self.values.iter().any(|v| v == actual),
            ConstraintOp::Ne => self.values.iter().all(|v| v != actual),
            ConstraintOp::In => self.values.iter().any(|v| v == actual),
            ConstraintOp::NotIn => self.values.iter().all(|v| v != actual),
            ConstraintOp::Regex => self.regex.as_ref().is_some_and(|r| r.is_match(actual)),
            ConstraintOp::Ge => matches!((number(), self.number), (Some(a), Some(b)) if a >= b),
            ConstraintOp::Le => matches!((number(), self.number), (Some(a), Some(b)) if a <= b),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            ConstraintOp::In | ConstraintOp::NotIn => write!(
                f,
                "{} {} [{}]",
                self.attribute,
                self.op,
                self.values.join(", ")
            ),
            _ => write!(
                f,
                "{} {} {}",
                self.attribute,
                self.op,
                self.values.first().map(String::as_str).unwrap_or_default()
            ),
        }
    }
}

/// What one instance of the group asks for, flattened.
#[derive(Debug)]
struct Need {
    cpu: u64,
    memory: u64,
    gpus: Option<GpuNeed>,
}

#[derive(Debug)]
struct GpuNeed {
    count: usize,
    model: Option<String>,
    min_memory: u64,
    slice: Option<u64>,
    same_interconnect: bool,
}

impl GpuNeed {
    fn new(request: &GpuRequest) -> Self {
        Self {
            count: usize::try_from(request.count).unwrap_or(usize::MAX),
            model: request.model.clone(),
            min_memory: request.min_memory_mib.map_or(0, MemoryMib::get),
            slice: request.memory_slice_mib.map(MemoryMib::get),
            same_interconnect: request.same_interconnect,
        }
    }

    /// Healthy GPUs of the right model and size, free or not.
    fn suits(&self, gpu: &SnapGpu) -> bool {
        gpu.healthy
            && gpu.memory >= self.min_memory
            && self.slice.is_none_or(|s| gpu.memory >= s)
            && self.model.as_deref().is_none_or(|m| gpu.model.contains(m))
    }

    fn describe(&self) -> String {
        let model = self.model.as_deref().unwrap_or("GPU");
        let min = if self.min_memory > 0 {
            format!(" ≥ {} MiB", self.min_memory)
        } else {
            String::new()
        };
        match self.slice {
            Some(slice) => format!("a {model}{min} with {slice} MiB free to share"),
            None if self.same_interconnect => {
                format!("{} free {model}{min} in one interconnect group", self.count)
            }
            None => format!("{} free {model}{min}", self.count),
        }
    }

    /// The GPUs (positions on the node) an instance would get, best first.
    fn choose(&self, node: &SnapNode, used: &Usage) -> Option<Vec<usize>> {
        if let Some(slice) = self.slice {
            // Best fit: the suitable shared GPU left with the least memory.
            return (0..node.gpus.len())
                .filter(|&g| !used.exclusive[g] && self.suits(&node.gpus[g]))
                .filter_map(|g| {
                    let left = node.gpus[g].memory.checked_sub(used.sliced[g] + slice)?;
                    Some((left, g))
                })
                .min()
                .map(|(_, g)| vec![g]);
        }
        let free: Vec<usize> = (0..node.gpus.len())
            .filter(|&g| !used.exclusive[g] && used.sliced[g] == 0 && self.suits(&node.gpus[g]))
            .collect();
        if free.len() < self.count {
            return None;
        }
        // Group free GPUs by interconnect domain; a GPU without one stands alone.
        let mut domains: BTreeMap<(Option<&str>, usize), Vec<usize>> = BTreeMap::new();
        for &g in &free {
            let gpu = &node.gpus[g];
            let key = match &gpu.interconnect {
                Some(d) => (Some(d.as_str()), 0),
                None => (None, g),
            };
            domains.entry(key).or_default().push(g);
        }
        // The smallest domain that holds the whole instance, so large domains stay
        // free for large instances.
        let fits = domains
            .values()
            .filter(|gs| gs.len() >= self.count)
            .min_by_key(|gs| gs.len());
        if let Some(gs) = fits {
            return Some(gs[..self.count].to_vec());
        }
        if self.same_interconnect {
            return None;
        }
        // Otherwise as few domains as possible: largest first.
        let mut ordered: Vec<&Vec<usize>> = domains.values().collect();
        ordered.sort_by_key(|gs| Reverse(gs.len()));
        let mut chosen: Vec<usize> = ordered.into_iter().flatten().copied().collect();
        chosen.truncate(self.count);
        chosen.sort_unstable();
        Some(chosen)
    }
}

/// A candidate in a bucket's heap: its score, its position (the earlier node id
/// wins a tie) and its affinity score, kept to rescore it after a placement.
type Ranked = (i64, Reverse<usize>, i64);

/// One group's filtered candidates and compiled rules.
struct GroupPlanner<'g> {
    group: &'g TaskGroup,
    need: Need,
    constraints: Vec<Rule>,
    /// Nodes passing status and constraints, with their affinity score.
    candidates: Vec<(usize, i64)>,
    /// Per spread attribute: its weight.
    spread_weights: Vec<i64>,
}

impl<'g> GroupPlanner<'g> {
    fn new(snapshot: &PlanSnapshot, group: &'g TaskGroup) -> Self {
        let r = &group.resources;
        let need = Need {
            cpu: r.cpu_millis.get(),
            memory: r.memory_mib.get(),
            gpus: r.gpus.as_ref().map(GpuNeed::new),
        };
        let constraints: Vec<Rule> = group
            .constraints
            .iter()
            .map(|c| Rule::new(&c.attribute, c.op, &c.value))
            .collect();
        let affinities: Vec<(Rule, i64)> = group
            .affinities
            .iter()
            .map(|a| {
                (
                    Rule::new(&a.attribute, a.op, &a.value),
                    i64::from(a.weight) * AFFINITY_UNIT,
                )
            })
            .collect();
        let candidates = snapshot
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.status.is_schedulable())
            .filter(|(_, n)| constraints.iter().all(|c| c.matches(&n.attributes)))
            .map(|(i, n)| {
                let affinity = affinities
                    .iter()
                    .filter(|(rule, _)| rule.matches(&n.attributes))
                    .map(|(_, w)| *w)
                    .sum();
                (i, affinity)
            })
            .collect();
        let spread_weights = group
            .spread
            .iter()
            .map(|s| s.weight.map_or(DEFAULT_SPREAD_WEIGHT, i64::from))
            .collect();
        Self {
            group,
            need,
            constraints,
            candidates,
            spread_weights,
        }
    }

    /// The spread values of a node, one per spread attribute; a node lacking the
    /// attribute counts under the empty value.
    fn spread_key(&self, node: &SnapNode) -> Vec<String> {
        self.group
            .spread
            .iter()
            .map(|s| {
                node.attributes
                    .get(&s.attribute)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The first capacity check the node fails, or the GPUs it would give.
    fn fit(&self, node: &SnapNode, used: &Usage) -> Result<Vec<usize>, Rejection> {
        if node.cpu.saturating_sub(used.cpu) < self.need.cpu {
            return Err(Rejection::Cpu(MilliCpu::new(self.need.cpu)));
        }
        if node.memory.saturating_sub(used.memory) < self.need.memory {
            return Err(Rejection::Memory(MemoryMib::new(self.need.memory)));
        }
        match &self.need.gpus {
            None => Ok(Vec::new()),
            Some(gpus) => gpus
                .choose(node, used)
                .ok_or_else(|| Rejection::Gpus(gpus.describe())),
        }
    }

    /// The node's score if the instance landed there: bin-packing plus GPU
    /// best-fit plus affinity. Higher is better.
    fn score(&self, node: &SnapNode, used: &Usage, affinity: i64) -> i64 {
        let share = |used: u64, need: u64, total: u64| -> i64 {
            if total == 0 {
                return FULL;
            }
            let after = u128::from(used + need).min(u128::from(total));
            i64::try_from(after * 1000 / u128::from(total)).unwrap_or(FULL)
        };
        let mut score = (share(used.cpu, self.need.cpu, node.cpu)
            + share(used.memory, self.need.memory, node.memory))
            / 2;
        if let Some(gpus) = &self.need.gpus {
            // Best fit: 1000 when the matching free GPUs are exactly the request.
            let free = (0..node.gpus.len())
                .filter(|&g| {
                    !used.exclusive[g]
                        && (gpus.slice.is_some() || used.sliced[g] == 0)
                        && gpus.suits(&node.gpus[g])
                })
                .count()
                .max(1);
            let want = if gpus.slice.is_some() { 1 } else { gpus.count };
            score += i64::try_from(want * 1000 / free).unwrap_or(FULL).min(FULL);
        }
        score + affinity
    }

    fn take(&self, node: &SnapNode, used: &mut Usage, gpus: &[usize]) {
        used.cpu += self.need.cpu;
        used.memory += self.need.memory;
        let slice = self.need.gpus.as_ref().and_then(|g| g.slice);
        for &g in gpus {
            match slice {
                Some(s) => used.sliced[g] += s,
                None => used.exclusive[g] = true,
            }
        }
        debug_assert!(used.cpu <= node.cpu && used.memory <= node.memory);
    }

    fn release(&self, snapshot: &PlanSnapshot, usage: &mut [Usage], p: &Placement) {
        let Ok(at) = snapshot.nodes.binary_search_by(|n| n.id.cmp(&p.node_id)) else {
            return;
        };
        let node = &snapshot.nodes[at];
        let used = &mut usage[at];
        used.cpu -= self.need.cpu;
        used.memory -= self.need.memory;
        for uuid in &p.gpus {
            if let Some(g) = node.gpus.iter().position(|g| &g.uuid == uuid) {
                match p.gpu_memory_slice {
                    Some(s) => used.sliced[g] -= s.get(),
                    None => used.exclusive[g] = false,
                }
            }
        }
    }

    /// Places the demand's instances, appending to `placements`. On the first
    /// instance that fits nowhere, answers how many fitted and why.
    fn place(
        &self,
        snapshot: &PlanSnapshot,
        request: &PlanRequest,
        demand: &GroupDemand,
        usage: &mut [Usage],
        placements: &mut Vec<Placement>,
    ) -> Result<(), (u32, Explanation)> {
        // Buckets by spread key, each a max-heap of (score, earliest node id).
        let mut bucket_of: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        let mut buckets: Vec<(Vec<String>, BinaryHeap<Ranked>)> = Vec::new();
        for &(n, affinity) in &self.candidates {
            let node = &snapshot.nodes[n];
            let key = self.spread_key(node);
            let b = *bucket_of.entry(key.clone()).or_insert_with(|| {
                buckets.push((key, BinaryHeap::new()));
                buckets.len() - 1
            });
            let score = self.score(node, &usage[n], affinity);
            buckets[b].1.push((score, Reverse(n), affinity));
        }
        // Instances per spread attribute value, starting from the live ones.
        let mut spread_counts: Vec<HashMap<String, i64>> =
            vec![HashMap::new(); self.group.spread.len()];
        if let Some(live) = snapshot
            .instances
            .get(&(request.job_id.clone(), self.group.name.clone()))
        {
            for &n in live {
                for (k, value) in self.spread_key(&snapshot.nodes[n]).into_iter().enumerate() {
                    *spread_counts[k].entry(value).or_default() += 1;
                }
            }
        }
        // Each bucket's best node that fits, with its GPUs. Only the bucket an
        // instance lands in changes, so the others' answers stay valid.
        let mut tops: Vec<Option<(i64, usize, Vec<usize>)>> = vec![None; buckets.len()];
        let mut stale = vec![true; buckets.len()];
        let mut fitted = 0u32;
        for &index in &demand.indices {
            let mut best: Option<(i64, usize, usize)> = None;
            for (b, (key, heap)) in buckets.iter_mut().enumerate() {
                if stale[b] {
                    stale[b] = false;
                    // Drop nodes that no longer fit: within a group they never will.
                    tops[b] = loop {
                        let Some(&(score, Reverse(n), _)) = heap.peek() else {
                            break None;
                        };
                        match self.fit(&snapshot.nodes[n], &usage[n]) {
                            Ok(gpus) => break Some((score, n, gpus)),
                            Err(_) => {
                                heap.pop();
                            }
                        }
                    };
                }
                let Some((score, n, _)) = &tops[b] else {
                    continue;
                };
                let (score, n) = (*score, *n);
                let penalty: i64 = key
                    .iter()
                    .enumerate()
                    .map(|(k, v)| {
                        spread_counts[k].get(v).copied().unwrap_or(0)
                            * self.spread_weights[k]
                            * SPREAD_UNIT
                    })
                    .sum();
                let total = score - penalty;
                let better = match best {
                    None => true,
                    Some((s, _, bn)) => total > s || (total == s && n < bn),
                };
                if better {
                    best = Some((total, b, n));
                }
            }
            let Some((_, b, n)) = best else {
                return Err((fitted, self.explain(snapshot, usage)));
            };
            let gpus = tops[b].take().map(|(_, _, gpus)| gpus).unwrap_or_default();
            stale[b] = true;
            let node = &snapshot.nodes[n];
            let (key, heap) = &mut buckets[b];
            let (_, _, affinity) = heap.pop().expect("the best node came from this heap");
            self.take(node, &mut usage[n], &gpus);
            heap.push((self.score(node, &usage[n], affinity), Reverse(n), affinity));
            for (k, value) in key.iter().enumerate() {
                *spread_counts[k].entry(value.clone()).or_default() += 1;
            }
            placements.push(Placement {
                group: self.group.name.clone(),
                index,
                node_id: node.id.clone(),
                gpus: gpus.iter().map(|&g| node.gpus[g].uuid.clone()).collect(),
                gpu_memory_slice: self
                    .need
                    .gpus
                    .as_ref()
                    .and_then(|g| g.slice)
                    .map(MemoryMib::new),
            });
            fitted += 1;
        }
        Ok(())
    }

    /// Checks every node against the group and counts the first failure of each.
    fn explain(&self, snapshot: &PlanSnapshot, usage: &[Usage]) -> Explanation {
        let mut counts: BTreeMap<Rejection, u32> = BTreeMap::new();
        let mut feasible = 0;
        for (node, used) in snapshot.nodes.iter().zip(usage) {
            let rejection = if !node.status.is_schedulable() {
                Some(Rejection::NotReady)
            } else if let Some(rule) = self
                .constraints
                .iter()
                .find(|c| !c.matches(&node.attributes))
            {
                Some(Rejection::Constraint(rule.to_string()))
            } else {
                self.fit(node, used).err()
            };
            match rejection {
                Some(r) => *counts.entry(r).or_default() += 1,
                None => feasible += 1,
            }
        }
        let mut rejections: Vec<(Rejection, u32)> = counts.into_iter().collect();
        rejections.sort_by_key(|(r, c)| (Reverse(*c), r.clone()));
        Explanation {
            nodes: u32::try_from(snapshot.nodes.len()).unwrap_or(u32::MAX),
            feasible,
            rejections,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use aigrid_api::{
        Affinity, AllocId, AllocState, Constraint, DesiredState, ExecTask, GpuDevice,
        NodeResources, Resources, Spread, TaskSpec, Timestamp,
    };
    use proptest::prelude::*;

    use super::*;

    /// A GPU as tests describe it: model, memory in GiB, healthy, interconnect group.
    type Gpu = (&'static str, u64, bool, Option<&'static str>);

    fn node(id: &str, attrs: &[(&str, &str)], cpu: u64, memory: u64, gpus: &[Gpu]) -> Node {
        Node {
            id: NodeId::new(id),
            name: id.to_owned(),
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            resources: NodeResources {
                cpu_millis: MilliCpu::new(cpu),
                memory_mib: MemoryMib::new(memory),
                disk_mib: 1000.into(),
                gpus: gpus
                    .iter()
                    .enumerate()
                    .map(|(i, (model, gib, healthy, link))| GpuDevice {
                        index: u32::try_from(i).unwrap(),
                        uuid: format!("{id}-gpu{i}"),
                        vendor: "nvidia".to_owned(),
                        model: (*model).to_owned(),
                        memory_mib: MemoryMib::new(gib * 1024),
                        healthy: *healthy,
                        numa_node: None,
                        interconnect_group: link.map(str::to_owned),
                        mig_capable: false,
                    })
                    .collect(),
            },
            status: NodeStatus::Ready,
            registered_at: Timestamp::new(1),
            last_seen: Timestamp::new(1),
        }
    }

    fn h100s(n: usize) -> Vec<Gpu> {
        vec![("NVIDIA H100", 80, true, None); n]
    }

    fn group(name: &str, count: u32, cpu: u64, memory: u64, gpus: Option<GpuRequest>) -> TaskGroup {
        TaskGroup {
            name: name.to_owned(),
            count,
            gang: false,
            resources: Resources {
                cpu_millis: MilliCpu::new(cpu),
                memory_mib: MemoryMib::new(memory),
                gpus,
            },
            constraints: Vec::new(),
            spread: Vec::new(),
            affinities: Vec::new(),
            movable: true,
            max_unavailable: None,
            task: TaskSpec::Exec(ExecTask {
                command: "/bin/true".to_owned(),
                args: Vec::new(),
                env: BTreeMap::new(),
                artifacts: Vec::new(),
            }),
        }
    }

    fn gpus(count: u32, model: Option<&str>, min_gib: Option<u64>) -> Option<GpuRequest> {
        Some(GpuRequest {
            count,
            model: model.map(str::to_owned),
            min_memory_mib: min_gib.map(|g| MemoryMib::new(g * 1024)),
            memory_slice_mib: None,
            same_interconnect: false,
        })
    }

    fn rule(attribute: &str, op: ConstraintOp, value: &[&str]) -> Constraint {
        let value = match op {
            ConstraintOp::In | ConstraintOp::NotIn => {
                ConstraintValue::Many(value.iter().map(|v| (*v).to_owned()).collect())
            }
            _ => ConstraintValue::One(value[0].to_owned()),
        };
        Constraint {
            attribute: attribute.to_owned(),
            op,
            value,
        }
    }

    fn request(groups: Vec<TaskGroup>) -> PlanRequest {
        PlanRequest {
            job_id: JobId::new("job"),
            groups: groups
                .into_iter()
                .map(|g| GroupDemand {
                    indices: (0..g.count).collect(),
                    group: g,
                })
                .collect(),
        }
    }

    fn run(nodes: &[Node], groups: Vec<TaskGroup>) -> Plan {
        plan(&PlanSnapshot::new(nodes, &[]), &request(groups))
    }

    fn on(plan: &Plan) -> Vec<&str> {
        plan.placements.iter().map(|p| p.node_id.as_str()).collect()
    }

    fn live(id: &str, job: &str, node: &str, resources: Resources, gpus: &[&str]) -> Allocation {
        Allocation {
            id: AllocId::new(id),
            job_id: JobId::new(job),
            job_version: 1,
            node_id: NodeId::new(node),
            group: "g".to_owned(),
            index: 0,
            resources,
            gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
            state: AllocState::Running,
            desired: DesiredState::Run,
            created_at: Timestamp::new(1),
            updated_at: Timestamp::new(1),
        }
    }

    #[test]
    fn only_ready_nodes_take_work() {
        let mut down = node("a", &[], 4000, 4096, &[]);
        down.status = NodeStatus::Down;
        let mut draining = node("b", &[], 4000, 4096, &[]);
        draining.status = NodeStatus::Draining;
        let nodes = [down, draining, node("c", &[], 4000, 4096, &[])];
        let p = run(&nodes, vec![group("g", 2, 1000, 1024, None)]);
        assert_eq!(on(&p), ["c", "c"]);
    }

    #[test]
    fn every_constraint_op_filters() {
        let nodes = [
            node(
                "a",
                &[("country", "BE"), ("cuda", "12.4"), ("site", "ghent-1")],
                8000,
                8192,
                &[],
            ),
            node(
                "b",
                &[("country", "NL"), ("cuda", "11.8"), ("site", "delft")],
                8000,
                8192,
                &[],
            ),
            node("c", &[("country", "FR")], 8000, 8192, &[]),
        ];
        let cases: [(Constraint, &[&str]); 7] = [
            (rule("country", ConstraintOp::Eq, &["NL"]), &["b"]),
            (rule("country", ConstraintOp::Ne, &["NL"]), &["a", "c"]),
            (
                rule("country", ConstraintOp::In, &["BE", "NL"]),
                &["a", "b"],
            ),
            (rule("country", ConstraintOp::NotIn, &["BE"]), &["b", "c"]),
            (rule("site", ConstraintOp::Regex, &["^ghent"]), &["a"]),
            (rule("cuda", ConstraintOp::Ge, &["12"]), &["a"]),
            (rule("cuda", ConstraintOp::Le, &["12"]), &["b"]),
        ];
        for (constraint, expected) in cases {
            let mut g = group("g", 3, 1000, 1024, None);
            g.constraints = vec![constraint.clone()];
            g.spread = vec![Spread {
                attribute: "country".to_owned(),
                weight: None,
            }];
            let p = run(&nodes, vec![g]);
            let used: BTreeSet<&str> = on(&p).into_iter().collect();
            assert_eq!(
                used.into_iter().collect::<Vec<_>>(),
                expected,
                "{constraint:?}"
            );
        }
    }

    #[test]
    fn cpu_and_memory_must_fit_and_binpacking_fills_the_fuller_node() {
        let nodes = [
            node("a", &[], 4000, 8192, &[]),
            node("b", &[], 4000, 8192, &[]),
            node("c", &[], 500, 8192, &[]),
        ];
        let snapshot = PlanSnapshot::new(
            &nodes,
            &[live(
                "x",
                "other",
                "b",
                Resources {
                    cpu_millis: 2000.into(),
                    memory_mib: 4096.into(),
                    gpus: None,
                },
                &[],
            )],
        );
        let p = plan(&snapshot, &request(vec![group("g", 3, 1000, 2048, None)]));
        // b is fuller, so it fills first; then a. c never has the CPU.
        assert_eq!(on(&p), ["b", "b", "a"]);
        let p = plan(&snapshot, &request(vec![group("g", 7, 1000, 2048, None)]));
        assert_eq!(p.placements.len(), 6);
        assert_eq!(p.unplaced[0].missing, 1);
        assert_eq!(
            p.unplaced[0].to_unplaced().reason,
            "0/3 nodes: 3 lacked 1000 free CPU millis"
        );
    }

    #[test]
    fn gpus_match_model_memory_and_prefer_the_tightest_node() {
        let nodes = [
            node("a", &[], 64000, 65536, &h100s(8)),
            node("b", &[], 64000, 65536, &h100s(2)),
            node(
                "c",
                &[],
                64000,
                65536,
                &[("NVIDIA A100", 40, true, None); 4],
            ),
        ];
        let p = run(
            &nodes,
            vec![group("g", 1, 1000, 1024, gpus(2, Some("H100"), Some(40)))],
        );
        assert_eq!(on(&p), ["b"]);
        assert_eq!(p.placements[0].gpus, ["b-gpu0", "b-gpu1"]);
        let p = run(
            &nodes,
            vec![group("g", 1, 1000, 1024, gpus(4, None, Some(60)))],
        );
        assert_eq!(on(&p), ["a"]);
        let p = run(
            &nodes,
            vec![group("g", 2, 1000, 1024, gpus(3, Some("A100"), None))],
        );
        assert_eq!(on(&p), ["c"]);
        assert_eq!(
            p.unplaced[0].to_unplaced().reason,
            "0/3 nodes: 3 lacked 3 free A100"
        );
    }

    #[test]
    fn unhealthy_and_held_gpus_are_never_chosen() {
        let mut gs = h100s(4);
        gs[0].2 = false;
        gs[2].2 = false;
        let nodes = [node("a", &[], 64000, 65536, &gs)];
        let held = live(
            "x",
            "other",
            "a",
            Resources {
                cpu_millis: 1000.into(),
                memory_mib: 1024.into(),
                gpus: gpus(1, None, None),
            },
            &["a-gpu1"],
        );
        let snapshot = PlanSnapshot::new(&nodes, &[held]);
        let p = plan(
            &snapshot,
            &request(vec![group("g", 4, 1000, 1024, gpus(1, None, None))]),
        );
        let chosen: Vec<&str> = p
            .placements
            .iter()
            .flat_map(|p| &p.gpus)
            .map(String::as_str)
            .collect();
        assert_eq!(chosen, ["a-gpu3"]);
        assert_eq!(p.unplaced[0].missing, 3);
    }

    #[test]
    fn slices_share_a_gpu_only_while_memory_fits() {
        let nodes = [node(
            "a",
            &[],
            64000,
            65536,
            &[("L4", 24, true, None), ("L4", 24, true, None)],
        )];
        let mut request_gpu = gpus(1, Some("L4"), None).unwrap();
        request_gpu.memory_slice_mib = Some(MemoryMib::new(10 * 1024));
        let p = run(
            &nodes,
            vec![group("s", 5, 1000, 1024, Some(request_gpu.clone()))],
        );
        // Two 10 GiB slices per 24 GiB GPU; the fifth fits nowhere.
        assert_eq!(p.placements.len(), 4);
        let first: Vec<&str> = p.placements.iter().map(|p| p.gpus[0].as_str()).collect();
        assert_eq!(first, ["a-gpu0", "a-gpu0", "a-gpu1", "a-gpu1"]);
        assert!(p
            .placements
            .iter()
            .all(|p| p.gpu_memory_slice == Some(MemoryMib::new(10240))));
        // A whole-GPU request cannot take a GPU that holds slices.
        let whole = group("w", 1, 1000, 1024, gpus(1, None, None));
        let p = run(
            &nodes,
            vec![group("s", 1, 1000, 1024, Some(request_gpu)), whole],
        );
        assert_eq!(p.placements[1].gpus, ["a-gpu1"]);
    }

    #[test]
    fn spread_over_three_sites_puts_three_replicas_on_three_sites() {
        let nodes: Vec<Node> = (0..9)
            .map(|i| {
                let site = ["ghent", "delft", "lille"][i % 3];
                node(&format!("n{i}"), &[("site", site)], 16000, 65536, &h100s(8))
            })
            .collect();
        let mut g = group("replica", 3, 1000, 1024, gpus(1, Some("H100"), Some(40)));
        g.spread = vec![Spread {
            attribute: "site".to_owned(),
            weight: None,
        }];
        let p = run(&nodes, vec![g.clone()]);
        let sites: BTreeSet<&str> = p
            .placements
            .iter()
            .map(|p| {
                let n = nodes.iter().find(|n| n.id == p.node_id).unwrap();
                n.attributes["site"].as_str()
            })
            .collect();
        assert_eq!(sites.len(), 3);
        // Without spread, bin-packing keeps them together.
        g.spread.clear();
        let p = run(&nodes, vec![g]);
        assert_eq!(on(&p), ["n0", "n0", "n0"]);
    }

    #[test]
    fn affinities_attract_and_repel() {
        let nodes = [
            node("a", &[("site", "x")], 8000, 8192, &[]),
            node("b", &[("site", "y")], 8000, 8192, &[]),
        ];
        let mut g = group("g", 1, 1000, 1024, None);
        g.affinities = vec![Affinity {
            attribute: "site".to_owned(),
            op: ConstraintOp::Eq,
            value: ConstraintValue::One("y".to_owned()),
            weight: 50,
        }];
        assert_eq!(on(&run(&nodes, vec![g.clone()])), ["b"]);
        g.affinities[0].weight = -50;
        g.affinities[0].value = ConstraintValue::One("x".to_owned());
        assert_eq!(on(&run(&nodes, vec![g])), ["b"]);
    }

    #[test]
    fn multi_gpu_instance_picks_gpus_of_one_interconnect_group() {
        let gs: Vec<Gpu> = (0..8)
            .map(|i| {
                (
                    "H100",
                    80,
                    true,
                    Some(["nvl-a", "nvl-b", "nvl-c"][[0, 1, 1, 2, 2, 2, 2, 0][i]]),
                )
            })
            .collect();
        let nodes = [node("a", &[], 64000, 65536, &gs)];
        // Four fit only in nvl-c (3..=6); two fit best in the smallest domain that holds them.
        let p = run(&nodes, vec![group("g", 1, 1000, 1024, gpus(4, None, None))]);
        assert_eq!(
            p.placements[0].gpus,
            ["a-gpu3", "a-gpu4", "a-gpu5", "a-gpu6"]
        );
        let p = run(&nodes, vec![group("g", 1, 1000, 1024, gpus(2, None, None))]);
        assert_eq!(p.placements[0].gpus, ["a-gpu0", "a-gpu7"]);
        // Five fit in no domain: split, unless one domain is required.
        let p = run(&nodes, vec![group("g", 1, 1000, 1024, gpus(5, None, None))]);
        assert_eq!(p.placements[0].gpus.len(), 5);
        let mut strict = gpus(5, None, None).unwrap();
        strict.same_interconnect = true;
        let p = run(&nodes, vec![group("g", 1, 1000, 1024, Some(strict))]);
        assert_eq!(
            p.unplaced[0].to_unplaced().reason,
            "0/1 nodes: 1 lacked 5 free GPU in one interconnect group"
        );
    }

    #[test]
    fn impossible_request_explains_why_in_counts() {
        let mut nodes: Vec<Node> = (0..120)
            .map(|i| {
                let country = if i < 80 { "BE" } else { "FR" };
                node(
                    &format!("n{i:03}"),
                    &[("country", country)],
                    64000,
                    65536,
                    &h100s(2),
                )
            })
            .collect();
        nodes[0].status = NodeStatus::Down;
        let mut g = group("g", 2, 1000, 1024, gpus(4, Some("H100"), Some(40)));
        g.constraints = vec![rule("country", ConstraintOp::In, &["BE", "NL"])];
        let p = run(&nodes, vec![g]);
        assert!(p.placements.is_empty());
        let unplaced = p.unplaced[0].to_unplaced();
        assert_eq!(unplaced.missing, 2);
        assert_eq!(
            unplaced.reason,
            "0/120 nodes: 79 lacked 4 free H100 ≥ 40960 MiB, 40 failed country in [BE, NL], 1 not ready"
        );
    }

    #[test]
    fn a_gang_is_placed_whole_or_not_at_all() {
        let nodes = [
            node("a", &[], 64000, 65536, &h100s(8)),
            node("b", &[], 64000, 65536, &h100s(4)),
        ];
        let mut g = group("train", 3, 1000, 1024, gpus(4, None, None));
        g.gang = true;
        let p = run(
            &nodes,
            vec![
                g.clone(),
                group("after", 1, 1000, 1024, gpus(4, None, None)),
            ],
        );
        // The gang needs 12 GPUs; it fits 3 x 4 = 12 exactly.
        assert_eq!(p.placements.len(), 4 - 1);
        assert_eq!(p.unplaced[0].group, "after");
        g.count = 4;
        let p = run(
            &nodes,
            vec![g, group("after", 1, 1000, 1024, gpus(4, None, None))],
        );
        // The gang fails and gives its GPUs back to the next group.
        assert_eq!(on(&p), ["b"]);
        let gang = &p.unplaced[0];
        assert_eq!((gang.missing, gang.gang_fitted), (4, Some(3)));
        assert!(gang
            .to_unplaced()
            .reason
            .starts_with("gang of 4 placed none: 3 fit, then 0/2"));
    }

    #[test]
    fn the_job_s_live_instances_count_for_spread() {
        let nodes = [
            node("a", &[("site", "x")], 8000, 8192, &[]),
            node("b", &[("site", "y")], 8000, 8192, &[]),
        ];
        let existing = live(
            "x",
            "job",
            "a",
            Resources {
                cpu_millis: 1000.into(),
                memory_mib: 1024.into(),
                gpus: None,
            },
            &[],
        );
        let mut g = group("g", 2, 1000, 1024, None);
        g.spread = vec![Spread {
            attribute: "site".to_owned(),
            weight: Some(100),
        }];
        let mut req = request(vec![g]);
        req.groups[0].indices = vec![1];
        let p = plan(&PlanSnapshot::new(&nodes, &[existing]), &req);
        assert_eq!(on(&p), ["b"]);
        assert_eq!(p.placements[0].index, 1);
    }

    #[test]
    fn cluster_state_builds_the_snapshot() {
        let state = crate::state::ClusterState::default();
        assert_eq!(state.plan_snapshot().node_count(), 0);
    }

    #[test]
    fn two_thousand_instances_on_two_thousand_nodes() {
        let nodes: Vec<Node> = (0..2000)
            .map(|i| {
                let site = format!("site-{}", i % 20);
                node(
                    &format!("n{i:05}"),
                    &[("site", &site), ("country", "BE")],
                    64000,
                    524288,
                    &h100s(8),
                )
            })
            .collect();
        let mut g = group("g", 2000, 2000, 8192, gpus(1, Some("H100"), Some(40)));
        g.constraints = vec![rule("country", ConstraintOp::In, &["BE", "NL"])];
        g.spread = vec![Spread {
            attribute: "site".to_owned(),
            weight: Some(50),
        }];
        let req = request(vec![g]);
        let p = plan(&PlanSnapshot::new(&nodes, &[]), &req);
        assert_eq!(p.placements.len(), 2000);
        assert!(p.unplaced.is_empty());
        check_plan(&nodes, &[], &req, &p);
    }

    /// Checks a plan against its input: no over-commit, constraints hold, gangs whole.
    fn check_plan(nodes: &[Node], allocs: &[Allocation], req: &PlanRequest, plan: &Plan) {
        let by_id: HashMap<&NodeId, &Node> = nodes.iter().map(|n| (&n.id, n)).collect();
        let mut cpu: HashMap<&NodeId, u64> = HashMap::new();
        let mut mem: HashMap<&NodeId, u64> = HashMap::new();
        let mut whole: HashSet<(&NodeId, &str)> = HashSet::new();
        let mut sliced: HashMap<(&NodeId, &str), u64> = HashMap::new();
        let mut take = |node: &'_ NodeId, c: u64, m: u64, gpus: &[String], slice: Option<u64>| {
            let node = by_id[node];
            let (id, r) = (&node.id, &node.resources);
            *cpu.entry(id).or_default() += c;
            *mem.entry(id).or_default() += m;
            assert!(cpu[id] <= r.cpu_millis.get(), "CPU over-committed on {id}");
            assert!(
                mem[id] <= r.memory_mib.get(),
                "memory over-committed on {id}"
            );
            for uuid in gpus {
                let gpu = r.gpus.iter().find(|g| &g.uuid == uuid).expect("a real GPU");
                let key = (id, gpu.uuid.as_str());
                match slice {
                    None => assert!(
                        whole.insert(key) && !sliced.contains_key(&key),
                        "{uuid} shared"
                    ),
                    Some(s) => {
                        assert!(!whole.contains(&key), "{uuid} held whole");
                        let total = sliced.entry(key).or_default();
                        *total += s;
                        assert!(*total <= gpu.memory_mib.get(), "{uuid} over-sliced");
                    }
                }
            }
        };
        for a in allocs.iter().filter(|a| a.is_live()) {
            let slice = a.resources.gpus.as_ref().and_then(|g| g.memory_slice_mib);
            take(
                &a.node_id,
                a.resources.cpu_millis.get(),
                a.resources.memory_mib.get(),
                &a.gpus,
                slice.map(MemoryMib::get),
            );
        }
        for p in &plan.placements {
            let demand = req.groups.iter().find(|d| d.group.name == p.group);
            let Some(demand) = demand else { continue };
            let g = &demand.group;
            let node = by_id[&p.node_id];
            assert!(node.status.is_schedulable());
            for c in &g.constraints {
                assert!(Rule::new(&c.attribute, c.op, &c.value).matches(&node.attributes));
            }
            let want = g.resources.gpus.as_ref();
            assert_eq!(p.gpus.len(), want.map_or(0, |w| w.count as usize));
            for uuid in &p.gpus {
                let gpu = node
                    .resources
                    .gpus
                    .iter()
                    .find(|d| &d.uuid == uuid)
                    .unwrap();
                let w = want.unwrap();
                assert!(gpu.healthy);
                assert!(w.model.as_deref().is_none_or(|m| gpu.model.contains(m)));
                assert!(w.min_memory_mib.is_none_or(|m| gpu.memory_mib >= m));
            }
            take(
                &p.node_id,
                g.resources.cpu_millis.get(),
                g.resources.memory_mib.get(),
                &p.gpus,
                p.gpu_memory_slice.map(MemoryMib::get),
            );
        }
        for d in req.groups.iter().filter(|d| d.group.gang) {
            let placed = plan
                .placements
                .iter()
                .filter(|p| p.group == d.group.name)
                .count();
            assert!(
                placed == 0 || placed == d.indices.len(),
                "gang {} split",
                d.group.name
            );
        }
    }

    fn arb_node(i: usize) -> impl Strategy<Value = Node> {
        (
            prop::sample::select(vec!["BE", "NL", "FR"]),
            0usize..3,
            1u64..16,
            1u64..16,
            prop::collection::vec(
                (
                    prop::sample::select(vec!["H100", "A100", "L4"]),
                    0usize..3,
                    any::<bool>(),
                    prop::option::of(0usize..2),
                ),
                0..6,
            ),
            prop::sample::select(vec![
                NodeStatus::Ready,
                NodeStatus::Ready,
                NodeStatus::Ready,
                NodeStatus::Down,
            ]),
        )
            .prop_map(move |(country, site, cpu, mem, gs, status)| {
                let gs: Vec<Gpu> = gs
                    .into_iter()
                    .map(|(m, size, healthy, link)| {
                        (
                            m,
                            [24, 40, 80][size],
                            healthy || size == 0,
                            link.map(|l| ["nvl-0", "nvl-1"][l]),
                        )
                    })
                    .collect();
                let site = ["s0", "s1", "s2"][site];
                let mut n = node(
                    &format!("n{i:03}"),
                    &[("country", country), ("site", site)],
                    cpu * 1000,
                    mem * 1024,
                    &gs,
                );
                n.status = status;
                n
            })
    }

    fn arb_group(i: usize) -> impl Strategy<Value = TaskGroup> {
        (
            1u32..6,
            1u64..4,
            1u64..4,
            prop::option::of((
                1u32..4,
                prop::option::of(prop::sample::select(vec!["H100", "A100"])),
                prop::option::of(0u64..3),
                any::<bool>(),
            )),
            prop::option::of(prop::sample::select(vec![
                vec!["BE"],
                vec!["BE", "NL"],
                vec!["NL", "FR"],
            ])),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(move |(count, cpu, mem, gpu, countries, gang, spread)| {
                let gpu = gpu.map(|(n, model, slice, _)| GpuRequest {
                    count: if slice.is_some() { 1 } else { n },
                    model: model.map(str::to_owned),
                    min_memory_mib: None,
                    memory_slice_mib: slice.map(|s| MemoryMib::new((s + 1) * 8 * 1024)),
                    same_interconnect: false,
                });
                let mut g = group(&format!("g{i}"), count, cpu * 1000, mem * 1024, gpu);
                g.gang = gang;
                if let Some(cs) = countries {
                    g.constraints = vec![rule("country", ConstraintOp::In, &cs)];
                }
                if spread {
                    g.spread = vec![Spread {
                        attribute: "site".to_owned(),
                        weight: None,
                    }];
                }
                g
            })
    }

    fn arb_case() -> impl Strategy<Value = (Vec<Node>, Vec<TaskGroup>, Vec<TaskGroup>)> {
        (1usize..12, 1usize..4, 0usize..3).prop_flat_map(|(n, g, pre)| {
            (
                (0..n).map(arb_node).collect::<Vec<_>>(),
                (0..g).map(arb_group).collect::<Vec<_>>(),
                (0..pre).map(|i| arb_group(i + 10)).collect::<Vec<_>>(),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn plans_never_overcommit_and_are_deterministic((nodes, groups, earlier) in arb_case()) {
            // Earlier jobs become live allocations, so the plan works around them.
            let first = request(earlier);
            let base = PlanSnapshot::new(&nodes, &[]);
            let placed = plan(&base, &first);
            let allocs: Vec<Allocation> = placed
                .placements
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let g = &first.groups.iter().find(|d| d.group.name == p.group).unwrap().group;
                    let mut a = live(&format!("a{i}"), "earlier", p.node_id.as_str(), g.resources.clone(), &[]);
                    a.gpus = p.gpus.clone();
                    a
                })
                .collect();
            check_plan(&nodes, &[], &first, &placed);
            let snapshot = PlanSnapshot::new(&nodes, &allocs);
            let req = request(groups);
            let out = plan(&snapshot, &req);
            check_plan(&nodes, &allocs, &req, &out);
            prop_assert_eq!(&out, &plan(&snapshot, &req));
            let reversed: Vec<Node> = nodes.iter().rev().cloned().collect();
            prop_assert_eq!(&out, &plan(&PlanSnapshot::new(&reversed, &allocs), &req));
            for u in &out.unplaced {
                prop_assert!(u.missing > 0);
                prop_assert_eq!(u.explanation.nodes as usize, nodes.len());
            }
        }
    }
}
