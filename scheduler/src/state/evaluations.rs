//! Evaluations: why a job needs planning, their verdicts, and the bounded history.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::{EvalId, EvalStatus, EvalTrigger, Evaluation, JobId, Timestamp, Unplaced};
use serde::{Deserialize, Serialize};

use super::*;

/// The planner's verdict on one evaluation, as [`Command::UpdateEvaluations`] carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvaluationUpdate {
    /// The evaluation.
    pub eval_id: EvalId,
    /// Its new status.
    pub status: EvalStatus,
    /// Instances that did not fit; empty when everything was placed.
    #[serde(default)]
    pub unplaced: Vec<Unplaced>,
}

impl ClusterState {
    /// The evaluation with this id, if it has not been forgotten.
    pub fn evaluation(&self, id: &EvalId) -> Option<Evaluation> {
        self.tables.evaluations.get(id).map(|r| r.eval.clone())
    }

    /// Evaluations with this status, oldest first: the planner's queue.
    pub fn evaluations(&self, status: EvalStatus) -> Vec<Evaluation> {
        self.eval_status
            .get(&status)
            .into_iter()
            .flatten()
            .filter_map(|seq| self.eval_order.get(seq))
            .filter_map(|id| self.tables.evaluations.get(id))
            .map(|r| r.eval.clone())
            .collect()
    }

    pub(super) fn update_evaluation(
        &mut self,
        eval_id: EvalId,
        status: EvalStatus,
        mut unplaced: Vec<Unplaced>,
        at: Timestamp,
    ) -> CommandOutput {
        let record = self
            .tables
            .evaluations
            .get_mut(&eval_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Evaluation, &eval_id))?;
        let was = std::mem::replace(&mut record.eval.status, status);
        record.eval.updated_at = at;
        if was != status {
            if let Some(seqs) = self.eval_status.get_mut(&was) {
                seqs.remove(&record.seq);
            }
            self.eval_status
                .entry(status)
                .or_default()
                .insert(record.seq);
        }
        let eval = &record.eval;
        let job = self.tables.jobs.get_mut(&eval.job_id);
        if let Some(job) = job.filter(|job| job.version == eval.job_version) {
            // Kept as long as the job: without the room its reading grew.
            unplaced.shrink_to_fit();
            Arc::make_mut(job).unplaced = unplaced;
        }
        Ok(Applied::EvaluationUpdated { id: eval_id })
    }

    /// Creates an evaluation per live job in `jobs`; for displaced and failed
    /// instances each is held back by the reschedule backoff of its instance
    /// rescheduled least so far (a preemption or an update's next batch is not). Their ids derive from the log index, the one input every
    /// replica shares for a command that carries none.
    pub(super) fn node_update_evals(
        &mut self,
        index: u64,
        jobs: BTreeMap<JobId, u32>,
        trigger: EvalTrigger,
        at: Timestamp,
    ) -> Vec<EvalId> {
        let mut created = Vec::new();
        for (n, (job_id, reschedules)) in jobs.into_iter().enumerate() {
            let Some(version) = self.tables.jobs.get(&job_id).map(|j| j.version) else {
                continue;
            };
            let eval_id = EvalId(format!("log-{index}-{trigger}-{n}"));
            if self.tables.evaluations.contains_key(&eval_id) {
                continue;
            }
            // Displaced and failed instances wait out their backoff; the rest of
            // an update and evicted instances are planned at once.
            let backs_off = matches!(trigger, EvalTrigger::NodeUpdate | EvalTrigger::AllocFailed);
            let wait_until = backs_off.then(|| {
                Timestamp::from_millis(
                    at.as_millis()
                        .saturating_add(reschedule_delay_ms(reschedules)),
                )
            });
            self.insert_eval(eval_id.clone(), job_id, version, trigger, at, wait_until);
            created.push(eval_id);
        }
        created
    }

    pub(super) fn insert_eval(
        &mut self,
        id: EvalId,
        job_id: JobId,
        job_version: u64,
        trigger: EvalTrigger,
        at: Timestamp,
        wait_until: Option<Timestamp>,
    ) {
        let seq = self.tables.next_eval_seq;
        self.tables.next_eval_seq += 1;
        self.eval_order.insert(seq, id.clone());
        self.eval_status
            .entry(EvalStatus::Pending)
            .or_default()
            .insert(seq);
        self.tables.evaluations.insert(
            id.clone(),
            Box::new(EvalRecord {
                seq,
                eval: Evaluation {
                    id,
                    job_id,
                    job_version,
                    trigger,
                    status: EvalStatus::Pending,
                    created_at: at,
                    updated_at: at,
                    wait_until,
                },
            }),
        );
        self.trim_evals();
    }

    /// Forgets the oldest evaluations beyond the limit: completed ones first, then,
    /// if the planner has fallen that far behind, the oldest of any status. One at
    /// a time: past the limit each new evaluation forgets one, with no set gathered.
    fn trim_evals(&mut self) {
        let excess = self
            .tables
            .evaluations
            .len()
            .saturating_sub(self.tables.eval_limit);
        for _ in 0..excess {
            let complete = self
                .eval_status
                .get_mut(&EvalStatus::Complete)
                .and_then(BTreeSet::pop_first);
            let Some(seq) = complete.or_else(|| self.eval_order.keys().next().copied()) else {
                return;
            };
            if let Some(id) = self.eval_order.remove(&seq) {
                if let Some(record) = self.tables.evaluations.remove(&id) {
                    if let Some(seqs) = self.eval_status.get_mut(&record.eval.status) {
                        seqs.remove(&seq);
                    }
                }
            }
        }
    }
}
