//! Allocations: agents' reports, logs, losses when a node or GPU goes, and the
//! reads of allocations.

use std::collections::BTreeMap;

use aigrid_api::{
    AllocId, AllocState, Allocation, AllocationLogs, AllocationReport, DesiredState, EvalTrigger,
    JobId, JobKind, NodeId, Timestamp, ValidationError,
};

use super::*;

impl ClusterState {
    /// The output tails shipped for an allocation.
    pub fn allocation_logs(&self, id: &AllocId) -> Option<AllocationLogs> {
        let alloc = self.tables.allocations.get(id)?;
        let record = self.tables.logs.get(id);
        Some(AllocationLogs {
            id: id.clone(),
            node_id: alloc.node_id.clone(),
            stdout: record.map(|r| r.stdout.clone()).unwrap_or_default(),
            stderr: record.map(|r| r.stderr.clone()).unwrap_or_default(),
            updated_at: record.map(|r| r.updated_at),
        })
    }

    /// Every allocation kept, ordered by id.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.tables.allocations.values().cloned().collect()
    }

    /// The allocation with this id.
    pub fn allocation(&self, id: &AllocId) -> Option<Allocation> {
        self.tables.allocations.get(id).cloned()
    }

    /// The allocations on one node, ordered by id: what its agent should run or stop.
    pub fn node_allocations(&self, node_id: &NodeId) -> Vec<Allocation> {
        self.index
            .by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tables.allocations.get(id))
            .cloned()
            .collect()
    }

    /// Checks that a node reports only its own allocations.
    pub(super) fn check_reports(
        &self,
        node_id: &NodeId,
        reports: &[AllocationReport],
    ) -> Result<(), StateError> {
        for (i, report) in reports.iter().enumerate() {
            if let Some(endpoint) = &report.endpoint {
                aigrid_api::allocation::check_endpoint(endpoint).map_err(|e| {
                    ValidationError::new(format!("allocations[{i}].endpoint"), e.message)
                })?;
            }
            if let Some(alloc) = self.tables.allocations.get(&report.id) {
                if &alloc.node_id != node_id {
                    return Err(StateError::conflict(format!(
                        "allocation `{}` is not on node `{node_id}`",
                        report.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Records reported states; answers how many allocations changed state and
    /// the services whose wanted instances failed (to be rescheduled), each with
    /// the fewest reschedules among them; and the jobs an update rolls through
    /// whose new instances started, so the next ones are replaced.
    pub(super) fn apply_reports(
        &mut self,
        reports: Vec<AllocationReport>,
        at: Timestamp,
    ) -> (usize, BTreeMap<JobId, u32>, BTreeMap<JobId, u32>) {
        let mut changed = 0;
        let mut failed: BTreeMap<JobId, u32> = BTreeMap::new();
        let mut rolling: BTreeMap<JobId, u32> = BTreeMap::new();
        for report in reports {
            let report = self.kept_report(report);
            let Some(alloc) = self.tables.allocations.get(&report.id) else {
                continue;
            };
            if alloc.state.is_terminal() || !report.differs_from(alloc) {
                continue;
            }
            changed += 1;
            let mut alloc = alloc.clone();
            alloc.state = report.state;
            alloc.reason = report.reason.map(|mut r| {
                truncate_at_char(&mut r, aigrid_api::allocation::MAX_REASON_LEN);
                r
            });
            alloc.restarts = report.restarts;
            alloc.limits = report.limits;
            alloc.endpoint = report.endpoint;
            alloc.updated_at = at;
            if alloc.desired == DesiredState::Stop && alloc.state.is_terminal() {
                self.drop_alloc(&report.id);
                continue;
            }
            let service = self
                .tables
                .jobs
                .get(&alloc.job_id)
                .is_some_and(|j| j.spec.kind == JobKind::Service);
            if service && matches!(alloc.state, AllocState::Failed | AllocState::Lost) {
                let fewest = failed.entry(alloc.job_id.clone()).or_insert(u32::MAX);
                *fewest = (*fewest).min(alloc.reschedules);
            }
            if alloc.state == AllocState::Running && self.rolls_through(&alloc) {
                rolling.insert(alloc.job_id.clone(), 0);
            }
            self.put_alloc(alloc);
        }
        (changed, failed, rolling)
    }

    /// Whether `alloc`, of its job's current version, runs beside live instances
    /// of an older one: an update is rolling through the job.
    fn rolls_through(&self, alloc: &Allocation) -> bool {
        let Some(version) = self.tables.jobs.get(&alloc.job_id).map(|j| j.version) else {
            return false;
        };
        alloc.job_version == version
            && self
                .job_allocs(&alloc.job_id)
                .iter()
                .any(|a| a.is_live() && a.job_version < version)
    }

    pub(super) fn report_allocations(
        &mut self,
        index: u64,
        node_id: NodeId,
        reports: Vec<AllocationReport>,
        at: Timestamp,
    ) -> CommandOutput {
        if !self.tables.nodes.contains_key(&node_id) {
            return Err(StateError::not_found(ObjectKind::Node, &node_id));
        }
        self.check_reports(&node_id, &reports)?;
        let (changed, failed, rolling) = self.apply_reports(reports, at);
        if let Some(node) = self.tables.nodes.get_mut(&node_id) {
            node.last_seen = node.last_seen.max(at);
        }
        let mut eval_ids = self.node_update_evals(index, failed, EvalTrigger::AllocFailed, at);
        eval_ids.extend(self.node_update_evals(index, rolling, EvalTrigger::JobUpdate, at));
        Ok(Applied::AllocationsReported {
            updated: changed,
            eval_ids,
        })
    }

    /// Marks the unfinished allocations on `node_id` that `gone` selects as lost
    /// (dropping those already asked to stop) and returns the jobs that lost one,
    /// each with the fewest reschedules among its lost instances.
    pub(super) fn lose_allocations(
        &mut self,
        node_id: &NodeId,
        at: Timestamp,
        gone: impl Fn(&Allocation) -> bool,
    ) -> BTreeMap<JobId, u32> {
        let mut jobs: BTreeMap<JobId, u32> = BTreeMap::new();
        for id in self.node_alloc_ids(node_id) {
            let Some(alloc) = self.tables.allocations.get(&id) else {
                continue;
            };
            if alloc.state.is_terminal() || !gone(alloc) {
                continue;
            }
            if alloc.desired == DesiredState::Stop {
                self.drop_alloc(&id);
                continue;
            }
            let mut alloc = alloc.clone();
            alloc.state = AllocState::Lost;
            alloc.updated_at = at;
            let fewest = jobs.entry(alloc.job_id.clone()).or_insert(u32::MAX);
            *fewest = (*fewest).min(alloc.reschedules);
            self.put_alloc(alloc);
        }
        jobs
    }
}

/// What of an allocation its node's agent acts on: whether it is in the node's
/// assignments at all (not finished), what is wanted of it, and which job version
/// it runs. A change to any of these wakes the agent's long poll.
pub(super) fn assigned(alloc: &Allocation) -> (bool, DesiredState, u64) {
    (!alloc.state.is_terminal(), alloc.desired, alloc.job_version)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
