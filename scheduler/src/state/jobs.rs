//! Jobs: submission (validated against the spec rules, idempotent by id, in place
//! by name), deletion, and the job views with their derived status.

use aigrid_api::{
    AllocState, Allocation, DeleteJobResponse, DesiredState, EvalId, EvalTrigger, IdentityId, Job,
    JobId, JobKind, JobSpec, JobStatus, JobSummary, JobVersion, Role, SubmitJobResponse, TaskSpec,
    Timestamp, ValidationError,
};

use super::*;

/// Earlier versions kept per job, to show and to revert to; older ones are forgotten.
pub const VERSIONS_KEPT: usize = 10;

impl ClusterState {
    /// The job with this id, with its allocations and derived status.
    pub fn job(&self, id: &JobId) -> Option<Job> {
        self.tables.jobs.get(id).map(|record| self.job_view(record))
    }

    /// The live job with this name.
    pub fn job_by_name(&self, name: &str) -> Option<Job> {
        self.job_names.get(name).and_then(|id| self.job(id))
    }

    /// The id of the job with this id or, failing that, of the live job with this
    /// name, without building the job's view.
    pub fn resolve_job(&self, id_or_name: &str) -> Option<&JobId> {
        self.tables
            .jobs
            .get_key_value(id_or_name)
            .map(|(id, _)| id)
            .or_else(|| self.job_names.get(id_or_name))
    }

    /// The spec of the live job with this name, without building the job's view.
    pub fn live_spec(&self, name: &str) -> Option<&JobSpec> {
        self.job_names
            .get(name)
            .and_then(|id| self.tables.jobs.get(id))
            .map(|job| &job.spec)
    }

    /// Every live job, ordered by name.
    pub fn jobs(&self) -> Vec<JobSummary> {
        self.jobs_where(|_| true)
    }

    /// The live jobs whose spec passes `keep`, ordered by name.
    pub fn jobs_where(&self, keep: impl Fn(&JobSpec) -> bool) -> Vec<JobSummary> {
        let mut listed: Vec<&JobRecord> = self
            .job_names
            .values()
            .filter_map(|id| self.tables.jobs.get(id).map(Arc::as_ref))
            .filter(|job| keep(&job.spec))
            .collect();
        listed.sort_unstable_by(|a, b| a.spec.name.cmp(&b.spec.name));
        listed
            .into_iter()
            .map(|job| {
                let allocs = &self.job_allocs(&job.id);
                JobSummary {
                    id: job.id.clone(),
                    name: job.spec.name.clone(),
                    kind: job.spec.kind,
                    priority: job.spec.priority,
                    version: job.version,
                    status: job_status(&job.spec, allocs),
                    submitted_at: job.submitted_at,
                    updated_at: job.updated_at,
                    groups: u32::try_from(job.spec.groups.len()).unwrap_or(u32::MAX),
                    instances: job.spec.instance_count(),
                    running: count_wanted(allocs, AllocState::Running),
                }
            })
            .collect()
    }

    /// The versions of a job kept, by its id or the name of a live job, newest first
    /// (the one running now included), specs as stored: the edge redacts them
    /// before showing them.
    pub fn job_versions(&self, id_or_name: &str) -> Option<Vec<JobVersion>> {
        let job = self.tables.jobs.get(self.resolve_job(id_or_name)?)?;
        let current = JobVersion {
            version: job.version,
            submitted_at: job.updated_at,
            by: job.updated_by.clone(),
            current: true,
            spec: job.spec.clone(),
        };
        let earlier = job.history.iter().rev().map(|k| JobVersion {
            version: k.version,
            submitted_at: k.submitted_at,
            by: k.by.clone(),
            current: false,
            spec: k.spec.clone(),
        });
        Some(std::iter::once(current).chain(earlier).collect())
    }

    fn job_view(&self, record: &JobRecord) -> Job {
        let allocations: Vec<Allocation> =
            self.job_allocs(&record.id).into_iter().cloned().collect();
        let refs: Vec<&Allocation> = allocations.iter().collect();
        Job {
            id: record.id.clone(),
            name: record.spec.name.clone(),
            version: record.version,
            status: job_status(&record.spec, &refs),
            spec: record.spec.clone(),
            submitted_at: record.submitted_at,
            updated_at: record.updated_at,
            allocations,
            unplaced: record.unplaced.clone(),
            deployment: self.deployment_of(&record.id),
            scale_events: record.scale_events.clone(),
        }
    }

    pub(super) fn submit_job(
        &mut self,
        job_id: JobId,
        eval_id: EvalId,
        mut spec: JobSpec,
        at: Timestamp,
        by: Option<&IdentityId>,
    ) -> CommandOutput {
        spec.validate()?;
        if let Some(record) = self.tables.evaluations.get(&eval_id) {
            let eval = &record.eval;
            let same_job = self
                .tables
                .jobs
                .get(&eval.job_id)
                .is_some_and(|job| job.spec.name == spec.name);
            return match eval.trigger {
                EvalTrigger::JobSubmit | EvalTrigger::JobUpdate if same_job => {
                    Ok(Applied::JobSubmitted(SubmitJobResponse {
                        id: eval.job_id.clone(),
                        version: eval.job_version,
                        eval_id,
                        created: eval.trigger == EvalTrigger::JobSubmit,
                    }))
                }
                _ => Err(StateError::conflict(format!(
                    "evaluation id `{eval_id}` is already used"
                ))),
            };
        }
        if let Some(existing) = self.tables.jobs.get(&job_id) {
            if existing.spec.name != spec.name {
                return Err(StateError::conflict(format!(
                    "job id `{job_id}` belongs to job `{}`",
                    existing.spec.name
                )));
            }
        }

        let live_id = self.job_names.get(&spec.name).cloned();
        let live_spec = live_id
            .as_ref()
            .and_then(|id| self.tables.jobs.get(id))
            .map(|job| &job.spec);
        if let Some(by) = by {
            // The edge checked the submitted circle against its own (possibly older)
            // view; here both circles are checked against the state this applies to.
            let who = Principal::Identity(by.clone());
            let circles = std::iter::once(spec.circle.as_deref())
                .chain(live_spec.map(|live| live.circle.as_deref()));
            for circle in circles {
                let action = Action::Circle(circle, Role::Operator);
                if !self.allows(&who, action) {
                    return Err(StateError::Forbidden(Self::denial(&who, action)));
                }
            }
        }
        keep_redacted_secrets(&mut spec, live_spec)?;
        self.keep_scaled_counts(&mut spec);

        let live = live_id.and_then(|id| self.tables.jobs.get(&id));
        let (id, version, trigger) = match live {
            Some(job) if job.spec == spec => {
                return Ok(Applied::JobSubmitted(SubmitJobResponse {
                    id: job.id.clone(),
                    version: job.version,
                    eval_id: job.last_eval.clone(),
                    created: false,
                }));
            }
            Some(job) => {
                let id = job.id.clone();
                let version = self
                    .push_version(&id, spec, by.cloned(), eval_id.clone(), at)
                    .ok_or_else(|| StateError::not_found(ObjectKind::Job, &id))?;
                self.begin_deployment(&id, at);
                (id, version, EvalTrigger::JobUpdate)
            }
            None => {
                if serves_models(&spec) {
                    self.model_jobs.insert(spec.name.clone());
                }
                self.job_names.insert(spec.name.clone(), job_id.clone());
                self.tables.jobs.insert(
                    job_id.clone(),
                    Arc::new(JobRecord {
                        id: job_id.clone(),
                        spec,
                        version: 1,
                        submitted_at: at,
                        updated_at: at,
                        last_eval: eval_id.clone(),
                        unplaced: Vec::new(),
                        updated_by: by.cloned(),
                        history: Vec::new(),
                        stable_version: Some(1),
                        deployment: None,
                        scale_events: Vec::new(),
                    }),
                );
                (job_id, 1, EvalTrigger::JobSubmit)
            }
        };
        self.insert_eval(eval_id.clone(), id.clone(), version, trigger, at, None);
        Ok(Applied::JobSubmitted(SubmitJobResponse {
            id,
            version,
            eval_id,
            created: trigger == EvalTrigger::JobSubmit,
        }))
    }

    pub(super) fn delete_job(
        &mut self,
        job_id: JobId,
        eval_id: EvalId,
        at: Timestamp,
    ) -> CommandOutput {
        if let Some(record) = self.tables.evaluations.get(&eval_id) {
            let eval = &record.eval;
            return if eval.trigger == EvalTrigger::JobDelete && eval.job_id == job_id {
                Ok(Applied::JobDeleted(DeleteJobResponse {
                    id: job_id,
                    eval_id,
                }))
            } else {
                Err(StateError::conflict(format!(
                    "evaluation id `{eval_id}` is already used"
                )))
            };
        }
        let job = self
            .tables
            .jobs
            .remove(&job_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Job, &job_id))?;
        self.job_names.remove(&job.spec.name);
        self.model_jobs.remove(&job.spec.name);
        self.deployed_jobs.remove(&job_id);
        for id in self.job_alloc_ids(&job_id) {
            let Some(mut alloc) = self.drop_alloc(&id) else {
                continue;
            };
            if !alloc.state.is_terminal() {
                alloc.desired = DesiredState::Stop;
                alloc.updated_at = at;
                self.put_alloc(alloc);
            }
        }
        self.insert_eval(
            eval_id.clone(),
            job_id.clone(),
            job.version,
            EvalTrigger::JobDelete,
            at,
            None,
        );
        Ok(Applied::JobDeleted(DeleteJobResponse {
            id: job_id,
            eval_id,
        }))
    }
}

/// Allocations the control plane still wants that are in `state`.
fn count_wanted(allocs: &[&Allocation], state: AllocState) -> u64 {
    let n = allocs
        .iter()
        .filter(|a| a.desired == DesiredState::Run && a.state == state)
        .count();
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A job's status from its wanted allocations: a service is running while any
/// instance runs; a batch or training job fails on any failed instance and completes
/// when as many instances completed as the spec asks for.
fn job_status(spec: &JobSpec, allocs: &[&Allocation]) -> JobStatus {
    let running = count_wanted(allocs, AllocState::Running);
    match spec.kind {
        JobKind::Service if running > 0 => JobStatus::Running,
        JobKind::Service => JobStatus::Pending,
        JobKind::Batch | JobKind::Training => {
            let complete = count_wanted(allocs, AllocState::Complete);
            if count_wanted(allocs, AllocState::Failed) > 0 {
                JobStatus::Failed
            } else if complete >= spec.instance_count() {
                JobStatus::Complete
            } else if running > 0 || complete > 0 {
                JobStatus::Running
            } else {
                JobStatus::Pending
            }
        }
    }
}

/// Replaces each env value given as `aigrid_api::access::REDACTED` (what every read
/// shows) with the live job's value of that name in the same group, so a spec read
/// back and resubmitted keeps its secrets; a placeholder with nothing to keep is
/// refused.
fn keep_redacted_secrets(spec: &mut JobSpec, live: Option<&JobSpec>) -> Result<(), StateError> {
    for (g, group) in spec.groups.iter_mut().enumerate() {
        let TaskSpec::Exec(task) = &mut group.task else {
            continue;
        };
        for (name, value) in task.env.iter_mut() {
            if value != aigrid_api::access::REDACTED {
                continue;
            }
            let kept = live
                .and_then(|l| l.groups.iter().find(|lg| lg.name == group.name))
                .and_then(|lg| match &lg.task {
                    TaskSpec::Exec(t) => t.env.get(name),
                    TaskSpec::ModelServer(_) => None,
                });
            match kept {
                Some(v) => value.clone_from(v),
                None => {
                    return Err(StateError::Invalid(ValidationError::new(
                        format!("groups[{g}].task.env.{name}"),
                        format!(
                            "`{}` stands for a value kept from the live job, and it has none",
                            aigrid_api::access::REDACTED
                        ),
                    )))
                }
            }
        }
    }
    Ok(())
}
