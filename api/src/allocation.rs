//! Allocations: one instance of a task group bound to a node. The planner writes
//! what should run (`desired`); the node's agent reports what does run (`state`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ids::{AllocId, JobId, NodeId};
use crate::spec::Resources;
use crate::units::Timestamp;

wire_enum!(
    /// What an allocation's process is doing, as last reported by its node.
    AllocState {
        /// Placed; the agent has not started it yet.
        Pending => "pending",
        /// Running on the node.
        Running => "running",
        /// Exited successfully.
        Complete => "complete",
        /// Exited with an error or could not start.
        Failed => "failed",
        /// Its node went down; what happened to the process is unknown.
        Lost => "lost",
        /// Stopped on request.
        Stopped => "stopped",
    }
);

impl AllocState {
    /// True once the process is gone for good: its resources are free and the state
    /// never changes again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Complete | Self::Failed | Self::Lost | Self::Stopped
        )
    }
}

wire_enum!(
    /// What the control plane wants an allocation to do.
    DesiredState {
        /// Keep it running.
        Run => "run",
        /// Stop it; the agent stops the process and reports `stopped`.
        Stop => "stop",
    }
);

/// One instance of a task group on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Allocation {
    /// Unique over the cluster's life.
    pub id: AllocId,
    /// The job it belongs to.
    pub job_id: JobId,
    /// The job version it was placed for, so an update can tell stale instances.
    pub job_version: u64,
    /// The node it runs on.
    pub node_id: NodeId,
    /// The task group it is an instance of.
    pub group: String,
    /// Its index within the group, `0..count`.
    pub index: u32,
    /// What it reserves on the node: the group's request when it was placed.
    pub resources: Resources,
    /// UUIDs of the node's GPUs reserved for it: exclusively, or for a request with
    /// a memory slice, the one shared GPU the slice is carved from.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// The allocation this one replaces (rescheduled after a failure, migrated by a
    /// drain or the rebalancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AllocId>,
    /// How many times this instance was rescheduled after failing or being lost in
    /// a row; the delay before the next reschedule doubles with each.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reschedules: u32,
    /// What the node last reported.
    pub state: AllocState,
    /// What the control plane wants.
    pub desired: DesiredState,
    /// When it was placed.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Allocation {
    /// True while it holds its node's resources: wanted and not finished.
    pub fn is_live(&self) -> bool {
        self.desired == DesiredState::Run && !self.state.is_terminal()
    }
}

/// An agent's report of one allocation's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocationReport {
    /// The allocation.
    pub id: AllocId,
    /// Its state on the node.
    pub state: AllocState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = AllocState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(terminal, ["complete", "failed", "lost", "stopped"]);
    }
}
