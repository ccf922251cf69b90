//! Simulated GPU inventories: `8xH100-80GB` or `4xH100-80GB,2xL4-24GB` gives devices
//! with stable UUIDs, as NVML would report them, for tests and benchmarks.

use aigrid_api::{GpuDevice, MemoryMib};

/// A `--simulate-gpus` specification that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--simulate-gpus `{spec}`: {reason} (expected e.g. 8xH100-80GB,2xL4-24GB)")]
pub struct SpecError {
    spec: String,
    reason: String,
}

/// Parses `COUNTxMODEL-MEMGB[,...]` into devices indexed from 0; `seed` makes the UUIDs
/// differ between simulated nodes while staying stable for one node.
pub fn parse(spec: &str, seed: &str) -> Result<Vec<GpuDevice>, SpecError> {
    let err = |reason: &str| SpecError {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let mut devices = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (count, rest) = part
            .split_once('x')
            .ok_or_else(|| err(&format!("`{part}` lacks COUNTx")))?;
        let count: u32 = count
            .parse()
            .map_err(|_| err(&format!("`{count}` is not a count")))?;
        if count == 0 || count > 64 {
            return Err(err("a count must be 1..=64"));
        }
        let (model, mem) = rest
            .rsplit_once('-')
            .ok_or_else(|| err(&format!("`{rest}` lacks -MEMGB")))?;
        let gb: u64 = mem
            .strip_suffix("GB")
            .and_then(|g| g.parse().ok())
            .filter(|g| *g > 0)
            .ok_or_else(|| err(&format!("`{mem}` is not a memory size like 80GB")))?;
        if model.is_empty() {
            return Err(err("the model name is empty"));
        }
        for _ in 0..count {
            let index = devices.len() as u32;
            devices.push(GpuDevice {
                index,
                uuid: simulated_uuid(seed, index),
                vendor: "nvidia".to_owned(),
                model: format!("NVIDIA {model}"),
                memory_mib: MemoryMib::new(gb * 1024),
                healthy: true,
                health_reason: None,
                numa_node: None,
                interconnect_group: None,
                mig_capable: false,
            });
        }
    }
    if devices.is_empty() {
        return Err(err("no devices"));
    }
    Ok(devices)
}

/// `GPU-` and a UUID-shaped hex string derived from the seed and index (FNV-1a), so
/// the same node reports the same UUIDs across restarts.
fn simulated_uuid(seed: &str, index: u32) -> String {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in seed.bytes().chain(index.to_be_bytes()) {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    let hex = format!("{h:032x}");
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_inventory() {
        let gpus = parse("4xH100-80GB,2xL4-24GB", "node-a").unwrap();
        assert_eq!(gpus.len(), 6);
        assert_eq!(gpus[3].model, "NVIDIA H100");
        assert_eq!(gpus[3].memory_mib, MemoryMib::new(80 * 1024));
        assert_eq!(gpus[5].model, "NVIDIA L4");
        assert_eq!(gpus[5].index, 5);
        let uuids: std::collections::BTreeSet<_> = gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 6, "uuids are distinct");
        assert_eq!(parse("4xH100-80GB,2xL4-24GB", "node-a").unwrap(), gpus);
        assert_ne!(
            parse("4xH100-80GB", "node-b").unwrap()[0].uuid,
            gpus[0].uuid
        );
    }

    #[test]
    fn bad_specs_say_why() {
        for bad in [
            "",
            "H100-80GB",
            "0xH100-80GB",
            "2xH100",
            "2xH100-80",
            "2x-80GB",
            "ax1-1GB",
        ] {
            assert!(parse(bad, "n").is_err(), "{bad} accepted");
        }
        assert!(parse("2xH100", "n")
            .unwrap_err()
            .to_string()
            .contains("MEMGB"));
    }
}
