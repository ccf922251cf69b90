//! One pass over the collected input: every job planned in turn against the same
//! snapshot, drains after, and the plans batched into bounded commands.

use std::collections::{BTreeMap, VecDeque};

use aigrid_api::{EvalStatus, Evaluation, Job, Timestamp, Unplaced};

use super::collect::{JobWork, PassInput};
use super::drains::plan_drains;
use super::job::{plan_held, plan_job};
use crate::state::{Command, EvaluationUpdate, JobPlan};

/// A plan command is sent once it carries this many jobs...
pub(super) const JOBS_PER_COMMAND: usize = 256;
/// ...or this many new allocations, which bounds one log entry's size.
pub(super) const ALLOCS_PER_COMMAND: usize = 4_096;

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
/// Jobs go highest priority first; among jobs of one priority, the job of the
/// circle with the lowest dominant share goes next (oldest first within a
/// circle), and what it places raises its circle's share: dominant-resource
/// fairness between circles contending for the pool ([`crate::planner::fair`]).
pub fn plan_pass(mut input: PassInput, mut emit: impl FnMut(Command)) {
    let at = input.now;
    let mut batch = Batcher {
        at,
        plans: Vec::new(),
        allocs: 0,
    };
    let mut orphans = Vec::new();
    let jobs = std::mem::take(&mut input.jobs);
    for level in by_priority(jobs) {
        let mut queues: BTreeMap<String, VecDeque<(usize, JobWork)>> = BTreeMap::new();
        for (order, work) in level.into_iter().enumerate() {
            let circle = work
                .job
                .as_ref()
                .and_then(|j| j.spec.circle.clone())
                .unwrap_or_default();
            queues.entry(circle).or_default().push_back((order, work));
        }
        while let Some(circle) = next_circle(&queues, &input) {
            let Some((_, work)) = queues.get_mut(&circle).and_then(VecDeque::pop_front) else {
                break;
            };
            if queues.get(&circle).is_some_and(VecDeque::is_empty) {
                queues.remove(&circle);
            }
            let Some(job) = work.job else {
                // Deleted since: its instances were asked to stop with the delete.
                orphans.extend(verdicts(&work.evals, Vec::new()));
                continue;
            };
            let held = input
                .holds
                .get(&circle)
                .cloned()
                .filter(|_| !circle.is_empty());
            let (mut plans, unplaced) = match held {
                Some(reason) => plan_held(&job, &reason, &mut input),
                None => plan_job(&job, &mut input),
            };
            for plan in &plans {
                record(&mut input, plan, &job);
            }
            if let Some(own) = plans.last_mut() {
                own.evals = verdicts(&work.evals, unplaced);
            }
            for plan in plans {
                batch.push(plan, &mut emit);
            }
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

/// The pass's jobs in runs of one priority, highest first, each run in the
/// order collected.
fn by_priority(jobs: Vec<JobWork>) -> Vec<Vec<JobWork>> {
    let mut levels: Vec<(u32, Vec<JobWork>)> = Vec::new();
    for work in jobs {
        let priority = work.job.as_ref().map_or(u32::MAX, |j| j.spec.priority);
        match levels.last_mut() {
            Some((p, level)) if *p == priority => level.push(work),
            _ => levels.push((priority, vec![work])),
        }
    }
    levels.into_iter().map(|(_, level)| level).collect()
}

/// The circle whose job goes next: the lowest dominant share, then the job
/// collected first.
fn next_circle(
    queues: &BTreeMap<String, VecDeque<(usize, JobWork)>>,
    input: &PassInput,
) -> Option<String> {
    queues
        .iter()
        .filter_map(|(circle, queue)| Some((circle, queue.front()?.0)))
        .map(|(circle, first)| (input.fair.share(circle), first, circle))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .map(|(_, _, circle)| circle.clone())
}

/// Counts what `plan` places and stops in the pass's fairness.
fn record(input: &mut PassInput, plan: &JobPlan, job: &Job) {
    for id in &plan.stop {
        input.fair.release(id);
    }
    let (circle, priority, groups) = if plan.job_id == job.id {
        (
            job.spec.circle.clone().unwrap_or_default(),
            job.spec.priority,
            &job.spec.groups,
        )
    } else {
        match input.groups.get(&plan.job_id) {
            Some(info) => (info.circle.clone(), info.priority, &info.groups),
            None => return,
        }
    };
    let placed = plan.place.iter().chain(plan.moves.iter().map(|m| &m.alloc));
    let mut counted = Vec::new();
    for new in placed {
        let Some(group) = groups.iter().find(|g| g.name == new.group) else {
            continue;
        };
        let amounts = input.fair.amounts(&group.resources, &new.gpus);
        counted.push((new.id.clone(), amounts));
    }
    for (id, amounts) in counted {
        input.fair.count(id, &circle, priority, amounts);
    }
    if input.fair.quota(&circle).is_some() {
        input.fair.find_borrowed_of(&circle);
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
