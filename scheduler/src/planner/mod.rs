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

pub mod defrag;
mod draft;
pub mod fair;
mod group;
mod live;
pub mod preempt;
mod rules;
mod snapshot;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

pub(crate) use draft::{place_one_by_one, Draft};
pub(crate) use group::GroupPlanner;
pub use live::{GroupInfo, LiveAlloc};
use rules::*;
pub use snapshot::PlanSnapshot;
use snapshot::*;

use std::collections::HashSet;
use std::fmt;

use aigrid_api::{JobId, JobSpec, MemoryMib, MilliCpu, NodeId, TaskGroup, Unplaced};

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
/// the first check it failed (status, constraints in order, CPU, memory, GPUs,
/// ports).
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
    /// No port of the node's range is free for an instance that listens.
    Ports,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotReady => f.write_str("not ready"),
            Self::Constraint(rule) => write!(f, "failed {rule}"),
            Self::Cpu(need) => write!(f, "lacked {need} free CPU millis"),
            Self::Memory(need) => write!(f, "lacked {need} MiB free memory"),
            Self::Gpus(what) => write!(f, "lacked {what}"),
            Self::Ports => f.write_str("had no free port"),
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
