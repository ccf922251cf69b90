//! Circles' quotas and fair share as the control API shows them: what a circle is
//! guaranteed (GPUs by model, GPU memory, CPU, memory), what its live allocations
//! hold, what of that is borrowed idle capacity (which its owners reclaim), and its
//! dominant share of the pool.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ValidationError;

/// What a circle is guaranteed. A GPU key matches every GPU whose model contains
/// it (`H100` matches `NVIDIA H100 80GB HBM3`); what a quota leaves out is not
/// limited. Beyond its quota a circle borrows idle capacity, which is taken back
/// (its allocations preempted, lowest priority first) when a circle within its
/// quota needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Whole GPUs by model.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpus: BTreeMap<String, u32>,
    /// GPU memory, MiB (a whole GPU holds all of its memory, a slice its size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mib: Option<u64>,
    /// CPU, thousandths of a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

impl Quota {
    /// Checks the keys: at most 64 GPU models, each 1 to 64 printable characters.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.gpus.len() > 64 {
            return Err(ValidationError::new("quota.gpus", "at most 64 GPU models"));
        }
        if self
            .gpus
            .keys()
            .any(|m| m.trim().is_empty() || m.len() > 64 || m.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "quota.gpus",
                "a GPU model is 1 to 64 printable characters",
            ));
        }
        Ok(())
    }

    /// Parses `aigrid circle quota set`'s `--gpus H100=8,L4=2`.
    pub fn parse_gpus(list: &str) -> Result<BTreeMap<String, u32>, String> {
        let mut gpus = BTreeMap::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (model, count) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected MODEL=COUNT"))?;
            let count: u32 = count
                .trim()
                .parse()
                .map_err(|_| format!("`{item}`: the count is a whole number"))?;
            gpus.insert(model.trim().to_owned(), count);
        }
        Ok(gpus)
    }
}

/// Amounts of what a circle holds: GPUs by the quota's keys (or by GPU model
/// where the quota names none), GPU memory, CPU and memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Held {
    /// GPUs; a slice counts its share of its GPU.
    pub gpus: BTreeMap<String, f64>,
    /// GPU memory, MiB.
    pub gpu_memory_mib: u64,
    /// CPU, thousandths of a core.
    pub cpu_millis: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// `GET /api/v1/circles/{circle}/usage`: `aigrid circle usage NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CircleUsage {
    /// The circle.
    pub circle: String,
    /// Its quota, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// What its live allocations hold.
    pub used: Held,
    /// What of that is beyond its quota: borrowed idle capacity, taken back when a
    /// circle within its quota needs it.
    pub borrowed: Held,
    /// Its dominant share: the largest fraction, over every resource, of its quota
    /// (or of the pool, for what its quota leaves out) that it holds.
    pub share: f64,
    /// Instances of its jobs waiting to be placed.
    pub pending: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_list_reads_into_a_quota() {
        let gpus = Quota::parse_gpus("H100=8, L4=2").unwrap();
        assert_eq!(gpus["H100"], 8);
        assert_eq!(gpus["L4"], 2);
        assert!(Quota::parse_gpus("H100").is_err());
        assert!(Quota::parse_gpus("H100=-1").is_err());
        let q = Quota {
            gpus: [(" ".to_owned(), 1)].into(),
            ..Quota::default()
        };
        assert_eq!(q.validate().unwrap_err().field, "quota.gpus");
    }
}
