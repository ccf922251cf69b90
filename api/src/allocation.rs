//! Allocations: one instance of a task group bound to a node. The planner writes
//! what should run (`desired`); the node's agent reports what does run (`state`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
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
    /// Why it failed or is not running, as its node reported it
    /// (`digest_mismatch: ...`, `exited with code 3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many times its node restarted the process in place.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Whether its node enforces its CPU and memory limits (cgroup v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsEnforcement>,
    /// The port on its node the workload listens on, for workloads that listen
    /// (model servers): assigned by the control plane from the node's
    /// [`crate::node::PortRange`] when the allocation is placed, never one that
    /// another unfinished allocation on the node holds, and kept for its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Where the workload serves, as its node reported it (`http://10.0.0.7:20417`),
    /// kept only when it is the node's address and the assigned [`Allocation::port`].
    /// The `/v1` gateway never reads it: it routes to the node's recorded address
    /// and the assigned port alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// What the control plane wants.
    pub desired: DesiredState,
    /// A canary of a rollout: a new-version instance started beside the running
    /// one of its index, which it replaces once the rollout is promoted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// Its rollout's verdict: healthy (ran, and answered ready, for the policy's
    /// minimum time) or not (failed, or not healthy by the deadline). Absent
    /// until judged, and for instances not under a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
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

wire_enum!(
    /// Whether a node holds an allocation to its CPU and memory reservation.
    LimitsEnforcement {
        /// A cgroup v2 group with `memory.max` and `cpu.max` contains the process.
        Enforced => "enforced",
        /// The node has no usable cgroup v2 controllers; the reservation is only
        /// bookkeeping there.
        NotEnforced => "not_enforced",
    }
);

/// An agent's report of one allocation's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocationReport {
    /// The allocation.
    pub id: AllocId,
    /// Its state on the node.
    pub state: AllocState,
    /// Why it failed or is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many times the process was restarted in place.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Whether its limits are enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsEnforcement>,
    /// Where it serves (`http://host:port`), for workloads that listen; see
    /// [`check_endpoint`] for what is accepted. Kept only when it names the
    /// node's recorded address and the allocation's assigned port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl AllocationReport {
    /// A report of `state` alone.
    pub fn new(id: AllocId, state: AllocState) -> Self {
        AllocationReport {
            id,
            state,
            reason: None,
            restarts: 0,
            limits: None,
            endpoint: None,
        }
    }

    /// True when it says something `alloc` does not already record.
    pub fn differs_from(&self, alloc: &Allocation) -> bool {
        self.state != alloc.state
            || self.reason != alloc.reason
            || self.restarts != alloc.restarts
            || self.limits != alloc.limits
            || self.endpoint != alloc.endpoint
    }
}

/// Longest failure reason kept; agents' longer ones are cut.
pub const MAX_REASON_LEN: usize = 1024;

/// Longest endpoint an agent may report.
pub const MAX_ENDPOINT_LEN: usize = 256;

/// Checks a reported endpoint: `http://` or `https://`, then `host:port` and nothing
/// else (no path, query, user info or whitespace), a port from 1 to 65535, at most
/// [`MAX_ENDPOINT_LEN`] bytes. The servers send requests there, so anything that
/// could make them talk to a different place than it says is refused.
pub fn check_endpoint(endpoint: &str) -> Result<(), ValidationError> {
    let bad = |why: &str| {
        Err(ValidationError::new(
            "endpoint",
            format!("`{endpoint}` is not a workload endpoint: {why}"),
        ))
    };
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return bad(&format!("longer than {MAX_ENDPOINT_LEN} bytes"));
    }
    let Some(authority) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return bad("want http://host:port or https://host:port");
    };
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@' | '\\'))
    {
        return bad("want only host:port after the scheme");
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return bad("the port is missing");
    };
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !host.is_empty() && !host.contains([':', '[', ']']),
    };
    if !host_ok {
        return bad("the host is missing or malformed");
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('+') => Ok(()),
        _ => bad("the port must be 1 to 65535"),
    }
}

/// True when `endpoint` names exactly `address` and `port`: `http://` or
/// `https://`, then the IP literal (an IPv4-mapped IPv6 address counts as its IPv4
/// form) and the port, nothing else. A host name never matches: the servers know
/// a node by the address its registration came from, not by a name it gives.
pub fn endpoint_matches(endpoint: &str, address: std::net::IpAddr, port: u16) -> bool {
    let Some(authority) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return false;
    };
    authority
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|at| at.ip().to_canonical() == address.to_canonical() && at.port() == port)
}

/// What a node's agent is told to run: the allocation and, when the allocation is
/// for the job's current version, its task. An allocation of an older version comes
/// without one: the agent keeps it running if it runs, and never starts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    /// The allocation.
    pub allocation: Allocation,
    /// What it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<crate::spec::TaskSpec>,
}

/// The answer to `GET /api/v1/nodes/{id}/assignments`: every allocation on the node
/// that is wanted or not yet confirmed stopped, as of `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeAssignments {
    /// The Raft index of the last change to this node's assignments; pass it back
    /// as `index` to wait for the next change.
    pub index: u64,
    /// The allocations, ordered by id.
    pub allocations: Vec<Assignment>,
    /// Models to stage and activate for fleet rollouts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<crate::rollout::ModelAssignment>,
}

/// Most bytes of each output stream an agent ships per allocation.
pub const MAX_LOG_TAIL_BYTES: usize = 16 * 1024;

/// The end of an allocation's output, as its agent ships it in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogTail {
    /// The allocation.
    pub id: AllocId,
    /// The last bytes of standard output (lossy UTF-8).
    #[serde(default)]
    pub stdout: String,
    /// The last bytes of standard error (lossy UTF-8).
    #[serde(default)]
    pub stderr: String,
}

/// The answer to `GET /api/v1/allocations/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AllocationLogs {
    /// The allocation.
    pub id: AllocId,
    /// The node it runs on.
    pub node_id: NodeId,
    /// The last bytes of standard output its agent shipped.
    pub stdout: String,
    /// The last bytes of standard error its agent shipped.
    pub stderr: String,
    /// When its agent last shipped them; absent when it never has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
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

    #[test]
    fn endpoints_name_a_host_and_port_only() {
        for good in [
            "http://127.0.0.1:41234",
            "https://node-7.example:443",
            "http://[::1]:8080",
            "http://gpu-host:1",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1:80",
            "ftp://h:21",
            "http://h",
            "http://h:0",
            "http://h:65536",
            "http://h:+80",
            "http://:80",
            "http://h:80/path",
            "http://user@h:80",
            "http://h:80?x",
            "http://h 1:80",
            "http://::1:80",
            "http://[nothex]:80",
        ] {
            let err = check_endpoint(bad).unwrap_err();
            assert_eq!(err.field, "endpoint", "{bad}");
        }
        let long = format!("http://{}:80", "h".repeat(MAX_ENDPOINT_LEN));
        assert!(check_endpoint(&long).is_err());
    }

    #[test]
    fn an_endpoint_matches_only_its_address_and_port() {
        let v4: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        let v6: std::net::IpAddr = "fd00::7".parse().unwrap();
        assert!(endpoint_matches("http://10.0.0.7:20417", v4, 20417));
        assert!(endpoint_matches("https://10.0.0.7:20417", v4, 20417));
        assert!(endpoint_matches(
            "http://[::ffff:10.0.0.7]:20417",
            v4,
            20417
        ));
        assert!(endpoint_matches("http://[fd00::7]:20417", v6, 20417));
        for other in [
            "http://10.0.0.7:20418",
            "http://10.0.0.8:20417",
            "http://node-7:20417",
            "http://10.0.0.7:20417/x",
            "ftp://10.0.0.7:20417",
            "http://user@10.0.0.7:20417",
            "10.0.0.7:20417",
        ] {
            assert!(!endpoint_matches(other, v4, 20417), "{other}");
        }
    }

    #[test]
    fn entries_without_an_endpoint_still_decode() {
        let old = serde_json::json!({
            "id": "a", "job_id": "j", "job_version": 1, "node_id": "n",
            "group": "g", "index": 0,
            "resources": {"cpu_millis": 100, "memory_mib": 64}, "gpus": [],
            "state": "running", "desired": "run", "created_at": 0, "updated_at": 0
        });
        let alloc: Allocation = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(alloc.endpoint, None);
        assert_eq!(serde_json::to_value(&alloc).unwrap(), old);
        let report: AllocationReport =
            serde_json::from_value(serde_json::json!({"id": "a", "state": "running"})).unwrap();
        assert!(!report.differs_from(&alloc));
        let mut moved = report.clone();
        moved.endpoint = Some("http://127.0.0.1:9000".into());
        assert!(moved.differs_from(&alloc));
        let wire = serde_json::to_value(&moved).unwrap();
        assert_eq!(wire["endpoint"], "http://127.0.0.1:9000");
    }
}
