//! Nodes: what an agent tells the control plane about its machine, and the view the
//! control API returns. The registration is strict (unknown top-level fields are an
//! error); the resource inventory inside it is shared with the view and so, like
//! every view, tolerates fields added by newer releases.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::NodePublicKey;
use crate::error::ValidationError;
use crate::ids::{EvalId, NodeId};
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
    /// Why the GPU was last reported unhealthy (`XID 79`, `uncorrectable ECC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
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

/// The ports a node offers to workloads that listen, `first..=last`: the control
/// plane assigns each such allocation one of them, never one a live allocation on
/// the same node holds, and the node's workload listens on exactly that port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    /// The lowest port offered.
    pub first: u16,
    /// The highest port offered.
    pub last: u16,
}

impl PortRange {
    /// What a node offers when it does not say: below Linux's ephemeral ports
    /// (32768 and up), so outgoing connections never hold an assigned port.
    pub const DEFAULT: PortRange = PortRange {
        first: 20_000,
        last: 32_767,
    };

    /// How many ports it holds.
    pub fn len(&self) -> u32 {
        u32::from(self.last).saturating_sub(u32::from(self.first)) + 1
    }

    /// Never true for a valid range; here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    /// True when `port` is in it.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Checks the bounds: `1 <= first <= last`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.first == 0 || self.first > self.last {
            return Err(ValidationError::new(
                "ports",
                format!(
                    "`{}-{}` is not a port range: want 1 <= first <= last <= 65535",
                    self.first, self.last
                ),
            ));
        }
        Ok(())
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = ValidationError;

    /// `FIRST-LAST`, or one port alone.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ValidationError::new("ports", format!("`{s}` is not FIRST-LAST"));
        let (first, last) = s.split_once('-').unwrap_or((s, s));
        let parse = |p: &str| p.trim().parse::<u16>().map_err(|_| bad());
        let range = PortRange {
            first: parse(first)?,
            last: parse(last)?,
        };
        range.validate()?;
        Ok(range)
    }
}

/// The URL a workload listening on `port` of a node reached at `address` serves
/// at: `http://10.0.0.7:20417`, `http://[fd00::7]:20417`. The only place the
/// servers send inference traffic to.
pub fn workload_endpoint(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(ip) => format!("http://{ip}:{port}"),
        IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
    }
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
    /// The node's ed25519 public key; agents always send it, and every later request
    /// from the node must be signed by the matching private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<NodePublicKey>,
    /// What keeps the node's workloads away from its control credentials; absent
    /// from agents that predate it (and from simulated nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protections: Option<NodeProtections>,
    /// The ports its workloads may be assigned; [`PortRange::DEFAULT`] when absent.
    /// Where the servers reach the node is not the agent's to say: it is the
    /// address the registration came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// The port of its private data port (the shard service), where it serves its
    /// store shards and its model cache's chunks to peers; at the node's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_port: Option<u16>,
    /// True when the data port serves TLS under a certificate from the cluster CA
    /// (peers then dial it `https://`); plain HTTP is for loopback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_tls: bool,
    /// A certificate request (PEM) for the data port's key, which the server
    /// answering issues from the cluster CA (see
    /// [`RegisterNodeResponse::data_certificate`]); absent when the node holds a
    /// certificate already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_csr: Option<String>,
    /// What its farmer charges circles' treasuries for its work, and who is paid;
    /// absent, the node's work is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<crate::NodeOffer>,
}

/// What keeps a node's workloads (the AI circuit) away from its keys, data dir and
/// one another, as its agent found it at start. Anything missing comes with the
/// reason, so an operator sees which machines run work unconfined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeProtections {
    /// The Landlock ABI version workloads are sandboxed with; absent when the
    /// kernel has no Landlock and workloads run without a filesystem sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_abi: Option<u32>,
    /// Why there is no filesystem sandbox, when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_reason: Option<String>,
    /// True when each allocation runs under its own uid and gid.
    #[serde(default)]
    pub per_allocation_uid: bool,
    /// Why allocations share a uid, when they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid_reason: Option<String>,
}

impl NodeProtections {
    /// One line for people: `landlock abi 7, per-allocation uid`, or
    /// `none (kernel has no Landlock), shared uid (agent not root)`.
    pub fn summary(&self) -> String {
        let sandbox = match (self.landlock_abi, &self.sandbox_reason) {
            (Some(abi), _) => format!("landlock abi {abi}"),
            (None, Some(why)) => format!("none ({why})"),
            (None, None) => "none".to_owned(),
        };
        let uid = match (self.per_allocation_uid, &self.uid_reason) {
            (true, _) => "per-allocation uid".to_owned(),
            (false, Some(why)) => format!("shared uid ({why})"),
            (false, None) => "shared uid".to_owned(),
        };
        format!("{sandbox}, {uid}")
    }
}

/// Largest data-port certificate request a registration may carry.
pub const MAX_DATA_CSR_BYTES: usize = 8 << 10;

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
        if let Some(ports) = &self.ports {
            ports.validate()?;
        }
        if let Some(csr) = &self.data_csr {
            if !self.data_tls || self.data_port.is_none() {
                return Err(ValidationError::new(
                    "data_csr",
                    "asks for a data port certificate: needs data_port and data_tls",
                ));
            }
            if csr.len() > MAX_DATA_CSR_BYTES {
                return Err(ValidationError::new(
                    "data_csr",
                    format!("must be at most {MAX_DATA_CSR_BYTES} bytes"),
                ));
            }
        }
        if let Some(offer) = &self.offer {
            offer.prices.validate()?;
            if offer.farmer.as_ref().is_some_and(|f| !f.is_well_formed()) {
                return Err(ValidationError::new(
                    "offer.farmer",
                    "an identity id: 32 lowercase hex characters",
                ));
            }
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
    /// Set while the node is draining: how its allocations are migrated away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainSpec>,
    /// What its live allocations hold; filled in by reads, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<NodeUsage>,
    /// The key its requests must be signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<NodePublicKey>,
    /// Set once an operator revoked the node's key: its requests are refused and its
    /// instances are rescheduled. It may join again with a new key and join token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
    /// Where the servers reach the node's workloads: the source address of the
    /// connection its registration came over, recorded by the server that took it.
    /// Absent for a node registered without one (by hand); nothing is routed to
    /// such a node's workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.0.0.7")]
    pub address: Option<IpAddr>,
    /// The ports its listening workloads are assigned from.
    #[serde(default)]
    pub ports: PortRange,
    /// Its private data port, at [`Node::address`], when it offers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_port: Option<u16>,
    /// True when the data port serves TLS (peers dial it `https://`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_tls: bool,
    /// The latest host and GPU readings its agent sent to the server answering;
    /// kept in that server's memory, never in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<NodeTelemetry>,
    /// What keeps its workloads away from its credentials, as its agent last
    /// registered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protections: Option<NodeProtections>,
    /// Its farmer's prices and who is paid, as its agent last registered them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<crate::NodeOffer>,
}

/// Host and per-GPU readings an agent sends with each heartbeat. They change every
/// time, so servers keep the latest in memory instead of committing them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeTelemetry {
    /// When the agent took the readings.
    pub at: Timestamp,
    /// CPU busy across all cores, in thousandths of a core.
    pub cpu_used_millis: u64,
    /// Host memory in use.
    pub memory_used_mib: u64,
    /// Free space on the agent's data disk.
    pub disk_free_mib: u64,
    /// One entry per GPU.
    #[serde(default)]
    pub gpus: Vec<GpuTelemetry>,
}

/// One GPU's readings; absent values are ones the driver does not give.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuTelemetry {
    /// The GPU.
    pub uuid: String,
    /// Device memory in use.
    pub memory_used_mib: u64,
    /// Percent of time a kernel ran over the last sample period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    /// Core temperature, degrees Celsius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Power draw in milliwatts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u32>,
    /// Uncorrectable ECC errors since the driver loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
    /// The last XID error the driver raised, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_xid: Option<u64>,
    /// Whether MIG mode is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
}

/// Most allocations a drain may migrate at once.
pub const MAX_DRAIN_PARALLEL: u32 = 10_000;

/// How a drain migrates a node's allocations: `POST /api/v1/nodes/{id}/drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainSpec {
    /// How many allocations may be on their way off the node at once: stopped here
    /// and not yet confirmed stopped by the agent.
    #[serde(default = "one")]
    #[schema(default = 1, minimum = 1)]
    pub max_parallel: u32,
}

fn one() -> u32 {
    1
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self { max_parallel: 1 }
    }
}

impl DrainSpec {
    /// Checks the bound.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.max_parallel == 0 || self.max_parallel > MAX_DRAIN_PARALLEL {
            return Err(ValidationError::new(
                "max_parallel",
                format!("must be between 1 and {MAX_DRAIN_PARALLEL}"),
            ));
        }
        Ok(())
    }
}

/// What a node's live allocations hold, as node listings show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeUsage {
    /// CPU reserved.
    pub cpu_millis: MilliCpu,
    /// Memory reserved.
    pub memory_mib: MemoryMib,
    /// GPUs held whole or sliced.
    pub gpus_used: u32,
    /// Healthy GPUs nobody holds.
    pub gpus_free: u32,
    /// Live allocations.
    pub allocations: u32,
}

/// One GPU's health as the node's agent observed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuHealth {
    /// The GPU.
    pub uuid: String,
    /// False on XID or uncorrectable ECC errors, or when the device is gone.
    pub healthy: bool,
    /// Why it is unhealthy, in the driver's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What an agent sends every heartbeat: `POST /api/v1/nodes/{id}/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Health of GPUs that changed or are unhealthy; GPUs not listed keep theirs.
    #[serde(default)]
    pub gpus: Vec<GpuHealth>,
    /// States of the node's allocations.
    #[serde(default)]
    pub allocations: Vec<crate::allocation::AllocationReport>,
    /// Host and GPU readings, kept in the answering server's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<NodeTelemetry>,
    /// Output tails of allocations whose output changed since the last accepted
    /// heartbeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<crate::allocation::LogTail>,
    /// What became of the models fleet rollouts asked this node to stage: active
    /// (with its attestation) or failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<crate::rollout::ModelReport>,
}

/// The answer to `POST /api/v1/nodes`, sent once the registration is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegisterNodeResponse {
    /// The node.
    pub id: NodeId,
    /// True for a node not seen before, false when a known node refreshed its
    /// inventory (an agent restart).
    pub created: bool,
    /// Evaluations created for jobs whose instances held GPUs the node no longer
    /// reports; empty for a new node.
    #[serde(default)]
    pub eval_ids: Vec<EvalId>,
    /// The address the servers reach the node's workloads at, as recorded: its
    /// model servers listen there (or on every interface when it is not one of the
    /// machine's own, as behind NAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.0.0.7")]
    pub address: Option<IpAddr>,
    /// The data port's certificate chain (PEM: the node's leaf, then the CA), issued
    /// for the registration's `data_csr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_certificate: Option<String>,
}

/// The answer to `POST /api/v1/nodes/{id}/heartbeat`, sent once it is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// The node.
    pub id: NodeId,
    /// Its status now; a node marked down is back once heard from.
    pub status: NodeStatus,
    /// Evaluations created to reschedule instances that lost a GPU or failed.
    #[serde(default)]
    pub eval_ids: Vec<EvalId>,
}

/// Most entries one heartbeat may carry.
pub const MAX_HEARTBEAT_ENTRIES: usize = 4096;
/// Most log tails one heartbeat may carry; with [`crate::allocation::MAX_LOG_TAIL_BYTES`]
/// per stream this keeps a heartbeat well under the body limit.
pub const MAX_HEARTBEAT_LOGS: usize = 16;

impl Heartbeat {
    /// Checks sizes and fields.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.gpus.len() > MAX_HEARTBEAT_ENTRIES {
            return Err(ValidationError::new(
                "gpus",
                format!("at most {MAX_HEARTBEAT_ENTRIES} entries"),
            ));
        }
        if self.allocations.len() > MAX_HEARTBEAT_ENTRIES {
            return Err(ValidationError::new(
                "allocations",
                format!("at most {MAX_HEARTBEAT_ENTRIES} entries"),
            ));
        }
        if self.logs.len() > MAX_HEARTBEAT_LOGS {
            return Err(ValidationError::new(
                "logs",
                format!("at most {MAX_HEARTBEAT_LOGS} entries"),
            ));
        }
        if self.models.len() > MAX_HEARTBEAT_LOGS {
            return Err(ValidationError::new(
                "models",
                format!("at most {MAX_HEARTBEAT_LOGS} entries"),
            ));
        }
        if let Some(i) = self.models.iter().position(|m| {
            m.rollout.len() > 64
                || m.digest.len() > 64
                || m.reason.as_ref().is_some_and(|r| r.len() > 1024)
                || m.signature.as_ref().is_some_and(|s| s.len() > 256)
        }) {
            return Err(ValidationError::new(
                format!("models[{i}]"),
                "a field is longer than a rollout id, digest, reason or signature can be",
            ));
        }
        let max = crate::allocation::MAX_LOG_TAIL_BYTES;
        if let Some(i) = self
            .logs
            .iter()
            .position(|l| l.stdout.len() > max || l.stderr.len() > max)
        {
            return Err(ValidationError::new(
                format!("logs[{i}]"),
                format!("each stream's tail is at most {max} bytes"),
            ));
        }
        if let Some(i) = self.gpus.iter().position(|g| g.uuid.trim().is_empty()) {
            return Err(ValidationError::new(
                format!("gpus[{i}].uuid"),
                "must not be empty",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
