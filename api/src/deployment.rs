//! Deployments: the rollout of one version of a service whose groups have an
//! `update` block, as the control API shows it and as people steer it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::{AllocId, JobId};
use crate::units::Timestamp;

wire_enum!(
    /// Where a rollout stands.
    DeploymentState {
        /// Placing canaries or replacing instances batch by batch.
        Running => "running",
        /// Held by a person: nothing new is replaced until it is resumed.
        Paused => "paused",
        /// Every canary is healthy; waiting for a promotion.
        AwaitingPromotion => "awaiting_promotion",
        /// Every instance runs the new version and is healthy.
        Successful => "successful",
        /// An instance turned unhealthy, or the progress deadline passed; the
        /// instances replaced so far stay as they are.
        Failed => "failed",
        /// Failed or aborted, and the last successful version runs again.
        Reverted => "reverted",
        /// A newer version of the job took its place.
        Cancelled => "cancelled",
    }
);

impl DeploymentState {
    /// True while the rollout may still move: running, paused or awaiting promotion.
    pub const fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::AwaitingPromotion)
    }
}

wire_enum!(
    /// What a person may ask of a rollout.
    DeploymentAction {
        /// Stop replacing instances until resumed.
        Pause => "pause",
        /// Go on after a pause.
        Resume => "resume",
        /// Let the healthy canaries replace their instances and the rest roll on; a
        /// guarded change (`rollout.promote`) when the job's circle says so.
        Promote => "promote",
        /// Stop the rollout and run the last successful version again.
        Abort => "abort",
    }
);

/// One group's part in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeploymentGroup {
    /// The task group.
    pub name: String,
    /// Instances the new version asks for.
    pub desired: u32,
    /// Canaries the update policy asks for.
    pub desired_canaries: u32,
    /// The live canaries.
    pub canaries: Vec<AllocId>,
    /// Live instances of the new version, canaries included.
    pub placed: u32,
    /// Of those, the ones judged healthy.
    pub healthy: u32,
    /// Instances of the new version judged unhealthy.
    pub unhealthy: u32,
    /// Whether the canaries were promoted (true when there are none).
    pub promoted: bool,
    /// While the canaries wait, the percent of requests naming the model that
    /// the gateway sends them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
}

/// The latest rollout of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    /// The job.
    pub job_id: JobId,
    /// Its name.
    pub job: String,
    /// The version rolling out.
    pub version: u64,
    /// The last version that deployed successfully: what a revert runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_version: Option<u64>,
    /// Where it stands.
    pub state: DeploymentState,
    /// Why it is where it stands, in words.
    pub description: String,
    /// Live instances of the new version over all groups, canaries included.
    pub placed: u32,
    /// Of those, the healthy ones.
    pub healthy: u32,
    /// Instances of the new version judged unhealthy.
    pub unhealthy: u32,
    /// Instances the new version asks for over all groups.
    pub desired: u32,
    /// Per group.
    pub groups: Vec<DeploymentGroup>,
    /// When it started.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it fails unless another instance turns healthy first (running only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline_at: Option<Timestamp>,
    /// The version a revert made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_to: Option<u64>,
}

/// `POST /api/v1/jobs/{id}/deployment/{action}`: what a person asks of a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SteerDeployment {
    /// The version the person means; refused (409) when another one is rolling
    /// out by now. Absent, the latest rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}
