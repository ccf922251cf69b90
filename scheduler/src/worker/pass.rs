//! One pass over the collected input: every job planned in turn against the same
//! snapshot, drains after, and the plans batched into bounded commands.

use aigrid_api::{EvalStatus, Evaluation, Timestamp, Unplaced};

use super::collect::PassInput;
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
        let held = job
            .spec
            .circle
            .as_ref()
            .and_then(|c| input.holds.get(c))
            .cloned();
        let (mut plans, unplaced) = match held {
            Some(reason) => plan_held(&job, &reason, &mut input),
            None => plan_job(&job, &mut input),
        };
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
