//! Nodes: what an agent tells the control plane about its machine, and the view the
//! control API returns. The registration is strict (unknown top-level fields are an
//! error); the resource inventory inside it is shared with the view and so, like
//! every view, tolerates fields added by newer releases.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::ids::NodeId;
use crate::units::{DiskMib, MemoryMib, MilliCpu, Timestamp};

/// Longest accepted node id; ids appear in URL paths.
pub const MAX_NODE_ID_LEN: usize = 128;
/// Longest accepted node name (a host name's limit).
pub const MAX_NODE_NAME_LEN: usize = 253;

wire_enum!(
    /// Whether the planner may place work on a node.
    NodeStatus {
        /// Heartbeating and accepting new work.
        Ready => "ready",
        /// Missed its heartbeats; its instances count as lost.
        Down => "down",
        /// Keeps running what it has but gets nothing new; its instances are moved off.
        Draining => "draining",
    }
);

impl NodeStatus {
    /// True when new allocations may be placed on the node.
    pub const fn is_schedulable(self) -> bool {
        matches!(self, Self::Ready)
    }
}

/// One GPU as discovered by the agent (NVML, or simulated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GpuDevice {
    /// The device index on the node.
    pub index: u32,
    /// The device UUID; allocations reserve GPUs by it.
    pub uuid: String,
    /// `nvidia`, `amd`, ...
    pub vendor: String,
    /// The marketing model name (`NVIDIA H100 80GB HBM3`).
    pub model: String,
    /// Device memory in MiB.
    pub memory_mib: MemoryMib,
    /// False when the device reports errors; unhealthy GPUs get no new work.
    pub healthy: bool,
    /// The NUMA node the device hangs off, when the host reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// The fast-interconnect domain (an NVLink/NVSwitch island) the device belongs
    /// to; GPUs sharing a value talk to each other without crossing PCIe. The planner
    /// keeps a multi-GPU instance inside one group when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interconnect_group: Option<String>,
    /// True when the device can be partitioned (NVIDIA MIG).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mig_capable: bool,
}

/// What a node offers to workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeResources {
    /// Allocatable CPU in thousandths of a core.
    pub cpu_millis: MilliCpu,
    /// Allocatable memory in MiB.
    pub memory_mib: MemoryMib,
    /// Allocatable disk in MiB.
    pub disk_mib: DiskMib,
    /// Its GPUs; empty on a CPU-only node.
    #[serde(default)]
    pub gpus: Vec<GpuDevice>,
}

/// What an agent sends when it joins or rejoins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeRegistration {
    /// Chosen by the agent and kept across restarts. 1 to 128 of `A-Z a-z 0-9 - _ .`.
    pub id: NodeId,
    /// A human-friendly name, usually the host name.
    pub name: String,
    /// Facts constraints and spreads match on (`country`, `site`, `gpu.model`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// What it offers.
    pub resources: NodeResources,
}

impl NodeRegistration {
    /// Checks the rules serde cannot express; the first broken rule names its field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let id = self.id.as_str();
        if id.is_empty() || id.len() > MAX_NODE_ID_LEN {
            return Err(ValidationError::new(
                "id",
                format!("must be 1 to {MAX_NODE_ID_LEN} characters"),
            ));
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ValidationError::new(
                "id",
                "may contain only letters, digits, `-`, `_` and `.`",
            ));
        }
        if self.name.trim().is_empty() || self.name.len() > MAX_NODE_NAME_LEN {
            return Err(ValidationError::new(
                "name",
                format!("must be 1 to {MAX_NODE_NAME_LEN} characters"),
            ));
        }
        if self.attributes.keys().any(|k| k.trim().is_empty()) {
            return Err(ValidationError::new(
                "attributes",
                "attribute names must not be empty",
            ));
        }
        let resources = &self.resources;
        if resources.cpu_millis.get() == 0 {
            return Err(ValidationError::new(
                "resources.cpu_millis",
                "must be greater than 0",
            ));
        }
        if resources.memory_mib.get() == 0 {
            return Err(ValidationError::new(
                "resources.memory_mib",
                "must be greater than 0",
            ));
        }
        let mut indices = BTreeSet::new();
        let mut uuids = BTreeSet::new();
        for (i, gpu) in resources.gpus.iter().enumerate() {
            if gpu.uuid.trim().is_empty() {
                return Err(ValidationError::new(
                    format!("resources.gpus[{i}].uuid"),
                    "must not be empty",
                ));
            }
            if !uuids.insert(gpu.uuid.as_str()) {
                return Err(ValidationError::new(
                    format!("resources.gpus[{i}].uuid"),
                    format!("duplicate GPU uuid `{}`", gpu.uuid),
                ));
            }
            if gpu
                .interconnect_group
                .as_deref()
                .is_some_and(|g| g.trim().is_empty())
            {
                return Err(ValidationError::new(
                    format!("resources.gpus[{i}].interconnect_group"),
                    "must not be empty when set",
                ));
            }
            if !indices.insert(gpu.index) {
                return Err(ValidationError::new(
                    format!("resources.gpus[{i}].index"),
                    format!("duplicate GPU index {}", gpu.index),
                ));
            }
        }
        Ok(())
    }
}

/// A node as `GET /api/v1/nodes/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// The agent-chosen id.
    pub id: NodeId,
    /// A human-friendly name.
    pub name: String,
    /// Facts constraints and spreads match on.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// What it offers.
    pub resources: NodeResources,
    /// Whether new work may be placed on it.
    pub status: NodeStatus,
    /// When it first registered.
    pub registered_at: Timestamp,
    /// When it last registered, heartbeated or reported.
    pub last_seen: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registration() -> serde_json::Value {
        json!({
            "id": "node-1",
            "name": "gpu-box-1",
            "attributes": {"country": "BE", "site": "ghent"},
            "resources": {
                "cpu_millis": 64000, "memory_mib": 512000, "disk_mib": 2000000,
                "gpus": [
                    {"index": 0, "uuid": "GPU-a", "vendor": "nvidia", "model": "H100",
                     "memory_mib": 81920, "healthy": true},
                    {"index": 1, "uuid": "GPU-b", "vendor": "nvidia", "model": "H100",
                     "memory_mib": 81920, "healthy": true, "numa_node": 1,
                     "interconnect_group": "nvl-0", "mig_capable": true}
                ]
            }
        })
    }

    fn blamed(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = registration();
        edit(&mut v);
        let reg: NodeRegistration = serde_json::from_value(v).unwrap();
        reg.validate().unwrap_err().field
    }

    #[test]
    fn registration_parses_and_validates() {
        let reg: NodeRegistration = serde_json::from_value(registration()).unwrap();
        reg.validate().unwrap();
        assert_eq!(reg.resources.gpus.len(), 2);
        let (old, new) = (&reg.resources.gpus[0], &reg.resources.gpus[1]);
        assert_eq!(
            (old.numa_node, old.interconnect_group.as_deref()),
            (None, None)
        );
        assert!(!old.mig_capable);
        assert_eq!(new.numa_node, Some(1));
        assert_eq!(new.interconnect_group.as_deref(), Some("nvl-0"));
        assert!(new.mig_capable);
        let json = serde_json::to_value(old).unwrap();
        assert!(json.get("numa_node").is_none() && json.get("mig_capable").is_none());
        let mut v = registration();
        v["extra"] = json!(true);
        assert!(serde_json::from_value::<NodeRegistration>(v).is_err());
    }

    #[test]
    fn registration_rules_name_the_field() {
        assert_eq!(blamed(|v| v["id"] = json!("")), "id");
        assert_eq!(blamed(|v| v["id"] = json!("a/b")), "id");
        assert_eq!(blamed(|v| v["name"] = json!(" ")), "name");
        assert_eq!(blamed(|v| v["attributes"] = json!({"": "x"})), "attributes");
        assert_eq!(
            blamed(|v| v["resources"]["cpu_millis"] = json!(0)),
            "resources.cpu_millis"
        );
        assert_eq!(
            blamed(|v| v["resources"]["memory_mib"] = json!(0)),
            "resources.memory_mib"
        );
        assert_eq!(
            blamed(|v| v["resources"]["gpus"][1]["uuid"] = json!("GPU-a")),
            "resources.gpus[1].uuid"
        );
        assert_eq!(
            blamed(|v| v["resources"]["gpus"][1]["index"] = json!(0)),
            "resources.gpus[1].index"
        );
        assert_eq!(
            blamed(|v| v["resources"]["gpus"][1]["interconnect_group"] = json!("")),
            "resources.gpus[1].interconnect_group"
        );
    }
}
