//! What every node holds, kept apart from any planner's own bookkeeping.
//!
//! The first-fit baseline plans on it directly. aigrid's placements are replayed
//! onto it after each plan, outside the timing, which checks them independently of
//! the planner (ready node, constraints, CPU, memory, suitable free GPUs) so a fast
//! but wrong plan cannot count. At the end it measures what the packing left.

use std::collections::HashMap;

use aigrid_api::{ConstraintOp, ConstraintValue, Node, NodeId, TaskGroup};
use anyhow::{bail, ensure, Result};

use crate::workload::GPUS_PER_NODE;

/// One node's taken resources.
#[derive(Debug, Clone)]
struct Held {
    cpu: u64,
    memory: u64,
    /// Per GPU, in the node's order: taken whole by an instance.
    gpus: Vec<bool>,
}

/// The cluster's nodes and what each holds.
#[derive(Debug)]
pub struct Occupancy<'n> {
    nodes: &'n [Node],
    by_id: HashMap<&'n str, usize>,
    held: Vec<Held>,
}

/// A task group's request, compiled once: its rules and what one instance takes.
#[derive(Debug)]
pub struct Demand<'g> {
    /// The group as the job spec states it.
    pub group: &'g TaskGroup,
    rules: Vec<Rule<'g>>,
    cpu: u64,
    memory: u64,
    gpus: usize,
    model: Option<&'g str>,
    min_gpu_memory: u64,
}

/// A constraint ready to evaluate, with the planner's semantics: a node lacking
/// the attribute matches only `!=` and `not_in`.
#[derive(Debug)]
struct Rule<'g> {
    attribute: &'g str,
    op: ConstraintOp,
    values: Vec<&'g str>,
    number: Option<f64>,
}

impl<'g> Rule<'g> {
    fn matches(&self, node: &Node) -> bool {
        let Some(actual) = node.attributes.get(self.attribute) else {
            return matches!(self.op, ConstraintOp::Ne | ConstraintOp::NotIn);
        };
        let number = || actual.trim().parse::<f64>().ok();
        match self.op {
            ConstraintOp::Eq | ConstraintOp::In => self.values.iter().any(|v| v == actual),
            ConstraintOp::Ne | ConstraintOp::NotIn => self.values.iter().all(|v| v != actual),
            ConstraintOp::Ge => matches!((number(), self.number), (Some(a), Some(b)) if a >= b),
            ConstraintOp::Le => matches!((number(), self.number), (Some(a), Some(b)) if a <= b),
            // Refused by `Demand::new`.
            ConstraintOp::Regex => false,
        }
    }
}

impl<'g> Demand<'g> {
    /// Compiles the group's request. The workload asks only for whole GPUs and
    /// has no regular expressions, so neither is modelled.
    pub fn new(group: &'g TaskGroup) -> Result<Self> {
        let rules = group
            .constraints
            .iter()
            .map(|c| {
                ensure!(
                    c.op != ConstraintOp::Regex,
                    "group {}: regex constraints are not modelled",
                    group.name
                );
                let values: Vec<&str> = match &c.value {
                    ConstraintValue::One(v) => vec![v.as_str()],
                    ConstraintValue::Many(vs) => vs.iter().map(String::as_str).collect(),
                };
                let number = values
                    .first()
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|n| n.is_finite());
                Ok(Rule {
                    attribute: &c.attribute,
                    op: c.op,
                    values,
                    number,
                })
            })
            .collect::<Result<_>>()?;
        let gpus = group.resources.gpus.as_ref();
        if gpus.is_some_and(|g| g.memory_slice_mib.is_some()) {
            bail!("group {}: GPU slices are not modelled", group.name);
        }
        Ok(Self {
            group,
            rules,
            cpu: group.resources.cpu_millis.get(),
            memory: group.resources.memory_mib.get(),
            gpus: gpus.map_or(0, |g| g.count as usize),
            model: gpus.and_then(|g| g.model.as_deref()),
            min_gpu_memory: gpus.and_then(|g| g.min_memory_mib).map_or(0, |m| m.get()),
        })
    }

    /// A healthy GPU of the model and memory asked for, free or not.
    fn suits(&self, gpu: &aigrid_api::GpuDevice) -> bool {
        gpu.healthy
            && gpu.memory_mib.get() >= self.min_gpu_memory
            && self.model.is_none_or(|m| gpu.model.contains(m))
    }
}

/// What the packing left at the end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quality {
    /// Healthy GPUs on ready nodes.
    pub gpus_usable: u64,
    /// Of those, GPUs taken.
    pub gpus_used: u64,
    /// Nodes with some of their healthy GPUs taken and some free.
    pub partly_used_nodes: u64,
    /// Free healthy GPUs on those nodes: capacity a whole-node instance cannot use.
    pub stranded_gpus: u64,
    /// 8-GPU instances that would still fit, counting free healthy GPUs only.
    pub eight_gpu_slots: u64,
}

impl<'n> Occupancy<'n> {
    /// Nothing held on any node.
    pub fn new(nodes: &'n [Node]) -> Self {
        Self {
            nodes,
            by_id: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.id.as_str(), i))
                .collect(),
            held: nodes
                .iter()
                .map(|n| Held {
                    cpu: 0,
                    memory: 0,
                    gpus: vec![false; n.resources.gpus.len()],
                })
                .collect(),
        }
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether node `at` can take one instance of `demand`, and if so the GPUs it
    /// would give: its lowest-indexed free suitable ones. Cheap checks go first.
    pub fn fit(&self, at: usize, demand: &Demand) -> Option<Vec<usize>> {
        let (node, held) = (&self.nodes[at], &self.held[at]);
        let r = &node.resources;
        if !node.status.is_schedulable()
            || r.cpu_millis.get().saturating_sub(held.cpu) < demand.cpu
            || r.memory_mib.get().saturating_sub(held.memory) < demand.memory
            || !demand.rules.iter().all(|rule| rule.matches(node))
        {
            return None;
        }
        let gpus: Vec<usize> = (0..r.gpus.len())
            .filter(|&g| !held.gpus[g] && demand.suits(&r.gpus[g]))
            .take(demand.gpus)
            .collect();
        (gpus.len() == demand.gpus).then_some(gpus)
    }

    /// Takes one instance of `demand` on node `at`, on GPUs `fit` gave.
    pub fn take(&mut self, at: usize, demand: &Demand, gpus: &[usize]) {
        let held = &mut self.held[at];
        held.cpu += demand.cpu;
        held.memory += demand.memory;
        for &g in gpus {
            held.gpus[g] = true;
        }
    }

    /// Checks a placement another planner made and takes it; answers the node's
    /// position. Fails on anything that planner should not have done.
    pub fn check_and_take(
        &mut self,
        demand: &Demand,
        node_id: &NodeId,
        gpu_uuids: &[String],
    ) -> Result<usize> {
        let group = &demand.group.name;
        let Some(&at) = self.by_id.get(node_id.as_str()) else {
            bail!("group {group}: placed on unknown node {node_id}");
        };
        let (node, held) = (&self.nodes[at], &self.held[at]);
        let r = &node.resources;
        ensure!(
            node.status.is_schedulable(),
            "group {group}: placed on {node_id}, which is not ready"
        );
        ensure!(
            demand.rules.iter().all(|rule| rule.matches(node)),
            "group {group}: placed on {node_id}, which fails a constraint"
        );
        ensure!(
            r.cpu_millis.get().saturating_sub(held.cpu) >= demand.cpu
                && r.memory_mib.get().saturating_sub(held.memory) >= demand.memory,
            "group {group}: CPU or memory over-committed on {node_id}"
        );
        ensure!(
            gpu_uuids.len() == demand.gpus,
            "group {group}: {} GPUs given on {node_id}, {} asked",
            gpu_uuids.len(),
            demand.gpus
        );
        let mut gpus = Vec::with_capacity(gpu_uuids.len());
        for uuid in gpu_uuids {
            let Some(g) = r.gpus.iter().position(|g| &g.uuid == uuid) else {
                bail!("group {group}: GPU {uuid} is not on {node_id}");
            };
            ensure!(
                !held.gpus[g] && !gpus.contains(&g),
                "group {group}: GPU {uuid} on {node_id} given twice"
            );
            ensure!(
                demand.suits(&r.gpus[g]),
                "group {group}: GPU {uuid} on {node_id} is unhealthy or not what was asked"
            );
            gpus.push(g);
        }
        self.take(at, demand, &gpus);
        Ok(at)
    }

    /// For instances on the nodes at `positions`: the share on the most used value
    /// of `attribute`, and how many values they use.
    pub fn busiest_share(&self, positions: &[usize], attribute: &str) -> (f64, usize) {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for &at in positions {
            let value = self.nodes[at].attributes.get(attribute);
            *counts.entry(value.map_or("", String::as_str)).or_default() += 1;
        }
        let busiest = counts.values().copied().max().unwrap_or(0);
        (busiest as f64 / positions.len().max(1) as f64, counts.len())
    }

    /// What the packing left.
    pub fn quality(&self) -> Quality {
        let mut q = Quality::default();
        for (node, held) in self.nodes.iter().zip(&self.held) {
            if !node.status.is_schedulable() {
                continue;
            }
            let healthy: Vec<bool> = node
                .resources
                .gpus
                .iter()
                .zip(&held.gpus)
                .filter(|(g, _)| g.healthy)
                .map(|(_, &taken)| taken)
                .collect();
            let used = healthy.iter().filter(|&&taken| taken).count() as u64;
            let free = healthy.len() as u64 - used;
            q.gpus_usable += healthy.len() as u64;
            q.gpus_used += used;
            if used > 0 && free > 0 {
                q.partly_used_nodes += 1;
                q.stranded_gpus += free;
            }
            q.eight_gpu_slots += free / GPUS_PER_NODE as u64;
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::first_fit;

    fn node(id: &str, country: &str) -> Node {
        let gpus: Vec<_> = (0..GPUS_PER_NODE)
            .map(|i| {
                json!({"index": i, "uuid": format!("{id}-gpu{i}"), "vendor": "nvidia",
                       "model": "NVIDIA H100 80GB HBM3", "memory_mib": 81_559, "healthy": i != 7})
            })
            .collect();
        serde_json::from_value(json!({
            "id": id, "name": id, "attributes": {"country": country},
            "resources": {"cpu_millis": 64_000, "memory_mib": 65_536, "disk_mib": 1, "gpus": gpus},
            "status": "ready", "registered_at": 0, "last_seen": 0,
        }))
        .unwrap()
    }

    fn group(count: u32, gpus: u32, countries: &[&str]) -> TaskGroup {
        serde_json::from_value(json!({
            "name": "g", "count": count,
            "resources": {"cpu_millis": 1000, "memory_mib": 1024,
                          "gpus": {"count": gpus, "model": "H100"}},
            "constraints": [{"attribute": "country", "op": "in", "value": countries}],
            "task": {"driver": "exec", "command": "/bin/true"},
        }))
        .unwrap()
    }

    #[test]
    fn first_fit_fills_the_first_node_that_passes_and_stops_when_full() {
        let nodes = [node("a", "FR"), node("b", "BE"), node("c", "NL")];
        let mut occupancy = Occupancy::new(&nodes);
        let g = group(5, 3, &["BE", "NL"]);
        let demand = Demand::new(&g).unwrap();
        // Seven healthy GPUs per node: two instances of three on b, then two on c.
        assert_eq!(first_fit::place(&mut occupancy, &demand), [1, 1, 2, 2]);
        let q = occupancy.quality();
        assert_eq!((q.gpus_usable, q.gpus_used), (21, 12));
        assert_eq!((q.partly_used_nodes, q.stranded_gpus), (2, 2));
        assert_eq!(q.eight_gpu_slots, 0);
    }

    #[test]
    fn a_checked_placement_must_respect_constraints_and_free_gpus() {
        let nodes = [node("a", "FR"), node("b", "BE")];
        let mut occupancy = Occupancy::new(&nodes);
        let g = group(1, 2, &["BE"]);
        let demand = Demand::new(&g).unwrap();
        let gpus = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let a = NodeId::new("a");
        let b = NodeId::new("b");
        assert!(occupancy
            .check_and_take(&demand, &a, &gpus(&["a-gpu0", "a-gpu1"]))
            .is_err());
        assert_eq!(
            occupancy
                .check_and_take(&demand, &b, &gpus(&["b-gpu0", "b-gpu1"]))
                .unwrap(),
            1
        );
        for wrong in [
            gpus(&["b-gpu1", "b-gpu2"]),
            gpus(&["b-gpu2", "b-gpu2"]),
            gpus(&["b-gpu6", "b-gpu7"]),
            gpus(&["b-gpu2"]),
        ] {
            assert!(occupancy.check_and_take(&demand, &b, &wrong).is_err());
        }
        let (share, sites) = occupancy.busiest_share(&[0, 1, 1], "country");
        assert_eq!(sites, 2);
        assert!((share - 2.0 / 3.0).abs() < 1e-9);
    }
}
