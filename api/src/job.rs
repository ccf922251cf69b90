//! Job views the control API answers with. Views, unlike the specs and requests
//! users send, accept unknown fields when read back, so an older CLI keeps working
//! against a newer server that adds fields.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::allocation::Allocation;
use crate::ids::{EvalId, JobId};
use crate::spec::{JobKind, JobSpec};
use crate::units::Timestamp;

wire_enum!(
    /// Where a job stands, derived from its allocations.
    JobStatus {
        /// Accepted; no instance is running yet.
        Pending => "pending",
        /// At least one instance is running.
        Running => "running",
        /// A batch or training job whose instances all finished successfully.
        Complete => "complete",
        /// A batch or training job with an instance that failed.
        Failed => "failed",
    }
);

/// One job with its spec and placements, as `GET /api/v1/jobs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Stable across updates of the spec.
    pub id: JobId,
    /// The spec's name, repeated for convenience.
    pub name: String,
    /// 1 on submission, incremented by each update that changes the spec.
    pub version: u64,
    /// Derived from the allocations.
    pub status: JobStatus,
    /// The current spec.
    pub spec: JobSpec,
    /// When the first version was accepted.
    pub submitted_at: Timestamp,
    /// When the spec last changed.
    pub updated_at: Timestamp,
    /// Instances placed on nodes, including ones being stopped.
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// Instances the planner could not place, and why; empty when all fit.
    #[serde(default)]
    pub unplaced: Vec<Unplaced>,
    /// Its latest rollout, for a service whose groups have an `update` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<crate::deployment::Deployment>,
    /// The latest changes of its scaled groups' counts, oldest first, each with
    /// its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale_events: Vec<crate::spec::ScaleEvent>,
}

/// Instances of one group the planner could not place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Unplaced {
    /// The task group.
    pub group: String,
    /// How many of its instances are missing.
    pub count: u32,
    /// Why, in words (`no node with 2 free H100 GPUs in country BE`).
    pub reason: String,
}

/// One line of `GET /api/v1/jobs`: enough to list jobs without their specs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    /// The job's id.
    pub id: JobId,
    /// The job's name.
    pub name: String,
    /// The job's kind.
    pub kind: JobKind,
    /// The job's priority.
    pub priority: u32,
    /// The current version.
    pub version: u64,
    /// Derived from the allocations.
    pub status: JobStatus,
    /// When the first version was accepted.
    pub submitted_at: Timestamp,
    /// When the spec last changed.
    pub updated_at: Timestamp,
    /// Number of task groups.
    pub groups: u32,
    /// Instances the spec asks for, over all groups.
    pub instances: u64,
    /// Instances currently running.
    pub running: u64,
}

/// The answer to `POST /api/v1/jobs`, sent once the submission is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubmitJobResponse {
    /// The job's id; an update keeps the id of the job it updated.
    pub id: JobId,
    /// The version now current.
    pub version: u64,
    /// The evaluation that will place the job.
    pub eval_id: EvalId,
    /// True when a new job was created, false when a live job of the same name was
    /// updated (or resubmitted unchanged).
    pub created: bool,
}

/// The answer to `DELETE /api/v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeleteJobResponse {
    /// The deleted job.
    pub id: JobId,
    /// The evaluation that stops its instances.
    pub eval_id: EvalId,
}

/// One version of a job, as `GET /api/v1/jobs/{id}/versions` lists it: what ran, from
/// when, and who submitted it. Secrets are shown redacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobVersion {
    /// The version number.
    pub version: u64,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// Who submitted it, when a person did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<crate::identity::IdentityId>,
    /// True for the version that runs now.
    #[serde(default)]
    pub current: bool,
    /// Its spec.
    pub spec: JobSpec,
}

/// `POST /api/v1/jobs/{id}/revert`: submit a kept version again, as a new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertJob {
    /// The version to run again.
    pub version: u64,
}
