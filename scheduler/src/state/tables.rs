//! The allocation table and its derived indexes: every allocation write goes
//! through here so the per-job, per-node and held-resource indexes stay exact.

use std::collections::{BTreeMap, BTreeSet};

use aigrid_api::{AllocId, Allocation, JobId, MemoryMib, NodeId};

use super::*;

/// Allocations indexed by job and by node, and what the live ones hold per node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct AllocIndex {
    by_job: BTreeMap<JobId, BTreeSet<AllocId>>,
    pub(super) by_node: BTreeMap<NodeId, BTreeSet<AllocId>>,
    pub(super) held: BTreeMap<NodeId, Held>,
    /// Per node, the ports its unfinished allocations were assigned: a port is
    /// taken from placement until the workload is confirmed gone, since a
    /// workload asked to stop may still be listening.
    pub(super) ports: BTreeMap<NodeId, BTreeMap<u16, AllocId>>,
    pub(super) live: usize,
}

/// What the live allocations on one node hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) cpu: u64,
    pub(super) memory: u64,
    pub(super) allocations: u32,
    pub(super) gpus: BTreeMap<String, GpuHeld>,
}

/// How one GPU is held: whole by one allocation, or in memory slices by several.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct GpuHeld {
    pub(super) whole: Option<AllocId>,
    pub(super) sliced: u64,
    pub(super) slices: u32,
}

/// The GPU memory slice an allocation holds on its one shared GPU, if it asked for
/// a slice rather than whole GPUs.
pub(super) fn slice_of(alloc: &Allocation) -> Option<u64> {
    alloc
        .resources
        .gpus
        .as_ref()
        .and_then(|g| g.memory_slice_mib)
        .map(MemoryMib::get)
}

impl Held {
    pub(super) fn add(&mut self, alloc: &Allocation) {
        self.cpu += alloc.resources.cpu_millis.get();
        self.memory += alloc.resources.memory_mib.get();
        self.allocations += 1;
        let slice = slice_of(alloc);
        for uuid in &alloc.gpus {
            let gpu = self.gpus.entry(uuid.clone()).or_default();
            match slice {
                Some(mib) => {
                    gpu.sliced += mib;
                    gpu.slices += 1;
                }
                None => gpu.whole = Some(alloc.id.clone()),
            }
        }
    }

    pub(super) fn remove(&mut self, alloc: &Allocation) {
        self.cpu = self.cpu.saturating_sub(alloc.resources.cpu_millis.get());
        self.memory = self.memory.saturating_sub(alloc.resources.memory_mib.get());
        self.allocations = self.allocations.saturating_sub(1);
        let slice = slice_of(alloc);
        for uuid in &alloc.gpus {
            let Some(gpu) = self.gpus.get_mut(uuid) else {
                continue;
            };
            match slice {
                Some(mib) => {
                    gpu.sliced = gpu.sliced.saturating_sub(mib);
                    gpu.slices = gpu.slices.saturating_sub(1);
                }
                None if gpu.whole.as_ref() == Some(&alloc.id) => gpu.whole = None,
                None => {}
            }
            if gpu.whole.is_none() && gpu.slices == 0 {
                self.gpus.remove(uuid);
            }
        }
    }
}

/// Removes `id` from the set under `key`, dropping the set once empty.
pub(super) fn forget<K: Ord>(map: &mut BTreeMap<K, BTreeSet<AllocId>>, key: &K, id: &AllocId) {
    if let Some(set) = map.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl AllocIndex {
    pub(super) fn from_allocations<'a>(
        allocations: impl IntoIterator<Item = &'a Allocation>,
    ) -> Self {
        let mut index = Self::default();
        for alloc in allocations {
            index.add(alloc);
        }
        index
    }

    pub(super) fn add(&mut self, alloc: &Allocation) {
        self.by_job
            .entry(alloc.job_id.clone())
            .or_default()
            .insert(alloc.id.clone());
        self.by_node
            .entry(alloc.node_id.clone())
            .or_default()
            .insert(alloc.id.clone());
        if alloc.is_live() {
            self.live += 1;
            self.held
                .entry(alloc.node_id.clone())
                .or_default()
                .add(alloc);
        }
        if let (Some(port), false) = (alloc.port, alloc.state.is_terminal()) {
            self.ports
                .entry(alloc.node_id.clone())
                .or_default()
                .insert(port, alloc.id.clone());
        }
    }

    pub(super) fn remove(&mut self, alloc: &Allocation) {
        forget(&mut self.by_job, &alloc.job_id, &alloc.id);
        forget(&mut self.by_node, &alloc.node_id, &alloc.id);
        if alloc.is_live() {
            self.live = self.live.saturating_sub(1);
            if let Some(held) = self.held.get_mut(&alloc.node_id) {
                held.remove(alloc);
                if held.allocations == 0 {
                    self.held.remove(&alloc.node_id);
                }
            }
        }
        if let (Some(port), false) = (alloc.port, alloc.state.is_terminal()) {
            if let Some(ports) = self.ports.get_mut(&alloc.node_id) {
                if ports.get(&port) == Some(&alloc.id) {
                    ports.remove(&port);
                }
                if ports.is_empty() {
                    self.ports.remove(&alloc.node_id);
                }
            }
        }
    }
}

impl ClusterState {
    /// Inserts or replaces an allocation.
    pub(super) fn put_alloc(&mut self, alloc: Allocation) {
        let old = self.tables.allocations.remove(&alloc.id);
        if let Some(old) = &old {
            if old.is_live() && !alloc.is_live() {
                self.capacity_epoch += 1;
            }
            self.index.remove(old);
        }
        if old.as_ref().map(assigned) != Some(assigned(&alloc)) {
            self.touch_node(&alloc.node_id);
        }
        self.index.add(&alloc);
        self.tables.allocations.insert(alloc.id.clone(), alloc);
    }

    /// Removes an allocation.
    pub(super) fn drop_alloc(&mut self, id: &AllocId) -> Option<Allocation> {
        let old = self.tables.allocations.remove(id)?;
        if old.is_live() {
            self.capacity_epoch += 1;
        }
        if assigned(&old).0 {
            self.touch_node(&old.node_id);
        }
        self.tables.logs.remove(id);
        self.index.remove(&old);
        Some(old)
    }

    /// Ids of the allocations of one job.
    pub(super) fn job_alloc_ids(&self, job_id: &JobId) -> Vec<AllocId> {
        self.index
            .by_job
            .get(job_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Ids of the allocations on one node.
    pub(super) fn node_alloc_ids(&self, node_id: &NodeId) -> Vec<AllocId> {
        self.index
            .by_node
            .get(node_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn job_allocs(&self, job_id: &JobId) -> Vec<&Allocation> {
        self.index
            .by_job
            .get(job_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tables.allocations.get(id))
            .collect()
    }
}
