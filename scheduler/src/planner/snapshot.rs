//! The cluster as the planner sees it: nodes interned by attribute map and GPU
//! layout, what live allocations take, and the copy-on-write view a plan changes.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use aigrid_api::{AllocId, Allocation, GpuDevice, JobId, MemoryMib, Node, NodeId, NodeStatus};

use super::live::{GroupInfo, LiveAlloc};

/// GPUs per word of a GPU bitset.
pub(super) const BITS: usize = 64;

/// What the planner knows about the cluster: nodes sorted by id, and what their
/// live allocations hold, indexed once so planning never rescans allocations.
/// [`PlanSnapshot::add`] and [`PlanSnapshot::remove`] keep it current while a
/// scheduling pass commits plan after plan, so a pass builds it once.
#[derive(Debug, Clone, Default)]
pub struct PlanSnapshot {
    pub(super) nodes: Vec<SnapNode>,
    /// Per node: its shape, an index into [`Shapes::nodes`]. Apart from the
    /// nodes, so that going over every node reads one word of each.
    pub(super) shape: Vec<usize>,
    /// The nodes' distinct shapes, attribute maps and GPU layouts; fixed once
    /// built, as the node list is.
    pub(super) shapes: Shapes,
    pub(super) usage: Usage,
    /// Per node: its live allocations, sorted by id, so preemption and
    /// defragmentation know whom letting go frees what.
    pub(super) held: Vec<Vec<LiveAlloc>>,
    /// The node each live allocation is on.
    pub(super) located: HashMap<AllocId, usize>,
    /// Nodes holding live instances, per job and group, for spreading; a node is
    /// listed once per instance on it.
    pub(super) instances: HashMap<(JobId, String), Vec<usize>>,
    /// The allocations counted as holding a port: every unfinished one that has
    /// or will be given one. A port stays taken until its workload is confirmed
    /// gone, so letting an allocation go in a plan does not free it.
    pub(super) port_holders: HashSet<AllocId>,
}

#[derive(Debug, Clone)]
pub(super) struct SnapNode {
    pub(super) id: NodeId,
    /// Its GPUs' UUIDs, in the node's order.
    pub(super) uuids: Vec<String>,
}

/// What a group's checks and ranking look at in a node, apart from what is
/// taken on it; many nodes share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct NodeShape {
    pub(super) status: NodeStatus,
    pub(super) cpu: u64,
    pub(super) memory: u64,
    /// How many ports its listening workloads may be assigned.
    pub(super) ports: u64,
    /// Its attribute map: an index into [`Shapes::attributes`].
    pub(super) attributes: usize,
    /// Its GPU layout: an index into [`Shapes::layouts`].
    pub(super) layout: usize,
}

/// The node properties rules and GPU requests look at, each distinct one stored
/// once.
#[derive(Debug, Clone, Default)]
pub(super) struct Shapes {
    /// Distinct node shapes.
    pub(super) nodes: Vec<NodeShape>,
    /// Attribute names, each with its id: its position in `values`.
    pub(super) names: HashMap<String, usize>,
    /// Per attribute: its distinct values. The empty value is always first: it
    /// is where spreading counts a node lacking the attribute.
    pub(super) values: Vec<Vec<String>>,
    /// Distinct attribute maps, as (attribute, value) ids sorted by attribute.
    pub(super) attributes: Vec<Vec<(usize, usize)>>,
    /// Distinct GPU models.
    pub(super) models: Vec<String>,
    /// Distinct GPU layouts.
    pub(super) layouts: Vec<Layout>,
}

/// A node's GPUs, as far as placing on them goes.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) gpus: Vec<GpuKind>,
    /// Per interconnect domain (by [`GpuKind::domain`]): its GPUs, as bits.
    pub(super) domains: Vec<Vec<u64>>,
}

/// One GPU of a [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct GpuKind {
    /// An index into [`Shapes::models`].
    pub(super) model: usize,
    pub(super) memory: u64,
    pub(super) healthy: bool,
    /// Its interconnect domain, ranked in the order instances look at domains:
    /// GPUs without one first, each alone, by position; then the named domains
    /// by name.
    pub(super) domain: usize,
}

/// Builds [`Shapes`], remembering what it has seen.
#[derive(Default)]
struct Interner {
    pub(super) shapes: Shapes,
    value_ids: Vec<HashMap<String, usize>>,
    attribute_ids: HashMap<Vec<(usize, usize)>, usize>,
    model_ids: HashMap<String, usize>,
    layout_ids: HashMap<Vec<GpuKind>, usize>,
    shape_ids: HashMap<NodeShape, usize>,
}

impl Interner {
    pub(super) fn shape(&mut self, node: &Node) -> usize {
        let shape = NodeShape {
            status: node.status,
            cpu: node.resources.cpu_millis.get(),
            memory: node.resources.memory_mib.get(),
            ports: u64::from(node.ports.len()),
            attributes: self.attributes(&node.attributes),
            layout: self.layout(&node.resources.gpus),
        };
        let shapes = &mut self.shapes.nodes;
        *self.shape_ids.entry(shape).or_insert_with_key(|shape| {
            shapes.push(shape.clone());
            shapes.len() - 1
        })
    }

    pub(super) fn attribute(&mut self, name: &str) -> usize {
        if let Some(&id) = self.shapes.names.get(name) {
            return id;
        }
        let id = self.shapes.values.len();
        self.shapes.names.insert(name.to_owned(), id);
        self.shapes.values.push(vec![String::new()]);
        self.value_ids.push(HashMap::from([(String::new(), 0)]));
        id
    }

    pub(super) fn attributes(&mut self, attributes: &BTreeMap<String, String>) -> usize {
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

    pub(super) fn layout(&mut self, gpus: &[GpuDevice]) -> usize {
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
    pub(super) fn value(&self, set: usize, attribute: usize) -> Option<usize> {
        let set = &self.attributes[set];
        set.binary_search_by_key(&attribute, |&(a, _)| a)
            .ok()
            .map(|i| set[i].1)
    }
}

pub(super) fn bit(words: &[u64], i: usize) -> bool {
    words[i / BITS] >> (i % BITS) & 1 == 1
}

pub(super) fn set_bit(words: &mut [u64], i: usize, on: bool) {
    let mask = 1 << (i % BITS);
    if on {
        words[i / BITS] |= mask;
    } else {
        words[i / BITS] &= !mask;
    }
}

/// How many bits two bitsets share.
pub(super) fn common(a: &[u64], b: &[u64]) -> usize {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a & b).count_ones() as usize)
        .sum()
}

/// Where one node's entries are in a [`Usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    /// Its first GPU in the per-GPU lists.
    pub(super) gpu: usize,
    /// Its first word in the bitsets.
    word: usize,
    pub(super) gpus: usize,
}

impl Span {
    pub(super) fn gpus(self) -> Range<usize> {
        self.gpu..self.gpu + self.gpus
    }

    pub(super) fn words(self) -> Range<usize> {
        self.word..self.word + self.gpus.div_ceil(BITS)
    }
}

/// What is taken on a list of nodes; changes as a plan places instances. Flat,
/// so that copying a node is a few short copies and checking one is a few reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) cpu: Vec<u64>,
    pub(super) memory: Vec<u64>,
    /// Per node: ports held by unfinished allocations.
    pub(super) ports: Vec<u64>,
    spans: Vec<Span>,
    /// Per GPU: how many instances hold it whole. One at most, unless the
    /// allocations the snapshot was given overlap; counting keeps letting one of
    /// them go from freeing the GPU.
    exclusive: Vec<u8>,
    /// Per GPU: memory taken by slices.
    pub(super) sliced: Vec<u64>,
    /// Per node, a bit per GPU: neither held whole nor sliced, so a whole-GPU
    /// instance may take it. Follows `exclusive` and `sliced`.
    pub(super) free: Vec<u64>,
    /// Per node, a bit per GPU: not held whole, so a slice may share it.
    pub(super) unheld: Vec<u64>,
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
        self.ports.push(0);
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
        self.ports.push(from.ports());
        self.spans.push(span);
        self.exclusive.extend_from_slice(from.exclusive());
        self.sliced.extend_from_slice(from.sliced());
        self.free.extend_from_slice(from.free());
        self.unheld.extend_from_slice(from.unheld());
        self.spans.len() - 1
    }

    /// A copy of one node, alone, to try changes on.
    pub(super) fn copy_of(from: NodeUse<'_>) -> Self {
        let mut copy = Self::default();
        copy.push_copy(from);
        copy
    }

    pub(super) fn node(&self, i: usize) -> NodeUse<'_> {
        NodeUse { usage: self, i }
    }

    pub(super) fn node_mut(&mut self, i: usize) -> NodeMut<'_> {
        NodeMut { usage: self, i }
    }
}

/// What is taken on one node of a [`Usage`].
#[derive(Debug, Clone, Copy)]
pub(super) struct NodeUse<'a> {
    pub(super) usage: &'a Usage,
    pub(super) i: usize,
}

impl<'a> NodeUse<'a> {
    fn span(self) -> Span {
        self.usage.spans[self.i]
    }

    pub(super) fn cpu(self) -> u64 {
        self.usage.cpu[self.i]
    }

    pub(super) fn memory(self) -> u64 {
        self.usage.memory[self.i]
    }

    pub(super) fn ports(self) -> u64 {
        self.usage.ports[self.i]
    }

    fn exclusive(self) -> &'a [u8] {
        &self.usage.exclusive[self.span().gpus()]
    }

    pub(super) fn sliced(self) -> &'a [u64] {
        &self.usage.sliced[self.span().gpus()]
    }

    pub(super) fn free(self) -> &'a [u64] {
        &self.usage.free[self.span().words()]
    }

    pub(super) fn unheld(self) -> &'a [u64] {
        &self.usage.unheld[self.span().words()]
    }
}

/// One node of a [`Usage`], to change.
pub(super) struct NodeMut<'a> {
    pub(super) usage: &'a mut Usage,
    pub(super) i: usize,
}

impl NodeMut<'_> {
    /// Changes what GPU `g` holds and keeps the bitsets in step.
    pub(super) fn gpu(&mut self, g: usize, change: impl FnOnce(&mut u8, &mut u64)) {
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
    pub(super) fn take(&mut self, cpu: u64, memory: u64, gpus: &[usize], slice: Option<u64>) {
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
    pub(super) fn give_back(&mut self, cpu: u64, memory: u64, gpus: &[usize], slice: Option<u64>) {
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

    /// Takes a port, or with `give_back` returns one. Only a plan's own
    /// placements do either; a live allocation's port is counted when the
    /// snapshot learns of it and stays taken however it is let go.
    pub(super) fn port(&mut self, give_back: bool) {
        let ports = &mut self.usage.ports[self.i];
        *ports = if give_back {
            ports.saturating_sub(1)
        } else {
            *ports + 1
        };
    }

    /// Takes what a live allocation holds.
    pub(super) fn hold(&mut self, alloc: &LiveAlloc) {
        let slice = alloc.gpu_slice.map(MemoryMib::get);
        self.take(alloc.cpu.get(), alloc.memory.get(), &alloc.gpus, slice);
    }

    /// Gives back what a live allocation holds.
    pub(super) fn let_go(&mut self, alloc: &LiveAlloc) {
        let slice = alloc.gpu_slice.map(MemoryMib::get);
        self.give_back(alloc.cpu.get(), alloc.memory.get(), &alloc.gpus, slice);
    }
}

/// What a plan in progress has taken: the snapshot's usage, with each node it
/// changes copied on its first change, so that a plan costs what it touches
/// rather than a copy of the cluster.
#[derive(Debug, Clone)]
pub(super) struct Taken<'s> {
    pub(super) base: &'s Usage,
    pub(super) changed: Usage,
    /// Per node changed: its position in `changed`.
    slots: HashMap<usize, usize>,
    /// A bit per node: changed. Reading an unchanged node costs no hashing.
    marked: Vec<u64>,
}

impl<'s> Taken<'s> {
    /// Nothing changed yet, with room to change about `nodes` nodes without
    /// growing.
    pub(super) fn new(base: &'s Usage, nodes: usize) -> Self {
        let nodes = nodes.min(base.spans.len());
        let per_node = |total: usize| total.div_ceil(base.spans.len().max(1)) * nodes;
        let changed = Usage {
            cpu: Vec::with_capacity(nodes),
            memory: Vec::with_capacity(nodes),
            ports: Vec::with_capacity(nodes),
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

    pub(super) fn node(&self, n: usize) -> NodeUse<'_> {
        if bit(&self.marked, n) {
            self.changed.node(self.slots[&n])
        } else {
            self.base.node(n)
        }
    }

    pub(super) fn node_mut(&mut self, n: usize) -> NodeMut<'_> {
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
    /// Only live allocations (wanted and not finished) hold resources, except
    /// ports: every unfinished allocation with a port holds it, stopping or not.
    /// Allocations on unknown nodes or naming unknown GPUs hold what can be
    /// matched and nothing more; of two allocations with one id, the first counts.
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
        let mut port_holders = HashSet::new();
        for alloc in allocations {
            let Some(&at) = position.get(alloc.node_id.as_str()) else {
                continue;
            };
            // Stopping but not yet gone, it may still listen.
            if alloc.port.is_some()
                && !alloc.state.is_terminal()
                && port_holders.insert(alloc.id.clone())
            {
                usage.node_mut(at).port(false);
            }
            if !alloc.is_live() {
                continue;
            }
            match located.entry(alloc.id.clone()) {
                Entry::Occupied(_) => continue,
                Entry::Vacant(slot) => slot.insert(at),
            };
            let info = info(&alloc.job_id, &alloc.group).unwrap_or_default();
            let live = LiveAlloc::new(&nodes[at].uuids, alloc, info);
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
            port_holders,
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
        let Some(at) = self.position(&alloc.node_id) else {
            return;
        };
        if (alloc.port.is_some() || info.listens)
            && !alloc.state.is_terminal()
            && self.port_holders.insert(alloc.id.clone())
        {
            self.usage.node_mut(at).port(false);
        }
        if !alloc.is_live() {
            return;
        }
        let live = LiveAlloc::new(&self.nodes[at].uuids, alloc, info);
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

    pub(super) fn position(&self, node: &NodeId) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.id.cmp(node)).ok()
    }

    /// The shape of node `n`.
    pub(super) fn shape(&self, n: usize) -> &NodeShape {
        &self.shapes.nodes[self.shape[n]]
    }

    /// The GPU layout of node `n`.
    pub(super) fn layout(&self, n: usize) -> &Layout {
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
