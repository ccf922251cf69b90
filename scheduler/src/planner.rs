//! The planner: a pure function from a cluster snapshot and a job's unplaced
//! instances to a plan of placements. No I/O, no clock, no randomness: the same
//! [`PlanSnapshot`] and [`PlanRequest`] always give the same [`Plan`].
//!
//! For each task group, in request order:
//!
//! 1. **Feasibility, once per group.** Nodes that are not ready, fail a constraint
//!    or could not take an instance even empty are dropped before any instance is
//!    considered; a regex is compiled once.
//! 2. **Ranking.** A node's score is bin-packing (fuller after placement is better),
//!    GPU best-fit (the node whose matching free GPUs fit the request most tightly),
//!    and the group's affinities. Spread is a penalty per instance already on the
//!    same attribute value.
//! 3. **Indexing.** Nodes that fit are bucketed by their spread values (one bucket
//!    without spread) and each bucket keeps a max-heap by score. A node's score only
//!    changes when an instance lands on it, and within one group free capacity only
//!    shrinks, so a node that no longer fits is dropped for good and an instance
//!    costs `O(buckets + log nodes)`, not a scan of every node.
//! 4. **Gangs.** A gang group is placed whole or its placements are rolled back.
//!
//! Ties break by node id (the snapshot keeps nodes sorted by id), then by GPU index.
//! When an instance cannot be placed, every node is checked once more to explain
//! why, in counts.
//!
//! A plan's cost is per job, over every node, so the snapshot makes a node cheap
//! to look at: it stores each distinct attribute map and GPU layout once (a
//! cluster has far fewer than it has nodes) and keeps what is taken in flat lists
//! with a bitset of free GPUs per node. A group then evaluates its rules once per
//! attribute value and its GPU request once per layout, and a node costs a few
//! table lookups and a popcount. A plan copies only the nodes it changes.
//!
//! The snapshot also knows which live allocation holds what, and of which job's
//! priority and group's movability, so that [`crate::preempt`] and
//! [`crate::defrag`] can make room for what does not fit. They work on a `Draft`:
//! a plan in progress that can let allocations go as well as place instances,
//! one instance at a time, ranking nodes exactly as [`plan`] does. A scheduling
//! pass keeps one snapshot for all its jobs with [`PlanSnapshot::add`] and
//! [`PlanSnapshot::remove`] rather than rebuilding it after each.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use aigrid_api::{
    AllocId, Allocation, ConstraintOp, ConstraintValue, GpuDevice, GpuRequest, JobId, JobSpec,
    MemoryMib, MilliCpu, Node, NodeId, NodeStatus, TaskGroup, Unplaced,
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
/// GPUs per word of a GPU bitset.
const BITS: usize = 64;

/// What the planner knows about the cluster: nodes sorted by id, and what their
/// live allocations hold, indexed once so planning never rescans allocations.
/// [`PlanSnapshot::add`] and [`PlanSnapshot::remove`] keep it current while a
/// scheduling pass commits plan after plan, so a pass builds it once.
#[derive(Debug, Clone, Default)]
pub struct PlanSnapshot {
    nodes: Vec<SnapNode>,
    /// Per node: its shape, an index into [`Shapes::nodes`]. Apart from the
    /// nodes, so that going over every node reads one word of each.
    shape: Vec<usize>,
    /// The nodes' distinct shapes, attribute maps and GPU layouts; fixed once
    /// built, as the node list is.
    shapes: Shapes,
    usage: Usage,
    /// Per node: its live allocations, sorted by id, so preemption and
    /// defragmentation know whom letting go frees what.
    held: Vec<Vec<LiveAlloc>>,
    /// The node each live allocation is on.
    located: HashMap<AllocId, usize>,
    /// Nodes holding live instances, per job and group, for spreading; a node is
    /// listed once per instance on it.
    instances: HashMap<(JobId, String), Vec<usize>>,
}

#[derive(Debug, Clone)]
struct SnapNode {
    id: NodeId,
    /// Its GPUs' UUIDs, in the node's order.
    uuids: Vec<String>,
}

/// What a group's checks and ranking look at in a node, apart from what is
/// taken on it; many nodes share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NodeShape {
    status: NodeStatus,
    cpu: u64,
    memory: u64,
    /// Its attribute map: an index into [`Shapes::attributes`].
    attributes: usize,
    /// Its GPU layout: an index into [`Shapes::layouts`].
    layout: usize,
}

/// The node properties rules and GPU requests look at, each distinct one stored
/// once.
#[derive(Debug, Clone, Default)]
struct Shapes {
    /// Distinct node shapes.
    nodes: Vec<NodeShape>,
    /// Attribute names, each with its id: its position in `values`.
    names: HashMap<String, usize>,
    /// Per attribute: its distinct values. The empty value is always first: it
    /// is where spreading counts a node lacking the attribute.
    values: Vec<Vec<String>>,
    /// Distinct attribute maps, as (attribute, value) ids sorted by attribute.
    attributes: Vec<Vec<(usize, usize)>>,
    /// Distinct GPU models.
    models: Vec<String>,
    /// Distinct GPU layouts.
    layouts: Vec<Layout>,
}

/// A node's GPUs, as far as placing on them goes.
#[derive(Debug, Clone)]
struct Layout {
    gpus: Vec<GpuKind>,
    /// Per interconnect domain (by [`GpuKind::domain`]): its GPUs, as bits.
    domains: Vec<Vec<u64>>,
}

/// One GPU of a [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GpuKind {
    /// An index into [`Shapes::models`].
    model: usize,
    memory: u64,
    healthy: bool,
    /// Its interconnect domain, ranked in the order instances look at domains:
    /// GPUs without one first, each alone, by position; then the named domains
    /// by name.
    domain: usize,
}

/// Builds [`Shapes`], remembering what it has seen.
#[derive(Default)]
struct Interner {
    shapes: Shapes,
    value_ids: Vec<HashMap<String, usize>>,
    attribute_ids: HashMap<Vec<(usize, usize)>, usize>,
    model_ids: HashMap<String, usize>,
    layout_ids: HashMap<Vec<GpuKind>, usize>,
    shape_ids: HashMap<NodeShape, usize>,
}

impl Interner {
    fn shape(&mut self, node: &Node) -> usize {
        let shape = NodeShape {
            status: node.status,
            cpu: node.resources.cpu_millis.get(),
            memory: node.resources.memory_mib.get(),
            attributes: self.attributes(&node.attributes),
            layout: self.layout(&node.resources.gpus),
        };
        let shapes = &mut self.shapes.nodes;
        *self.shape_ids.entry(shape).or_insert_with_key(|shape| {
            shapes.push(shape.clone());
            shapes.len() - 1
        })
    }

    fn attribute(&mut self, name: &str) -> usize {
        if let Some(&id) = self.shapes.names.get(name) {
            return id;
        }
        let id = self.shapes.values.len();
        self.shapes.names.insert(name.to_owned(), id);
        self.shapes.values.push(vec![String::new()]);
        self.value_ids.push(HashMap::from([(String::new(), 0)]));
        id
    }

    fn attributes(&mut self, attributes: &BTreeMap<String, String>) -> usize {
        let mut set: Vec<(usize, usize)> = attributes
            .iter()
            .map(|(name, value)| {
                let a = self.attribute(name);
                let values = &mut self.shapes.values[a];
                let v = *self.value_ids[a].entry(value.clone()).or_insert_with(|| {
                    values.push(value.clone());
                    values.len() - 1
                });
                (a, v)
            })
            .collect();
        set.sort_unstable();
        let sets = &mut self.shapes.attributes;
        *self.attribute_ids.entry(set).or_insert_with_key(|set| {
            sets.push(set.clone());
            sets.len() - 1
        })
    }

    fn layout(&mut self, gpus: &[GpuDevice]) -> usize {
        let alone = gpus
            .iter()
            .filter(|g| g.interconnect_group.is_none())
            .count();
        let mut named: Vec<&str> = gpus
            .iter()
            .filter_map(|g| g.interconnect_group.as_deref())
            .collect();
        named.sort_unstable();
        named.dedup();
        let mut unlinked = 0;
        let kinds: Vec<GpuKind> = gpus
            .iter()
            .map(|g| {
                let models = &mut self.shapes.models;
                let model = *self.model_ids.entry(g.model.clone()).or_insert_with(|| {
                    models.push(g.model.clone());
                    models.len() - 1
                });
                let domain = match g.interconnect_group.as_deref() {
                    None => {
                        unlinked += 1;
                        unlinked - 1
                    }
                    Some(d) => alone + named.binary_search(&d).unwrap_or(0),
                };
                GpuKind {
                    model,
                    memory: g.memory_mib.get(),
                    healthy: g.healthy,
                    domain,
                }
            })
            .collect();
        let layouts = &mut self.shapes.layouts;
        *self.layout_ids.entry(kinds).or_insert_with_key(|kinds| {
            let mut domains = vec![vec![0; kinds.len().div_ceil(BITS)]; alone + named.len()];
            for (g, kind) in kinds.iter().enumerate() {
                set_bit(&mut domains[kind.domain], g, true);
            }
            layouts.push(Layout {
                gpus: kinds.clone(),
                domains,
            });
            layouts.len() - 1
        })
    }
}

impl Shapes {
    /// The value id of `attribute` in the attribute map `set`, if it has it.
    fn value(&self, set: usize, attribute: usize) -> Option<usize> {
        let set = &self.attributes[set];
        set.binary_search_by_key(&attribute, |&(a, _)| a)
            .ok()
            .map(|i| set[i].1)
    }
}

fn bit(words: &[u64], i: usize) -> bool {
    words[i / BITS] >> (i % BITS) & 1 == 1
}

fn set_bit(words: &mut [u64], i: usize, on: bool) {
    let mask = 1 << (i % BITS);
    if on {
        words[i / BITS] |= mask;
    } else {
        words[i / BITS] &= !mask;
    }
}

/// How many bits two bitsets share.
fn common(a: &[u64], b: &[u64]) -> usize {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a & b).count_ones() as usize)
        .sum()
}

/// Where one node's entries are in a [`Usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    /// Its first GPU in the per-GPU lists.
    gpu: usize,
    /// Its first word in the bitsets.
    word: usize,
    gpus: usize,
}

impl Span {
    fn gpus(self) -> Range<usize> {
        self.gpu..self.gpu + self.gpus
    }

    fn words(self) -> Range<usize> {
        self.word..self.word + self.gpus.div_ceil(BITS)
    }
}

/// What is taken on a list of nodes; changes as a plan places instances. Flat,
/// so that copying a node is a few short copies and checking one is a few reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Usage {
    cpu: Vec<u64>,
    memory: Vec<u64>,
    spans: Vec<Span>,
    /// Per GPU: how many instances hold it whole. One at most, unless the
    /// allocations the snapshot was given overlap; counting keeps letting one of
    /// them go from freeing the GPU.
    exclusive: Vec<u8>,
    /// Per GPU: memory taken by slices.
    sliced: Vec<u64>,
    /// Per node, a bit per GPU: neither held whole nor sliced, so a whole-GPU
    /// instance may take it. Follows `exclusive` and `sliced`.
    free: Vec<u64>,
    /// Per node, a bit per GPU: not held whole, so a slice may share it.
    unheld: Vec<u64>,
}

impl Usage {
    /// Appends a node with `gpus` GPUs and nothing taken.
    fn push_empty(&mut self, gpus: usize) {
        let span = Span {
            gpu: self.exclusive.len(),
            word: self.free.len(),
            gpus,
        };
        self.cpu.push(0);
        self.memory.push(0);
        self.spans.push(span);
        self.exclusive.resize(span.gpus().end, 0);
        self.sliced.resize(span.gpus().end, 0);
        self.free.resize(span.words().end, 0);
        self.unheld.resize(span.words().end, 0);
        for g in 0..gpus {
            set_bit(&mut self.free[span.words()], g, true);
            set_bit(&mut self.unheld[span.words()], g, true);
        }
    }

    /// Appends a copy of a node of another usage; answers its position here.
    fn push_copy(&mut self, from: NodeUse<'_>) -> usize {
        let span = Span {
            gpu: self.exclusive.len(),
            word: self.free.len(),
            gpus: from.span().gpus,
        };
        self.cpu.push(from.cpu());
        self.memory.push(from.memory());
        self.spans.push(span);
        self.exclusive.extend_from_slice(from.exclusive());
        self.sliced.extend_from_slice(from.sliced());
        self.free.extend_from_slice(from.free());
        self.unheld.extend_from_slice(from.unheld());
        self.spans.len() - 1
    }

    /// A copy of one node, alone, to try changes on.
    fn copy_of(from: NodeUse<'_>) -> Self {
        let mut copy = Self::default();
        copy.push_copy(from);
        copy
    }

    fn node(&self, i: usize) -> NodeUse<'_> {
        NodeUse { usage: self, i }
    }

    fn node_mut(&mut self, i: usize) -> NodeMut<'_> {
        NodeMut { usage: self, i }
    }
}

/// What is taken on one node of a [`Usage`].
#[derive(Debug, Clone, Copy)]
struct NodeUse<'a> {
    usage: &'a Usage,
    i: usize,
}

impl<'a> NodeUse<'a> {
    fn span(self) -> Span {
        self.usage.spans[self.i]
    }

    fn cpu(self) -> u64 {
        self.usage.cpu[self.i]
    }

    fn memory(self) -> u64 {
        self.usage.memory[self.i]
    }

    fn exclusive(self) -> &'a [u8] {
        &self.usage.exclusive[self.span().gpus()]
    }

    fn sliced(self) -> &'a [u64] {
        &self.usage.sliced[self.span().gpus()]
    }

    fn free(self) -> &'a [u64] {
        &self.usage.free[self.span().words()]
    }

    fn unheld(self) -> &'a [u64] {
        &self.usage.unheld[self.span().words()]
    }
}

/// One node of a [`Usage`], to change.
struct NodeMut<'a> {
    usage: &'a mut Usage,
    i: usize,
}

impl NodeMut<'_> {
    /// Changes what GPU `g` holds and keeps the bitsets in step.
    fn gpu(&mut self, g: usize, change: impl FnOnce(&mut u8, &mut u64)) {
        let span = self.usage.spans[self.i];
        let at = span.gpu + g;
        change(&mut self.usage.exclusive[at], &mut self.usage.sliced[at]);
        let (exclusive, sliced) = (self.usage.exclusive[at], self.usage.sliced[at]);
        set_bit(
            &mut self.usage.free[span.words()],
            g,
            exclusive == 0 && sliced == 0,
        );
        set_bit(&mut self.usage.unheld[span.words()], g, exclusive == 0);
    }

    /// Takes CPU, memory and the GPUs at positions `gpus`: whole, or `slice`
    /// of each.
    fn take(&mut self, cpu: u64, memory: u64, gpus: &[usize], slice: Option<u64>) {
        self.usage.cpu[self.i] += cpu;
        self.usage.memory[self.i] += memory;
        for &g in gpus {
            self.gpu(g, |exclusive, sliced| match slice {
                Some(slice) => *sliced += slice,
                None => *exclusive = exclusive.saturating_add(1),
            });
        }
    }

    /// Gives back what [`NodeMut::take`] took.
    fn give_back(&mut self, cpu: u64, memory: u64, gpus: &[usize], slice: Option<u64>) {
        let (taken_cpu, taken_memory) =
            (&mut self.usage.cpu[self.i], &mut self.usage.memory[self.i]);
        *taken_cpu = taken_cpu.saturating_sub(cpu);
        *taken_memory = taken_memory.saturating_sub(memory);
        for &g in gpus {
            self.gpu(g, |exclusive, sliced| match slice {
                Some(slice) => *sliced = sliced.saturating_sub(slice),
                None => *exclusive = exclusive.saturating_sub(1),
            });
        }
    }

    /// Takes what a live allocation holds.
    fn hold(&mut self, alloc: &LiveAlloc) {
        let slice = alloc.gpu_slice.map(MemoryMib::get);
        self.take(alloc.cpu.get(), alloc.memory.get(), &alloc.gpus, slice);
    }

    /// Gives back what a live allocation holds.
    fn let_go(&mut self, alloc: &LiveAlloc) {
        let slice = alloc.gpu_slice.map(MemoryMib::get);
        self.give_back(alloc.cpu.get(), alloc.memory.get(), &alloc.gpus, slice);
    }
}

/// What a plan in progress has taken: the snapshot's usage, with each node it
/// changes copied on its first change, so that a plan costs what it touches
/// rather than a copy of the cluster.
#[derive(Debug, Clone)]
struct Taken<'s> {
    base: &'s Usage,
    changed: Usage,
    /// Per node changed: its position in `changed`.
    slots: HashMap<usize, usize>,
    /// A bit per node: changed. Reading an unchanged node costs no hashing.
    marked: Vec<u64>,
}

impl<'s> Taken<'s> {
    /// Nothing changed yet, with room to change about `nodes` nodes without
    /// growing.
    fn new(base: &'s Usage, nodes: usize) -> Self {
        let nodes = nodes.min(base.spans.len());
        let per_node = |total: usize| total.div_ceil(base.spans.len().max(1)) * nodes;
        let changed = Usage {
            cpu: Vec::with_capacity(nodes),
            memory: Vec::with_capacity(nodes),
            spans: Vec::with_capacity(nodes),
            exclusive: Vec::with_capacity(per_node(base.exclusive.len())),
            sliced: Vec::with_capacity(per_node(base.sliced.len())),
            free: Vec::with_capacity(per_node(base.free.len())),
            unheld: Vec::with_capacity(per_node(base.unheld.len())),
        };
        Self {
            base,
            changed,
            slots: HashMap::with_capacity(nodes),
            marked: vec![0; base.spans.len().div_ceil(BITS)],
        }
    }

    fn node(&self, n: usize) -> NodeUse<'_> {
        if bit(&self.marked, n) {
            self.changed.node(self.slots[&n])
        } else {
            self.base.node(n)
        }
    }

    fn node_mut(&mut self, n: usize) -> NodeMut<'_> {
        let slot = match self.slots.entry(n) {
            Entry::Occupied(slot) => *slot.get(),
            Entry::Vacant(slot) => {
                set_bit(&mut self.marked, n, true);
                *slot.insert(self.changed.push_copy(self.base.node(n)))
            }
        };
        self.changed.node_mut(slot)
    }
}

/// What the planner knows of the job and group a live allocation belongs to:
/// whether it may be evicted for another job, and whether it may be moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupInfo {
    /// The job's priority ([`JobSpec::priority`], 0 to 100).
    pub priority: u32,
    /// Whether the group may be migrated ([`TaskGroup::movable`]).
    pub movable: bool,
}

impl Default for GroupInfo {
    /// What an allocation of a job the caller does not know gets: the lowest
    /// priority, and movable, as a group is unless its spec says otherwise.
    fn default() -> Self {
        Self {
            priority: 0,
            movable: true,
        }
    }
}

impl GroupInfo {
    /// The info of group `group` of a job with `spec`. A group the spec no longer
    /// has is movable: its instances are on their way out anyway.
    pub fn of(spec: &JobSpec, group: &str) -> Self {
        Self {
            priority: spec.priority,
            movable: spec.group(group).is_none_or(|g| g.movable),
        }
    }
}

/// One live allocation as the snapshot holds it: who it is, who may displace it,
/// and what letting it go frees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAlloc {
    /// The allocation.
    pub id: AllocId,
    /// Its job.
    pub job_id: JobId,
    /// Its task group.
    pub group: String,
    /// Its index within the group.
    pub index: u32,
    /// Its job's priority and its group's movability.
    pub info: GroupInfo,
    /// CPU it holds.
    pub cpu: MilliCpu,
    /// Host memory it holds.
    pub memory: MemoryMib,
    /// For a slice, the GPU memory it holds on its one GPU.
    pub gpu_slice: Option<MemoryMib>,
    /// Positions in the node's GPU list of the GPUs it holds (whole, or the one
    /// its slice is on); GPUs the node does not have are left out.
    gpus: Vec<usize>,
}

impl LiveAlloc {
    fn new(node: &SnapNode, alloc: &Allocation, info: GroupInfo) -> Self {
        Self {
            id: alloc.id.clone(),
            job_id: alloc.job_id.clone(),
            group: alloc.group.clone(),
            index: alloc.index,
            info,
            cpu: alloc.resources.cpu_millis,
            memory: alloc.resources.memory_mib,
            gpu_slice: alloc
                .resources
                .gpus
                .as_ref()
                .and_then(|g| g.memory_slice_mib),
            gpus: alloc
                .gpus
                .iter()
                .filter_map(|uuid| node.uuids.iter().position(|u| u == uuid))
                .collect(),
        }
    }

    /// How many GPUs it holds, whole or sliced.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }
}

impl PlanSnapshot {
    /// Builds the snapshot from nodes and allocations, knowing nothing of jobs:
    /// every allocation counts as [`GroupInfo::default`]. Enough for [`plan`];
    /// preemption and defragmentation want [`PlanSnapshot::with_jobs`].
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        allocations: impl IntoIterator<Item = &'a Allocation>,
    ) -> Self {
        Self::with_jobs(nodes, allocations, |_, _| None)
    }

    /// Builds the snapshot from nodes and allocations, asking `info` about the
    /// job and group of each live allocation (`None`: [`GroupInfo::default`]).
    /// Only live allocations (wanted and not finished) hold resources; allocations
    /// on unknown nodes or naming unknown GPUs hold what can be matched and nothing
    /// more; of two allocations with one id, the first counts.
    pub fn with_jobs<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        allocations: impl IntoIterator<Item = &'a Allocation>,
        mut info: impl FnMut(&JobId, &str) -> Option<GroupInfo>,
    ) -> Self {
        let mut sorted: Vec<&Node> = nodes.into_iter().collect();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.dedup_by(|a, b| a.id == b.id);
        let mut interner = Interner::default();
        let mut usage = Usage::default();
        let shape = sorted.iter().map(|n| interner.shape(n)).collect();
        let nodes: Vec<SnapNode> = sorted
            .into_iter()
            .map(|n| {
                let gpus = &n.resources.gpus;
                usage.push_empty(gpus.len());
                SnapNode {
                    id: n.id.clone(),
                    uuids: gpus.iter().map(|g| g.uuid.clone()).collect(),
                }
            })
            .collect();
        let position: HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let mut held: Vec<Vec<LiveAlloc>> = vec![Vec::new(); nodes.len()];
        let mut located: HashMap<AllocId, usize> = HashMap::new();
        let mut instances: HashMap<(JobId, String), Vec<usize>> = HashMap::new();
        for alloc in allocations.into_iter().filter(|a| a.is_live()) {
            let Some(&at) = position.get(alloc.node_id.as_str()) else {
                continue;
            };
            match located.entry(alloc.id.clone()) {
                Entry::Occupied(_) => continue,
                Entry::Vacant(slot) => slot.insert(at),
            };
            let info = info(&alloc.job_id, &alloc.group).unwrap_or_default();
            let live = LiveAlloc::new(&nodes[at], alloc, info);
            usage.node_mut(at).hold(&live);
            instances
                .entry((alloc.job_id.clone(), alloc.group.clone()))
                .or_default()
                .push(at);
            held[at].push(live);
        }
        for allocs in &mut held {
            allocs.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        }
        drop(position);
        Self {
            nodes,
            shape,
            shapes: interner.shapes,
            usage,
            held,
            located,
            instances,
        }
    }

    /// How many nodes the snapshot holds.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The live allocations on a node, sorted by id; none for an unknown node.
    pub fn live_allocations(&self, node: &NodeId) -> &[LiveAlloc] {
        self.position(node).map_or(&[], |at| &self.held[at])
    }

    /// Adds an allocation a plan creates or changes, as the state machine will
    /// hold it once the plan commits: what an earlier version with its id held is
    /// given back, and it holds only if it is live (so adding a stopped version
    /// is removing it). A scheduling pass calls it for each allocation it writes.
    pub fn add(&mut self, alloc: &Allocation, info: GroupInfo) {
        self.remove(&alloc.id);
        if !alloc.is_live() {
            return;
        }
        let Some(at) = self.position(&alloc.node_id) else {
            return;
        };
        let live = LiveAlloc::new(&self.nodes[at], alloc, info);
        self.usage.node_mut(at).hold(&live);
        self.instances
            .entry((alloc.job_id.clone(), alloc.group.clone()))
            .or_default()
            .push(at);
        let held = &mut self.held[at];
        let slot = held.partition_point(|a| a.id < live.id);
        held.insert(slot, live);
        self.located.insert(alloc.id.clone(), at);
    }

    /// Whether the snapshot holds this allocation as live.
    pub fn holds(&self, id: &AllocId) -> bool {
        self.located.contains_key(id)
    }

    /// Gives back what a live allocation holds: a plan stops it (evicted,
    /// migrated, dropped from its spec). Answers whether the snapshot held it.
    pub fn remove(&mut self, id: &AllocId) -> bool {
        let Some(at) = self.located.remove(id) else {
            return false;
        };
        let held = &mut self.held[at];
        let Ok(slot) = held.binary_search_by(|a| a.id.cmp(id)) else {
            return false;
        };
        let live = held.remove(slot);
        self.usage.node_mut(at).let_go(&live);
        let key = (live.job_id, live.group);
        if let Some(nodes) = self.instances.get_mut(&key) {
            if let Some(i) = nodes.iter().position(|&n| n == at) {
                nodes.swap_remove(i);
            }
            if nodes.is_empty() {
                self.instances.remove(&key);
            }
        }
        true
    }

    fn position(&self, node: &NodeId) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.cmp(node)).ok()
    }

    /// The shape of node `n`.
    fn shape(&self, n: usize) -> &NodeShape {
        &self.shapes.nodes[self.shape[n]]
    }

    /// The GPU layout of node `n`.
    fn layout(&self, n: usize) -> &Layout {
        &self.shapes.layouts[self.shape(n).layout]
    }

    /// The share of node `n` that `alloc` holds, in thousandths per resource,
    /// summed over CPU, memory and GPUs: how much letting it go frees, comparable
    /// across allocations of one node.
    pub(crate) fn share(&self, n: usize, alloc: &LiveAlloc) -> u64 {
        let (node, shape) = (&self.nodes[n], self.shape(n));
        let layout = self.layout(n);
        let part = |x: u64, total: u64| -> u64 {
            if total == 0 {
                return 0;
            }
            u64::try_from(u128::from(x) * 1000 / u128::from(total)).unwrap_or(u64::MAX)
        };
        let gpus: u64 = alloc
            .gpus
            .iter()
            .map(|&g| match alloc.gpu_slice {
                Some(slice) => part(slice.get(), layout.gpus[g].memory).min(1000),
                None => 1000,
            })
            .sum();
        let gpu_count = u64::try_from(node.uuids.len()).unwrap_or(u64::MAX).max(1);
        part(alloc.cpu.get(), shape.cpu)
            .saturating_add(part(alloc.memory.get(), shape.memory))
            .saturating_add(gpus / gpu_count)
    }

    /// The id of the node at position `n`.
    pub(crate) fn node_id(&self, n: usize) -> &NodeId {
        &self.nodes[n].id
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

    /// The request less the instances `placements` placed: what is left for
    /// [`crate::defrag::plan_defrag`] or [`crate::preempt::plan_preemption`] once
    /// [`plan`] has placed what fits as things are.
    pub fn without(&self, placements: &[Placement]) -> Self {
        let placed: HashSet<(&str, u32)> = placements
            .iter()
            .map(|p| (p.group.as_str(), p.index))
            .collect();
        Self {
            job_id: self.job_id.clone(),
            groups: self
                .groups
                .iter()
                .map(|d| GroupDemand {
                    group: d.group.clone(),
                    indices: d
                        .indices
                        .iter()
                        .copied()
                        .filter(|&i| !placed.contains(&(d.group.name.as_str(), i)))
                        .collect(),
                })
                .filter(|d| !d.indices.is_empty())
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
            count: self.missing,
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
    let instances = request.groups.iter().map(|d| d.indices.len()).sum();
    let mut taken = Taken::new(&snapshot.usage, instances);
    let mut out = Plan::default();
    for demand in &request.groups {
        if demand.indices.is_empty() {
            continue;
        }
        let group = GroupPlanner::new(snapshot, &demand.group);
        let first = out.placements.len();
        let result = group.place(
            snapshot,
            &request.job_id,
            demand,
            &mut taken,
            &mut out.placements,
        );
        if let Err((fitted, explanation)) = result {
            let placed = out.placements.len() - first;
            let missing = demand.indices.len() - placed;
            let gang_fitted = if demand.group.gang {
                for p in out.placements.drain(first..) {
                    group.release(snapshot, &mut taken, &p);
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

    #[cfg(test)]
    fn matches(&self, attributes: &BTreeMap<String, String>) -> bool {
        self.matches_value(attributes.get(&self.attribute).map(String::as_str))
    }

    /// Whether a node whose value of the rule's attribute is `actual` (`None`:
    /// it lacks the attribute) passes.
    fn matches_value(&self, actual: Option<&str>) -> bool {
        let Some(actual) = actual else {
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

    /// Per attribute map of the snapshot: whether it passes. The rule is
    /// evaluated once per value of its attribute, not once per node.
    fn over(&self, shapes: &Shapes) -> Vec<bool> {
        let attribute = shapes.names.get(&self.attribute).copied();
        let absent = self.matches_value(None);
        let by_value: Vec<bool> = attribute.map_or_else(Vec::new, |a| {
            shapes.values[a]
                .iter()
                .map(|v| self.matches_value(Some(v)))
                .collect()
        });
        (0..shapes.attributes.len())
            .map(|set| {
                attribute
                    .and_then(|a| shapes.value(set, a))
                    .map_or(absent, |v| by_value[v])
            })
            .collect()
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

    /// Per GPU layout of the snapshot: its healthy GPUs of the right model and
    /// size, free or not, as bits. A model is matched once, not once per GPU.
    fn suits(&self, shapes: &Shapes) -> Vec<Vec<u64>> {
        let models: Vec<bool> = shapes
            .models
            .iter()
            .map(|model| self.model.as_deref().is_none_or(|m| model.contains(m)))
            .collect();
        shapes
            .layouts
            .iter()
            .map(|layout| {
                let mut bits = vec![0; layout.gpus.len().div_ceil(BITS)];
                for (g, gpu) in layout.gpus.iter().enumerate() {
                    let suits = gpu.healthy
                        && gpu.memory >= self.min_memory
                        && self.slice.is_none_or(|s| gpu.memory >= s)
                        && models[gpu.model];
                    set_bit(&mut bits, g, suits);
                }
                bits
            })
            .collect()
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

    /// Whether an instance would get GPUs on a node with GPUs `layout`, of which
    /// `suits` suit: [`GpuNeed::choose`] would answer, without choosing.
    fn fits(&self, layout: &Layout, suits: &[u64], used: NodeUse<'_>) -> bool {
        if let Some(slice) = self.slice {
            let (unheld, sliced) = (used.unheld(), used.sliced());
            return (0..layout.gpus.len()).any(|g| {
                bit(unheld, g)
                    && bit(suits, g)
                    && layout.gpus[g]
                        .memory
                        .checked_sub(sliced[g] + slice)
                        .is_some()
            });
        }
        self.fits_whole(layout, suits, used.free())
    }

    /// Whether an instance would get GPUs on a node with GPUs `layout` were
    /// nothing taken there.
    fn fits_empty(&self, layout: &Layout, suits: &[u64]) -> bool {
        match self.slice {
            // A suitable GPU has room for the slice.
            Some(_) => suits.iter().any(|&s| s != 0),
            None => self.fits_whole(layout, suits, suits),
        }
    }

    /// Whether whole GPUs would be found for an instance on a node with GPUs
    /// `layout`, of which `suits` suit and `free` are free.
    fn fits_whole(&self, layout: &Layout, suits: &[u64], free: &[u64]) -> bool {
        if common(free, suits) < self.count {
            return false;
        }
        // One domain that holds the whole instance, if it must be one.
        !self.same_interconnect
            || layout.domains.iter().any(|domain| {
                let n: usize = domain
                    .iter()
                    .zip(free)
                    .zip(suits)
                    .map(|((d, f), s)| (d & f & s).count_ones() as usize)
                    .sum();
                n > 0 && n >= self.count
            })
    }

    /// The GPUs (positions on the node) an instance would get, best first.
    fn choose(&self, layout: &Layout, suits: &[u64], used: NodeUse<'_>) -> Option<Vec<usize>> {
        if let Some(slice) = self.slice {
            // Best fit: the suitable shared GPU left with the least memory.
            let (unheld, sliced) = (used.unheld(), used.sliced());
            return (0..layout.gpus.len())
                .filter(|&g| bit(unheld, g) && bit(suits, g))
                .filter_map(|g| {
                    let left = layout.gpus[g].memory.checked_sub(sliced[g] + slice)?;
                    Some((left, g))
                })
                .min()
                .map(|(_, g)| vec![g]);
        }
        let free: Vec<usize> = (0..layout.gpus.len())
            .filter(|&g| bit(used.free(), g) && bit(suits, g))
            .collect();
        if free.len() < self.count {
            return None;
        }
        // Group free GPUs by interconnect domain; a GPU without one stands alone.
        let mut domains: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &g in &free {
            domains.entry(layout.gpus[g].domain).or_default().push(g);
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

/// The first capacity check a node fails for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shortfall {
    Cpu,
    Memory,
    Gpus,
}

/// A candidate in a bucket's heap: its score and its position (the earlier node
/// id wins a tie).
type Ranked = (i64, Reverse<usize>);

/// One group's filtered candidates and compiled rules, evaluated against the
/// snapshot's distinct attribute maps and GPU layouts.
pub(crate) struct GroupPlanner<'g> {
    group: &'g TaskGroup,
    need: Need,
    constraints: Vec<Rule>,
    /// Per attribute map: the first constraint it fails.
    failed: Vec<Option<usize>>,
    /// Per attribute map: its affinity score.
    affinity: Vec<i64>,
    /// Per GPU layout: the GPUs that suit the request, free or not, as bits.
    suits: Vec<Vec<u64>>,
    /// Nodes passing status and constraints that could take an instance were
    /// they empty, in id order.
    candidates: Vec<u32>,
    /// Per spread attribute: its weight.
    spread_weights: Vec<i64>,
    /// Per spread attribute: how many values it has.
    spread_values: Vec<usize>,
    /// Per attribute map, one after another: its value of each spread attribute.
    spread_keys: Vec<usize>,
}

impl<'g> GroupPlanner<'g> {
    pub(crate) fn new(snapshot: &PlanSnapshot, group: &'g TaskGroup) -> Self {
        let shapes = &snapshot.shapes;
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
        let sets = shapes.attributes.len();
        let mut failed = vec![None; sets];
        for (i, rule) in constraints.iter().enumerate().rev() {
            for (set, pass) in rule.over(shapes).into_iter().enumerate() {
                if !pass {
                    failed[set] = Some(i);
                }
            }
        }
        let mut affinity = vec![0; sets];
        for a in &group.affinities {
            let weight = i64::from(a.weight) * AFFINITY_UNIT;
            let rule = Rule::new(&a.attribute, a.op, &a.value);
            for (set, pass) in rule.over(shapes).into_iter().enumerate() {
                if pass {
                    affinity[set] += weight;
                }
            }
        }
        let suits = need
            .gpus
            .as_ref()
            .map_or_else(Vec::new, |gpus| gpus.suits(shapes));
        // Layouts that could take an instance were they empty.
        let possible: Vec<bool> = shapes
            .layouts
            .iter()
            .enumerate()
            .map(|(l, layout)| {
                need.gpus
                    .as_ref()
                    .is_none_or(|gpus| gpus.fits_empty(layout, &suits[l]))
            })
            .collect();
        let takes: Vec<bool> = shapes
            .nodes
            .iter()
            .map(|n| {
                n.status.is_schedulable()
                    && failed[n.attributes].is_none()
                    && possible[n.layout]
                    && n.cpu >= need.cpu
                    && n.memory >= need.memory
            })
            .collect();
        // Every node is looked at: without a branch, a node costs a couple of
        // nanoseconds however the shapes that pass are mixed.
        let mut candidates = vec![0; snapshot.nodes.len()];
        let mut passed = 0;
        for (n, &shape) in (0..).zip(&snapshot.shape) {
            candidates[passed] = n;
            passed += usize::from(takes[shape]);
        }
        candidates.truncate(passed);
        let spread_weights = group
            .spread
            .iter()
            .map(|s| s.weight.map_or(DEFAULT_SPREAD_WEIGHT, i64::from))
            .collect();
        // A node lacking a spread attribute counts under the empty value, which
        // every attribute has first; one no node has has no other.
        let spread: Vec<Option<usize>> = group
            .spread
            .iter()
            .map(|s| shapes.names.get(&s.attribute).copied())
            .collect();
        let spread_values = spread
            .iter()
            .map(|a| a.map_or(1, |a| shapes.values[a].len()))
            .collect();
        let spread_keys = (0..sets)
            .flat_map(|set| {
                spread
                    .iter()
                    .map(move |a| a.and_then(|a| shapes.value(set, a)).unwrap_or(0))
            })
            .collect();
        Self {
            group,
            need,
            constraints,
            failed,
            affinity,
            suits,
            candidates,
            spread_weights,
            spread_values,
            spread_keys,
        }
    }

    /// Positions of the nodes passing status and constraints that could take an
    /// instance were they empty, in id order.
    pub(crate) fn candidates(&self) -> impl Iterator<Item = usize> + '_ {
        self.candidates.iter().map(|&n| n as usize)
    }

    /// The spread values of the nodes with attribute map `set`, one per spread
    /// attribute.
    fn spread_key(&self, set: usize) -> &[usize] {
        let k = self.spread_weights.len();
        &self.spread_keys[set * k..(set + 1) * k]
    }

    /// The first capacity check the node fails.
    fn check(&self, snapshot: &PlanSnapshot, n: usize, used: NodeUse<'_>) -> Result<(), Shortfall> {
        let shape = snapshot.shape(n);
        if shape.cpu.saturating_sub(used.cpu()) < self.need.cpu {
            return Err(Shortfall::Cpu);
        }
        if shape.memory.saturating_sub(used.memory()) < self.need.memory {
            return Err(Shortfall::Memory);
        }
        match &self.need.gpus {
            Some(gpus) if !gpus.fits(snapshot.layout(n), &self.suits[shape.layout], used) => {
                Err(Shortfall::Gpus)
            }
            _ => Ok(()),
        }
    }

    /// The GPUs an instance would get on node `n`, if it fits there.
    fn fit(&self, snapshot: &PlanSnapshot, n: usize, used: NodeUse<'_>) -> Option<Vec<usize>> {
        self.check(snapshot, n, used).ok()?;
        let Some(gpus) = &self.need.gpus else {
            return Some(Vec::new());
        };
        let chosen = gpus.choose(
            snapshot.layout(n),
            &self.suits[snapshot.shape(n).layout],
            used,
        );
        debug_assert!(chosen.is_some(), "GpuNeed::fits and choose disagree");
        chosen
    }

    /// The node's score if the instance landed there: bin-packing plus GPU
    /// best-fit plus affinity. Higher is better.
    fn score(&self, snapshot: &PlanSnapshot, n: usize, used: NodeUse<'_>) -> i64 {
        let node = snapshot.shape(n);
        let share = |used: u64, need: u64, total: u64| -> i64 {
            if total == 0 {
                return FULL;
            }
            let after = (used + need).min(total);
            // At most 1000; in 64 bits unless the total is beyond any machine.
            let part = match after.checked_mul(1000) {
                Some(thousandths) => thousandths / total,
                None => {
                    u64::try_from(u128::from(after) * 1000 / u128::from(total)).unwrap_or(u64::MAX)
                }
            };
            i64::try_from(part).unwrap_or(FULL)
        };
        let mut score = (share(used.cpu(), self.need.cpu, node.cpu)
            + share(used.memory(), self.need.memory, node.memory))
            / 2;
        if let Some(gpus) = &self.need.gpus {
            // Best fit: 1000 when the matching free GPUs are exactly the request.
            let takeable = if gpus.slice.is_some() {
                used.unheld()
            } else {
                used.free()
            };
            let free = common(takeable, &self.suits[node.layout]).max(1);
            let want = if gpus.slice.is_some() { 1 } else { gpus.count };
            score += i64::try_from(want * 1000 / free).unwrap_or(FULL).min(FULL);
        }
        score + self.affinity[node.attributes]
    }

    /// Takes what an instance takes on node `n`, with the GPUs at `gpus`.
    fn take(&self, snapshot: &PlanSnapshot, n: usize, taken: &mut Taken<'_>, gpus: &[usize]) {
        let slice = self.need.gpus.as_ref().and_then(|g| g.slice);
        taken
            .node_mut(n)
            .take(self.need.cpu, self.need.memory, gpus, slice);
        let (shape, used) = (snapshot.shape(n), taken.node(n));
        debug_assert!(used.cpu() <= shape.cpu && used.memory() <= shape.memory);
    }

    /// Gives back what a placement of the group took.
    fn release(&self, snapshot: &PlanSnapshot, taken: &mut Taken<'_>, p: &Placement) {
        let Some(at) = snapshot.position(&p.node_id) else {
            return;
        };
        let uuids = &snapshot.nodes[at].uuids;
        let gpus: Vec<usize> = p
            .gpus
            .iter()
            .filter_map(|uuid| uuids.iter().position(|u| u == uuid))
            .collect();
        let slice = p.gpu_memory_slice.map(MemoryMib::get);
        taken
            .node_mut(at)
            .give_back(self.need.cpu, self.need.memory, &gpus, slice);
    }

    /// Instances per spread attribute and value: the job's live ones in the
    /// snapshot, then `changes` (a node and +1 for an instance added, -1 for one
    /// let go).
    fn spread_counts(
        &self,
        snapshot: &PlanSnapshot,
        job_id: &JobId,
        changes: &[(usize, i64)],
    ) -> Vec<Vec<i64>> {
        let mut counts: Vec<Vec<i64>> = self.spread_values.iter().map(|&v| vec![0; v]).collect();
        if counts.is_empty() {
            return counts;
        }
        let live = snapshot
            .instances
            .get(&(job_id.clone(), self.group.name.clone()));
        let live = live.into_iter().flatten().map(|&n| (n, 1));
        for (n, delta) in live.chain(changes.iter().copied()) {
            let key = self.spread_key(snapshot.shape(n).attributes);
            for (k, &value) in key.iter().enumerate() {
                counts[k][value] += delta;
            }
        }
        counts
    }

    /// The spread penalty of a node with spread values `key`.
    fn penalty(&self, key: &[usize], counts: &[Vec<i64>]) -> i64 {
        key.iter()
            .enumerate()
            .map(|(k, &v)| counts[k][v] * self.spread_weights[k] * SPREAD_UNIT)
            .sum()
    }

    /// The node an instance would go to, with its GPUs: the best score less
    /// spread penalty among the nodes it fits, the earliest on a tie. One scan,
    /// the same answer [`GroupPlanner::place`]'s heaps give, for callers that
    /// place one instance at a time between other changes.
    fn best(
        &self,
        snapshot: &PlanSnapshot,
        taken: &Taken<'_>,
        counts: &[Vec<i64>],
        exclude: Option<usize>,
    ) -> Option<(usize, Vec<usize>)> {
        let mut best: Option<(i64, usize)> = None;
        for n in self.candidates() {
            if exclude == Some(n) {
                continue;
            }
            let used = taken.node(n);
            if self.check(snapshot, n, used).is_err() {
                continue;
            }
            let key = self.spread_key(snapshot.shape(n).attributes);
            let total = self.score(snapshot, n, used) - self.penalty(key, counts);
            if best.is_none_or(|(top, _)| total > top) {
                best = Some((total, n));
            }
        }
        let (_, n) = best?;
        Some((n, self.fit(snapshot, n, taken.node(n))?))
    }

    /// The placement of instance `index` on node `n` with the GPUs at `gpus`.
    fn placement(
        &self,
        snapshot: &PlanSnapshot,
        n: usize,
        index: u32,
        gpus: &[usize],
    ) -> Placement {
        let node = &snapshot.nodes[n];
        Placement {
            group: self.group.name.clone(),
            index,
            node_id: node.id.clone(),
            gpus: gpus.iter().map(|&g| node.uuids[g].clone()).collect(),
            gpu_memory_slice: self
                .need
                .gpus
                .as_ref()
                .and_then(|g| g.slice)
                .map(MemoryMib::new),
        }
    }

    /// Places the demand's instances, appending to `placements`. On the first
    /// instance that fits nowhere, answers how many fitted and why.
    fn place(
        &self,
        snapshot: &PlanSnapshot,
        job_id: &JobId,
        demand: &GroupDemand,
        taken: &mut Taken<'_>,
        placements: &mut Vec<Placement>,
    ) -> Result<(), (u32, Explanation)> {
        // Buckets by spread key, each a max-heap of (score, earliest node id), of
        // the nodes that fit: within a group, one that does not never will.
        let spreading = !self.spread_weights.is_empty();
        let mut bucket_of_set: Vec<Option<usize>> = vec![None; self.affinity.len()];
        let mut bucket_of_key: HashMap<&[usize], usize> = HashMap::new();
        let mut keys: Vec<&[usize]> = Vec::new();
        let mut fitting: Vec<(usize, Ranked)> = Vec::with_capacity(self.candidates.len());
        for n in self.candidates() {
            let used = taken.node(n);
            if self.check(snapshot, n, used).is_err() {
                continue;
            }
            let set = snapshot.shape(n).attributes;
            let b = *bucket_of_set[set].get_or_insert_with(|| {
                let key = self.spread_key(set);
                // Without spread, one bucket holds every node.
                let b = if spreading {
                    *bucket_of_key.entry(key).or_insert(keys.len())
                } else {
                    0
                };
                if b == keys.len() {
                    keys.push(key);
                }
                b
            });
            fitting.push((b, (self.score(snapshot, n, used), Reverse(n))));
        }
        // Sized up front: growing a hundred buckets one push at a time costs more
        // than counting them.
        let mut sizes = vec![0; keys.len()];
        for &(b, _) in &fitting {
            sizes[b] += 1;
        }
        let mut ranked: Vec<Vec<Ranked>> = sizes.into_iter().map(Vec::with_capacity).collect();
        for (b, candidate) in fitting {
            ranked[b].push(candidate);
        }
        let mut heaps: Vec<BinaryHeap<Ranked>> = ranked.into_iter().map(BinaryHeap::from).collect();
        // Instances per spread attribute value, starting from the live ones.
        let mut spread_counts = self.spread_counts(snapshot, job_id, &[]);
        // Each bucket's best node that fits, with its GPUs. Only the bucket an
        // instance lands in changes, so the others' answers stay valid.
        let mut tops: Vec<Option<(i64, usize, Vec<usize>)>> = vec![None; heaps.len()];
        let mut stale = vec![true; heaps.len()];
        let mut fitted = 0u32;
        for &index in &demand.indices {
            let mut best: Option<(i64, usize, usize)> = None;
            for (b, heap) in heaps.iter_mut().enumerate() {
                if stale[b] {
                    stale[b] = false;
                    // Drop nodes that no longer fit: within a group they never will.
                    tops[b] = loop {
                        let Some(&(score, Reverse(n))) = heap.peek() else {
                            break None;
                        };
                        match self.fit(snapshot, n, taken.node(n)) {
                            Some(gpus) => break Some((score, n, gpus)),
                            None => {
                                heap.pop();
                            }
                        }
                    };
                }
                let Some((score, n, _)) = &tops[b] else {
                    continue;
                };
                let (score, n) = (*score, *n);
                let total = score - self.penalty(keys[b], &spread_counts);
                let better = match best {
                    None => true,
                    Some((s, _, bn)) => total > s || (total == s && n < bn),
                };
                if better {
                    best = Some((total, b, n));
                }
            }
            let Some((_, b, n)) = best else {
                return Err((fitted, self.explain(snapshot, taken)));
            };
            let gpus = tops[b].take().map(|(_, _, gpus)| gpus).unwrap_or_default();
            stale[b] = true;
            let heap = &mut heaps[b];
            let top = heap.pop().map(|(_, Reverse(top))| top);
            debug_assert_eq!(top, Some(n), "the best node came from this heap");
            self.take(snapshot, n, taken, &gpus);
            heap.push((self.score(snapshot, n, taken.node(n)), Reverse(n)));
            for (k, &value) in keys[b].iter().enumerate() {
                spread_counts[k][value] += 1;
            }
            placements.push(self.placement(snapshot, n, index, &gpus));
            fitted += 1;
        }
        Ok(())
    }

    /// Checks every node against the group and counts the first failure of each.
    fn explain(&self, snapshot: &PlanSnapshot, taken: &Taken<'_>) -> Explanation {
        let mut not_ready = 0;
        let mut failed = vec![0; self.constraints.len()];
        let (mut cpu, mut memory, mut gpus) = (0, 0, 0);
        let mut feasible = 0;
        for n in 0..snapshot.nodes.len() {
            let shape = snapshot.shape(n);
            if !shape.status.is_schedulable() {
                not_ready += 1;
            } else if let Some(rule) = self.failed[shape.attributes] {
                failed[rule] += 1;
            } else {
                match self.check(snapshot, n, taken.node(n)) {
                    Ok(()) => feasible += 1,
                    Err(Shortfall::Cpu) => cpu += 1,
                    Err(Shortfall::Memory) => memory += 1,
                    Err(Shortfall::Gpus) => gpus += 1,
                }
            }
        }
        let mut counts: BTreeMap<Rejection, u32> = BTreeMap::new();
        let mut count = |rejection: Rejection, n: u32| {
            if n > 0 {
                *counts.entry(rejection).or_default() += n;
            }
        };
        count(Rejection::NotReady, not_ready);
        for (rule, n) in self.constraints.iter().zip(failed) {
            count(Rejection::Constraint(rule.to_string()), n);
        }
        count(Rejection::Cpu(MilliCpu::new(self.need.cpu)), cpu);
        count(Rejection::Memory(MemoryMib::new(self.need.memory)), memory);
        if let Some(need) = &self.need.gpus {
            count(Rejection::Gpus(need.describe()), gpus);
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

/// A plan in progress over a snapshot, for planners that do more than place:
/// what is taken now, which live allocations were let go (evicted, or moved
/// away), and per job and group the instances added and let go, so that spread
/// counts follow both. Preemption and defragmentation try a change on a clone
/// and keep or drop it whole; the snapshot itself is never touched, and a clone
/// copies only the nodes the draft changed.
#[derive(Debug, Clone)]
pub(crate) struct Draft<'s> {
    snapshot: &'s PlanSnapshot,
    taken: Taken<'s>,
    let_go: HashSet<AllocId>,
    /// Per job and group: a node and +1 for an instance added there, -1 for one
    /// let go.
    changes: HashMap<(JobId, String), Vec<(usize, i64)>>,
}

impl<'s> Draft<'s> {
    pub(crate) fn new(snapshot: &'s PlanSnapshot) -> Self {
        Self {
            snapshot,
            taken: Taken::new(&snapshot.usage, 0),
            let_go: HashSet::new(),
            changes: HashMap::new(),
        }
    }

    pub(crate) fn snapshot(&self) -> &'s PlanSnapshot {
        self.snapshot
    }

    /// The live allocations on node `n` not let go yet, by id.
    pub(crate) fn live_on(&self, n: usize) -> impl Iterator<Item = &'s LiveAlloc> + '_ {
        self.snapshot.held[n]
            .iter()
            .filter(|a| !self.let_go.contains(&a.id))
    }

    /// Lets a live allocation on node `n` go: what it holds is free from now on.
    pub(crate) fn let_go(&mut self, n: usize, alloc: &LiveAlloc) {
        if self.let_go.insert(alloc.id.clone()) {
            self.taken.node_mut(n).let_go(alloc);
            self.changes
                .entry((alloc.job_id.clone(), alloc.group.clone()))
                .or_default()
                .push((n, -1));
        }
    }

    /// Where an instance of `group` of job `job_id` goes as things stand, by the
    /// planner's ranking, never on node `exclude`; with the GPUs it would get.
    pub(crate) fn best(
        &self,
        group: &GroupPlanner<'_>,
        job_id: &JobId,
        exclude: Option<usize>,
    ) -> Option<(usize, Vec<usize>)> {
        let changes = self
            .changes
            .get(&(job_id.clone(), group.group.name.clone()))
            .map_or(&[][..], Vec::as_slice);
        let counts = group.spread_counts(self.snapshot, job_id, changes);
        group.best(self.snapshot, &self.taken, &counts, exclude)
    }

    /// What is taken on node `n` were `let_go` let go, as a one-node usage.
    fn without(&self, n: usize, let_go: &[&LiveAlloc]) -> Usage {
        let mut used = Usage::copy_of(self.taken.node(n));
        for alloc in let_go {
            used.node_mut(0).let_go(alloc);
        }
        used
    }

    /// The GPUs an instance of `group` would get on node `n` were `let_go` let
    /// go, if it would fit then.
    pub(crate) fn fits_without(
        &self,
        group: &GroupPlanner<'_>,
        n: usize,
        let_go: &[&LiveAlloc],
    ) -> Option<Vec<usize>> {
        group.fit(self.snapshot, n, self.without(n, let_go).node(0))
    }

    /// Whether an instance of `group` fits on some node as things stand.
    pub(crate) fn fits_somewhere(&self, group: &GroupPlanner<'_>) -> bool {
        group
            .candidates()
            .any(|n| group.check(self.snapshot, n, self.taken.node(n)).is_ok())
    }

    /// How many more suitable whole GPUs an instance of `group` needs on node
    /// `n` than are free there: a floor on what making room there must free. 0
    /// for work without GPUs or with a slice.
    pub(crate) fn gpus_missing(&self, group: &GroupPlanner<'_>, n: usize) -> usize {
        let Some(gpus) = group.need.gpus.as_ref().filter(|g| g.slice.is_none()) else {
            return 0;
        };
        let suits = &group.suits[self.snapshot.shape(n).layout];
        let free = common(self.taken.node(n).free(), suits);
        gpus.count.saturating_sub(free)
    }

    /// Of `let_go`, the ones an instance of `group` needs gone to fit on node
    /// `n`: each is given back in turn while the instance still fits without it,
    /// the smallest first (by [`PlanSnapshot::share`]), then the higher priority,
    /// then the later id, so that what stays let go is few, small and of low
    /// priority, and none of it superfluous. `None` when even letting all of
    /// `let_go` go makes no room.
    pub(crate) fn make_room(
        &self,
        group: &GroupPlanner<'_>,
        n: usize,
        mut let_go: Vec<&'s LiveAlloc>,
    ) -> Option<Vec<&'s LiveAlloc>> {
        let mut used = self.without(n, &let_go);
        group.check(self.snapshot, n, used.node(0)).ok()?;
        let_go.sort_by_cached_key(|a| {
            let a: &'s LiveAlloc = a;
            (
                self.snapshot.share(n, a),
                Reverse(a.info.priority),
                Reverse(&a.id),
            )
        });
        let mut needed = Vec::new();
        for alloc in let_go {
            used.node_mut(0).hold(alloc);
            if group.check(self.snapshot, n, used.node(0)).is_err() {
                used.node_mut(0).let_go(alloc);
                needed.push(alloc);
            }
        }
        Some(needed)
    }

    /// Places instance `index` of `group` of job `job_id` on node `n`, with the
    /// GPUs at positions `gpus` (as [`Draft::best`] or [`Draft::fits_without`]
    /// gave them).
    pub(crate) fn place(
        &mut self,
        group: &GroupPlanner<'_>,
        job_id: &JobId,
        index: u32,
        n: usize,
        gpus: &[usize],
    ) -> Placement {
        group.take(self.snapshot, n, &mut self.taken, gpus);
        self.changes
            .entry((job_id.clone(), group.group.name.clone()))
            .or_default()
            .push((n, 1));
        group.placement(self.snapshot, n, index, gpus)
    }
}

impl AsRef<Self> for Draft<'_> {
    fn as_ref(&self) -> &Self {
        self
    }
}

/// Places a request's instances one at a time with `place_one`, which sees and
/// changes `state` (a [`Draft`] and whatever else a planner keeps) and answers
/// whether the instance found a node. A group stops at its first instance that
/// does not; a gang then gets back the state it started from. Answers the groups
/// left short, explained against the state at the failure, as [`plan`] does.
pub(crate) fn place_one_by_one<'s, S: Clone + AsRef<Draft<'s>>>(
    snapshot: &'s PlanSnapshot,
    request: &PlanRequest,
    state: &mut S,
    mut place_one: impl FnMut(&mut S, &GroupPlanner<'_>, u32) -> bool,
) -> Vec<UnplacedGroup> {
    let mut unplaced = Vec::new();
    for demand in &request.groups {
        if demand.indices.is_empty() {
            continue;
        }
        let group = GroupPlanner::new(snapshot, &demand.group);
        let before = demand.group.gang.then(|| state.clone());
        let fitted = demand
            .indices
            .iter()
            .take_while(|&&index| place_one(state, &group, index))
            .count();
        if fitted == demand.indices.len() {
            continue;
        }
        let explanation = group.explain(snapshot, &state.as_ref().taken);
        let gang_fitted = before.map(|before| {
            *state = before;
            u32::try_from(fitted).unwrap_or(u32::MAX)
        });
        let missing = match gang_fitted {
            Some(_) => demand.indices.len(),
            None => demand.indices.len() - fitted,
        };
        unplaced.push(UnplacedGroup {
            group: demand.group.name.clone(),
            missing: u32::try_from(missing).unwrap_or(u32::MAX),
            gang_fitted,
            explanation,
        });
    }
    unplaced
}

#[cfg(test)]
pub(crate) mod testkit {
    //! Fixtures and the invariant checker shared by the planner's, preemption's
    //! and defragmentation's tests.

    use std::collections::HashSet;

    use aigrid_api::{
        AllocId, AllocState, Constraint, DesiredState, ExecTask, GpuDevice, NodeResources,
        Resources, Spread, TaskSpec, Timestamp,
    };
    use proptest::prelude::*;

    use super::*;

    /// A GPU as tests describe it: model, memory in GiB, healthy, interconnect group.
    pub(crate) type Gpu = (&'static str, u64, bool, Option<&'static str>);

    pub(crate) fn node(
        id: &str,
        attrs: &[(&str, &str)],
        cpu: u64,
        memory: u64,
        gpus: &[Gpu],
    ) -> Node {
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
                        health_reason: None,
                        numa_node: None,
                        interconnect_group: link.map(str::to_owned),
                        mig_capable: false,
                    })
                    .collect(),
            },
            status: NodeStatus::Ready,
            registered_at: Timestamp::new(1),
            last_seen: Timestamp::new(1),
            drain: None,
            public_key: None,
            revoked: false,
            telemetry: None,
            usage: None,
        }
    }

    pub(crate) fn h100s(n: usize) -> Vec<Gpu> {
        vec![("NVIDIA H100", 80, true, None); n]
    }

    pub(crate) fn group(
        name: &str,
        count: u32,
        cpu: u64,
        memory: u64,
        gpus: Option<GpuRequest>,
    ) -> TaskGroup {
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
                restart: Default::default(),
                kill_timeout_ms: None,
                env: BTreeMap::new(),
                artifacts: Vec::new(),
            }),
        }
    }

    pub(crate) fn gpus(
        count: u32,
        model: Option<&str>,
        min_gib: Option<u64>,
    ) -> Option<GpuRequest> {
        Some(GpuRequest {
            count,
            model: model.map(str::to_owned),
            min_memory_mib: min_gib.map(|g| MemoryMib::new(g * 1024)),
            memory_slice_mib: None,
            same_interconnect: false,
        })
    }

    pub(crate) fn rule(attribute: &str, op: ConstraintOp, value: &[&str]) -> Constraint {
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

    pub(crate) fn request(groups: Vec<TaskGroup>) -> PlanRequest {
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

    pub(crate) fn run(nodes: &[Node], groups: Vec<TaskGroup>) -> Plan {
        plan(&PlanSnapshot::new(nodes, &[]), &request(groups))
    }

    pub(crate) fn on(plan: &Plan) -> Vec<&str> {
        nodes_of(&plan.placements)
    }

    /// The nodes placements went to, in order.
    pub(crate) fn nodes_of(placements: &[Placement]) -> Vec<&str> {
        placements.iter().map(|p| p.node_id.as_str()).collect()
    }

    pub(crate) fn live(
        id: &str,
        job: &str,
        node: &str,
        resources: Resources,
        gpus: &[&str],
    ) -> Allocation {
        Allocation {
            id: AllocId::new(id),
            job_id: JobId::new(job),
            job_version: 1,
            node_id: NodeId::new(node),
            group: "g".to_owned(),
            index: 0,
            resources,
            gpus: gpus.iter().map(|g| (*g).to_owned()).collect(),
            previous: None,
            reschedules: 0,
            state: AllocState::Running,
            reason: None,
            restarts: 0,
            limits: None,
            endpoint: None,
            desired: DesiredState::Run,
            created_at: Timestamp::new(1),
            updated_at: Timestamp::new(1),
        }
    }

    /// A live allocation of instance `index` of `job`'s group `group`, holding
    /// `gpus` whole, 1000 CPU millis and 1 GiB.
    pub(crate) fn holding(
        id: &str,
        job: &str,
        node: &str,
        (group, index): (&str, u32),
        gpus: &[&str],
    ) -> Allocation {
        let count = u32::try_from(gpus.len()).unwrap();
        let resources = Resources {
            cpu_millis: 1000.into(),
            memory_mib: 1024.into(),
            gpus: (count > 0).then_some(GpuRequest {
                count,
                model: None,
                min_memory_mib: None,
                memory_slice_mib: None,
                same_interconnect: false,
            }),
        };
        let mut alloc = live(id, job, node, resources, gpus);
        alloc.group = group.to_owned();
        alloc.index = index;
        alloc
    }

    /// The live allocation a placement of `job`'s `group` becomes.
    pub(crate) fn placed(id: &str, job: &JobId, group: &TaskGroup, p: &Placement) -> Allocation {
        let mut alloc = live(
            id,
            job.as_str(),
            p.node_id.as_str(),
            group.resources.clone(),
            &[],
        );
        alloc.group = p.group.clone();
        alloc.index = p.index;
        alloc.gpus = p.gpus.clone();
        alloc
    }

    /// A job placed before the one under test: one group, its priority, and how
    /// many of its instances may be disrupted now.
    #[derive(Debug, Clone)]
    pub(crate) struct Earlier {
        pub(crate) job_id: JobId,
        pub(crate) priority: u32,
        pub(crate) group: TaskGroup,
        pub(crate) budget: u32,
    }

    impl Earlier {
        /// What a snapshot is told of an earlier job's allocations.
        pub(crate) fn info(jobs: &[Earlier], job_id: &JobId) -> Option<GroupInfo> {
            let job = jobs.iter().find(|j| &j.job_id == job_id)?;
            Some(GroupInfo {
                priority: job.priority,
                movable: job.group.movable,
            })
        }
    }

    /// Places earlier jobs one after another, as a scheduling pass would, keeping
    /// one snapshot current with [`PlanSnapshot::add`]; answers their allocations.
    pub(crate) fn populate(nodes: &[Node], jobs: &[Earlier]) -> Vec<Allocation> {
        let mut snapshot = PlanSnapshot::new(nodes, &[]);
        let mut allocs = Vec::new();
        for job in jobs {
            let req = PlanRequest {
                job_id: job.job_id.clone(),
                groups: vec![GroupDemand {
                    indices: (0..job.group.count).collect(),
                    group: job.group.clone(),
                }],
            };
            for p in plan(&snapshot, &req).placements {
                let id = format!("{}-{}", job.job_id, p.index);
                let alloc = placed(&id, &job.job_id, &job.group, &p);
                snapshot.add(&alloc, GroupInfo::default());
                allocs.push(alloc);
            }
        }
        allocs
    }

    /// A GPU server: four or eight GPUs of one model, in interconnect domains of
    /// some size or none, now and then an unhealthy one, and CPU and memory to
    /// spare, so that GPUs are what runs out.
    pub(crate) fn arb_gpu_node(i: usize) -> impl Strategy<Value = Node> {
        (
            prop::sample::select(vec!["BE", "NL", "FR"]),
            0usize..3,
            prop::sample::select(vec![4usize, 8]),
            prop::sample::select(vec!["H100", "A100"]),
            prop::sample::select(vec![None, Some(2usize), Some(4), Some(8)]),
            prop::option::weighted(0.2, 0usize..8),
            prop::option::weighted(0.1, Just(NodeStatus::Down)),
        )
            .prop_map(move |(country, site, count, model, domain, sick, down)| {
                const DOMAINS: [&str; 4] = ["nvl-0", "nvl-1", "nvl-2", "nvl-3"];
                let gs: Vec<Gpu> = (0..count)
                    .map(|g| (model, 80, sick != Some(g), domain.map(|d| DOMAINS[g / d])))
                    .collect();
                let site = ["s0", "s1", "s2"][site];
                let id = format!("n{i:03}");
                let attrs = [("country", country), ("site", site), ("host", &id)];
                let mut n = node(&id, &attrs, 64000, 262_144, &gs);
                n.status = down.unwrap_or(NodeStatus::Ready);
                n
            })
    }

    /// A group of GPU instances: up to `most` whole GPUs each, or now and then a
    /// slice; sometimes limited to countries, spread over sites or hosts (which
    /// scatters it over every node), a gang, or held to one interconnect domain.
    pub(crate) fn arb_gpu_group(
        i: usize,
        count: std::ops::Range<u32>,
        most: u32,
    ) -> impl Strategy<Value = TaskGroup> {
        (
            count,
            1u32..=most,
            prop::option::weighted(0.15, 0u64..3),
            prop::option::weighted(0.3, prop::sample::select(vec!["H100", "A100"])),
            prop::option::weighted(
                0.2,
                prop::sample::select(vec![vec!["BE"], vec!["BE", "NL"], vec!["NL", "FR"]]),
            ),
            (
                prop::option::of(prop::sample::select(vec!["site", "host"])),
                prop::bool::weighted(0.2),
                prop::bool::weighted(0.2),
            ),
            (1u64..8, 1u64..16),
        )
            .prop_map(
                move |(count, n, slice, model, countries, (spread, gang, linked), (cpu, mem))| {
                    let gpu = GpuRequest {
                        count: if slice.is_some() { 1 } else { n },
                        model: model.map(str::to_owned),
                        min_memory_mib: None,
                        memory_slice_mib: slice.map(|s| MemoryMib::new((s + 1) * 16 * 1024)),
                        same_interconnect: linked,
                    };
                    let mut g = group(&format!("g{i}"), count, cpu * 1000, mem * 1024, Some(gpu));
                    g.gang = gang;
                    if let Some(cs) = countries {
                        g.constraints = vec![rule("country", ConstraintOp::In, &cs)];
                    }
                    if let Some(attribute) = spread {
                        g.spread = vec![Spread {
                            attribute: attribute.to_owned(),
                            weight: None,
                        }];
                    }
                    g
                },
            )
    }

    pub(crate) fn arb_earlier(i: usize) -> impl Strategy<Value = Earlier> {
        (
            arb_gpu_group(i + 10, 1..7, 2),
            prop::sample::select(vec![0u32, 0, 10, 10, 20, 30, 40, 60]),
            prop::bool::weighted(0.85),
            0u32..8,
        )
            .prop_map(move |(mut group, priority, movable, budget)| {
                group.movable = movable;
                group.gang = false;
                Earlier {
                    job_id: JobId::new(format!("earlier{i}")),
                    priority,
                    group,
                    budget,
                }
            })
    }

    /// A GPU cluster with earlier jobs placed on it, a job to place, and its
    /// priority.
    pub(crate) fn arb_crowded(
    ) -> impl Strategy<Value = (Vec<Node>, Vec<Earlier>, Vec<TaskGroup>, u32)> {
        (2usize..6, 2usize..9, 1usize..3).prop_flat_map(|(n, e, g)| {
            (
                (0..n).map(arb_gpu_node).collect::<Vec<_>>(),
                (0..e).map(arb_earlier).collect::<Vec<_>>(),
                (0..g)
                    .map(|i| arb_gpu_group(i, 1..4, 8))
                    .collect::<Vec<_>>(),
                prop::sample::select(vec![15u32, 35, 50, 70]),
            )
        })
    }

    /// Like [`arb_crowded`], but half the time the earlier jobs are one-GPU
    /// instances spread over hosts: free GPUs scattered over every node, the
    /// case defragmentation is for.
    pub(crate) fn arb_scattered(
    ) -> impl Strategy<Value = (Vec<Node>, Vec<Earlier>, Vec<TaskGroup>, u32)> {
        (arb_crowded(), any::<bool>()).prop_map(
            |((nodes, mut earlier, groups, priority), scatter)| {
                if scatter {
                    for job in &mut earlier {
                        let g = &mut job.group;
                        g.spread = vec![Spread {
                            attribute: "host".to_owned(),
                            weight: None,
                        }];
                        g.constraints.clear();
                        g.resources.gpus = Some(GpuRequest {
                            count: 1,
                            model: None,
                            min_memory_mib: None,
                            memory_slice_mib: None,
                            same_interconnect: false,
                        });
                    }
                }
                (nodes, earlier, groups, priority)
            },
        )
    }

    /// What holds resources once a change commits: `allocs` less those `stopped`,
    /// plus `added`.
    pub(crate) fn after(
        allocs: &[Allocation],
        stopped: &HashSet<&AllocId>,
        added: impl IntoIterator<Item = Allocation>,
    ) -> Vec<Allocation> {
        let mut out: Vec<Allocation> = allocs
            .iter()
            .filter(|a| !stopped.contains(&a.id))
            .cloned()
            .collect();
        out.extend(added);
        out
    }

    /// Checks a plan against its input: no over-commit, constraints hold, gangs whole.
    pub(crate) fn check_plan(
        nodes: &[Node],
        allocs: &[Allocation],
        req: &PlanRequest,
        plan: &Plan,
    ) {
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

    pub(crate) fn arb_node(i: usize) -> impl Strategy<Value = Node> {
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

    pub(crate) fn arb_group(i: usize) -> impl Strategy<Value = TaskGroup> {
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aigrid_api::{Affinity, Constraint, DesiredState, Resources, Spread};
    use proptest::prelude::*;

    use super::testkit::*;
    use super::*;

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
        assert_eq!(unplaced.count, 2);
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
    fn the_snapshot_knows_who_holds_what() {
        let nodes = [node("a", &[], 64000, 65536, &h100s(4))];
        let allocs = [
            holding("z", "train", "a", ("workers", 1), &["a-gpu2", "a-gpu3"]),
            holding("y", "web", "a", ("front", 0), &[]),
            holding("x", "gone", "nowhere", ("g", 0), &["a-gpu0"]),
        ];
        let snap = PlanSnapshot::with_jobs(&nodes, &allocs, |job, group| {
            (job.as_str() == "train").then_some(GroupInfo {
                priority: 70,
                movable: group != "workers",
            })
        });
        let held = snap.live_allocations(&NodeId::new("a"));
        let ids: Vec<&str> = held.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["y", "z"]);
        let z = &held[1];
        assert_eq!(
            (z.group.as_str(), z.index, z.gpu_count()),
            ("workers", 1, 2)
        );
        assert_eq!(
            z.info,
            GroupInfo {
                priority: 70,
                movable: false
            }
        );
        // Jobs the caller does not know are the lowest priority, and movable.
        assert_eq!(held[0].info, GroupInfo::default());
        assert_eq!(GroupInfo::default().priority, 0);
        assert!(GroupInfo::default().movable);
        assert!(snap.live_allocations(&NodeId::new("nowhere")).is_empty());
        let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "j", "priority": 30, "groups": []
        }))
        .unwrap();
        let mut g = group("pinned", 1, 1000, 1024, None);
        g.movable = false;
        spec.groups.push(g);
        assert_eq!(
            GroupInfo::of(&spec, "pinned"),
            GroupInfo {
                priority: 30,
                movable: false
            }
        );
        assert!(GroupInfo::of(&spec, "dropped").movable);
    }

    #[test]
    fn a_request_without_what_was_placed_is_what_is_left() {
        let nodes = [node("a", &[], 4000, 4096, &h100s(2))];
        let mut gang = group("gang", 2, 1000, 1024, gpus(2, None, None));
        gang.gang = true;
        let req = request(vec![group("g", 3, 1000, 1024, gpus(1, None, None)), gang]);
        let p = plan(&PlanSnapshot::new(&nodes, &[]), &req);
        let left = req.without(&p.placements);
        assert_eq!(left.job_id, req.job_id);
        let groups: Vec<(&str, &[u32])> = left
            .groups
            .iter()
            .map(|d| (d.group.name.as_str(), d.indices.as_slice()))
            .collect();
        assert_eq!(groups, [("g", &[2][..]), ("gang", &[0, 1][..])]);
        assert!(req.without(&[]) == req);
    }

    /// A snapshot's contents in a form that does not depend on the order changes
    /// came in.
    type Contents = (
        Usage,
        Vec<Vec<LiveAlloc>>,
        HashMap<AllocId, usize>,
        BTreeMap<(JobId, String), Vec<usize>>,
    );

    fn contents(snap: &PlanSnapshot) -> Contents {
        let instances = snap
            .instances
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                v.sort_unstable();
                (k.clone(), v)
            })
            .collect();
        (
            snap.usage.clone(),
            snap.held.clone(),
            snap.located.clone(),
            instances,
        )
    }

    /// A state for [`place_one_by_one`] that keeps placements as [`plan`] does.
    #[derive(Clone)]
    struct OneByOne<'s>(Draft<'s>, Vec<Placement>);

    impl<'s> AsRef<Draft<'s>> for OneByOne<'s> {
        fn as_ref(&self) -> &Draft<'s> {
            &self.0
        }
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
        fn add_and_remove_keep_the_snapshot_as_a_rebuild_would(
            (nodes, earlier, groups, _) in arb_crowded(),
            split in 0usize..40,
            fate in prop::collection::vec(0u8..4, 40),
        ) {
            let allocs = populate(&nodes, &earlier);
            let info = |job: &JobId, _: &str| Earlier::info(&earlier, job);
            let split = split.min(allocs.len());
            let mut snap = PlanSnapshot::with_jobs(&nodes, &allocs[..split], info);
            for a in &allocs[split..] {
                snap.add(a, info(&a.job_id, &a.group).unwrap_or_default());
            }
            let mut kept = Vec::new();
            for (i, a) in allocs.iter().enumerate() {
                let info = info(&a.job_id, &a.group).unwrap_or_default();
                match fate[i % fate.len()] {
                    0 => prop_assert!(snap.remove(&a.id)),
                    1 => {
                        let mut stopped = a.clone();
                        stopped.desired = DesiredState::Stop;
                        snap.add(&stopped, info);
                        prop_assert!(!snap.remove(&a.id));
                    }
                    2 => {
                        // Adding a version the snapshot holds changes nothing.
                        snap.add(a, info);
                        kept.push(a.clone());
                    }
                    _ => kept.push(a.clone()),
                }
            }
            let rebuilt = PlanSnapshot::with_jobs(&nodes, &kept, info);
            prop_assert_eq!(contents(&snap), contents(&rebuilt));
            let req = request(groups);
            prop_assert_eq!(plan(&snap, &req), plan(&rebuilt, &req));
        }

        #[test]
        fn one_at_a_time_places_as_the_heaps_do((nodes, earlier, groups, _) in arb_crowded()) {
            let allocs = populate(&nodes, &earlier);
            let snap = PlanSnapshot::new(&nodes, &allocs);
            let req = request(groups);
            let mut state = OneByOne(Draft::new(&snap), Vec::new());
            let unplaced = place_one_by_one(&snap, &req, &mut state, |state, group, index| {
                let Some((n, gpus)) = state.0.best(group, &req.job_id, None) else {
                    return false;
                };
                let placement = state.0.place(group, &req.job_id, index, n, &gpus);
                state.1.push(placement);
                true
            });
            prop_assert_eq!(plan(&snap, &req), Plan { placements: state.1, unplaced });
        }

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
