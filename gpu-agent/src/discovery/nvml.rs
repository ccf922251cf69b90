//! NVIDIA GPUs through NVML.
//!
//! Everything that does not change while the driver is loaded (UUIDs, names, NUMA
//! nodes, NVLink islands, MIG support) is read once at open; a sample asks each GPU
//! only for its live readings and drains its XID event set without waiting. NVML
//! answers `NotSupported` for many queries on many boards, so each reading is
//! optional on its own and a failed query never fails the sample; only a device that
//! stops answering altogether is reported unhealthy.

use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};

use aigrid_api::{GpuDevice, GpuTelemetry, MemoryMib};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};

const MIB: u64 = 1024 * 1024;
/// NVML's `NVML_NVLINK_MAX_LINKS`; devices answer an error for links they lack.
const MAX_NVLINKS: u32 = 18;
/// NVML's `NVML_DEVICE_MIG_ENABLE`.
const MIG_ENABLED: u32 = 1;
/// XIDs NVIDIA attributes to the application, not the hardware; the Kubernetes
/// device plugin skips the same set by default.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];
/// Bound on events drained per sample, so a storm cannot stall a heartbeat.
const MAX_EVENTS_PER_SAMPLE: usize = 64;

/// NVML is process-wide (the driver reference-counts `nvmlInit`) and every `Device`
/// borrows the library, so one instance lives as long as the process; a failed load
/// is remembered too, so it costs one attempt per process.
static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();

fn nvml() -> Result<&'static Nvml, String> {
    NVML.get_or_init(|| Nvml::init().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

pub(super) struct NvmlGpus {
    /// The inventory, health included; parallel to `gpus`.
    devices: Vec<GpuDevice>,
    gpus: Vec<NvmlGpu>,
}

struct NvmlGpu {
    device: Device<'static>,
    /// Critical XID events; `None` where the device does not deliver them. The
    /// mutex is never locked (sampling has `&mut`): it only makes the set `Sync`.
    events: Option<Mutex<EventSet<'static>>>,
    last_xid: Option<u64>,
}

impl NvmlGpus {
    /// The node's NVIDIA GPUs, or why there are none to offer.
    pub(super) fn open() -> Result<Self, String> {
        let nvml = nvml()?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("cannot count devices: {e}"))?;
        let mut devices = Vec::new();
        let mut gpus = Vec::new();
        let mut bus_ids = Vec::new();
        let mut peers = Vec::new();
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(e) => {
                    tracing::warn!("NVML device {index} skipped: {e}");
                    continue;
                }
            };
            let uuid = match device.uuid() {
                Ok(uuid) => uuid,
                Err(e) => {
                    tracing::warn!("NVML device {index} skipped: no UUID: {e}");
                    continue;
                }
            };
            let bus_id = device.pci_info().ok().map(|p| sysfs_bus_id(&p.bus_id));
            devices.push(GpuDevice {
                index,
                uuid,
                vendor: "nvidia".to_owned(),
                model: device.name().unwrap_or_else(|_| "NVIDIA GPU".to_owned()),
                memory_mib: MemoryMib::new(device.memory_info().map_or(0, |m| m.total / MIB)),
                healthy: true,
                health_reason: None,
                numa_node: numa_node(&device, bus_id.as_deref()),
                interconnect_group: None,
                mig_capable: device.mig_mode().is_ok(),
            });
            peers.push(nvlink_peers(&device, devices.len() - 1));
            bus_ids.push(bus_id);
            gpus.push(NvmlGpu {
                events: xid_events(nvml, &device, index),
                device,
                last_xid: None,
            });
        }
        if devices.is_empty() {
            return Err(match count {
                0 => "no NVIDIA GPU found".to_owned(),
                n => format!("none of {n} NVIDIA GPUs could be queried"),
            });
        }
        for (device, group) in devices
            .iter_mut()
            .zip(interconnect_groups(&bus_ids, &peers))
        {
            device.interconnect_group = group;
        }
        Ok(Self { devices, gpus })
    }

    pub(super) fn devices(&self) -> &[GpuDevice] {
        &self.devices
    }

    /// Reads every GPU, updating its health in the inventory.
    pub(super) fn sample(&mut self) -> Vec<GpuTelemetry> {
        self.gpus
            .iter_mut()
            .zip(&mut self.devices)
            .map(|(gpu, info)| gpu.sample(info))
            .collect()
    }
}

impl NvmlGpu {
    fn sample(&mut self, info: &mut GpuDevice) -> GpuTelemetry {
        let xid = self.drain_xids();
        let mut reading = GpuTelemetry {
            uuid: info.uuid.clone(),
            last_xid: self.last_xid,
            ..GpuTelemetry::default()
        };
        let reason = match self.device.memory_info() {
            Err(e) if !is_query_refusal(&e) => Some(format!("device unreachable: {e}")),
            memory => {
                reading.memory_used_mib = memory.map_or(0, |m| m.used / MIB);
                let mut lost = None;
                let d = &self.device;
                reading.utilization_percent =
                    field(d.utilization_rates(), &mut lost).map(|u| u.gpu);
                reading.temperature_c = field(d.temperature(TemperatureSensor::Gpu), &mut lost);
                reading.power_mw = field(d.power_usage(), &mut lost);
                reading.ecc_uncorrected = field(
                    d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                    &mut lost,
                );
                reading.mig_enabled =
                    field(d.mig_mode(), &mut lost).map(|m| m.current == MIG_ENABLED);
                lost.map(|e| format!("device unreachable: {e}"))
                    .or(xid)
                    .or_else(|| {
                        reading
                            .ecc_uncorrected
                            .filter(|n| *n > 0)
                            .map(|n| format!("uncorrectable ECC errors: {n}"))
                    })
            }
        };
        info.healthy = reason.is_none();
        info.health_reason = reason;
        reading
    }

    /// Drains the XID events raised since the last sample; returns why they make the
    /// GPU unhealthy, if they do.
    fn drain_xids(&mut self) -> Option<String> {
        let set = self
            .events
            .as_mut()?
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let mut reason = None;
        for _ in 0..MAX_EVENTS_PER_SAMPLE {
            match set.wait(0) {
                Ok(event) => match event.event_data {
                    Some(XidError::Value(xid)) => {
                        self.last_xid = Some(xid);
                        if !APPLICATION_XIDS.contains(&xid) {
                            reason = Some(format!("XID {xid}"));
                        }
                    }
                    Some(XidError::Unknown) => reason = Some("XID error (code unknown)".to_owned()),
                    None => {}
                },
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    tracing::debug!("draining XID events: {e}");
                    break;
                }
            }
        }
        reason
    }
}

/// Errors that mean "this query is not offered here", as opposed to "the device did
/// not answer".
fn is_query_refusal(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::NotSupported
            | NvmlError::NoPermission
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_)
            | NvmlError::NoData
    )
}

/// One optional reading; a lost GPU is remembered so the sample can say so.
fn field<T>(result: Result<T, NvmlError>, lost: &mut Option<NvmlError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e @ (NvmlError::GpuLost | NvmlError::ResetRequired)) => {
            lost.get_or_insert(e);
            None
        }
        Err(_) => None,
    }
}

/// A set registered for the device's critical XID events, if it delivers them.
fn xid_events(
    nvml: &'static Nvml,
    device: &Device<'static>,
    index: u32,
) -> Option<Mutex<EventSet<'static>>> {
    let supported = device.supported_event_types().ok()?;
    if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
        tracing::info!("GPU {index} does not deliver XID events; XIDs will not be reported");
        return None;
    }
    let registered = nvml
        .create_event_set()
        .map_err(|e| e.to_string())
        .and_then(|set| {
            device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| e.to_string())
        });
    match registered {
        Ok(set) => Some(Mutex::new(set)),
        Err(e) => {
            tracing::info!("GPU {index}: XID events unavailable ({e}); XIDs will not be reported");
            None
        }
    }
}

/// The NUMA node from NVML, or from sysfs on drivers without the query.
fn numa_node(device: &Device<'_>, bus_id: Option<&str>) -> Option<u32> {
    if let Some(node) = device.numa_node_id().ok().filter(|n| *n != u32::MAX) {
        return Some(node);
    }
    let path = Path::new("/sys/bus/pci/devices")
        .join(bus_id?)
        .join("numa_node");
    let node: i64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    u32::try_from(node).ok()
}

/// What each active NVLink of the device reaches, as PCI bus ids (another GPU or
/// an NVSwitch). A link whose far end is unknown still counts, as a peer of its own.
fn nvlink_peers(device: &Device<'_>, position: usize) -> Vec<String> {
    (0..MAX_NVLINKS)
        .filter_map(|link| {
            let nvlink = device.link_wrapper_for(link);
            if !nvlink.is_active().unwrap_or(false) {
                return None;
            }
            Some(match nvlink.remote_pci_info() {
                Ok(remote) => sysfs_bus_id(&remote.bus_id),
                Err(_) => format!("unknown-peer-of-{position}"),
            })
        })
        .collect()
}

/// NVML writes `00000000:3B:00.0`; sysfs and everything else `0000:3b:00.0`.
fn sysfs_bus_id(nvml_bus_id: &str) -> String {
    let id = nvml_bus_id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 && domain.is_ascii() => {
            format!("{}:{rest}", &domain[domain.len() - 4..])
        }
        _ => id,
    }
}

/// NVLink islands: GPUs joined by active links, directly or through the same
/// NVSwitch, share a group named `nvlink-N` (numbered in GPU order); GPUs without an
/// active link get none. `bus_ids[i]` and `peers[i]` describe GPU `i`.
fn interconnect_groups(bus_ids: &[Option<String>], peers: &[Vec<String>]) -> Vec<Option<String>> {
    let mut nodes: std::collections::HashMap<&str, usize> = bus_ids
        .iter()
        .enumerate()
        .filter_map(|(i, b)| Some((b.as_deref()?, i)))
        .collect();
    let mut parent: Vec<usize> = (0..bus_ids.len()).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for (gpu, remotes) in peers.iter().enumerate() {
        for remote in remotes {
            let next = parent.len();
            let node = *nodes.entry(remote.as_str()).or_insert(next);
            if node == next {
                parent.push(next);
            }
            let (a, b) = (find(&mut parent, gpu), find(&mut parent, node));
            parent[a.max(b)] = a.min(b);
        }
    }
    let mut names: Vec<Option<usize>> = vec![None; parent.len()];
    let mut next_group = 0;
    (0..bus_ids.len())
        .map(|gpu| {
            if peers.get(gpu).is_none_or(Vec::is_empty) {
                return None;
            }
            let root = find(&mut parent, gpu);
            let n = *names[root].get_or_insert_with(|| {
                next_group += 1;
                next_group - 1
            });
            Some(format!("nvlink-{n}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Discovery, DiscoveryOptions};

    fn ids(ids: &[&str]) -> Vec<Option<String>> {
        ids.iter().map(|s| Some((*s).to_owned())).collect()
    }

    fn links(links: &[&[&str]]) -> Vec<Vec<String>> {
        links
            .iter()
            .map(|l| l.iter().map(|s| (*s).to_owned()).collect())
            .collect()
    }

    #[test]
    fn bus_ids_match_sysfs() {
        assert_eq!(sysfs_bus_id("00000000:3B:00.0"), "0000:3b:00.0");
        assert_eq!(sysfs_bus_id("0000:3b:00.0"), "0000:3b:00.0");
    }

    #[test]
    fn nvlink_islands_by_direct_links_and_switches() {
        // GPUs 0-1 linked directly, 2-3 through a switch, 4 alone, 5 unknown far end.
        let groups = interconnect_groups(
            &ids(&["g0", "g1", "g2", "g3", "g4", "g5"]),
            &links(&[
                &["g1", "g1"],
                &["g0"],
                &["sw"],
                &["sw"],
                &[],
                &["unknown-peer-of-5"],
            ]),
        );
        let groups: Vec<_> = groups.iter().map(Option::as_deref).collect();
        assert_eq!(
            groups,
            [
                Some("nvlink-0"),
                Some("nvlink-0"),
                Some("nvlink-1"),
                Some("nvlink-1"),
                None,
                Some("nvlink-2")
            ]
        );
        // Eight GPUs on a full NVSwitch fabric form one island.
        let fabric: Vec<&[&str]> = vec![&["sw0", "sw1", "sw2", "sw3"]; 8];
        let bus: Vec<String> = (0..8).map(|i| format!("g{i}")).collect();
        let bus: Vec<&str> = bus.iter().map(String::as_str).collect();
        let groups = interconnect_groups(&ids(&bus), &links(&fabric));
        assert!(groups.iter().all(|g| g.as_deref() == Some("nvlink-0")));
    }

    /// Runs where an NVIDIA driver is installed (the build script looks):
    /// `cargo test -p aigrid-agent nvml -- --nocapture` prints what it found.
    #[test]
    #[cfg_attr(
        not(nvidia_driver),
        ignore = "skipped: no NVIDIA driver here (libnvidia-ml.so.1 and its kernel module)"
    )]
    fn nvml_discovers_real_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Discovery::open(DiscoveryOptions {
            simulate_gpus: None,
            data_dir: dir.path().to_owned(),
            seed: "nvml-test".to_owned(),
        })
        .unwrap();
        assert_eq!(d.gpu_source(), "nvml");
        let res = d.resources();
        assert!(!res.gpus.is_empty());
        for gpu in &res.gpus {
            println!(
                "GPU {} {} {} MiB {} numa={:?} group={:?} mig_capable={} healthy={} {:?}",
                gpu.index,
                gpu.model,
                gpu.memory_mib,
                gpu.uuid,
                gpu.numa_node,
                gpu.interconnect_group,
                gpu.mig_capable,
                gpu.healthy,
                gpu.health_reason
            );
            assert!(gpu.uuid.starts_with("GPU-"), "{}", gpu.uuid);
            assert!(!gpu.model.trim().is_empty());
            assert!(gpu.memory_mib.get() > 0);
            assert_eq!(gpu.vendor, "nvidia");
        }
        let sample = d.sample();
        assert_eq!(sample.health.len(), res.gpus.len());
        for (gpu, reading) in res.gpus.iter().zip(&sample.telemetry.gpus) {
            assert_eq!(gpu.uuid, reading.uuid);
            assert!(reading.memory_used_mib <= gpu.memory_mib.get());
            println!("{reading:?}");
        }
        println!("{:?}", sample.health);
    }
}
