//! Workload ports and endpoints: the port each listening allocation is assigned
//! on its node, and where the servers reach it. A node's address is the source
//! address of its registration and a workload's port is chosen here, as the
//! allocation is written, so every server agrees on both and none of them ever
//! sends traffic to a place a node merely names.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::allocation::endpoint_matches;
use aigrid_api::node::workload_endpoint;
use aigrid_api::{AllocId, Allocation, AllocationReport, NodeId, TaskSpec, ValidationError};

use super::*;

impl ClusterState {
    /// True when `alloc`'s task listens and so needs a port: a `model-server`
    /// task of its job's current spec.
    fn listens(&self, alloc: &Allocation) -> bool {
        self.tables
            .jobs
            .get(&alloc.job_id)
            .and_then(|j| j.spec.group(&alloc.group))
            .is_some_and(|g| matches!(g.task, TaskSpec::ModelServer(_)))
    }

    /// Gives each new allocation that listens a port of its node's range that no
    /// unfinished allocation on the node holds (nor one placed earlier in the same
    /// batch), and checks the ports the batch carries: an allocation keeps the
    /// port it was given for its life, a port given with a new allocation must be
    /// free and in the node's range, and one that does not listen gets none.
    /// Which free port is deterministic: a hash of the allocation id picks where
    /// to start looking, so that a replacement rarely reuses the port of the
    /// instance it replaces (whatever made that one fail may still hold it).
    pub(super) fn assign_ports(&self, allocations: &mut [Allocation]) -> Result<(), StateError> {
        let mut taken: BTreeMap<NodeId, BTreeSet<u16>> = BTreeMap::new();
        for (i, alloc) in allocations.iter_mut().enumerate() {
            let field = format!("allocations[{i}].port");
            if let Some(old) = self.tables.allocations.get(&alloc.id) {
                if alloc.port.is_some() && alloc.port != old.port {
                    return Err(StateError::conflict(format!(
                        "allocation `{}` cannot change its port",
                        alloc.id
                    )));
                }
                alloc.port = old.port;
                continue;
            }
            if !self.listens(alloc) {
                if alloc.port.is_some() {
                    return Err(ValidationError::new(
                        field,
                        format!("group `{}` runs nothing that listens", alloc.group),
                    )
                    .into());
                }
                continue;
            }
            if !alloc.is_live() {
                continue;
            }
            let Some(node) = self.tables.nodes.get(&alloc.node_id) else {
                // `check_allocations` names the unknown node.
                continue;
            };
            let used = taken.entry(alloc.node_id.clone()).or_insert_with(|| {
                self.index
                    .ports
                    .get(&alloc.node_id)
                    .map(|p| p.keys().copied().collect())
                    .unwrap_or_default()
            });
            let range = node.ports;
            let port = match alloc.port {
                Some(port) if !range.contains(port) => {
                    return Err(ValidationError::new(
                        field,
                        format!("port {port} is not in node `{}`'s range {range}", node.id),
                    )
                    .into());
                }
                Some(port) if used.contains(&port) => {
                    return Err(StateError::conflict(format!(
                        "port {port} on node `{}` is already assigned",
                        node.id
                    )));
                }
                Some(port) => port,
                None => free_port(&alloc.id, range, used).ok_or_else(|| {
                    StateError::conflict(format!("node `{}` has no free port in {range}", node.id))
                })?,
            };
            used.insert(port);
            alloc.port = Some(port);
        }
        Ok(())
    }

    /// Where the servers reach `alloc`'s workload: its node's recorded address and
    /// its assigned port; `None` when it has no port or its node no address.
    pub fn workload_endpoint(&self, alloc: &Allocation) -> Option<String> {
        let address = self.tables.nodes.get(&alloc.node_id)?.address?;
        Some(workload_endpoint(address, alloc.port?))
    }

    /// `endpoint`, as a node reports it for `alloc`, when it is the node's address
    /// and the allocation's port; anything else is dropped.
    pub(super) fn kept_endpoint(
        &self,
        alloc: &Allocation,
        endpoint: Option<String>,
    ) -> Option<String> {
        let address = self.tables.nodes.get(&alloc.node_id)?.address?;
        let port = alloc.port?;
        endpoint.filter(|e| endpoint_matches(e, address, port))
    }

    /// `report` with its endpoint dropped unless it is where the servers reach
    /// the allocation, as [`Command::ReportAllocations`] records it.
    pub(super) fn kept_report(&self, mut report: AllocationReport) -> AllocationReport {
        report.endpoint = match self.tables.allocations.get(&report.id) {
            Some(alloc) => self.kept_endpoint(alloc, report.endpoint),
            None => None,
        };
        report
    }

    /// The endpoints among `reports` that name somewhere other than where the
    /// servers reach the allocation, with that place (`None` when they reach it
    /// nowhere): what a node claims and is not believed about, for the log.
    pub fn foreign_endpoints(
        &self,
        node_id: &NodeId,
        reports: &[AllocationReport],
    ) -> Vec<(AllocId, String, Option<String>)> {
        reports
            .iter()
            .filter_map(|r| {
                let alloc = self.tables.allocations.get(&r.id)?;
                if &alloc.node_id != node_id {
                    return None;
                }
                let endpoint = r.endpoint.clone()?;
                if self.kept_endpoint(alloc, Some(endpoint.clone())).is_some() {
                    return None;
                }
                Some((r.id.clone(), endpoint, self.workload_endpoint(alloc)))
            })
            .collect()
    }
}

/// The first port of `range` not in `used`, looking from a place the hash of `id`
/// picks and wrapping around; `None` when every port is used.
fn free_port(id: &AllocId, range: aigrid_api::PortRange, used: &BTreeSet<u16>) -> Option<u16> {
    let size = range.len();
    let hash = blake3::hash(id.as_str().as_bytes());
    let mut word = [0u8; 4];
    word.copy_from_slice(&hash.as_bytes()[..4]);
    let start = u32::from_le_bytes(word) % size;
    (0..size)
        .map(|k| u32::from(range.first) + (start + k) % size)
        .map(|p| u16::try_from(p).expect("inside a u16 range"))
        .find(|p| !used.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_found_wherever_the_hash_starts() {
        let range = aigrid_api::PortRange {
            first: 65_533,
            last: 65_535,
        };
        let id = AllocId::new("a");
        let mut used = BTreeSet::new();
        let mut got = BTreeSet::new();
        for _ in 0..3 {
            let p = free_port(&id, range, &used).unwrap();
            assert!(range.contains(p));
            assert!(used.insert(p));
            got.insert(p);
        }
        assert_eq!(got.len(), 3);
        assert_eq!(free_port(&id, range, &used), None);
        // The same id and ports in use always give the same answer.
        used.remove(&65_534);
        assert_eq!(free_port(&id, range, &used), Some(65_534));
        assert_eq!(free_port(&AllocId::new("b"), range, &used), Some(65_534));
    }
}
