//! Evaluations: a recorded reason to run the planner for one job. Creating one in the
//! same command as the change that needs it means no change is committed without the
//! work to reconcile it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::{EvalId, JobId};
use crate::units::Timestamp;

wire_enum!(
    /// What caused an evaluation.
    EvalTrigger {
        /// A new job was submitted.
        JobSubmit => "job_submit",
        /// A live job's spec changed.
        JobUpdate => "job_update",
        /// A job was deleted; its instances must stop.
        JobDelete => "job_delete",
        /// A node went down, started draining or lost a GPU, displacing the job's
        /// instances.
        NodeUpdate => "node_update",
        /// Instances were evicted for a higher-priority job and must be placed again.
        Preemption => "preemption",
        /// An instance failed on its node and is rescheduled.
        AllocFailed => "alloc_failed",
        /// A rollout moved: instances judged, canaries promoted, a pause lifted.
        Deployment => "deployment",
        /// The job's circle's treasury was spent or refilled: its work is held,
        /// stopped, or may be placed again.
        Treasury => "treasury",
        /// A scaled group's count changed: instances are added or stopped.
        Scale => "scale",
    }
);

wire_enum!(
    /// Progress of an evaluation.
    EvalStatus {
        /// Waiting for the planner.
        Pending => "pending",
        /// Planned; its outcome is committed.
        Complete => "complete",
        /// Planned, but some instances did not fit; retried when capacity changes.
        Blocked => "blocked",
    }
);

/// A request to the planner to reconcile one job with the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Evaluation {
    /// Unique; also the idempotency key of the command that created it.
    pub id: EvalId,
    /// The job to reconcile.
    pub job_id: JobId,
    /// The job's version when the evaluation was created.
    pub job_version: u64,
    /// Why it was created.
    pub trigger: EvalTrigger,
    /// Its progress.
    pub status: EvalStatus,
    /// When it was created.
    pub created_at: Timestamp,
    /// When its status last changed.
    pub updated_at: Timestamp,
    /// Not planned before this time: the backoff before rescheduling instances that
    /// failed or were lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_until: Option<Timestamp>,
}
