//! One task group's placement: feasibility once per group, ranking, spread
//! buckets and the per-instance choice of node and GPUs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use aigrid_api::{JobId, MemoryMib, MilliCpu, TaskGroup};

use super::*;

/// Score of a node whose used share of every resource would be 100% after placement.
const FULL: i64 = 1000;
/// Spread penalty per instance already on a value, per point of spread weight. At
/// the default weight it outweighs bin-packing and GPU best-fit together.
const SPREAD_UNIT: i64 = 40;
/// Spread weight when a spread does not state one.
const DEFAULT_SPREAD_WEIGHT: i64 = 100;
/// Affinity score per point of affinity weight.
const AFFINITY_UNIT: i64 = 10;

/// A candidate in a bucket's heap: its score and its position (the earlier node
/// id wins a tie).
type Ranked = (i64, Reverse<usize>);

/// One group's filtered candidates and compiled rules, evaluated against the
/// snapshot's distinct attribute maps and GPU layouts.
pub(crate) struct GroupPlanner<'g> {
    pub(super) group: &'g TaskGroup,
    pub(super) need: Need,
    constraints: Vec<Rule>,
    /// Per attribute map: the first constraint it fails.
    pub(super) failed: Vec<Option<usize>>,
    /// Per attribute map: its affinity score.
    pub(super) affinity: Vec<i64>,
    /// Per GPU layout: the GPUs that suit the request, free or not, as bits.
    pub(super) suits: Vec<Vec<u64>>,
    /// Nodes passing status and constraints that could take an instance were
    /// they empty, in id order.
    pub(super) candidates: Vec<u32>,
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
            listens: GroupInfo::listening(group),
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
                    && (!need.listens || n.ports > 0)
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
    pub(super) fn check(
        &self,
        snapshot: &PlanSnapshot,
        n: usize,
        used: NodeUse<'_>,
    ) -> Result<(), Shortfall> {
        let shape = snapshot.shape(n);
        if shape.cpu.saturating_sub(used.cpu()) < self.need.cpu {
            return Err(Shortfall::Cpu);
        }
        if shape.memory.saturating_sub(used.memory()) < self.need.memory {
            return Err(Shortfall::Memory);
        }
        match &self.need.gpus {
            Some(gpus) if !gpus.fits(snapshot.layout(n), &self.suits[shape.layout], used) => {
                return Err(Shortfall::Gpus)
            }
            _ => {}
        }
        if self.need.listens && used.ports() >= shape.ports {
            return Err(Shortfall::Ports);
        }
        Ok(())
    }

    /// The GPUs an instance would get on node `n`, if it fits there.
    pub(super) fn fit(
        &self,
        snapshot: &PlanSnapshot,
        n: usize,
        used: NodeUse<'_>,
    ) -> Option<Vec<usize>> {
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
    pub(super) fn score(&self, snapshot: &PlanSnapshot, n: usize, used: NodeUse<'_>) -> i64 {
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
    pub(super) fn take(
        &self,
        snapshot: &PlanSnapshot,
        n: usize,
        taken: &mut Taken<'_>,
        gpus: &[usize],
    ) {
        let slice = self.need.gpus.as_ref().and_then(|g| g.slice);
        let mut node = taken.node_mut(n);
        node.take(self.need.cpu, self.need.memory, gpus, slice);
        if self.need.listens {
            node.port(false);
        }
        let (shape, used) = (snapshot.shape(n), taken.node(n));
        debug_assert!(used.cpu() <= shape.cpu && used.memory() <= shape.memory);
    }

    /// Gives back what a placement of the group took.
    pub(super) fn release(&self, snapshot: &PlanSnapshot, taken: &mut Taken<'_>, p: &Placement) {
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
        let mut node = taken.node_mut(at);
        node.give_back(self.need.cpu, self.need.memory, &gpus, slice);
        if self.need.listens {
            node.port(true);
        }
    }

    /// Instances per spread attribute and value: the job's live ones in the
    /// snapshot, then `changes` (a node and +1 for an instance added, -1 for one
    /// let go).
    pub(super) fn spread_counts(
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
    pub(super) fn penalty(&self, key: &[usize], counts: &[Vec<i64>]) -> i64 {
        key.iter()
            .enumerate()
            .map(|(k, &v)| counts[k][v] * self.spread_weights[k] * SPREAD_UNIT)
            .sum()
    }

    /// The node an instance would go to, with its GPUs: the best score less
    /// spread penalty among the nodes it fits, the earliest on a tie. One scan,
    /// the same answer [`GroupPlanner::place`]'s heaps give, for callers that
    /// place one instance at a time between other changes.
    pub(super) fn best(
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
    pub(super) fn placement(
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
    pub(super) fn place(
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
    pub(super) fn explain(&self, snapshot: &PlanSnapshot, taken: &Taken<'_>) -> Explanation {
        let mut not_ready = 0;
        let mut failed = vec![0; self.constraints.len()];
        let (mut cpu, mut memory, mut gpus, mut ports) = (0, 0, 0, 0);
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
                    Err(Shortfall::Ports) => ports += 1,
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
        count(Rejection::Ports, ports);
        let mut rejections: Vec<(Rejection, u32)> = counts.into_iter().collect();
        rejections.sort_by_key(|(r, c)| (Reverse(*c), r.clone()));
        Explanation {
            nodes: u32::try_from(snapshot.nodes.len()).unwrap_or(u32::MAX),
            feasible,
            rejections,
        }
    }
}
