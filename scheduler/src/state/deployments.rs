//! Rollouts of services whose groups have an `update` block: a deployment per new
//! version, its canaries, the verdicts on its instances, promotion, pause, abort,
//! and the revert to the last version that deployed successfully.
//!
//! The state decides from what commands carry: the leader's watcher judges
//! instances (it sees the gateway's readiness probes and measurements) and reports
//! deadlines that passed, people steer. What a verdict implies (the rollout waits,
//! goes on, succeeds, fails, reverts) is settled here, so every replica agrees.

use std::collections::BTreeSet;

use aigrid_api::{
    AllocState, Allocation, Deployment, DeploymentAction, DeploymentGroup, DeploymentState,
    DesiredState, EvalId, EvalTrigger, JobId, JobSpec, TaskGroup, Timestamp, UpdatePolicy,
};
use serde::{Deserialize, Serialize};

use super::*;

/// The latest rollout of a job, as the state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeploymentRecord {
    version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stable_version: Option<u64>,
    state: DeploymentState,
    description: String,
    /// Groups past their canaries: promoted, or with nothing to try first.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    promoted: BTreeSet<String>,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    progress_deadline_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reverted_to: Option<u64>,
}

/// The leader's word on one instance of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The allocation.
    pub id: aigrid_api::AllocId,
    /// Healthy, or not.
    pub healthy: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A rollout the leader watches: the instances to judge and the deadline to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The job.
    pub job_id: JobId,
    /// The version rolling out.
    pub version: u64,
    /// Where it stands.
    pub state: DeploymentState,
    /// When it fails unless an instance turns healthy first.
    pub progress_deadline_at: Option<Timestamp>,
    /// Its instances not judged yet.
    pub instances: Vec<WatchedInstance>,
}

/// One instance of a watched rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedInstance {
    /// The allocation.
    pub id: aigrid_api::AllocId,
    /// What its node last reported.
    pub state: AllocState,
    /// Why it is not running, as its node said.
    pub reason: Option<String>,
    /// In-place restarts so far.
    pub restarts: u32,
    /// Where the gateway reaches it, for a model server: healthy means ready too.
    pub endpoint: Option<String>,
    /// Whether it serves models (so readiness counts).
    pub listens: bool,
    /// Whether it is a canary (the gateway's checks judge canaries).
    pub canary: bool,
    /// The group's policy.
    pub policy: UpdatePolicy,
    /// From when its healthy deadline counts: its placement, or the rollout's
    /// start for an instance the new version kept.
    pub since: Timestamp,
}

fn millis_after(at: Timestamp, ms: u64) -> Timestamp {
    Timestamp::from_millis(at.as_millis().saturating_add(ms))
}

/// The groups of `spec` with an update policy.
fn updated_groups(spec: &JobSpec) -> impl Iterator<Item = (&TaskGroup, &UpdatePolicy)> {
    spec.groups
        .iter()
        .filter_map(|g| g.update.as_ref().map(|u| (g, u)))
}

/// When a rollout of `spec` starting (or going on) at `at` fails without progress.
fn progress_deadline(spec: &JobSpec, at: Timestamp) -> Option<Timestamp> {
    updated_groups(spec)
        .map(|(_, u)| u.progress_deadline.as_millis())
        .filter(|ms| *ms > 0)
        .min()
        .map(|ms| millis_after(at, ms))
}

impl JobRecord {
    /// The spec of a kept version (or the current one).
    pub(super) fn spec_at(&self, version: u64) -> Option<&JobSpec> {
        if version == self.version {
            return Some(&self.spec);
        }
        self.history
            .iter()
            .find(|k| k.version == version)
            .map(|k| &k.spec)
    }

    fn active_deployment(&mut self) -> Option<&mut DeploymentRecord> {
        let version = self.version;
        self.deployment
            .as_mut()
            .filter(|d| d.state.is_active() && d.version == version)
    }
}

impl ClusterState {
    /// Makes `spec` the job's new version: the old one is kept, and the live
    /// instances the new version would run unchanged (same task and resources as
    /// the version they were placed for, whatever the count or update policy) now
    /// count as the new version's, so only what changed is replaced; a revert
    /// leaves the instances of the version it returns to running. Answers the new
    /// version.
    pub(super) fn push_version(
        &mut self,
        job_id: &JobId,
        spec: JobSpec,
        by: Option<IdentityId>,
        eval_id: EvalId,
        at: Timestamp,
    ) -> Option<u64> {
        let job = self.tables.job_mut(job_id)?;
        let old = std::mem::replace(&mut job.spec, spec);
        job.history.push(KeptVersion {
            version: job.version,
            spec: old,
            submitted_at: job.updated_at,
            by: job.updated_by.take(),
        });
        if job.history.len() > jobs::VERSIONS_KEPT {
            job.history.remove(0);
        }
        job.version += 1;
        job.updated_by = by;
        job.updated_at = at;
        job.last_eval = eval_id;
        job.unplaced.clear();
        let (version, new) = (job.version, job.spec.clone());
        if super::serves_models(&new) {
            self.model_jobs.insert(new.name.clone());
        } else {
            self.model_jobs.remove(&new.name);
        }
        let job = &self.tables.jobs[job_id];
        let mut kept: Vec<Allocation> = self
            .job_allocs(job_id)
            .into_iter()
            .filter(|a| a.is_live() && a.job_version < version)
            .filter(|a| {
                let was = job.spec_at(a.job_version).and_then(|s| s.group(&a.group));
                match (was, new.group(&a.group)) {
                    (Some(was), Some(now)) => was.same_instances(now),
                    _ => false,
                }
            })
            .cloned()
            .collect();
        // A gang runs one version whole: its instances carry over only all
        // together; one missing (lost, stopped by an earlier version) leaves the
        // rest on their version, to be replaced with the whole gang.
        let whole = |group: &aigrid_api::TaskGroup| {
            (0..group.count).all(|i| kept.iter().any(|a| a.group == group.name && a.index == i))
        };
        let split: Vec<String> = new
            .groups
            .iter()
            .filter(|g| g.gang && !whole(g))
            .map(|g| g.name.clone())
            .collect();
        kept.retain(|a| !split.contains(&a.group));
        for mut alloc in kept {
            alloc.job_version = version;
            alloc.healthy = None;
            self.put_alloc(alloc);
        }
        Some(version)
    }

    /// Starts the rollout of the job's new version when a group has an update
    /// policy (a running rollout is cancelled first); a version without one is
    /// stable as soon as it is submitted.
    pub(super) fn begin_deployment(&mut self, job_id: &JobId, at: Timestamp) {
        let Some(job) = self.tables.job_mut(job_id) else {
            return;
        };
        let version = job.version;
        if let Some(running) = job
            .deployment
            .as_mut()
            .filter(|d| d.state.is_active() && d.version < version)
        {
            running.state = DeploymentState::Cancelled;
            running.description = format!("version {version} took its place");
            running.updated_at = at;
            running.progress_deadline_at = None;
        }
        if updated_groups(&job.spec).next().is_none() {
            job.stable_version = Some(version);
            return;
        }
        let old = job.history.last().map(|k| &k.spec);
        // A group tries canaries only when its instances change: with nothing
        // running to compare against, or nothing changed, it is past them.
        let promoted: BTreeSet<String> = updated_groups(&job.spec)
            .filter(|(g, u)| {
                u.canary == 0
                    || old
                        .and_then(|o| o.group(&g.name))
                        .is_none_or(|was| was.same_instances(g))
            })
            .map(|(g, _)| g.name.clone())
            .collect();
        let canaries = updated_groups(&job.spec).any(|(g, _)| !promoted.contains(&g.name));
        self.deployed_jobs.insert(job_id.clone());
        job.deployment = Some(DeploymentRecord {
            version,
            stable_version: job.stable_version,
            state: DeploymentState::Running,
            description: if canaries {
                "placing canaries".to_owned()
            } else {
                "replacing instances".to_owned()
            },
            promoted,
            created_at: at,
            updated_at: at,
            progress_deadline_at: progress_deadline(&job.spec, at),
            reverted_to: None,
        });
    }

    /// Records the leader's verdicts on instances of the rollout of `version`, then
    /// settles what they imply. An unhealthy instance fails the rollout (and
    /// reverts it when the policy says so); a healthy one pushes the progress
    /// deadline back.
    pub(super) fn judge_allocations(
        &mut self,
        job_id: &JobId,
        version: u64,
        verdicts: Vec<Verdict>,
        eval_id: EvalId,
        at: Timestamp,
    ) -> CommandOutput {
        let mut healthy = 0usize;
        let mut failure = None;
        for verdict in verdicts {
            let Some(mut alloc) = self.tables.allocations.get(&verdict.id).cloned() else {
                continue;
            };
            if alloc.job_id != *job_id || alloc.job_version != version || alloc.healthy.is_some() {
                continue;
            }
            alloc.healthy = Some(verdict.healthy);
            alloc.updated_at = at;
            if verdict.healthy {
                healthy += 1;
            } else if failure.is_none() {
                failure = Some(format!(
                    "instance {}[{}]{} ({}) is unhealthy: {}",
                    alloc.group,
                    alloc.index,
                    if alloc.canary { " canary" } else { "" },
                    alloc.id,
                    verdict.reason.as_deref().unwrap_or("no reason given")
                ));
            }
            self.put_alloc(alloc);
        }
        let Some(job) = self.tables.job_mut(job_id) else {
            return Err(StateError::not_found(ObjectKind::Job, job_id));
        };
        let spec_deadline = progress_deadline(&job.spec, at);
        let Some(deployment) = job.active_deployment().filter(|d| d.version == version) else {
            return Ok(Applied::DeploymentChanged(self.deployment_of(job_id)));
        };
        if healthy > 0 && deployment.state == DeploymentState::Running {
            deployment.progress_deadline_at = spec_deadline;
            deployment.updated_at = at;
        }
        if let Some(reason) = failure {
            self.fail_deployment(job_id, reason, &eval_id, at);
        } else {
            self.settle_deployment(job_id, at);
        }
        self.deployment_eval(job_id, eval_id, at);
        Ok(Applied::DeploymentChanged(self.deployment_of(job_id)))
    }

    /// A person's (or the leader's, for a passed deadline) word on the rollout of
    /// `version`: refused when that rollout is no longer the job's, or when the
    /// action does not fit where it stands.
    pub(super) fn steer_deployment(
        &mut self,
        job_id: &JobId,
        version: u64,
        action: DeploymentAction,
        eval_id: EvalId,
        at: Timestamp,
    ) -> CommandOutput {
        let job = self
            .tables
            .job_mut(job_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Job, job_id))?;
        let name = job.spec.name.clone();
        let spec_deadline = progress_deadline(&job.spec, at);
        let deployment = job
            .deployment
            .as_mut()
            .filter(|d| d.version == version)
            .ok_or_else(|| {
                StateError::conflict(format!(
                    "version {version} of `{name}` is not the one rolling out"
                ))
            })?;
        let state = deployment.state;
        let not_now = |what: &str| {
            Err(StateError::conflict(format!(
                "the rollout of `{name}` version {version} is {state}: it cannot be {what}"
            )))
        };
        match action {
            DeploymentAction::Pause => match state {
                DeploymentState::Paused => {}
                DeploymentState::Running | DeploymentState::AwaitingPromotion => {
                    deployment.state = DeploymentState::Paused;
                    deployment.description = "paused".to_owned();
                    deployment.progress_deadline_at = None;
                    deployment.updated_at = at;
                }
                _ => return not_now("paused"),
            },
            DeploymentAction::Resume => match state {
                DeploymentState::Running | DeploymentState::AwaitingPromotion => {}
                DeploymentState::Paused => {
                    deployment.state = DeploymentState::Running;
                    deployment.description = "resumed".to_owned();
                    deployment.progress_deadline_at = spec_deadline;
                    deployment.updated_at = at;
                    self.settle_deployment(job_id, at);
                }
                _ => return not_now("resumed"),
            },
            DeploymentAction::Promote => match state {
                DeploymentState::Running | DeploymentState::AwaitingPromotion => {
                    self.promote(job_id, at)?;
                    self.settle_deployment(job_id, at);
                }
                DeploymentState::Paused => return not_now("promoted before it is resumed"),
                _ => return not_now("promoted"),
            },
            DeploymentAction::Abort => {
                if !state.is_active() {
                    return not_now("aborted");
                }
                let reason = format!("version {version} was aborted");
                self.revert_or_fail(job_id, reason, &eval_id, at);
            }
        }
        self.deployment_eval(job_id, eval_id, at);
        Ok(Applied::DeploymentChanged(self.deployment_of(job_id)))
    }

    /// The leader's report that the rollout of `version` went past its progress
    /// deadline with no instance turning healthy.
    pub(super) fn deadline_passed(
        &mut self,
        job_id: &JobId,
        version: u64,
        eval_id: EvalId,
        at: Timestamp,
    ) -> CommandOutput {
        let passed = self
            .tables
            .job_mut(job_id)
            .and_then(JobRecord::active_deployment)
            .filter(|d| d.version == version && d.state == DeploymentState::Running)
            .and_then(|d| d.progress_deadline_at)
            .is_some_and(|deadline| deadline <= at);
        if passed {
            let reason = "no instance turned healthy before the progress deadline".to_owned();
            self.fail_deployment(job_id, reason, &eval_id, at);
            self.deployment_eval(job_id, eval_id, at);
        }
        Ok(Applied::DeploymentChanged(self.deployment_of(job_id)))
    }

    /// Fails the active rollout for `reason`, reverting when a group's policy
    /// asks for it.
    fn fail_deployment(&mut self, job_id: &JobId, reason: String, eval_id: &EvalId, at: Timestamp) {
        let Some(job) = self.tables.job_mut(job_id) else {
            return;
        };
        let revert = updated_groups(&job.spec).any(|(_, u)| u.auto_revert);
        if revert {
            self.revert_or_fail(job_id, reason, eval_id, at);
        } else if let Some(deployment) = job.active_deployment() {
            deployment.state = DeploymentState::Failed;
            deployment.description = reason;
            deployment.progress_deadline_at = None;
            deployment.updated_at = at;
        }
    }

    /// Ends the active rollout: reverted to its stable version when one is kept,
    /// failed otherwise.
    fn revert_or_fail(&mut self, job_id: &JobId, reason: String, eval_id: &EvalId, at: Timestamp) {
        let Some(job) = self.tables.job_mut(job_id) else {
            return;
        };
        let Some(deployment) = job.active_deployment() else {
            return;
        };
        deployment.progress_deadline_at = None;
        deployment.updated_at = at;
        let stable = deployment.stable_version;
        let kept = stable.and_then(|v| job.spec_at(v)).cloned();
        let (Some(stable), Some(spec)) = (stable, kept) else {
            if let Some(deployment) = job.active_deployment() {
                deployment.state = DeploymentState::Failed;
                deployment.description =
                    format!("{reason}; no version that deployed successfully is kept to revert to");
            }
            return;
        };
        let Some(reverted) = self.push_version(job_id, spec, None, eval_id.clone(), at) else {
            return;
        };
        if let Some(job) = self.tables.job_mut(job_id) {
            job.stable_version = Some(reverted);
            if let Some(deployment) = job.deployment.as_mut() {
                deployment.state = DeploymentState::Reverted;
                deployment.description =
                    format!("{reason}; reverted to version {stable} as version {reverted}");
                deployment.reverted_to = Some(reverted);
            }
        }
    }

    /// Lets every group's healthy canaries replace the instances of their index;
    /// refused unless each group has all its canaries, healthy.
    fn promote(&mut self, job_id: &JobId, at: Timestamp) -> Result<(), StateError> {
        let Some(job) = self.tables.jobs.get(job_id) else {
            return Ok(());
        };
        let Some(deployment) = job.deployment.as_ref() else {
            return Ok(());
        };
        let version = deployment.version;
        let waiting: Vec<(String, u32)> = updated_groups(&job.spec)
            .filter(|(g, _)| !deployment.promoted.contains(&g.name))
            .map(|(g, u)| (g.name.clone(), u.canary))
            .collect();
        let allocs = self.job_allocs(job_id);
        let mut changes = Vec::new();
        for (group, wanted) in &waiting {
            let canaries: Vec<&Allocation> = allocs
                .iter()
                .filter(|a| {
                    a.is_live() && a.canary && a.group == *group && a.job_version == version
                })
                .copied()
                .collect();
            let healthy = canaries.iter().filter(|a| a.healthy == Some(true)).count();
            if healthy < *wanted as usize {
                return Err(StateError::conflict(format!(
                    "group `{group}` has {healthy} healthy canaries of {wanted}; promote once all are"
                )));
            }
            for canary in canaries {
                let mut promoted = (*canary).clone();
                promoted.canary = false;
                promoted.updated_at = at;
                let replaced = allocs.iter().find(|a| {
                    a.is_live() && !a.canary && a.group == *group && a.index == canary.index
                });
                if let Some(old) = replaced {
                    let mut old = (*old).clone();
                    old.desired = DesiredState::Stop;
                    old.updated_at = at;
                    promoted.previous = Some(old.id.clone());
                    changes.push(old);
                }
                changes.push(promoted);
            }
        }
        for alloc in changes {
            self.put_alloc(alloc);
        }
        if let Some(deployment) = self
            .tables
            .job_mut(job_id)
            .and_then(|j| j.deployment.as_mut())
        {
            deployment
                .promoted
                .extend(waiting.into_iter().map(|(g, _)| g));
            deployment.state = DeploymentState::Running;
            deployment.description = "canaries promoted; replacing instances".to_owned();
            deployment.updated_at = at;
        }
        Ok(())
    }

    /// Moves a running rollout on from what its instances are: awaiting promotion
    /// (or promoted, when every waiting group promotes itself) once every canary is
    /// healthy, successful once every instance runs the new version healthy.
    fn settle_deployment(&mut self, job_id: &JobId, at: Timestamp) {
        let Some(job) = self.tables.jobs.get(job_id) else {
            return;
        };
        let Some(deployment) = job.deployment.as_ref() else {
            return;
        };
        if deployment.state != DeploymentState::Running || deployment.version != job.version {
            return;
        }
        let version = deployment.version;
        let allocs = self.job_allocs(job_id);
        let mut waiting = 0;
        let mut canaries_ready = true;
        let mut auto_promote = true;
        let mut done = true;
        for (group, policy) in updated_groups(&job.spec) {
            let of_group = || {
                allocs
                    .iter()
                    .filter(|a| a.is_live() && a.group == group.name)
            };
            if !deployment.promoted.contains(&group.name) {
                waiting += 1;
                auto_promote &= policy.auto_promote;
                let healthy = of_group()
                    .filter(|a| a.canary && a.job_version == version && a.healthy == Some(true))
                    .count();
                canaries_ready &= healthy >= policy.canary as usize;
                continue;
            }
            let healthy = of_group()
                .filter(|a| !a.canary && a.job_version == version && a.healthy == Some(true))
                .count();
            let stale = of_group().any(|a| a.job_version != version || a.canary);
            done &= healthy >= group.count as usize && !stale;
        }
        if waiting > 0 && canaries_ready {
            if auto_promote {
                if self.promote(job_id, at).is_ok() {
                    self.settle_deployment(job_id, at);
                }
                return;
            }
            if let Some(d) = self.active_deployment_mut(job_id) {
                d.state = DeploymentState::AwaitingPromotion;
                d.description = "every canary is healthy; promote to go on".to_owned();
                d.progress_deadline_at = None;
                d.updated_at = at;
            }
        } else if waiting == 0 && done {
            if let Some(job) = self.tables.job_mut(job_id) {
                job.stable_version = Some(version);
                if let Some(d) = job.active_deployment() {
                    d.state = DeploymentState::Successful;
                    d.description = "every instance runs the new version, healthy".to_owned();
                    d.progress_deadline_at = None;
                    d.updated_at = at;
                }
            }
        }
    }

    fn active_deployment_mut(&mut self, job_id: &JobId) -> Option<&mut DeploymentRecord> {
        self.tables
            .job_mut(job_id)
            .and_then(JobRecord::active_deployment)
    }

    /// An evaluation so the planner acts on what the rollout's change allows.
    fn deployment_eval(&mut self, job_id: &JobId, eval_id: EvalId, at: Timestamp) {
        if self.tables.evaluations.contains_key(&eval_id) {
            return;
        }
        let Some(version) = self.tables.jobs.get(job_id).map(|j| j.version) else {
            return;
        };
        self.insert_eval(
            eval_id,
            job_id.clone(),
            version,
            EvalTrigger::Deployment,
            at,
            None,
        );
    }

    /// Jobs by the state of their latest rollout.
    pub fn deployment_counts(&self) -> std::collections::BTreeMap<DeploymentState, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for record in self
            .deployed_jobs
            .iter()
            .filter_map(|id| self.tables.jobs.get(id)?.deployment.as_ref())
        {
            *counts.entry(record.state).or_default() += 1;
        }
        counts
    }

    /// The job's latest rollout, as the control API shows it.
    pub fn deployment_of(&self, job_id: &JobId) -> Option<Deployment> {
        let job = self.tables.jobs.get(job_id)?;
        let record = job.deployment.as_ref()?;
        let spec = job.spec_at(record.version).unwrap_or(&job.spec);
        let allocs = self.job_allocs(job_id);
        let groups: Vec<DeploymentGroup> = updated_groups(spec)
            .map(|(group, policy)| {
                let of_version = || {
                    allocs
                        .iter()
                        .filter(|a| a.group == group.name && a.job_version == record.version)
                };
                let live = || of_version().filter(|a| a.is_live());
                let promoted = record.promoted.contains(&group.name);
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                DeploymentGroup {
                    name: group.name.clone(),
                    desired: group.count,
                    desired_canaries: policy.canary,
                    canaries: live().filter(|a| a.canary).map(|a| a.id.clone()).collect(),
                    placed: count(live().count()),
                    healthy: count(live().filter(|a| a.healthy == Some(true)).count()),
                    unhealthy: count(of_version().filter(|a| a.healthy == Some(false)).count()),
                    promoted,
                    canary_percent: (!promoted && record.state.is_active())
                        .then(|| policy.canary_percent(group.count)),
                }
            })
            .collect();
        let sum = |f: fn(&DeploymentGroup) -> u32| groups.iter().map(f).sum();
        Some(Deployment {
            job_id: job_id.clone(),
            job: job.spec.name.clone(),
            version: record.version,
            stable_version: record.stable_version,
            state: record.state,
            description: record.description.clone(),
            placed: sum(|g| g.placed),
            healthy: sum(|g| g.healthy),
            unhealthy: sum(|g| g.unhealthy),
            desired: sum(|g| g.desired),
            groups,
            created_at: record.created_at,
            updated_at: record.updated_at,
            progress_deadline_at: record.progress_deadline_at,
            reverted_to: record.reverted_to,
        })
    }

    /// The rollouts under way, with the instances of the new version the leader
    /// has yet to judge.
    pub fn watched_deployments(&self) -> Vec<Watched> {
        let mut watched = Vec::new();
        for job in self
            .deployed_jobs
            .iter()
            .filter_map(|id| self.tables.jobs.get(id))
        {
            let Some(record) = job.deployment.as_ref() else {
                continue;
            };
            if !record.state.is_active() || record.version != job.version {
                continue;
            }
            let mut instances = Vec::new();
            for alloc in self.job_allocs(&job.id) {
                let Some(group) = job.spec.group(&alloc.group) else {
                    continue;
                };
                let Some(policy) = group.update.as_ref() else {
                    continue;
                };
                if alloc.job_version != record.version
                    || alloc.healthy.is_some()
                    || alloc.desired != DesiredState::Run
                {
                    continue;
                }
                let listens = matches!(group.task, aigrid_api::TaskSpec::ModelServer(_));
                instances.push(WatchedInstance {
                    id: alloc.id.clone(),
                    state: alloc.state,
                    reason: alloc.reason.clone(),
                    restarts: alloc.restarts,
                    endpoint: listens.then(|| self.workload_endpoint(alloc)).flatten(),
                    listens,
                    canary: alloc.canary,
                    policy: policy.clone(),
                    since: alloc.created_at.max(record.created_at),
                });
            }
            watched.push(Watched {
                job_id: job.id.clone(),
                version: record.version,
                state: record.state,
                progress_deadline_at: record.progress_deadline_at,
                instances,
            });
        }
        watched
    }

    /// Where the gateway splits requests naming a model while canaries wait: per
    /// rollout, the canaries' model digest, their endpoints, the endpoints of the
    /// instances they would replace, and the canaries' percent.
    pub fn traffic_splits(&self) -> Vec<TrafficSplit> {
        let mut splits = Vec::new();
        for job in self.model_job_records() {
            let Some(record) = job.deployment.as_ref() else {
                continue;
            };
            if !record.state.is_active() || record.version != job.version {
                continue;
            }
            for (group, policy) in updated_groups(&job.spec) {
                let aigrid_api::TaskSpec::ModelServer(task) = &group.task else {
                    continue;
                };
                if record.promoted.contains(&group.name) {
                    continue;
                }
                let mut split = TrafficSplit {
                    digest: task.model.to_ascii_lowercase(),
                    canary: Vec::new(),
                    stable: Vec::new(),
                    percent: policy.canary_percent(group.count),
                };
                for alloc in self.job_allocs(&job.id) {
                    if alloc.group != group.name
                        || alloc.desired != DesiredState::Run
                        || alloc.state != AllocState::Running
                    {
                        continue;
                    }
                    let Some(endpoint) = self.workload_endpoint(alloc) else {
                        continue;
                    };
                    if alloc.canary {
                        split.canary.push(endpoint);
                    } else {
                        split.stable.push(endpoint);
                    }
                }
                splits.push(split);
            }
        }
        splits
    }
}

/// How the gateway splits the requests naming a model while its canaries wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficSplit {
    /// The digest of the model the canaries serve.
    pub digest: String,
    /// The canaries' endpoints.
    pub canary: Vec<String>,
    /// The endpoints of the instances they would replace.
    pub stable: Vec<String>,
    /// The canaries' share of the requests, in percent.
    pub percent: u8,
}
