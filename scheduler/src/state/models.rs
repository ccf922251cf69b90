//! Reads of the model registry held in the state.

use aigrid_api::{AllocState, Allocation, DesiredState, ModelSummary};

use super::*;

impl ClusterState {
    /// Registered models, newest first; only those named `name` when given.
    pub fn models(&self, name: Option<&str>) -> Vec<ModelSummary> {
        self.tables.models.list(name)
    }

    /// The models pushed under `name`, newest first: what a deployment naming a
    /// model rather than a digest resolves to (the first).
    pub fn models_named(&self, name: &str) -> Vec<ModelSummary> {
        self.tables.models.list(Some(name))
    }

    /// The model with this digest: summary, signed manifest and locations.
    pub fn model(&self, digest: &str) -> Option<crate::models::ModelDetail> {
        self.tables.models.detail(digest)
    }

    /// The model table, for the checks handlers run before proposing.
    pub(crate) fn models_table(&self) -> &crate::models::Models {
        &self.tables.models
    }

    /// Every registered model's digest, name and registration time, without building
    /// summaries: what the `/v1` gateway resolves request names against.
    pub fn model_names(&self) -> Vec<crate::models::ModelName> {
        self.tables.models.names()
    }

    /// The model servers the `/v1` gateway may route to, as (model digest,
    /// allocation): wanted, running instances of `model-server` groups that report
    /// an endpoint, at their job's current version. Instances of an older version
    /// are left out, since the state keeps only the current task and so does not
    /// know which model they serve. Costs the live jobs plus their model servers'
    /// allocations, never a scan of every allocation.
    pub fn model_servers(&self) -> Vec<(&str, &Allocation)> {
        let mut found = Vec::new();
        for job in self
            .job_names
            .values()
            .filter_map(|id| self.tables.jobs.get(id))
        {
            for group in &job.spec.groups {
                let aigrid_api::TaskSpec::ModelServer(task) = &group.task else {
                    continue;
                };
                found.extend(
                    self.job_allocs(&job.id)
                        .into_iter()
                        .filter(|a| {
                            a.group == group.name
                                && a.job_version == job.version
                                && a.desired == DesiredState::Run
                                && a.state == AllocState::Running
                                && a.endpoint.is_some()
                        })
                        .map(|a| (task.model.as_str(), a)),
                );
            }
        }
        found
    }
}
