//! Allocations moved off draining nodes, at most `max_parallel` per node at once.

use aigrid_api::{Allocation, DesiredState};

use super::collect::PassInput;
use super::job::add_to_snapshot;
use crate::planner::{plan, GroupDemand, PlanRequest};
use crate::state::{JobPlan, NewAllocation};

/// Migrates allocations off draining nodes, at most `max_parallel` per node on
/// their way off at once (stopped and not yet confirmed stopped by the agent).
/// An allocation that fits nowhere else stays until room appears.
pub(super) fn plan_drains(input: &mut PassInput) -> Vec<JobPlan> {
    let mut plans = Vec::new();
    let drains = std::mem::take(&mut input.drains);
    for (_, drain, allocs) in drains {
        let leaving = allocs
            .iter()
            .filter(|a| a.desired == DesiredState::Stop && !a.state.is_terminal())
            .count();
        let mut room = usize::try_from(drain.max_parallel)
            .unwrap_or(usize::MAX)
            .saturating_sub(leaving);
        // Allocations this pass already stopped or moved are not drained again.
        let live: Vec<&Allocation> = allocs
            .iter()
            .filter(|a| a.is_live() && input.snapshot.holds(&a.id))
            .collect();
        for alloc in live {
            if room == 0 {
                break;
            }
            let Some(job) = input.drain_jobs.get(&alloc.job_id).cloned() else {
                continue;
            };
            let wanted = job
                .spec
                .group(&alloc.group)
                .filter(|g| alloc.index < g.count);
            let Some(group) = wanted else {
                // Not wanted any more: stopped rather than moved.
                input.snapshot.remove(&alloc.id);
                let mut stop = JobPlan::new(job.id.clone(), job.version);
                stop.stop.push(alloc.id.clone());
                plans.push(stop);
                room -= 1;
                continue;
            };
            if group.gang && alloc.job_version != job.version {
                // Moving it would place one instance of the gang's new version
                // alone: it leaves with the update of the whole gang instead,
                // once that fits.
                continue;
            }
            let request = PlanRequest {
                job_id: job.id.clone(),
                groups: vec![GroupDemand {
                    group: group.clone(),
                    indices: vec![alloc.index],
                }],
            };
            let planned = plan(&input.snapshot, &request);
            let Some(p) = planned.placements.into_iter().next() else {
                continue;
            };
            let new = NewAllocation::new(&p, Some(alloc.id.clone()), 0);
            input.snapshot.remove(&alloc.id);
            add_to_snapshot(input, &job, &new);
            let mut moved = JobPlan::new(job.id.clone(), job.version);
            moved.stop.push(alloc.id.clone());
            moved.place.push(new);
            plans.push(moved);
            room -= 1;
        }
    }
    plans
}
