//! The host around the GPUs: CPU, memory and the data dir's filesystem.
//!
//! Disk is measured with `statvfs` on the data dir itself rather than picked from
//! sysinfo's disk list, because what matters is the one filesystem where the agent
//! keeps models and shards, whichever mount that turns out to be. Only CPU usage and
//! RAM are refreshed per sample; a full sysinfo refresh walks every process.

use std::path::{Path, PathBuf};

use aigrid_api::{DiskMib, MemoryMib, MilliCpu};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, System};

use super::DiscoveryError;

const MIB: u64 = 1024 * 1024;

/// What the host offers, fixed for the life of the agent.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostResources {
    pub cpu_millis: MilliCpu,
    pub memory_mib: MemoryMib,
    pub disk_mib: DiskMib,
}

/// One host reading.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostReading {
    pub cpu_used_millis: u64,
    pub memory_used_mib: u64,
    pub disk_free_mib: u64,
}

pub(super) enum Host {
    /// This machine.
    Real(Box<RealHost>),
    /// A fleet member: constant figures, no system calls.
    Fixed { name: String },
}

pub(super) struct RealHost {
    system: System,
    hostname: String,
    data_dir: PathBuf,
    resources: HostResources,
    /// The last disk reading, kept when a later `statvfs` fails.
    disk_free_mib: u64,
    disk_warned: bool,
}

/// A fleet member's host: a typical 8-GPU server.
const FIXED: HostResources = HostResources {
    cpu_millis: MilliCpu::new(64 * 1000),
    memory_mib: MemoryMib::new(512 * 1024),
    disk_mib: DiskMib::new(2 * 1024 * 1024),
};
const FIXED_READING: HostReading = HostReading {
    cpu_used_millis: 8 * 1000,
    memory_used_mib: 64 * 1024,
    disk_free_mib: 3 * 512 * 1024,
};

impl Host {
    pub(super) fn real(data_dir: PathBuf) -> Result<Host, DiscoveryError> {
        let data_dir_error = |source| DiscoveryError::DataDir {
            path: data_dir.clone(),
            source,
        };
        let meta = std::fs::metadata(&data_dir).map_err(data_dir_error)?;
        if !meta.is_dir() {
            return Err(data_dir_error(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        let (disk_total, disk_free) = disk_mib(&data_dir).map_err(data_dir_error)?;

        let mut system = System::new().map_err(|e| DiscoveryError::Host {
            reason: e.to_string(),
        })?;
        system.refresh_cpu_list(CpuRefreshKind::nothing());
        // The first usage refresh only sets the baseline the next one measures from.
        system.refresh_cpu_usage();
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let cores = match system.cpus().len() {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let resources = HostResources {
            cpu_millis: MilliCpu::new(cores as u64 * 1000),
            memory_mib: MemoryMib::new(system.total_memory() / MIB),
            disk_mib: DiskMib::new(disk_total),
        };
        Ok(Host::Real(Box::new(RealHost {
            system,
            hostname: hostname(),
            data_dir,
            resources,
            disk_free_mib: disk_free,
            disk_warned: false,
        })))
    }

    pub(super) fn fixed(name: &str) -> Host {
        Host::Fixed {
            name: name.to_owned(),
        }
    }

    pub(super) fn resources(&self) -> HostResources {
        match self {
            Host::Real(real) => real.resources,
            Host::Fixed { .. } => FIXED,
        }
    }

    pub(super) fn hostname(&self) -> &str {
        match self {
            Host::Real(real) => &real.hostname,
            Host::Fixed { name } => name,
        }
    }

    pub(super) fn sample(&mut self) -> HostReading {
        match self {
            Host::Real(real) => real.sample(),
            Host::Fixed { .. } => FIXED_READING,
        }
    }
}

impl RealHost {
    fn sample(&mut self) -> HostReading {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total_millis = self.resources.cpu_millis.get();
        let busy = f64::from(self.system.global_cpu_usage()) / 100.0;
        let cpu_used_millis = if busy.is_finite() {
            ((busy * total_millis as f64).round() as u64).min(total_millis)
        } else {
            0
        };
        match disk_mib(&self.data_dir) {
            Ok((_, free)) => {
                self.disk_free_mib = free;
                self.disk_warned = false;
            }
            Err(e) if !self.disk_warned => {
                tracing::warn!(
                    "cannot measure free space of {}: {e}; reporting the last reading",
                    self.data_dir.display()
                );
                self.disk_warned = true;
            }
            Err(_) => {}
        }
        HostReading {
            cpu_used_millis,
            memory_used_mib: self.system.used_memory() / MIB,
            disk_free_mib: self.disk_free_mib,
        }
    }
}

/// Total and available (to unprivileged users) MiB of the filesystem holding `dir`.
fn disk_mib(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field widths differ between platforms
    let unit = match u64::from(st.fragment_size()) {
        0 => u64::from(st.block_size()),
        n => n,
    };
    #[allow(clippy::useless_conversion)]
    let (blocks, available) = (u64::from(st.blocks()), u64::from(st.blocks_available()));
    Ok((
        blocks.saturating_mul(unit) / MIB,
        available.saturating_mul(unit) / MIB,
    ))
}

/// The kernel's host name; registration needs a non-empty one, so `localhost` is
/// the last resort.
fn hostname() -> String {
    System::host_name()
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
