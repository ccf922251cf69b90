//! What the planner knows of a live allocation: who it is, who may displace it,
//! whether it listens, and what letting it go frees.

use aigrid_api::{AllocId, Allocation, JobId, JobSpec, MemoryMib, MilliCpu, TaskGroup, TaskSpec};

/// What the planner knows of the job and group a live allocation belongs to:
/// whether it may be evicted for another job, and whether it may be moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupInfo {
    /// The job's priority ([`JobSpec::priority`], 0 to 100).
    pub priority: u32,
    /// Whether the group may be migrated ([`TaskGroup::movable`]).
    pub movable: bool,
    /// Whether its instances listen, each on a port of its node
    /// ([`GroupInfo::listening`]).
    pub listens: bool,
}

impl Default for GroupInfo {
    /// What an allocation of a job the caller does not know gets: the lowest
    /// priority, and movable, as a group is unless its spec says otherwise.
    fn default() -> Self {
        Self {
            priority: 0,
            movable: true,
            listens: false,
        }
    }
}

impl GroupInfo {
    /// The info of group `group` of a job with `spec`. A group the spec no longer
    /// has is movable: its instances are on their way out anyway.
    pub fn of(spec: &JobSpec, group: &str) -> Self {
        let group = spec.group(group);
        Self {
            priority: spec.priority,
            movable: group.is_none_or(|g| g.movable),
            listens: group.is_some_and(Self::listening),
        }
    }

    /// Whether `group`'s instances listen and so take a port of their node each:
    /// those of a `model-server` task.
    pub fn listening(group: &TaskGroup) -> bool {
        matches!(group.task, TaskSpec::ModelServer(_))
    }
}

/// One live allocation as the snapshot holds it: who it is, who may displace it,
/// and what letting it go frees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAlloc {
    /// The allocation.
    pub id: AllocId,
    /// Its job.
    pub job_id: JobId,
    /// Its task group.
    pub group: String,
    /// Its index within the group.
    pub index: u32,
    /// Its job's priority and its group's movability.
    pub info: GroupInfo,
    /// CPU it holds.
    pub cpu: MilliCpu,
    /// Host memory it holds.
    pub memory: MemoryMib,
    /// For a slice, the GPU memory it holds on its one GPU.
    pub gpu_slice: Option<MemoryMib>,
    /// Positions in the node's GPU list of the GPUs it holds (whole, or the one
    /// its slice is on); GPUs the node does not have are left out.
    pub(super) gpus: Vec<usize>,
}

impl LiveAlloc {
    /// What the planner knows of `alloc`, on a node whose GPUs are `node_uuids` in
    /// order.
    pub(super) fn new(node_uuids: &[String], alloc: &Allocation, info: GroupInfo) -> Self {
        Self {
            id: alloc.id.clone(),
            job_id: alloc.job_id.clone(),
            group: alloc.group.clone(),
            index: alloc.index,
            info,
            cpu: alloc.resources.cpu_millis,
            memory: alloc.resources.memory_mib,
            gpu_slice: alloc
                .resources
                .gpus
                .as_ref()
                .and_then(|g| g.memory_slice_mib),
            gpus: alloc
                .gpus
                .iter()
                .filter_map(|uuid| node_uuids.iter().position(|u| u == uuid))
                .collect(),
        }
    }

    /// How many GPUs it holds, whole or sliced.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }
}
