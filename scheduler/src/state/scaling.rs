//! Scaled groups: the count a group's `scaling` block lets the leader move
//! ([`Command::ScaleGroup`]), kept across resubmissions of the spec, the record of
//! each change with its reason, and what the autoscaler and the gateway read of
//! them ([`ScaledGroup`]).
//!
//! A change of count is not a new version of the job: the instances stay as they
//! are and only as many are added or stopped as the count moved. Raising a job's
//! instances above its circle's `scale_limit`, where `job.scale` is guarded, is a
//! guarded change like a resubmission that does the same.

use aigrid_api::{
    AllocState, ChangeKind, DesiredState, EvalId, EvalTrigger, JobId, JobSpec, ScaleEvent, Scaling,
    TaskSpec, Timestamp, ValidationError,
};

use super::*;

/// Scale events kept per job; older ones are forgotten.
pub const SCALE_EVENTS_KEPT: usize = 20;

/// A live group with a `scaling` block, as the autoscaler and the gateway see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaledGroup {
    /// Its job.
    pub job_id: JobId,
    /// Its job's name.
    pub job: String,
    /// The group's name.
    pub group: String,
    /// Its scaling block.
    pub scaling: Scaling,
    /// Its count now.
    pub count: u32,
    /// The digest of the model it serves.
    pub digest: String,
    /// Where the servers reach its running replicas.
    pub endpoints: Vec<String>,
    /// The largest count it may reach without its circle's quorum, where its
    /// circle guards `job.scale` with a `scale_limit`.
    pub room: Option<u32>,
    /// Whether a guarded scale of this job waits for its circle's quorum.
    pub proposed: bool,
}

impl ClusterState {
    /// Every live scaled group serving a model, by job name then group.
    pub fn scaled_groups(&self) -> Vec<ScaledGroup> {
        let mut found = Vec::new();
        for job in self.model_job_records() {
            let limit = job
                .spec
                .circle
                .as_deref()
                .and_then(|c| self.governing(c))
                .map(|g| &g.policy)
                .filter(|p| p.guards(ChangeKind::JobScale))
                .and_then(|p| p.scale_limit);
            // Only a job with a limit can have a scale waiting for its quorum.
            let proposed = limit.is_some() && {
                let target = format!("job:{}", job.spec.name);
                self.proposal_infos().any(|p| {
                    !p.state.is_final() && p.kind == ChangeKind::JobScale && p.target == target
                })
            };
            let running: Vec<_> = self
                .job_allocs(&job.id)
                .into_iter()
                .filter(|a| a.desired == DesiredState::Run && a.state == AllocState::Running)
                .collect();
            for group in &job.spec.groups {
                let (Some(scaling), TaskSpec::ModelServer(task)) = (&group.scaling, &group.task)
                else {
                    continue;
                };
                let endpoints = running
                    .iter()
                    .filter(|a| a.group == group.name)
                    .filter_map(|a| self.workload_endpoint(a))
                    .collect();
                let others = job.spec.instance_count() - u64::from(group.count);
                let room = limit.map(|l| {
                    u32::try_from(u64::from(l).saturating_sub(others)).unwrap_or(u32::MAX)
                });
                found.push(ScaledGroup {
                    job_id: job.id.clone(),
                    job: job.spec.name.clone(),
                    group: group.name.clone(),
                    scaling: scaling.clone(),
                    count: group.count,
                    digest: task.model.to_ascii_lowercase(),
                    endpoints,
                    room,
                    proposed,
                });
            }
        }
        found.sort_by(|a, b| (&a.job, &a.group).cmp(&(&b.job, &b.group)));
        found
    }

    /// A submitted spec with each scaled group's count as it will run: the count
    /// the live job's group reached, where that group scaled too, else the
    /// submitted one; kept within the group's `min..=max`.
    pub(super) fn keep_scaled_counts(&self, spec: &mut JobSpec) {
        if !has_scaled_group(spec) {
            return;
        }
        let live = self.live_spec(&spec.name);
        for group in &mut spec.groups {
            let Some(scaling) = &group.scaling else {
                continue;
            };
            let reached = live
                .and_then(|l| l.group(&group.name))
                .filter(|g| g.scaling.is_some())
                .map(|g| g.count);
            group.count = scaling.clamp(reached.unwrap_or(group.count));
        }
    }

    /// `spec` as [`ClusterState::keep_scaled_counts`] makes it, copied only when it
    /// has a scaled group.
    pub(super) fn as_it_will_run<'a>(&self, spec: &'a JobSpec) -> std::borrow::Cow<'a, JobSpec> {
        if !has_scaled_group(spec) {
            return std::borrow::Cow::Borrowed(spec);
        }
        let mut spec = spec.clone();
        self.keep_scaled_counts(&mut spec);
        std::borrow::Cow::Owned(spec)
    }

    /// What scaling `group` of `job_id` to `to` changes, as governance sees it: a
    /// guarded `job.scale` when it raises the job's instances above its circle's
    /// `scale_limit`; nothing otherwise.
    pub(super) fn scale_change(&self, job_id: &JobId, group: &str, to: u32) -> Option<Change> {
        let job = self.tables.jobs.get(job_id)?;
        let circle = job.spec.circle.clone()?;
        let policy = &self.governing(&circle)?.policy;
        let limit = policy.scale_limit?;
        let now = job.spec.group(group)?.count;
        let total = job.spec.instance_count() - u64::from(now) + u64::from(to);
        let over = to > now && total > u64::from(limit);
        (over && policy.guards(ChangeKind::JobScale)).then(|| Change {
            circle,
            kind: ChangeKind::JobScale,
            target: format!("job:{}", job.spec.name),
        })
    }

    /// Sets a scaled group's count to `to` (within its `min..=max`) and records
    /// why; with `from`, only if the count is still `from` (a decision made on
    /// what has since changed is dropped). Creates the evaluation that adds or
    /// stops the instances.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scale_group(
        &mut self,
        job_id: JobId,
        group: String,
        from: Option<u32>,
        to: u32,
        reason: String,
        eval_id: EvalId,
        at: Timestamp,
    ) -> CommandOutput {
        let job = self
            .tables
            .job_mut(&job_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Job, &job_id))?;
        let Some(g) = job.spec.groups.iter_mut().find(|g| g.name == group) else {
            return Err(StateError::Invalid(ValidationError::new(
                "group",
                format!("job `{}` has no group `{group}`", job.spec.name),
            )));
        };
        let Some(scaling) = &g.scaling else {
            return Err(StateError::Invalid(ValidationError::new(
                "group",
                format!("group `{group}` has no scaling block"),
            )));
        };
        if scaling.clamp(to) != to {
            return Err(StateError::Invalid(ValidationError::new(
                "to",
                format!(
                    "group `{group}` scales between {} and {}, not to {to}",
                    scaling.min, scaling.max
                ),
            )));
        }
        let was = g.count;
        if from.is_some_and(|f| f != was) || was == to {
            return Ok(Applied::Scaled {
                count: was,
                changed: false,
            });
        }
        g.count = to;
        job.scale_events.push(ScaleEvent {
            at,
            group,
            from: was,
            to,
            reason,
        });
        if job.scale_events.len() > SCALE_EVENTS_KEPT {
            job.scale_events.remove(0);
        }
        let version = job.version;
        self.insert_eval(eval_id, job_id, version, EvalTrigger::Scale, at, None);
        Ok(Applied::Scaled {
            count: to,
            changed: true,
        })
    }
}

/// Whether any group of `spec` scales (has a `scaling` policy).
fn has_scaled_group(spec: &JobSpec) -> bool {
    spec.groups.iter().any(|g| g.scaling.is_some())
}
