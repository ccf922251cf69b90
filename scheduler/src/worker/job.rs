//! One job brought to its spec: placements for missing instances, updates at the
//! pace of each group's budget (a gang's whole), then defragmentation and
//! preemption for what does not fit.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::{
    AllocId, AllocState, Allocation, Deployment, DeploymentState, DesiredState, Job, JobId,
    Timestamp, Unplaced,
};

use super::collect::PassInput;
use crate::planner::defrag::plan_defrag;
use crate::planner::fair::Amounts;
use crate::planner::preempt::{plan_eviction, PREEMPTION_MARGIN};
use crate::planner::{plan, GroupDemand, GroupInfo, LiveAlloc, Placement, PlanRequest};
use crate::state::{reschedule_delay_ms, JobPlan, MovedAllocation, NewAllocation};

/// The timestamp of allocations only the snapshot sees; the applier stamps the
/// real ones.
pub(super) fn at0() -> Timestamp {
    Timestamp::new(0)
}

/// The plan of a job whose circle may not place new work (`reason`): only its
/// instances the spec no longer wants are stopped (scaling down still saves its
/// circle credits); every instance without a live allocation is left unplaced
/// with the reason.
pub(super) fn plan_held(
    job: &Job,
    reason: &str,
    input: &mut PassInput,
) -> (Vec<JobPlan>, Vec<Unplaced>) {
    let mut own = JobPlan::new(job.id.clone(), job.version);
    let mut running: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for alloc in job.allocations.iter().filter(|a| a.is_live()) {
        let wanted = job
            .spec
            .group(&alloc.group)
            .is_some_and(|g| alloc.index < g.count);
        if !wanted && input.snapshot.holds(&alloc.id) {
            own.stop.push(alloc.id.clone());
            input.snapshot.remove(&alloc.id);
        } else {
            running.entry(&alloc.group).or_default().insert(alloc.index);
        }
    }
    let unplaced = job
        .spec
        .groups
        .iter()
        .filter_map(|g| {
            let live = running.get(g.name.as_str()).map_or(0, |r| r.len() as u32);
            let missing = g.count.saturating_sub(live);
            (missing > 0).then(|| Unplaced {
                group: g.name.clone(),
                count: missing,
                reason: reason.to_owned(),
            })
        })
        .collect();
    (vec![own], unplaced)
}

/// The plans that bring `job` to its spec: stops for instances the spec no longer
/// has and placements for instances without a live allocation, defragmenting or
/// preempting when they do not fit otherwise. Migrations come first as plans of
/// the jobs they move, so the one command applies them before the placements that
/// need the room. Every change is applied to the snapshot. Answers the plans,
/// the job's own last, and what could not be placed.
pub(super) fn plan_job(job: &Job, input: &mut PassInput) -> (Vec<JobPlan>, Vec<Unplaced>) {
    let mut live: BTreeMap<(&str, u32), &Allocation> = BTreeMap::new();
    // The latest finished allocation per instance: a replacement continues its
    // reschedule count and takes its place.
    let mut finished: BTreeMap<(&str, u32), &Allocation> = BTreeMap::new();
    // Instances whose allocation this pass already stopped or moved (a drain, a
    // migration, an eviction for a job planned earlier) are left to that change.
    let mut busy: BTreeSet<(&str, u32)> = BTreeSet::new();
    let mut own = JobPlan::new(job.id.clone(), job.version);
    // The rollout of the current version, if there is one.
    let rollout = job.deployment.as_ref().filter(|d| d.version == job.version);
    let canaries = plan_canaries(job, rollout, input, &mut own);
    for alloc in &job.allocations {
        if alloc.canary {
            continue;
        }
        let key = (alloc.group.as_str(), alloc.index);
        if alloc.is_live() && !input.snapshot.holds(&alloc.id) {
            busy.insert(key);
        } else if alloc.is_live() {
            live.insert(key, alloc);
        } else if alloc.desired == DesiredState::Run
            && finished
                .get(&key)
                .is_none_or(|f| f.updated_at <= alloc.updated_at)
        {
            finished.insert(key, alloc);
        }
    }
    for alloc in live.values() {
        let wanted = job
            .spec
            .group(&alloc.group)
            .is_some_and(|g| alloc.index < g.count);
        if !wanted {
            own.stop.push(alloc.id.clone());
            input.snapshot.remove(&alloc.id);
        }
    }
    // Instances that failed or were lost wait out their reschedule backoff even
    // when something else (an update, freed capacity) plans the job sooner; the
    // evaluation the failure created comes due when the backoff ends.
    let backing_off: BTreeSet<(&str, u32)> = finished
        .iter()
        .filter(|(key, a)| {
            !live.contains_key(key)
                && a.updated_at
                    .as_millis()
                    .saturating_add(reschedule_delay_ms(a.reschedules))
                    > input.now.as_millis()
        })
        .map(|(key, _)| *key)
        .collect();
    let mut replacing = outdated(job, rollout, &live);
    for old in replacing.values() {
        input.snapshot.remove(&old.id);
    }
    let demand = |replacing: &BTreeMap<(&str, u32), &Allocation>| -> Vec<GroupDemand> {
        job.spec
            .groups
            .iter()
            .map(|g| {
                let key = |i: u32| (g.name.as_str(), i);
                let waits = |i: u32| {
                    (backing_off.contains(&key(i)) || busy.contains(&key(i)))
                        && !replacing.contains_key(&key(i))
                };
                // A gang is placed whole: while one of its instances waits (a
                // backoff, a stop in progress), none of the others is placed.
                let indices = if g.gang && (0..g.count).any(waits) {
                    Vec::new()
                } else {
                    (0..g.count)
                        .filter(|i| {
                            (!live.contains_key(&key(*i)) && !waits(*i))
                                || replacing.contains_key(&key(*i))
                        })
                        .collect()
                };
                GroupDemand {
                    group: g.clone(),
                    indices,
                }
            })
            .filter(|d| !d.indices.is_empty())
            .collect()
    };
    // A gang that waits for one of its instances is not updated in this pass: its
    // old version keeps running and keeps what it holds.
    let mut groups = demand(&replacing);
    let waiting: Vec<(&str, u32)> = replacing
        .keys()
        .filter(|(g, i)| {
            !groups
                .iter()
                .any(|d| d.group.name == *g && d.indices.contains(i))
        })
        .copied()
        .collect();
    if !waiting.is_empty() {
        for key in waiting {
            if let Some(old) = replacing.remove(&key) {
                input
                    .snapshot
                    .add(old, GroupInfo::of(&job.spec, &old.group));
            }
        }
        groups = demand(&replacing);
    }
    let mut plans = Vec::new();
    let mut unplaced = Vec::new();
    if !groups.is_empty() {
        let request = PlanRequest {
            job_id: job.id.clone(),
            groups,
        };
        let mut outcome = place(job, &request, input);
        let all_replaced = replacing.keys().all(|(g, i)| {
            outcome
                .placements
                .iter()
                .any(|p| p.group == *g && p.index == *i)
        });
        if !all_replaced {
            // The update does not fit yet: the old versions keep running and keep
            // what they hold, and only missing instances are placed around them.
            for old in replacing.values() {
                input
                    .snapshot
                    .add(old, GroupInfo::of(&job.spec, &old.group));
            }
            // A gang runs one version whole: while its update waits, nothing of
            // the new version is placed beside the old.
            let waiting_gangs: BTreeSet<&str> = replacing
                .keys()
                .map(|(g, _)| *g)
                .filter(|g| job.spec.group(g).is_some_and(|g| g.gang))
                .collect();
            replacing.clear();
            let why = outcome.unplaced;
            let groups: Vec<GroupDemand> = demand(&replacing)
                .into_iter()
                .filter(|d| !waiting_gangs.contains(d.group.name.as_str()))
                .collect();
            outcome = if groups.is_empty() {
                Outcome::default()
            } else {
                place(
                    job,
                    &PlanRequest {
                        job_id: job.id.clone(),
                        groups,
                    },
                    input,
                )
            };
            if outcome.unplaced.is_empty() {
                outcome.unplaced = why;
            }
        }
        for (moved_job, old, to) in outcome.migrations {
            own.stop.push(old.clone());
            if let Some(moved) = migrate(input, &moved_job, &old, &to) {
                own.moves.push(moved);
            }
        }
        for (victim, group, id) in outcome.evictions {
            let members = input
                .gangs
                .remove(&(victim, group))
                .unwrap_or_else(|| vec![id.clone()]);
            for id in members.into_iter().chain([id]) {
                if input.snapshot.remove(&id) {
                    own.stop.push(id);
                }
            }
        }
        let mut replaced = BTreeSet::new();
        for p in outcome.placements {
            let key = (p.group.as_str(), p.index);
            let new = if let Some(old) = replacing.get(&key) {
                // An update: the old version stops as the new one is placed.
                own.stop.push(old.id.clone());
                replaced.insert(old.id.clone());
                NewAllocation::new(&p, Some(old.id.clone()), 0)
            } else {
                let previous = finished.get(&key).copied();
                NewAllocation::new(
                    &p,
                    previous.map(|a| a.id.clone()),
                    previous.map_or(0, |a| a.reschedules.saturating_add(1)),
                )
            };
            add_to_snapshot(input, job, &new);
            own.place.push(new);
        }
        debug_assert_eq!(replaced.len(), replacing.len());
        unplaced = outcome.unplaced;
    }
    own.place.extend(canaries);
    plans.push(own);
    (plans, unplaced)
}

/// The canaries of the job's rollout: those no longer wanted (another version's,
/// or their group promoted or rolled back) are stopped into `own`; while the
/// rollout runs, the missing ones are placed beside the running instances, on
/// capacity that is free (a canary never displaces other work). Answers the
/// placements.
fn plan_canaries(
    job: &Job,
    rollout: Option<&Deployment>,
    input: &mut PassInput,
    own: &mut JobPlan,
) -> Vec<NewAllocation> {
    let waiting = |group: &str| {
        rollout.and_then(|d| {
            let part = d.groups.iter().find(|g| g.name == group)?;
            (d.state.is_active() && !part.promoted).then_some(part.desired_canaries)
        })
    };
    let mut have: BTreeSet<(&str, u32)> = BTreeSet::new();
    for alloc in job.allocations.iter().filter(|a| a.canary) {
        let wanted = alloc.job_version == job.version
            && waiting(&alloc.group).is_some_and(|n| alloc.index < n);
        if wanted {
            if alloc.is_live() || alloc.desired == DesiredState::Run {
                have.insert((alloc.group.as_str(), alloc.index));
            }
        } else if alloc.is_live() && input.snapshot.holds(&alloc.id) {
            own.stop.push(alloc.id.clone());
            input.snapshot.remove(&alloc.id);
        }
    }
    if rollout.is_none_or(|d| d.state != DeploymentState::Running) {
        return Vec::new();
    }
    let groups: Vec<GroupDemand> = job
        .spec
        .groups
        .iter()
        .filter_map(|g| {
            let n = waiting(&g.name)?;
            let indices: Vec<u32> = (0..n)
                .filter(|i| !have.contains(&(g.name.as_str(), *i)))
                .collect();
            (!indices.is_empty()).then(|| GroupDemand {
                group: g.clone(),
                indices,
            })
        })
        .collect();
    if groups.is_empty() {
        return Vec::new();
    }
    let request = PlanRequest {
        job_id: job.id.clone(),
        groups,
    };
    let mut placed = Vec::new();
    for p in plan(&input.snapshot, &request).placements {
        let mut new = NewAllocation::new(&p, None, 0);
        new.canary = true;
        add_to_snapshot(input, job, &new);
        placed.push(new);
    }
    placed
}

/// The live instances of an older job version to replace in this pass: a gang's
/// all at once (a gang never runs two versions); a group under a rollout at most
/// `max_parallel` at a time, counting instances of the new version not yet
/// healthy, and none while its canaries wait or the rollout is paused, awaiting
/// promotion or failed; other groups' at most the group's disruption budget
/// (`max_unavailable`, counting instances not running) at a time, so an update
/// rolls.
fn outdated<'a>(
    job: &Job,
    rollout: Option<&Deployment>,
    live: &BTreeMap<(&'a str, u32), &'a Allocation>,
) -> BTreeMap<(&'a str, u32), &'a Allocation> {
    let mut chosen = BTreeMap::new();
    for group in &job.spec.groups {
        let instances: Vec<(&(&'a str, u32), &&'a Allocation)> = live
            .iter()
            .filter(|((g, i), _)| *g == group.name && *i < group.count)
            .collect();
        let old = instances
            .iter()
            .filter(|(_, a)| a.job_version < job.version);
        if group.gang {
            if old.count() > 0 {
                chosen.extend(instances.iter().map(|(k, a)| (**k, **a)));
            }
            continue;
        }
        let budget = match (rollout, &group.update) {
            (Some(d), Some(policy)) => {
                let promoted = d.groups.iter().any(|g| g.name == group.name && g.promoted);
                if d.state == DeploymentState::Running && promoted {
                    let unproven = instances
                        .iter()
                        .filter(|(_, a)| a.job_version == job.version && a.healthy != Some(true))
                        .count();
                    usize::try_from(policy.max_parallel)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(unproven)
                } else {
                    0
                }
            }
            _ => {
                let down = instances
                    .iter()
                    .filter(|(_, a)| a.state != AllocState::Running)
                    .count();
                usize::try_from(group.max_unavailable.unwrap_or(1))
                    .unwrap_or(usize::MAX)
                    .saturating_sub(down)
            }
        };
        chosen.extend(old.take(budget).map(|(k, a)| (**k, **a)));
    }
    chosen
}

/// What placing one job's missing instances came to.
#[derive(Debug, Default)]
struct Outcome {
    placements: Vec<Placement>,
    /// Allocations of lower-priority jobs to stop for the placements, with their
    /// job and group.
    evictions: Vec<(JobId, String, AllocId)>,
    /// Allocations to move first: (their job, the allocation, where it goes).
    migrations: Vec<(JobId, AllocId, Placement)>,
    unplaced: Vec<Unplaced>,
}

/// Places a job's missing instances: a plain plan first; what does not fit is
/// tried with defragmentation (moving movable work of lower or equal priority,
/// within each job's disruption budget), then, for a circle within its quota, by
/// reclaiming other circles' borrowed work, then with preemption (evicting work at
/// least [`crate::planner::preempt::PREEMPTION_MARGIN`] priority points lower that
/// no quota guarantees; see [`crate::planner::fair`]). None of that is tried when
/// the plain plan placed everything, so the common path costs one plan.
fn place(job: &Job, request: &PlanRequest, input: &PassInput) -> Outcome {
    let planned = plan(&input.snapshot, request);
    if planned.unplaced.is_empty() {
        return Outcome {
            placements: planned.placements,
            ..Outcome::default()
        };
    }
    let priority = job.spec.priority;
    let groups = &input.groups;
    let group_spec = |job_id: &JobId, group: &str| {
        groups
            .get(job_id)
            .and_then(|info| info.groups.iter().find(|g| g.name == group))
    };
    let budget = |job_id: &JobId, group: &str| -> u32 {
        // A gang running an older version moves only with its whole update.
        if input
            .outdated_gangs
            .get(job_id)
            .is_some_and(|groups| groups.contains(group))
        {
            return 0;
        }
        let allowed = group_spec(job_id, group).map_or(0, |g| g.max_unavailable.unwrap_or(1));
        let down = input
            .unavailable
            .get(&(job_id.clone(), group.to_owned()))
            .copied()
            .unwrap_or(0);
        allowed.saturating_sub(down)
    };
    let circle = job.spec.circle.as_deref().unwrap_or_default();
    let fair = &input.fair;
    let wanted = requested(request);
    let explain = |unplaced: &[crate::planner::UnplacedGroup]| -> Vec<Unplaced> {
        let over = fair.excess_with(circle, &wanted);
        unplaced
            .iter()
            .map(|u| {
                let mut u = u.to_unplaced();
                if !over.is_empty() {
                    u.reason = format!(
                        "circle `{circle}` would hold {} with this job, beyond its quota, and \
                         no idle capacity is left to borrow: {}",
                        over.join(", "),
                        u.reason
                    );
                }
                u
            })
            .collect()
    };
    if let Some(defrag) = plan_defrag(&input.snapshot, request, priority, budget, group_spec) {
        return Outcome {
            placements: defrag.placements,
            migrations: defrag
                .migrations
                .into_iter()
                .map(|m| (m.job_id, m.alloc_id, m.to))
                .collect(),
            unplaced: explain(&defrag.unplaced),
            ..Outcome::default()
        };
    }
    let evicting = |preemption: crate::planner::preempt::Preemption| Outcome {
        placements: preemption.placements,
        evictions: preemption
            .evictions
            .into_iter()
            .map(|e| (e.job_id, e.group, e.alloc_id))
            .collect(),
        unplaced: explain(&preemption.unplaced),
        ..Outcome::default()
    };
    // Reclaim: a circle within its quota takes back what others borrowed.
    if fair.any_borrowed() && fair.within(circle, &wanted) {
        let borrowed = |a: &LiveAlloc| {
            fair.is_borrowed(&a.id) && fair.circle_of(&a.id).is_some_and(|c| c != circle)
        };
        if let Some(reclaim) = plan_eviction(&input.snapshot, request, &borrowed) {
            return evicting(reclaim);
        }
    }
    let lower = |a: &LiveAlloc| {
        a.info.priority.saturating_add(PREEMPTION_MARGIN) <= priority
            && fair.may_preempt(circle, &a.id)
    };
    if let Some(preemption) = plan_eviction(&input.snapshot, request, &lower) {
        return evicting(preemption);
    }
    Outcome {
        placements: planned.placements,
        unplaced: explain(&planned.unplaced),
        ..Outcome::default()
    }
}

/// What a request's instances would hold, before knowing where: GPUs under the
/// model they ask for (`*`, counted against every quota's GPUs, when any will do).
fn requested(request: &PlanRequest) -> Amounts {
    let mut out = Amounts::default();
    for demand in &request.groups {
        let n = demand.indices.len() as u64;
        let r = &demand.group.resources;
        out.cpu_millis += n * r.cpu_millis.get();
        out.memory_mib += n * r.memory_mib.get();
        if let Some(g) = &r.gpus {
            let model = g.model.clone().unwrap_or_else(|| "*".to_owned());
            let each = if g.memory_slice_mib.is_some() {
                1000
            } else {
                1000 * u64::from(g.count)
            };
            *out.gpus.entry(model).or_default() += n * each;
        }
    }
    out
}

/// Moves one allocation of `job_id` to `to` in the snapshot and answers its
/// replacement; an instance its spec no longer wants (scaled down, not yet
/// reconciled) is only stopped.
pub(super) fn migrate(
    input: &mut PassInput,
    job_id: &JobId,
    old: &AllocId,
    to: &Placement,
) -> Option<MovedAllocation> {
    input.snapshot.remove(old);
    let info = input.groups.get(job_id)?;
    let group = info
        .groups
        .iter()
        .find(|g| g.name == to.group && to.index < g.count)?;
    let new = NewAllocation::new(to, Some(old.clone()), 0);
    let group_info = GroupInfo {
        priority: info.priority,
        movable: group.movable,
        listens: GroupInfo::listening(group),
    };
    let version = info.version;
    input.snapshot.add(
        &new.to_allocation(job_id, version, group, at0()),
        group_info,
    );
    *input
        .unavailable
        .entry((job_id.clone(), to.group.clone()))
        .or_default() += 1;
    Some(MovedAllocation {
        job_id: job_id.clone(),
        job_version: version,
        alloc: new,
    })
}

pub(super) fn add_to_snapshot(input: &mut PassInput, job: &Job, new: &NewAllocation) {
    let Some(group) = job.spec.group(&new.group) else {
        return;
    };
    let info = GroupInfo {
        priority: job.spec.priority,
        movable: group.movable,
        listens: GroupInfo::listening(group),
    };
    input
        .snapshot
        .add(&new.to_allocation(&job.id, job.version, group, at0()), info);
}
