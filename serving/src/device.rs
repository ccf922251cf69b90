//! Which device a model runs on.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::ServingError;

/// `cpu`, `cuda:N`, or `auto` (the first CUDA device when this build has CUDA and
/// one answers, the CPU otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// Pick at start.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda:N or auto")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `cuda:N` fails clearly when this build has no CUDA or the
    /// device does not answer; `auto` falls back to the CPU.
    pub fn open(self) -> Result<Device, ServingError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(ServingError::model(format!(
                        "device cuda:{n}: this build has no CUDA support (build with --features cuda)"
                    )));
                }
                Device::new_cuda(n)
                    .map_err(|e| ServingError::model(format!("device cuda:{n}: {e}")))
            }
            DeviceSpec::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(device) = Device::new_cuda(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Whether candle has bf16 kernels for `device`: on the CPU always (whether bf16
/// products are used there is AMX's to decide), on a CUDA device where its compute
/// capability is 8.0 or more (Ampere on): candle compiles its bf16 kernels for those
/// alone, so bf16 on a GPU also needs a build for such a one (`CUDA_COMPUTE_CAP` 80
/// or more, 90 by default).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn has_bf16_kernels(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8);
    }
    true
}

/// Fixes the CPU thread count candle uses to this machine's cores, unless
/// `RAYON_NUM_THREADS` already says: when it is unset, candle 0.11 reads
/// `/proc/cpuinfo` again on every matrix product, which costs small models about as
/// much as the product itself. Call it first thing in `main`, before any thread
/// exists (it sets an environment variable).
pub fn set_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for text in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap().to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("gpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("cpu, cuda:N"));
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }
}
