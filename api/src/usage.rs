//! Metered use as the control API reports it: what allocations held while they ran
//! (GPUs by model, CPU, memory), summed per circle, job, node and GPU model over an
//! interval of whole hours.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

/// Amounts of use. GPU-seconds count a whole GPU as 1 per second and a memory slice
/// as its share of the GPU's memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageAmounts {
    /// GPU-seconds.
    pub gpu_seconds: f64,
    /// CPU-seconds reserved (cores × seconds).
    pub cpu_seconds: f64,
    /// Memory reserved, in MiB × seconds.
    pub memory_mib_seconds: f64,
}

/// One line of a usage report: the use of one job, node or GPU model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageLine {
    /// What it is the use of: a job id, a node id or a GPU model.
    pub key: String,
    /// The job's name, while the cluster still holds the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The use.
    #[serde(flatten)]
    pub amounts: UsageAmounts,
}

/// `GET /api/v1/usage?circle=NAME&since=24h`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// The circle reported on; absent for the whole cluster (admins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circle: Option<String>,
    /// Start of the first hour counted (`since` rounded down to the hour).
    pub from: Timestamp,
    /// When the use was last metered: nothing after it is counted yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metered_until: Option<Timestamp>,
    /// Everything in the interval.
    pub total: UsageAmounts,
    /// By GPU model (`H100-80GB`), GPU-seconds only; CPU-only use is not listed.
    pub by_gpu_model: Vec<UsageLine>,
    /// By job id.
    pub by_job: Vec<UsageLine>,
    /// By node id.
    pub by_node: Vec<UsageLine>,
}

/// `GET /api/v1/usage`'s query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// The circle; without it, the whole cluster (admins only).
    #[serde(default)]
    pub circle: Option<String>,
    /// How far back: a duration (`24h`, `90m`, `7d`) before now. Default `24h`.
    #[serde(default)]
    pub since: Option<String>,
}

/// Parses `since`: a whole number with a unit of `s`, `m`, `h` or `d`, into
/// milliseconds, at most a year.
pub fn parse_since(since: &str) -> Result<u64, String> {
    let since = since.trim();
    let (digits, unit) = since.split_at(since.len().saturating_sub(1));
    let scale: u64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "`{since}` is not a duration: a whole number and s, m, h or d (24h, 7d)"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{since}` is not a duration: a whole number and s, m, h or d"))?;
    let ms = n.saturating_mul(scale);
    if ms == 0 || ms > 366 * 86_400_000 {
        return Err(format!("`{since}` must be more than 0 and at most 366d"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_nonsense_is_refused() {
        assert_eq!(parse_since("24h"), Ok(24 * 3_600_000));
        assert_eq!(parse_since("90m"), Ok(90 * 60_000));
        assert_eq!(parse_since("7d"), Ok(7 * 86_400_000));
        for bad in ["", "h", "24", "-1h", "1.5h", "0h", "400d", "24x", "1e3s"] {
            assert!(parse_since(bad).is_err(), "{bad}");
        }
    }
}
