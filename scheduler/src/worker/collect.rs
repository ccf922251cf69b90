//! The input of a pass, gathered under the state's read lock: the due evaluations
//! by job, the draining nodes and a snapshot of the cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aigrid_api::{
    AllocId, AllocState, Allocation, DrainSpec, EvalStatus, Evaluation, Job, JobId, NodeId,
    Timestamp,
};

use crate::planner::PlanSnapshot;
use crate::state::ClusterState;

/// Jobs planned per pass at most; the rest wait for the next pass.
const JOBS_PER_PASS: usize = 20_000;

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
    /// Gang groups with live instances of an older job version: moving one would
    /// place one instance of the new version beside the old, so none is moved to
    /// make room for other work; they leave with the update of the whole gang.
    pub outdated_gangs: HashMap<JobId, BTreeSet<String>>,
    /// Circles whose new work is not placed (their treasury is spent), with why.
    pub holds: BTreeMap<String, String>,
    /// Quotas, what each circle holds and borrows: kept current as the pass plans.
    pub fair: crate::planner::fair::Fairness,
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
    /// Its circle; empty for the admins' jobs.
    pub circle: String,
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
    // What circles hold matters to the pass only when it orders several circles'
    // jobs or weighs quotas; otherwise it is not counted at all.
    let circles: std::collections::BTreeSet<Option<&str>> = jobs
        .iter()
        .map(|(_, _, w)| w.job.as_ref().and_then(|j| j.spec.circle.as_deref()))
        .collect();
    let fair = if circles.len() > 1 || !state.quotas().is_empty() {
        state.fairness()
    } else {
        crate::planner::fair::Fairness::default()
    };
    let snapshot = state.plan_snapshot();
    // One walk over the live allocations, with borrowed keys and one spec lookup
    // per job, since the state's read lock is held meanwhile.
    let mut specs: HashMap<&JobId, Option<(&aigrid_api::JobSpec, u64)>> = HashMap::new();
    let mut down: HashMap<(&JobId, &str), u32> = HashMap::new();
    let mut gang_members: HashMap<(&JobId, &str), Vec<&AllocId>> = HashMap::new();
    let mut outdated_gangs: HashMap<JobId, BTreeSet<String>> = HashMap::new();
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
            if spec.is_some_and(|(_, version)| alloc.job_version < version) {
                outdated_gangs
                    .entry(alloc.job_id.clone())
                    .or_default()
                    .insert(alloc.group.clone());
            }
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
                circle: spec.circle.clone().unwrap_or_default(),
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
        outdated_gangs,
        holds: state.placement_holds(),
        fair,
    }
}
