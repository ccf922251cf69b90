//! The leader's scheduling loop, in Nomad's shape: evaluations queued by priority,
//! one plan per job per pass against one consistent snapshot, and a single applier
//! (the state machine) that re-checks every job's plan against the latest state as
//! it commits.
//!
//! A pass has three steps:
//!
//! 1. [`collect`], under the state's read lock: the due evaluations grouped by job,
//!    highest priority first, the draining nodes, and a [`PlanSnapshot`] of the
//!    cluster. Nothing else happens under the lock, so the replica keeps applying.
//! 2. [`plan_pass`], with no lock: each job is reconciled against the snapshot (new
//!    placements, stops of instances the spec dropped); what does not fit is tried
//!    again with defragmentation, then preemption; drains migrate their allocations
//!    at their pace. Each job's changes are applied to the snapshot before the next
//!    job is planned, and every few hundred jobs a [`Command::ApplyPlan`] goes out.
//! 3. The commands are proposed while planning continues, several in flight, so
//!    Raft's commit latency does not bound placement throughput.
//!
//! Blocked evaluations are planned again whenever capacity may have changed. A node
//! silent for longer than the TTL is marked down (its instances are rescheduled
//! after the backoff the state machine sets on their evaluations); a new leader
//! first waits one TTL so nodes can reach it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use aigrid_api::{
    AllocId, AllocState, Allocation, DesiredState, DrainSpec, EvalStatus, Evaluation, Job, JobId,
    NodeId, NodeStatus, Timestamp, Unplaced,
};
use aigrid_consensus::RaftNode;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::clock::SharedClock;
use crate::metrics::WorkerMetrics;
use crate::planner::defrag::plan_defrag;
use crate::planner::preempt::plan_preemption;
use crate::planner::{plan, GroupDemand, GroupInfo, Placement, PlanRequest, PlanSnapshot};
use crate::state::{
    reschedule_delay_ms, Applied, ClusterState, Command, CommandOutput, EvaluationUpdate, JobPlan,
    MovedAllocation, NewAllocation,
};

/// Jobs planned per pass at most; the rest wait for the next pass.
const JOBS_PER_PASS: usize = 20_000;
/// A plan command is sent once it carries this many jobs...
const JOBS_PER_COMMAND: usize = 256;
/// ...or this many new allocations, which bounds one log entry's size.
const ALLOCS_PER_COMMAND: usize = 4_096;
/// Plan commands proposed and not yet committed at once.
const IN_FLIGHT: usize = 4;
/// Blocked evaluations are retried at least this often even if no capacity change
/// was seen.
const BLOCKED_RETRY: Duration = Duration::from_secs(30);

/// How the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerConfig {
    /// How often the leader looks for work.
    pub interval: Duration,
    /// How long a node may stay silent before it is marked down.
    pub node_ttl: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            node_ttl: Duration::from_secs(30),
        }
    }
}

/// One job's share of a pass: its due evaluations (oldest first) and its view
/// (`None` once deleted).
#[derive(Debug, Clone)]
pub struct JobWork {
    /// The evaluations planned together.
    pub evals: Vec<Evaluation>,
    /// The job with its allocations.
    pub job: Option<Job>,
}

/// Everything one pass plans from, read under one lock.
#[derive(Debug, Clone)]
pub struct PassInput {
    /// The time the pass plans at.
    pub now: Timestamp,
    /// Jobs to plan, highest priority first.
    pub jobs: Vec<JobWork>,
    /// Draining nodes: the drain, its allocations, and the jobs they belong to.
    pub drains: Vec<(NodeId, DrainSpec, Vec<Allocation>)>,
    /// Views of the jobs with allocations on draining nodes.
    pub drain_jobs: BTreeMap<JobId, Job>,
    /// The cluster as the planner sees it.
    pub snapshot: PlanSnapshot,
    /// Per job and group: instances not running now (placed and not started, or
    /// stopping), which count against the group's disruption budget.
    pub unavailable: HashMap<(JobId, String), u32>,
    /// Per job with live allocations: what moving them needs to know.
    pub groups: HashMap<JobId, JobInfo>,
    /// The live instances of every gang group: evicting one evicts them all, since
    /// a gang runs whole or not at all.
    pub gangs: HashMap<(JobId, String), Vec<AllocId>>,
}

/// What moving a job's allocations needs: its priority, version and groups.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// The job's priority.
    pub priority: u32,
    /// Its current version.
    pub version: u64,
    /// Its groups as the spec states them.
    pub groups: Vec<aigrid_api::TaskGroup>,
}

impl PassInput {
    /// True when there is nothing to plan.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.drains.iter().all(|(_, _, a)| a.is_empty())
    }
}

/// Reads what a pass needs: evaluations due at `now` (pending ones, and blocked
/// ones when `with_blocked`), grouped per job, highest priority first, then oldest.
pub fn collect(state: &ClusterState, now: Timestamp, with_blocked: bool) -> PassInput {
    let mut evals: Vec<Evaluation> = state
        .evaluations(EvalStatus::Pending)
        .into_iter()
        .filter(|e| e.wait_until.is_none_or(|t| t <= now))
        .collect();
    if with_blocked {
        evals.extend(state.evaluations(EvalStatus::Blocked));
    }
    let mut by_job: BTreeMap<JobId, Vec<Evaluation>> = BTreeMap::new();
    for eval in evals {
        by_job.entry(eval.job_id.clone()).or_default().push(eval);
    }
    let mut jobs: Vec<(u32, Timestamp, JobWork)> = by_job
        .into_values()
        .map(|mut evals| {
            evals.sort_by_key(|e| (e.created_at, e.id.clone()));
            let job = state.job(&evals[0].job_id);
            let priority = job.as_ref().map_or(u32::MAX, |j| j.spec.priority);
            (priority, evals[0].created_at, JobWork { evals, job })
        })
        .collect();
    jobs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    jobs.truncate(JOBS_PER_PASS);
    let drains = state.drains();
    let mut drain_jobs = BTreeMap::new();
    for (_, _, allocs) in &drains {
        for alloc in allocs {
            if !drain_jobs.contains_key(&alloc.job_id) {
                if let Some(job) = state.job(&alloc.job_id) {
                    drain_jobs.insert(alloc.job_id.clone(), job);
                }
            }
        }
    }
    let snapshot = state.plan_snapshot();
    // One walk over the live allocations, with borrowed keys and one spec lookup
    // per job, since the state's read lock is held meanwhile.
    let mut specs: HashMap<&JobId, Option<(&aigrid_api::JobSpec, u64)>> = HashMap::new();
    let mut down: HashMap<(&JobId, &str), u32> = HashMap::new();
    let mut gang_members: HashMap<(&JobId, &str), Vec<&AllocId>> = HashMap::new();
    for alloc in state.live_allocations() {
        let spec = *specs
            .entry(&alloc.job_id)
            .or_insert_with(|| state.job_spec(&alloc.job_id));
        let gang = spec
            .and_then(|(spec, _)| spec.group(&alloc.group))
            .is_some_and(|g| g.gang);
        if gang {
            gang_members
                .entry((&alloc.job_id, alloc.group.as_str()))
                .or_default()
                .push(&alloc.id);
        }
        if alloc.state != AllocState::Running {
            *down
                .entry((&alloc.job_id, alloc.group.as_str()))
                .or_default() += 1;
        }
    }
    let unavailable = down
        .into_iter()
        .map(|((job, group), n)| ((job.clone(), group.to_owned()), n))
        .collect();
    let gangs = gang_members
        .into_iter()
        .map(|((job, group), ids)| {
            let ids = ids.into_iter().cloned().collect();
            ((job.clone(), group.to_owned()), ids)
        })
        .collect();
    let groups = specs
        .into_iter()
        .filter_map(|(job_id, spec)| {
            let (spec, version) = spec?;
            let info = JobInfo {
                priority: spec.priority,
                version,
                groups: spec.groups.clone(),
            };
            Some((job_id.clone(), info))
        })
        .collect();
    PassInput {
        now,
        jobs: jobs.into_iter().map(|(_, _, w)| w).collect(),
        drains,
        drain_jobs,
        snapshot,
        unavailable,
        groups,
        gangs,
    }
}

/// Job plans gathered into [`Command::ApplyPlan`]s of bounded size.
struct Batcher {
    at: Timestamp,
    plans: Vec<JobPlan>,
    allocs: usize,
}

impl Batcher {
    fn push(&mut self, plan: JobPlan, emit: &mut impl FnMut(Command)) {
        self.allocs += plan.place.len();
        self.plans.push(plan);
        if self.plans.len() >= JOBS_PER_COMMAND || self.allocs >= ALLOCS_PER_COMMAND {
            self.flush(emit);
        }
    }

    fn flush(&mut self, emit: &mut impl FnMut(Command)) {
        if !self.plans.is_empty() {
            emit(Command::ApplyPlan {
                jobs: std::mem::take(&mut self.plans),
                at: self.at,
            });
            self.allocs = 0;
        }
    }
}

/// Plans a pass and hands each command to `emit` as soon as it is complete.
pub fn plan_pass(mut input: PassInput, mut emit: impl FnMut(Command)) {
    let at = input.now;
    let mut batch = Batcher {
        at,
        plans: Vec::new(),
        allocs: 0,
    };
    let mut orphans = Vec::new();
    let jobs = std::mem::take(&mut input.jobs);
    for work in jobs {
        let Some(job) = work.job else {
            // Deleted since: its instances were asked to stop with the delete.
            orphans.extend(verdicts(&work.evals, Vec::new()));
            continue;
        };
        let (mut plans, unplaced) = plan_job(&job, &mut input);
        if let Some(own) = plans.last_mut() {
            own.evals = verdicts(&work.evals, unplaced);
        }
        for plan in plans {
            batch.push(plan, &mut emit);
        }
    }
    for plan in plan_drains(&mut input) {
        batch.push(plan, &mut emit);
    }
    batch.flush(&mut emit);
    if !orphans.is_empty() {
        emit(Command::UpdateEvaluations {
            updates: orphans,
            at,
        });
    }
}

/// Spreads one verdict over a job's evaluations: the newest is blocked with what
/// is still unplaced (or complete), older ones are complete (superseded), listed
/// first so the newest decides what the job shows.
fn verdicts(evals: &[Evaluation], unplaced: Vec<Unplaced>) -> Vec<EvaluationUpdate> {
    let newest = evals.len().saturating_sub(1);
    let mut unplaced = Some(unplaced);
    evals
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let unplaced = if i == newest {
                unplaced.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            EvaluationUpdate {
                eval_id: e.id.clone(),
                status: if unplaced.is_empty() {
                    EvalStatus::Complete
                } else {
                    EvalStatus::Blocked
                },
                unplaced,
            }
        })
        .collect()
}

/// The timestamp of allocations only the snapshot sees; the applier stamps the
/// real ones.
fn at0() -> Timestamp {
    Timestamp::new(0)
}

/// The plans that bring `job` to its spec: stops for instances the spec no longer
/// has and placements for instances without a live allocation, defragmenting or
/// preempting when they do not fit otherwise. Migrations come first as plans of
/// the jobs they move, so the one command applies them before the placements that
/// need the room. Every change is applied to the snapshot. Answers the plans,
/// the job's own last, and what could not be placed.
fn plan_job(job: &Job, input: &mut PassInput) -> (Vec<JobPlan>, Vec<Unplaced>) {
    let mut live: BTreeMap<(&str, u32), &Allocation> = BTreeMap::new();
    // The latest finished allocation per instance: a replacement continues its
    // reschedule count and takes its place.
    let mut finished: BTreeMap<(&str, u32), &Allocation> = BTreeMap::new();
    // Instances whose allocation this pass already stopped or moved (a drain, a
    // migration, an eviction for a job planned earlier) are left to that change.
    let mut busy: BTreeSet<(&str, u32)> = BTreeSet::new();
    for alloc in &job.allocations {
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
    let mut own = JobPlan::new(job.id.clone(), job.version);
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
    let mut replacing = outdated(job, &live);
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
    let waiting: Vec<(&str, u32)> = {
        let groups = demand(&replacing);
        replacing
            .keys()
            .filter(|(g, i)| {
                !groups
                    .iter()
                    .any(|d| d.group.name == *g && d.indices.contains(i))
            })
            .copied()
            .collect()
    };
    for key in waiting {
        if let Some(old) = replacing.remove(&key) {
            input
                .snapshot
                .add(old, GroupInfo::of(&job.spec, &old.group));
        }
    }
    let groups = demand(&replacing);
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
    plans.push(own);
    (plans, unplaced)
}

/// The live instances of an older job version to replace in this pass: a gang's
/// all at once (a gang never runs two versions), other groups' at most the
/// group's disruption budget (`max_unavailable`, counting instances not running)
/// at a time, so an update rolls.
fn outdated<'a>(
    job: &Job,
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
        let down = instances
            .iter()
            .filter(|(_, a)| a.state != AllocState::Running)
            .count();
        let budget = usize::try_from(group.max_unavailable.unwrap_or(1))
            .unwrap_or(usize::MAX)
            .saturating_sub(down);
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
/// within each job's disruption budget), then with preemption (evicting work at
/// least [`crate::planner::preempt::PREEMPTION_MARGIN`] priority points lower). Neither is tried when the plain
/// plan placed everything, so the common path costs one plan.
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
        let allowed = group_spec(job_id, group).map_or(0, |g| g.max_unavailable.unwrap_or(1));
        let down = input
            .unavailable
            .get(&(job_id.clone(), group.to_owned()))
            .copied()
            .unwrap_or(0);
        allowed.saturating_sub(down)
    };
    let explain = |unplaced: &[crate::planner::UnplacedGroup]| -> Vec<Unplaced> {
        unplaced.iter().map(|u| u.to_unplaced()).collect()
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
    if let Some(preemption) = plan_preemption(&input.snapshot, request, priority) {
        return Outcome {
            placements: preemption.placements,
            evictions: preemption
                .evictions
                .into_iter()
                .map(|e| (e.job_id, e.group, e.alloc_id))
                .collect(),
            unplaced: explain(&preemption.unplaced),
            ..Outcome::default()
        };
    }
    Outcome {
        placements: planned.placements,
        unplaced: explain(&planned.unplaced),
        ..Outcome::default()
    }
}

/// Moves one allocation of `job_id` to `to` in the snapshot and answers its
/// replacement; an instance its spec no longer wants (scaled down, not yet
/// reconciled) is only stopped.
fn migrate(
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

fn add_to_snapshot(input: &mut PassInput, job: &Job, new: &NewAllocation) {
    let Some(group) = job.spec.group(&new.group) else {
        return;
    };
    let info = GroupInfo {
        priority: job.spec.priority,
        movable: group.movable,
    };
    input
        .snapshot
        .add(&new.to_allocation(&job.id, job.version, group, at0()), info);
}

/// Migrates allocations off draining nodes, at most `max_parallel` per node on
/// their way off at once (stopped and not yet confirmed stopped by the agent).
/// An allocation that fits nowhere else stays until room appears.
fn plan_drains(input: &mut PassInput) -> Vec<JobPlan> {
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

/// Commands that mark nodes silent since before `now - ttl` as down.
pub fn expire_nodes(state: &ClusterState, now: Timestamp, ttl: Duration) -> Vec<Command> {
    let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let deadline = Timestamp::from_millis(now.as_millis().saturating_sub(ttl));
    state
        .silent_nodes(deadline)
        .into_iter()
        .map(|node_id| Command::SetNodeStatus {
            node_id,
            status: NodeStatus::Down,
            at: now,
        })
        .collect()
}

/// Runs the loop until `shutdown` turns true. Followers idle; the leader plans.
pub async fn run(
    raft: RaftNode<ClusterState>,
    config: WorkerConfig,
    metrics: WorkerMetrics,
    clock: SharedClock,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leader_since: Option<Instant> = None;
    let mut planned_epoch: Option<u64> = None;
    let mut blocked_retry = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
        let status = raft.status();
        if status.leader != Some(status.id) {
            leader_since = None;
            planned_epoch = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let at = clock.now();
        if since.elapsed() >= config.node_ttl {
            let expired = raft.read_local(|s| expire_nodes(s, at, config.node_ttl));
            for command in expired {
                match raft.propose(&command).await {
                    Ok(_) => metrics.nodes_expired.inc(),
                    Err(e) => tracing::warn!(error = %e, "marking a silent node down failed"),
                }
            }
        }
        let epoch = raft.read_local(ClusterState::capacity_epoch);
        let with_blocked = planned_epoch != Some(epoch) || blocked_retry.elapsed() >= BLOCKED_RETRY;
        if let Err(e) = pass(&raft, &metrics, at, with_blocked).await {
            tracing::warn!(error = %e, "scheduling pass failed");
            continue;
        }
        if with_blocked {
            planned_epoch = Some(epoch);
            blocked_retry = Instant::now();
        }
    }
}

/// One pass: collect under a linearizable read, plan on a blocking thread, and
/// propose each command as it comes, [`IN_FLIGHT`] at a time.
async fn pass(
    raft: &RaftNode<ClusterState>,
    metrics: &WorkerMetrics,
    at: Timestamp,
    with_blocked: bool,
) -> Result<(), aigrid_consensus::RaftError> {
    let started = Instant::now();
    let input = raft.read(|s| collect(s, at, with_blocked)).await?;
    if input.is_empty() {
        return Ok(());
    }
    metrics.passes.inc();
    let record = |done: Result<CommandOutput, aigrid_consensus::RaftError>| match done {
        Ok(Ok(Applied::PlanApplied {
            placed,
            stopped,
            refused,
            ..
        })) => {
            metrics.placed.inc_by(placed as u64);
            metrics.stopped.inc_by(stopped as u64);
            metrics.refused.inc_by(refused.len() as u64);
            for (job, reason) in refused {
                tracing::info!(%job, %reason, "a job plan was refused");
            }
            Ok(())
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a scheduling command was refused");
            Ok(())
        }
        Err(e) => Err(e),
    };
    let (tx, mut rx) = mpsc::channel::<Command>(IN_FLIGHT);
    let planner = tokio::task::spawn_blocking(move || {
        plan_pass(input, |command| {
            // The receiver only goes away when the pass is abandoned.
            let _ = tx.blocking_send(command);
        });
    });
    let mut in_flight = FuturesUnordered::new();
    let mut result = Ok(());
    loop {
        tokio::select! {
            command = rx.recv(), if in_flight.len() < IN_FLIGHT => {
                let Some(command) = command else { break };
                let raft = raft.clone();
                in_flight.push(async move { raft.propose(&command).await });
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = record(done) {
                    result = Err(e);
                }
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        if let Err(e) = record(done) {
            result = Err(e);
        }
    }
    let _ = planner.await;
    metrics
        .pass_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}
