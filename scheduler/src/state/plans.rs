//! Plans from the scheduler: allocations placed, moved and preempted, each
//! re-checked against the state as it commits; and the snapshot the planner reads.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::{
    AllocId, AllocState, Allocation, DesiredState, EvalId, EvalStatus, EvalTrigger, JobId, JobSpec,
    NodeId, Timestamp, Unplaced, ValidationError,
};
use serde::{Deserialize, Serialize};

use super::*;

/// What one scheduling pass decided for one job, as [`Command::ApplyPlan`] carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPlan {
    /// The job planned.
    pub job_id: JobId,
    /// The version planned for; a plan for an older version is refused.
    pub job_version: u64,
    /// New allocations, each reserving what its group asks for at `job_version`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub place: Vec<NewAllocation>,
    /// Allocations to stop, of this job or (preemption, migration) of others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<AllocId>,
    /// Replacements of other jobs' allocations moved to make room for this job's
    /// placements (their old allocations are in `stop`); part of this plan, so a
    /// move is never committed without what it made room for, nor the reverse.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<MovedAllocation>,
    /// Verdicts on the job's evaluations, applied with the placements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evals: Vec<EvaluationUpdate>,
}

impl JobPlan {
    /// A plan for `job_id` at `job_version` that changes nothing yet.
    pub fn new(job_id: JobId, job_version: u64) -> Self {
        Self {
            job_id,
            job_version,
            place: Vec::new(),
            stop: Vec::new(),
            moves: Vec::new(),
            evals: Vec::new(),
        }
    }
}

/// An instance of another job moved by a [`JobPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedAllocation {
    /// The moved instance's job.
    pub job_id: JobId,
    /// That job's version, which must still be current.
    pub job_version: u64,
    /// Where it goes.
    pub alloc: NewAllocation,
}

/// A placement in a [`JobPlan`]: the instance, where, and on which GPUs. Its
/// resources are the group's, so the log does not repeat them per instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAllocation {
    /// Unique over the cluster's life.
    pub id: AllocId,
    /// The task group.
    pub group: String,
    /// The instance index.
    pub index: u32,
    /// The node chosen.
    pub node: NodeId,
    /// The GPUs reserved, by uuid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// The allocation it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AllocId>,
    /// Reschedules in a row so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reschedules: u32,
    /// A canary of the job's rollout, placed beside the running instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl NewAllocation {
    /// A placement as the plan carries it, under a fresh id.
    pub fn new(
        placement: &crate::planner::Placement,
        previous: Option<AllocId>,
        reschedules: u32,
    ) -> Self {
        Self {
            id: crate::new_id(AllocId::new),
            group: placement.group.clone(),
            index: placement.index,
            node: placement.node_id.clone(),
            gpus: placement.gpus.clone(),
            previous,
            reschedules,
            canary: false,
        }
    }

    /// The allocation this placement becomes: pending, wanted, reserving what
    /// `group` asks for.
    pub fn to_allocation(
        &self,
        job_id: &JobId,
        job_version: u64,
        group: &aigrid_api::TaskGroup,
        at: Timestamp,
    ) -> Allocation {
        Allocation {
            id: self.id.clone(),
            job_id: job_id.clone(),
            job_version,
            node_id: self.node.clone(),
            group: self.group.clone(),
            index: self.index,
            resources: group.resources.clone(),
            gpus: self.gpus.clone(),
            previous: self.previous.clone(),
            reschedules: self.reschedules,
            state: AllocState::Pending,
            desired: DesiredState::Run,
            reason: None,
            restarts: 0,
            limits: None,
            port: None,
            endpoint: None,
            canary: self.canary,
            healthy: None,
            created_at: at,
            updated_at: at,
        }
    }
}

impl ClusterState {
    /// What the planner needs to know: every node, what live allocations hold
    /// and the ports unfinished ones hold.
    pub fn plan_snapshot(&self) -> crate::planner::PlanSnapshot {
        crate::planner::PlanSnapshot::with_jobs(
            self.tables.nodes.values(),
            // Unfinished rather than live: one asked to stop still holds its port.
            self.tables
                .allocations
                .values()
                .filter(|a| !a.state.is_terminal()),
            // A hash lookup per allocation rather than a walk of the job map.
            {
                let mut specs: std::collections::HashMap<JobId, Option<&JobSpec>> =
                    std::collections::HashMap::new();
                move |job_id: &JobId, group: &str| {
                    let spec = match specs.get(job_id) {
                        Some(spec) => *spec,
                        None => {
                            let spec = self.tables.jobs.get(job_id).map(|j| &j.spec);
                            specs.insert(job_id.clone(), spec);
                            spec
                        }
                    };
                    spec.map(|spec| crate::planner::GroupInfo::of(spec, group))
                }
            },
        )
    }

    /// Every live allocation (wanted and not finished), ordered by id.
    pub fn live_allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.tables.allocations.values().filter(|a| a.is_live())
    }

    /// The spec and version of a live job, without building its view.
    pub fn job_spec(&self, id: &JobId) -> Option<(&JobSpec, u64)> {
        self.tables.jobs.get(id).map(|j| (&j.spec, j.version))
    }

    /// Changes whenever capacity may have appeared or been freed; see the field.
    pub fn capacity_epoch(&self) -> u64 {
        self.capacity_epoch
    }

    pub(super) fn apply_plan(&mut self, index: u64, plans: Vec<JobPlan>, at: Timestamp) -> Applied {
        let (mut placed, mut stopped, mut preempted_allocs, mut migrated) = (0, 0, 0, 0);
        let mut refused = Vec::new();
        let mut preempted = BTreeSet::new();
        for plan in plans {
            let result = self
                .plan_allocations(&plan, at)
                .and_then(|mut allocations| {
                    self.assign_ports(&mut allocations)?;
                    self.check_allocations(&allocations).map(|()| allocations)
                });
            match result {
                Ok(allocations) => {
                    placed += plan.place.len() + plan.moves.len();
                    stopped += plan.stop.len();
                    // Other jobs' allocations stopped: moved elsewhere, or preempted.
                    let others = plan
                        .stop
                        .iter()
                        .filter(|id| {
                            self.tables
                                .allocations
                                .get(*id)
                                .is_some_and(|a| a.job_id != plan.job_id)
                        })
                        .count();
                    migrated += plan.moves.len();
                    preempted_allocs += others.saturating_sub(plan.moves.len());
                    preempted.extend(self.write_allocations(allocations, at));
                    for u in plan.evals {
                        let _ = self.update_evaluation(u.eval_id, u.status, u.unplaced, at);
                    }
                }
                Err(e) => {
                    for u in plan.evals {
                        let unplaced = vec![Unplaced {
                            group: String::new(),
                            count: 0,
                            reason: format!("the plan was refused: {e}"),
                        }];
                        let _ =
                            self.update_evaluation(u.eval_id, EvalStatus::Blocked, unplaced, at);
                    }
                    refused.push((plan.job_id, e.to_string()));
                }
            }
        }
        let eval_ids = self.requeue_preempted(index, preempted, at);
        Applied::PlanApplied {
            placed,
            stopped,
            preempted: preempted_allocs,
            migrated,
            refused,
            eval_ids,
        }
    }

    /// The allocations a job plan writes: its placements with the group's
    /// resources, and its stops.
    fn plan_allocations(
        &self,
        plan: &JobPlan,
        at: Timestamp,
    ) -> Result<Vec<Allocation>, StateError> {
        let job = self
            .tables
            .jobs
            .get(&plan.job_id)
            .ok_or_else(|| StateError::not_found(ObjectKind::Job, &plan.job_id))?;
        if plan.job_version != job.version {
            return Err(StateError::conflict(format!(
                "the plan is for version {} of job `{}`, now at version {}",
                plan.job_version, job.spec.name, job.version
            )));
        }
        self.check_not_held(&plan.job_id, !plan.place.is_empty())?;
        let mut allocations =
            Vec::with_capacity(plan.place.len() + plan.stop.len() + plan.moves.len());
        for moved in &plan.moves {
            let other = self
                .tables
                .jobs
                .get(&moved.job_id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Job, &moved.job_id))?;
            if moved.job_version != other.version {
                return Err(StateError::conflict(format!(
                    "a move is for version {} of job `{}`, now at version {}",
                    moved.job_version, other.spec.name, other.version
                )));
            }
            let group = other.spec.group(&moved.alloc.group).ok_or_else(|| {
                ValidationError::new(
                    "moves.alloc.group",
                    format!(
                        "job `{}` has no group `{}`",
                        other.spec.name, moved.alloc.group
                    ),
                )
            })?;
            allocations.push(moved.alloc.to_allocation(
                &moved.job_id,
                moved.job_version,
                group,
                at,
            ));
        }
        for id in &plan.stop {
            let mut alloc = self
                .tables
                .allocations
                .get(id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Allocation, id))?
                .clone();
            alloc.desired = DesiredState::Stop;
            allocations.push(alloc);
        }
        for new in &plan.place {
            let group = job.spec.group(&new.group).ok_or_else(|| {
                ValidationError::new(
                    "place.group",
                    format!("job `{}` has no group `{}`", job.spec.name, new.group),
                )
            })?;
            if self.tables.allocations.contains_key(&new.id) {
                return Err(StateError::conflict(format!(
                    "allocation id `{}` is already used",
                    new.id
                )));
            }
            allocations.push(new.to_allocation(&plan.job_id, plan.job_version, group, at));
        }
        self.check_one_per_instance(&allocations)?;
        Ok(allocations)
    }

    /// Refuses a plan that would leave two live allocations for one instance (job,
    /// group, index): a plan made twice, say by a leader that could not tell its
    /// first commit went through, places nothing twice.
    fn check_one_per_instance(&self, allocations: &[Allocation]) -> Result<(), StateError> {
        let rewritten: BTreeSet<&AllocId> = allocations.iter().map(|a| &a.id).collect();
        let jobs: BTreeSet<&JobId> = allocations
            .iter()
            .filter(|a| a.is_live())
            .map(|a| &a.job_id)
            .collect();
        // A canary runs beside the instance of its index, so it is an instance of
        // its own.
        let mut instances: BTreeSet<(&JobId, &str, u32, bool)> = BTreeSet::new();
        for job_id in jobs {
            for alloc in self.job_allocs(job_id) {
                if alloc.is_live() && !rewritten.contains(&alloc.id) {
                    instances.insert((
                        &alloc.job_id,
                        alloc.group.as_str(),
                        alloc.index,
                        alloc.canary,
                    ));
                }
            }
        }
        for alloc in allocations.iter().filter(|a| a.is_live()) {
            if !instances.insert((
                &alloc.job_id,
                alloc.group.as_str(),
                alloc.index,
                alloc.canary,
            )) {
                return Err(StateError::conflict(format!(
                    "instance {}[{}] of job `{}` already has a live allocation",
                    alloc.group, alloc.index, alloc.job_id
                )));
            }
        }
        Ok(())
    }

    pub(super) fn upsert_allocations(
        &mut self,
        index: u64,
        mut allocations: Vec<Allocation>,
        at: Timestamp,
    ) -> CommandOutput {
        self.assign_ports(&mut allocations)?;
        self.check_allocations(&allocations)?;
        self.check_one_per_instance(&allocations)?;
        let count = allocations.len();
        let stopped = self.write_allocations(allocations, at);
        let eval_ids = self.requeue_preempted(index, stopped, at);
        Ok(Applied::AllocationsUpserted { count, eval_ids })
    }

    /// Jobs among `stopped` whose wanted instances were stopped without a
    /// replacement were preempted: they go back in the queue, without backoff.
    fn requeue_preempted(
        &mut self,
        index: u64,
        stopped: BTreeSet<JobId>,
        at: Timestamp,
    ) -> Vec<EvalId> {
        let preempted = stopped
            .into_iter()
            .filter(|job_id| self.missing_instances(job_id))
            .map(|job_id| (job_id, 0))
            .collect();
        self.node_update_evals(index, preempted, EvalTrigger::Preemption, at)
    }

    /// Writes checked allocations; answers the jobs that had a live allocation
    /// stopped.
    fn write_allocations(
        &mut self,
        allocations: Vec<Allocation>,
        at: Timestamp,
    ) -> BTreeSet<JobId> {
        let mut stopped: BTreeSet<JobId> = BTreeSet::new();
        for mut alloc in allocations {
            alloc.updated_at = at;
            alloc.created_at = at;
            if let Some(old) = self.tables.allocations.get(&alloc.id) {
                alloc.created_at = old.created_at;
                if old.state.is_terminal() {
                    alloc.state = old.state;
                }
                if old.is_live() && !alloc.is_live() {
                    stopped.insert(alloc.job_id.clone());
                }
            }
            // A replacement takes over from a finished allocation: forget it.
            if let Some(previous) = &alloc.previous {
                if self
                    .tables
                    .allocations
                    .get(previous)
                    .is_some_and(|p| p.state.is_terminal() && p.job_id == alloc.job_id)
                {
                    self.drop_alloc(previous);
                }
            }
            if alloc.desired == DesiredState::Stop && alloc.state.is_terminal() {
                self.drop_alloc(&alloc.id);
            } else {
                self.put_alloc(alloc);
            }
        }
        stopped
    }

    /// True when some instance the job's spec wants has no live allocation.
    fn missing_instances(&self, job_id: &JobId) -> bool {
        let Some(job) = self.tables.jobs.get(job_id) else {
            return false;
        };
        let live: BTreeSet<(&str, u32)> = self
            .job_allocs(job_id)
            .into_iter()
            .filter(|a| a.is_live())
            .map(|a| (a.group.as_str(), a.index))
            .collect();
        job.spec
            .groups
            .iter()
            .any(|g| (0..g.count).any(|i| !live.contains(&(g.name.as_str(), i))))
    }

    /// Every rule an upsert must pass, checked before anything is written. Costs
    /// what the upsert carries, never a scan of every allocation.
    fn check_allocations(&self, allocations: &[Allocation]) -> Result<(), StateError> {
        let t = &self.tables;
        let incoming: BTreeSet<&AllocId> = allocations.iter().map(|a| &a.id).collect();
        if incoming.len() != allocations.len() {
            return Err(
                ValidationError::new("allocations", "an allocation id appears twice").into(),
            );
        }
        // What the touched nodes hold once the rewritten allocations let go of theirs;
        // the incoming ones are then added one by one.
        let mut held: BTreeMap<&NodeId, Held> = BTreeMap::new();
        for alloc in allocations {
            if !held.contains_key(&alloc.node_id) {
                let current = self.index.held.get(&alloc.node_id).cloned();
                held.insert(&alloc.node_id, current.unwrap_or_default());
            }
        }
        for alloc in allocations {
            if let Some(old) = t.allocations.get(&alloc.id).filter(|o| o.is_live()) {
                if let Some(h) = held.get_mut(&old.node_id) {
                    h.remove(old);
                }
            }
        }

        for (i, alloc) in allocations.iter().enumerate() {
            let field = |name: &str| format!("allocations[{i}].{name}");
            if alloc.id.as_str().is_empty() {
                return Err(ValidationError::new(field("id"), "must not be empty").into());
            }
            let node = t
                .nodes
                .get(&alloc.node_id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Node, &alloc.node_id))?;
            let old = t.allocations.get(&alloc.id);
            if let Some(old) = old {
                if (&old.job_id, &old.node_id, &old.group, old.index)
                    != (&alloc.job_id, &alloc.node_id, &alloc.group, alloc.index)
                {
                    return Err(StateError::conflict(format!(
                        "allocation `{}` cannot move to another job, node, group or index",
                        alloc.id
                    )));
                }
            }
            let mut own = BTreeSet::new();
            for gpu in &alloc.gpus {
                if !node.resources.gpus.iter().any(|g| &g.uuid == gpu) {
                    return Err(ValidationError::new(
                        field("gpus"),
                        format!("node `{}` has no GPU `{gpu}`", node.id),
                    )
                    .into());
                }
                if !own.insert(gpu.as_str()) {
                    return Err(ValidationError::new(
                        field("gpus"),
                        format!("GPU `{gpu}` is listed twice"),
                    )
                    .into());
                }
            }
            let live = alloc.is_live() && !old.is_some_and(|o| o.state.is_terminal());
            if !live {
                continue;
            }
            let job = t
                .jobs
                .get(&alloc.job_id)
                .ok_or_else(|| StateError::not_found(ObjectKind::Job, &alloc.job_id))?;
            let Some(group) = job.spec.group(&alloc.group) else {
                return Err(ValidationError::new(
                    field("group"),
                    format!("job `{}` has no group `{}`", job.spec.name, alloc.group),
                )
                .into());
            };
            if alloc.index >= group.count {
                return Err(ValidationError::new(
                    field("index"),
                    format!("group `{}` has {} instances", group.name, group.count),
                )
                .into());
            }
            if alloc.job_version == 0 || alloc.job_version > job.version {
                return Err(ValidationError::new(
                    field("job_version"),
                    format!("must be between 1 and the job's version {}", job.version),
                )
                .into());
            }
            let h = held.get_mut(&alloc.node_id).expect("every node was added");
            if old.is_none() {
                if !node.status.is_schedulable() {
                    return Err(StateError::conflict(format!(
                        "node `{}` is {} and takes no new allocations",
                        node.id, node.status
                    )));
                }
                let gpus_wanted = match &alloc.resources.gpus {
                    None => 0,
                    Some(g) if g.memory_slice_mib.is_some() => 1,
                    Some(g) => g.count,
                };
                if u32::try_from(alloc.gpus.len()).ok() != Some(gpus_wanted) {
                    return Err(ValidationError::new(
                        field("gpus"),
                        format!("must name {gpus_wanted} GPUs"),
                    )
                    .into());
                }
                let (cpu, memory) = (alloc.resources.cpu_millis, alloc.resources.memory_mib);
                if h.cpu + cpu.get() > node.resources.cpu_millis.get() {
                    return Err(StateError::conflict(format!(
                        "node `{}` has not {cpu} CPU millis free",
                        node.id
                    )));
                }
                if h.memory + memory.get() > node.resources.memory_mib.get() {
                    return Err(StateError::conflict(format!(
                        "node `{}` has not {memory} MiB of memory free",
                        node.id
                    )));
                }
            }
            let slice = slice_of(alloc);
            for uuid in &alloc.gpus {
                let device = node
                    .resources
                    .gpus
                    .iter()
                    .find(|g| &g.uuid == uuid)
                    .expect("checked above");
                if !device.healthy {
                    return Err(StateError::conflict(format!(
                        "GPU `{uuid}` on node `{}` is unhealthy",
                        node.id
                    )));
                }
                let Some(gpu) = h.gpus.get(uuid) else {
                    continue;
                };
                if let Some(other) = &gpu.whole {
                    return Err(StateError::conflict(format!(
                        "GPU `{uuid}` on node `{}` is already held by allocation `{other}`",
                        node.id
                    )));
                }
                match slice {
                    None if gpu.slices > 0 => {
                        return Err(StateError::conflict(format!(
                            "GPU `{uuid}` on node `{}` is shared by {} allocations",
                            node.id, gpu.slices
                        )));
                    }
                    Some(mib) if gpu.sliced + mib > device.memory_mib.get() => {
                        return Err(StateError::conflict(format!(
                            "GPU `{uuid}` on node `{}` has not {mib} MiB free to share",
                            node.id
                        )));
                    }
                    _ => {}
                }
            }
            h.add(alloc);
        }
        Ok(())
    }
}
