//! Simulated GPUs: the inventory from a `--simulate-gpus` spec, constant telemetry,
//! and faults injected through the fault file or [`SimulatedGpus::set_fault`] (the
//! file format is in the parent module's docs).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aigrid_api::{GpuDevice, GpuTelemetry};

use super::DiscoveryError;

/// The fault file's name inside the data dir.
pub(super) const FAULT_FILE: &str = "simulated-gpu-faults";

/// Why a GPU named on a fault-file line without words is unhealthy.
const DEFAULT_REASON: &str = "simulated fault";

pub(super) struct SimulatedGpus {
    devices: Vec<GpuDevice>,
    /// Faults set from code, by index; they win over the file's.
    set_faults: BTreeMap<u32, String>,
    /// `None` for fleet members, which do no disk I/O.
    file: Option<FaultFile>,
}

impl SimulatedGpus {
    pub(super) fn new(
        spec: &str,
        seed: &str,
        data_dir: Option<&Path>,
    ) -> Result<Self, DiscoveryError> {
        let devices = crate::simulated::parse(spec, seed)?;
        let mut gpus = Self {
            devices,
            set_faults: BTreeMap::new(),
            file: data_dir.map(|dir| FaultFile::new(dir.join(FAULT_FILE))),
        };
        gpus.apply_faults();
        Ok(gpus)
    }

    pub(super) fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    pub(super) fn set_fault(&mut self, index: u32, reason: Option<String>) -> bool {
        if !self.devices.iter().any(|d| d.index == index) {
            return false;
        }
        match reason {
            Some(reason) => self.set_faults.insert(index, reason),
            None => self.set_faults.remove(&index),
        };
        self.apply_faults();
        true
    }

    /// Re-reads the fault file if it changed, then reports the constant readings.
    pub(super) fn sample(&mut self) -> Vec<GpuTelemetry> {
        if self.file.is_some() {
            self.apply_faults();
        }
        self.devices
            .iter()
            .map(|d| GpuTelemetry {
                uuid: d.uuid.clone(),
                memory_used_mib: 0,
                utilization_percent: Some(0),
                temperature_c: Some(35),
                power_mw: Some(70_000),
                ecc_uncorrected: Some(0),
                last_xid: None,
                mig_enabled: Some(false),
            })
            .collect()
    }

    fn apply_faults(&mut self) {
        if let Some(file) = &mut self.file {
            file.refresh(&self.devices);
        }
        let file_faults = self.file.as_ref().map(|f| &f.faults);
        for device in &mut self.devices {
            let reason = self
                .set_faults
                .get(&device.index)
                .or_else(|| file_faults.and_then(|f| f.get(&device.index)));
            device.healthy = reason.is_none();
            device.health_reason = reason.cloned();
        }
    }
}

/// The fault file and what it said when last read.
struct FaultFile {
    path: PathBuf,
    /// Modification time, size and inode at the last read; `None` while absent.
    seen: Option<(Option<SystemTime>, u64, u64)>,
    faults: BTreeMap<u32, String>,
    /// GPU names and errors already warned about.
    warned: BTreeSet<String>,
}

impl FaultFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            seen: None,
            faults: BTreeMap::new(),
            warned: BTreeSet::new(),
        }
    }

    /// One `stat` per call; the file is read only when the `stat` changed.
    fn refresh(&mut self, devices: &[GpuDevice]) {
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    let message = format!("cannot stat {}: {e}", self.path.display());
                    warn_once(&mut self.warned, &e.to_string(), message);
                }
                self.seen = None;
                self.faults.clear();
                return;
            }
        };
        let stamp = (meta.modified().ok(), meta.len(), meta.ino());
        if self.seen == Some(stamp) {
            return;
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                self.seen = Some(stamp);
                self.faults = self.parse(&text, devices);
            }
            Err(e) => {
                let message = format!("cannot read {}: {e}", self.path.display());
                warn_once(&mut self.warned, &e.to_string(), message);
            }
        }
    }

    fn parse(&mut self, text: &str, devices: &[GpuDevice]) -> BTreeMap<u32, String> {
        let mut faults = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let Some(gpu) = words.next() else { continue };
            let reason = words.collect::<Vec<_>>().join(" ");
            let reason = if reason.is_empty() {
                DEFAULT_REASON.to_owned()
            } else {
                reason
            };
            let index = devices
                .iter()
                .find(|d| d.uuid.eq_ignore_ascii_case(gpu) || d.index.to_string() == gpu)
                .map(|d| d.index);
            match index {
                Some(index) => {
                    faults.entry(index).or_insert(reason);
                }
                None => {
                    let message = format!(
                        "{}: no GPU `{gpu}` on this node; line ignored",
                        self.path.display()
                    );
                    warn_once(&mut self.warned, gpu, message);
                }
            }
        }
        faults
    }
}

/// Logs `message` the first time `key` comes up, so an edit loop does not flood the
/// log.
fn warn_once(warned: &mut BTreeSet<String>, key: &str, message: String) {
    if warned.insert(key.to_owned()) {
        tracing::warn!("{message}");
    }
}
