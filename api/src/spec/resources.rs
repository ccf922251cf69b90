//! What one instance reserves: CPU, memory and GPUs (whole, or a slice of one), and
//! the checks on them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::units::{MemoryMib, MilliCpu};

/// Resources reserved for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: MilliCpu,
    /// Host memory in MiB.
    pub memory_mib: MemoryMib,
    /// GPUs, for groups that need them; absent for CPU-only work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<GpuRequest>,
}

/// GPUs reserved for one instance: whole GPUs, held exclusively, or with
/// `memory_slice_mib` a slice of one GPU shared with other sliced instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    /// How many GPUs, all on the same node; 1 for a slice.
    #[schema(minimum = 1)]
    pub count: u32,
    /// A model name the device's model must contain (`H100`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Least memory each GPU must have, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<MemoryMib>,
    /// Ask for a slice of one shared GPU with at least this much of its memory, in
    /// MiB, instead of whole GPUs. Slices share a GPU only with other slices, and
    /// the slices on one GPU never add up to more than its memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_slice_mib: Option<MemoryMib>,
    /// Require all of an instance's GPUs to be in one interconnect group (an NVLink
    /// domain). Without it the planner still prefers one group but may split.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub same_interconnect: bool,
}

impl GpuRequest {
    /// True when the request is for a slice of a shared GPU.
    pub fn is_slice(&self) -> bool {
        self.memory_slice_mib.is_some()
    }
}

impl Resources {
    pub(super) fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        if self.cpu_millis.get() == 0 {
            return Err(ValidationError::new(
                format!("{path}.cpu_millis"),
                "must be greater than 0",
            ));
        }
        if self.memory_mib.get() == 0 {
            return Err(ValidationError::new(
                format!("{path}.memory_mib"),
                "must be greater than 0",
            ));
        }
        let Some(gpus) = &self.gpus else {
            return Ok(());
        };
        if gpus.count == 0 {
            return Err(ValidationError::new(
                format!("{path}.gpus.count"),
                "must be at least 1; omit `gpus` for a CPU-only group",
            ));
        }
        if gpus.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(ValidationError::new(
                format!("{path}.gpus.model"),
                "must not be empty when set",
            ));
        }
        if gpus.min_memory_mib.is_some_and(|m| m.get() == 0) {
            return Err(ValidationError::new(
                format!("{path}.gpus.min_memory_mib"),
                "must be greater than 0 when set",
            ));
        }
        if let Some(slice) = gpus.memory_slice_mib {
            if slice.get() == 0 {
                return Err(ValidationError::new(
                    format!("{path}.gpus.memory_slice_mib"),
                    "must be greater than 0 when set",
                ));
            }
            if gpus.count != 1 {
                return Err(ValidationError::new(
                    format!("{path}.gpus.count"),
                    format!(
                        "a memory slice is one shared GPU: count must be 1, got {}",
                        gpus.count
                    ),
                ));
            }
            if gpus.same_interconnect {
                return Err(ValidationError::new(
                    format!("{path}.gpus.same_interconnect"),
                    "does not apply to a memory slice of one GPU",
                ));
            }
        }
        Ok(())
    }
}
