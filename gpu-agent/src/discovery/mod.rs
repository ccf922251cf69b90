//! What this machine offers and how its GPUs are doing.
//!
//! The agent registers once with [`Discovery::resources`] and then calls
//! [`Discovery::sample`] every heartbeat, so discovery splits into a part done once
//! at [`Discovery::open`] (probing NVML, finding NVLink islands and NUMA nodes,
//! registering for XID events) and a cheap part done per sample (a handful of NVML
//! queries per GPU, one sysinfo refresh, one `statvfs`).
//!
//! GPUs come from one of three sources, named by [`Discovery::gpu_source`]:
//!
//! - `nvml`: the NVIDIA driver, through `nvml-wrapper`, which loads `libnvidia-ml`
//!   at run time, so the same binary runs on machines with and without a driver.
//! - `none`: NVML could not be loaded, initialised, or found no device. That is a
//!   normal state, not an error: the node offers CPU only and says so once in the log.
//! - `simulated`: `--simulate-gpus 4xH100-80GB,2xL4-24GB` (see [`crate::simulated`]),
//!   for tests, benchmarks and `--simulate-fleet`, which runs thousands of
//!   [`Discovery::fleet_member`]s in one process and so must not touch the host.
//!
//! # Health
//!
//! A GPU is reported unhealthy while it cannot be queried (`device unreachable:
//! ...`), while its volatile uncorrectable ECC count is above zero, and in the sample
//! that follows a critical XID event (`XID 79`). XIDs that NVIDIA documents as caused
//! by the application rather than the hardware (13, 31, 43, 45, 68, 109) are still
//! shown as `last_xid` in telemetry but do not mark the GPU unhealthy: otherwise one
//! user's faulty kernel would move every workload off a good GPU.
//!
//! # Simulated faults
//!
//! A simulated node has no driver to raise errors, so faults are injected through a
//! text file, `<data-dir>/simulated-gpu-faults`, that an operator or test edits while
//! the agent runs:
//!
//! ```text
//! # <gpu index or uuid> <reason...>
//! 0 XID 79
//! GPU-2f0c5c7e-0d1b-9a3e-7c41-5d3e8f7a6b21 uncorrectable ECC
//! 3
//! ```
//!
//! Each line makes one GPU unhealthy; the words after the GPU are the reason
//! (`simulated fault` when there are none). Blank lines and lines starting with `#`
//! are skipped; a line naming no known GPU is ignored with one warning. The file is
//! re-read when its size, modification time or inode changes, so deleting a line,
//! or the file, makes the GPU healthy again at the next sample.
//! [`Discovery::set_simulated_fault`] does the same from code, for the fleet
//! simulation and tests.

mod host;
mod nvml;
mod simulated;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use aigrid_api::{GpuDevice, GpuHealth, GpuTelemetry, NodeResources, NodeTelemetry, Timestamp};

use crate::simulated::SpecError;
use host::Host;
use nvml::NvmlGpus;
use simulated::SimulatedGpus;

/// How the agent wants its machine discovered; built from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// `--simulate-gpus` spec; when set, NVML is not probed at all.
    pub simulate_gpus: Option<String>,
    /// The agent's data dir: disk_mib / disk_free_mib measure its filesystem; the
    /// simulated fault file lives here.
    pub data_dir: PathBuf,
    /// Seed for simulated GPU uuids (the node id), so uuids are stable per node.
    pub seed: String,
}

/// Why discovery could not start. A missing NVIDIA driver is not one of them: the
/// node then offers CPU only.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The `--simulate-gpus` specification is malformed.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The data dir is missing, not a directory, or its filesystem cannot be
    /// measured.
    #[error("data dir `{}`: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The operating system does not give CPU and memory figures.
    #[error("host information unavailable: {reason}")]
    Host {
        /// What sysinfo said.
        reason: String,
    },
}

/// One reading, taken by [`Discovery::sample`] for a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Health of every GPU, in index order.
    pub health: Vec<GpuHealth>,
    /// Host and per-GPU readings.
    pub telemetry: NodeTelemetry,
}

/// Where the GPUs come from; private so the source string stays the one contract.
enum Gpus {
    None,
    Nvml(NvmlGpus),
    Simulated(SimulatedGpus),
}

/// The machine as the agent sees it: host resources plus GPUs, and the means to read
/// both again each heartbeat.
pub struct Discovery {
    host: Host,
    gpus: Gpus,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("hostname", &self.hostname())
            .field("gpu_source", &self.gpu_source())
            .field("gpus", &self.devices().len())
            .finish()
    }
}

impl Discovery {
    /// Real host (sysinfo) + NVML GPUs, or simulated GPUs. NVML being unavailable
    /// (library not loadable, init error, no devices) is logged once at info level
    /// and gives a CPU-only discovery. Errors only for a bad simulate spec, an
    /// unreadable data dir, or a platform sysinfo does not support.
    pub fn open(opts: DiscoveryOptions) -> Result<Discovery, DiscoveryError> {
        let gpus = match &opts.simulate_gpus {
            Some(spec) => {
                Gpus::Simulated(SimulatedGpus::new(spec, &opts.seed, Some(&opts.data_dir))?)
            }
            None => match NvmlGpus::open() {
                Ok(gpus) => Gpus::Nvml(gpus),
                Err(reason) => {
                    tracing::info!("NVML not available ({reason}): this node offers CPU only");
                    Gpus::None
                }
            },
        };
        let host = Host::real(opts.data_dir)?;
        let mut discovery = Discovery { host, gpus };
        // Health flags in the registration should already reflect known faults.
        discovery.sample_gpus();
        Ok(discovery)
    }

    /// A cheap simulated member for `--simulate-fleet` (thousands per process): no
    /// sysinfo, no NVML, no disk I/O per sample; fixed host resources (64 cores,
    /// 512 GiB, 2 TiB), GPUs from `spec` seeded with `seed`, constant telemetry.
    pub fn fleet_member(spec: &str, seed: &str) -> Result<Discovery, DiscoveryError> {
        Ok(Discovery {
            host: Host::fixed(seed),
            gpus: Gpus::Simulated(SimulatedGpus::new(spec, seed, None)?),
        })
    }

    /// What the node offers, for registration: logical cores × 1000, total RAM,
    /// total size of the data dir's filesystem, and the GPUs with their health as
    /// of the last sample.
    pub fn resources(&self) -> NodeResources {
        let host = self.host.resources();
        NodeResources {
            cpu_millis: host.cpu_millis,
            memory_mib: host.memory_mib,
            disk_mib: host.disk_mib,
            gpus: self.devices().to_vec(),
        }
    }

    /// The host name, for the registration's `name`.
    pub fn hostname(&self) -> String {
        self.host.hostname().to_owned()
    }

    /// Where the GPUs come from: `nvml`, `simulated` or `none`; the agent also puts
    /// it in the node attributes as `gpu.source`.
    pub fn gpu_source(&self) -> &'static str {
        match self.gpus {
            Gpus::None => "none",
            Gpus::Nvml(_) => "nvml",
            Gpus::Simulated(_) => "simulated",
        }
    }

    /// Takes one reading: the health of every GPU and the host and GPU telemetry.
    /// Cheap enough for every heartbeat; a reading the driver does not give is
    /// `None`, never an error.
    pub fn sample(&mut self) -> Sample {
        let at = now();
        let gpus = self.sample_gpus();
        let host = self.host.sample();
        let health = self
            .devices()
            .iter()
            .map(|d| GpuHealth {
                uuid: d.uuid.clone(),
                healthy: d.healthy,
                reason: d.health_reason.clone(),
            })
            .collect();
        Sample {
            health,
            telemetry: NodeTelemetry {
                at,
                cpu_used_millis: host.cpu_used_millis,
                memory_used_mib: host.memory_used_mib,
                disk_free_mib: host.disk_free_mib,
                gpus,
            },
        }
    }

    /// Makes a simulated GPU (by index) unhealthy with `reason`, or healthy again
    /// with `None`. Returns false, changing nothing, when the GPUs are not simulated
    /// or there is no GPU with that index.
    pub fn set_simulated_fault(&mut self, index: u32, reason: Option<String>) -> bool {
        match &mut self.gpus {
            Gpus::Simulated(sim) => sim.set_fault(index, reason),
            Gpus::None | Gpus::Nvml(_) => false,
        }
    }

    fn devices(&self) -> &[GpuDevice] {
        match &self.gpus {
            Gpus::None => &[],
            Gpus::Nvml(nvml) => nvml.devices(),
            Gpus::Simulated(sim) => sim.devices(),
        }
    }

    /// Refreshes GPU health (kept in the devices) and returns their telemetry.
    fn sample_gpus(&mut self) -> Vec<GpuTelemetry> {
        match &mut self.gpus {
            Gpus::None => Vec::new(),
            Gpus::Nvml(nvml) => nvml.sample(),
            Gpus::Simulated(sim) => sim.sample(),
        }
    }
}

fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &std::path::Path, simulate: Option<&str>) -> DiscoveryOptions {
        DiscoveryOptions {
            simulate_gpus: simulate.map(str::to_owned),
            data_dir: dir.to_owned(),
            seed: "node-a".to_owned(),
        }
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn discovery_is_send_and_sync() {
        assert_send_sync::<Discovery>();
    }

    #[test]
    fn discovery_without_nvml_offers_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Discovery::open(options(dir.path(), None)).unwrap();
        let res = d.resources();
        assert!(res.cpu_millis.get() >= 1000, "{res:?}");
        assert_eq!(res.cpu_millis.get() % 1000, 0);
        assert!(res.memory_mib.get() > 0, "{res:?}");
        assert!(res.disk_mib.get() > 0, "{res:?}");
        // This check also holds when the tests run on a GPU machine.
        match d.gpu_source() {
            "none" => assert!(res.gpus.is_empty()),
            "nvml" => assert!(!res.gpus.is_empty()),
            other => panic!("unexpected gpu source {other}"),
        }
        assert!(!d.hostname().trim().is_empty());
        assert!(!d.set_simulated_fault(0, Some("x".into())));

        let s = d.sample();
        let t = &s.telemetry;
        assert!(t.at.as_millis() > 1_600_000_000_000, "{t:?}");
        assert!(t.cpu_used_millis <= res.cpu_millis.get(), "{t:?}");
        assert!(t.memory_used_mib > 0 && t.memory_used_mib <= res.memory_mib.get());
        assert!(t.disk_free_mib <= res.disk_mib.get(), "{t:?}");
        assert_eq!(s.health.len(), res.gpus.len());
        assert_eq!(t.gpus.len(), res.gpus.len());
    }

    #[test]
    fn discovery_rejects_bad_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let err = Discovery::open(options(dir.path(), Some("2xH100"))).unwrap_err();
        assert!(matches!(err, DiscoveryError::Spec(_)), "{err}");
        let missing = dir.path().join("missing");
        let err = Discovery::open(options(&missing, None)).unwrap_err();
        assert!(matches!(err, DiscoveryError::DataDir { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(Discovery::fleet_member("", "n").is_err());
    }

    #[test]
    fn discovery_simulated_reports_gpus_and_host() {
        let dir = tempfile::tempdir().unwrap();
        let spec = "4xH100-80GB,2xL4-24GB";
        let mut d = Discovery::open(options(dir.path(), Some(spec))).unwrap();
        assert_eq!(d.gpu_source(), "simulated");
        let res = d.resources();
        assert_eq!(res.gpus, crate::simulated::parse(spec, "node-a").unwrap());
        assert!(res.memory_mib.get() > 0 && res.disk_mib.get() > 0);
        let s = d.sample();
        assert_eq!(s.health.len(), 6);
        assert!(s.health.iter().all(|h| h.healthy && h.reason.is_none()));
        let g = &s.telemetry.gpus[5];
        assert_eq!(g.uuid, res.gpus[5].uuid);
        assert_eq!(
            (g.memory_used_mib, g.utilization_percent, g.temperature_c),
            (0, Some(0), Some(35))
        );
        assert_eq!((g.power_mw, g.ecc_uncorrected), (Some(70_000), Some(0)));
        assert_eq!((g.last_xid, g.mig_enabled), (None, Some(false)));
    }

    #[test]
    fn discovery_fault_file_marks_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let faults = dir.path().join("simulated-gpu-faults");
        // A fault present at open is already in the registration.
        std::fs::write(&faults, "1 XID 79\n").unwrap();
        let mut d = Discovery::open(options(dir.path(), Some("4xH100-80GB"))).unwrap();
        let uuid3 = d.resources().gpus[3].uuid.clone();
        assert_eq!(
            d.resources().gpus[1].health_reason.as_deref(),
            Some("XID 79")
        );
        assert!(!d.resources().gpus[1].healthy);

        std::fs::write(
            &faults,
            format!("# injected\n\n1 XID 79\n{uuid3}   uncorrectable  ECC\n7 no such gpu\n2\n"),
        )
        .unwrap();
        let s = d.sample();
        let state: Vec<_> = s
            .health
            .iter()
            .map(|h| (h.healthy, h.reason.as_deref()))
            .collect();
        assert_eq!(
            state,
            [
                (true, None),
                (false, Some("XID 79")),
                (false, Some("simulated fault")),
                (false, Some("uncorrectable ECC")),
            ]
        );
        assert_eq!(s.health[3].uuid, uuid3);

        std::fs::write(&faults, "2 gone\n").unwrap();
        let s = d.sample();
        let unhealthy: Vec<_> = s.health.iter().filter(|h| !h.healthy).collect();
        assert_eq!(unhealthy.len(), 1);
        assert_eq!(unhealthy[0].reason.as_deref(), Some("gone"));

        std::fs::remove_file(&faults).unwrap();
        assert!(d.sample().health.iter().all(|h| h.healthy));
        assert!(d.resources().gpus.iter().all(|g| g.healthy));
    }

    #[test]
    fn discovery_set_simulated_fault() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Discovery::open(options(dir.path(), Some("2xL4-24GB"))).unwrap();
        assert!(d.set_simulated_fault(1, Some("XID 48".into())));
        assert!(!d.set_simulated_fault(2, Some("XID 48".into())));
        let gpu = &d.resources().gpus[1];
        assert_eq!(
            (gpu.healthy, gpu.health_reason.as_deref()),
            (false, Some("XID 48"))
        );
        assert!(!d.sample().health[1].healthy);
        assert!(d.set_simulated_fault(1, None));
        assert!(d.sample().health.iter().all(|h| h.healthy));
    }

    #[test]
    fn discovery_fleet_member_is_cheap_and_deterministic() {
        let spec = "8xH100-80GB";
        let mut a = Discovery::fleet_member(spec, "fleet-0001").unwrap();
        let b = Discovery::fleet_member(spec, "fleet-0001").unwrap();
        let c = Discovery::fleet_member(spec, "fleet-0002").unwrap();
        assert_eq!(a.resources(), b.resources());
        assert_ne!(a.resources().gpus[0].uuid, c.resources().gpus[0].uuid);
        assert_eq!(a.gpu_source(), "simulated");
        assert_eq!(a.hostname(), "fleet-0001");
        let res = a.resources();
        assert_eq!(res.cpu_millis.get(), 64_000);
        assert_eq!(res.memory_mib.get(), 512 * 1024);
        assert_eq!(res.gpus.len(), 8);

        let first = a.sample();
        let second = a.sample();
        let constant = |s: &Sample| NodeTelemetry {
            at: Timestamp::from_millis(0),
            ..s.telemetry.clone()
        };
        assert_eq!(constant(&first), constant(&second));
        assert!(first.telemetry.disk_free_mib <= res.disk_mib.get());
        assert!(a.set_simulated_fault(7, Some("XID 79".into())));
        assert!(!a.sample().health[7].healthy);

        // Thousands of members and samples must stay far below a heartbeat.
        let started = std::time::Instant::now();
        let mut fleet: Vec<_> = (0..2000)
            .map(|i| Discovery::fleet_member(spec, &format!("fleet-{i}")).unwrap())
            .collect();
        for member in &mut fleet {
            assert_eq!(member.sample().health.len(), 8);
        }
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }
}
