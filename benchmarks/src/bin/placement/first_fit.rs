//! The baseline: a naive first-fit planner, the simplest thing that could work.
//!
//! For each instance it scans the nodes in id order and takes the first that is
//! ready, passes the constraints and has the CPU, memory and GPUs free, with that
//! node's lowest-indexed free suitable GPUs. No ranking, no index, no spread, no
//! interconnect awareness. Like aigrid's planner it stops a group at the first
//! instance that fits nowhere: capacity only shrinks, so the rest would not fit
//! either.

use crate::occupancy::{Demand, Occupancy};

/// Places up to the group's count of instances; answers the positions of the
/// nodes they went to, in placement order.
pub fn place(occupancy: &mut Occupancy, demand: &Demand) -> Vec<usize> {
    let mut placed = Vec::new();
    for _ in 0..demand.group.count {
        let found =
            (0..occupancy.len()).find_map(|at| occupancy.fit(at, demand).map(|gpus| (at, gpus)));
        let Some((at, gpus)) = found else {
            break;
        };
        occupancy.take(at, demand, &gpus);
        placed.push(at);
    }
    placed
}
