//! Metering: what every running allocation holds (GPUs by model, CPU, memory),
//! counted over the time it runs, in hourly aggregates.
//!
//! The leader commits a [`Command::Meter`](super::Command::Meter) every
//! [`METER_EVERY_MS`]; applying it counts, for every allocation its node last
//! reported running, what it holds times the time since the previous meter, split at
//! hour boundaries into buckets keyed by hour, circle, job, node and GPU model. The
//! state is what the agents' reports made it, so the count follows their heartbeats
//! to within one meter interval, and one entry commits a whole interval, not one per
//! heartbeat. Every replica counts the same from the same log: amounts are integers
//! (thousandths of a GPU or a core, MiB, milliseconds).
//!
//! A gap between meters longer than [`MAX_GAP_MS`] (no leader for a while) counts
//! as [`MAX_GAP_MS`]: what ran in the rest of it is not known, and is reported as
//! unmetered rather than guessed. Buckets older than [`RETENTION_HOURS`] are
//! dropped; the running totals behind `/metrics` are kept per circle and GPU model.

use std::collections::BTreeMap;

use aigrid_api::{
    AllocState, Allocation, JobId, NodeId, Timestamp, UsageAmounts, UsageLine, UsageReport,
};
use serde::{Deserialize, Serialize};

use super::ClusterState;

/// How often the leader meters.
pub const METER_EVERY_MS: u64 = 10_000;
/// The longest interval one meter counts.
pub const MAX_GAP_MS: u64 = 60_000;
/// Hourly buckets kept: 31 days.
pub const RETENTION_HOURS: u64 = 31 * 24;

const HOUR_MS: u64 = 3_600_000;

/// Amounts in integers: thousandths of a GPU or a core, or MiB, times milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amounts {
    gpu_milli_ms: u64,
    cpu_milli_ms: u64,
    memory_mib_ms: u64,
}

impl Amounts {
    fn add(&mut self, other: &Amounts) {
        self.gpu_milli_ms = self.gpu_milli_ms.saturating_add(other.gpu_milli_ms);
        self.cpu_milli_ms = self.cpu_milli_ms.saturating_add(other.cpu_milli_ms);
        self.memory_mib_ms = self.memory_mib_ms.saturating_add(other.memory_mib_ms);
    }

    /// What is held each millisecond (these amounts) held for `ms`.
    fn times(self, ms: u64) -> Amounts {
        Amounts {
            gpu_milli_ms: self.gpu_milli_ms.saturating_mul(ms),
            cpu_milli_ms: self.cpu_milli_ms.saturating_mul(ms),
            memory_mib_ms: self.memory_mib_ms.saturating_mul(ms),
        }
    }

    /// As the API shows it.
    pub fn to_api(self) -> UsageAmounts {
        UsageAmounts {
            gpu_seconds: self.gpu_milli_ms as f64 / 1e6,
            cpu_seconds: self.cpu_milli_ms as f64 / 1e6,
            memory_mib_seconds: self.memory_mib_ms as f64 / 1e3,
        }
    }
}

/// One hourly bucket's key. `circle` is empty for the admins' jobs and `gpu_model`
/// for CPU-only allocations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BucketKey {
    hour: u64,
    circle: String,
    job: JobId,
    node: NodeId,
    gpu_model: String,
}

impl BucketKey {
    /// The least key of `hour`: every key of that hour or later sorts at or after it.
    fn first_of(hour: u64) -> BucketKey {
        BucketKey {
            hour,
            circle: String::new(),
            job: JobId::new(""),
            node: NodeId::new(""),
            gpu_model: String::new(),
        }
    }
}

/// The metering tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Metering {
    /// When the last meter applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_at: Option<Timestamp>,
    /// Hourly use, at most [`RETENTION_HOURS`] back from the last meter.
    #[serde(default, with = "pairs")]
    buckets: BTreeMap<BucketKey, Amounts>,
    /// Use since the cluster began, by circle and GPU model: counters.
    #[serde(default, with = "pairs")]
    totals: BTreeMap<(String, String), Amounts>,
    /// Milliseconds of gaps longer than [`MAX_GAP_MS`] that were not counted.
    #[serde(default)]
    unmetered_ms: u64,
}

/// Maps with structured keys as lists of pairs (JSON keys must be strings).
pub(super) mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// What one meter counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metered {
    /// Allocations counted.
    pub allocations: usize,
    /// Milliseconds counted for each.
    pub ms: u64,
}

/// Running totals per circle and GPU model, for `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageTotal {
    /// The circle; empty for the admins' jobs.
    pub circle: String,
    /// The GPU model; empty for CPU-only use.
    pub gpu_model: String,
    /// The use.
    pub amounts: UsageAmounts,
}

impl ClusterState {
    /// Counts what running allocations held since the last meter (see the module
    /// documentation). A meter at or before the last one counts nothing.
    pub(super) fn meter(&mut self, at: Timestamp) -> Metered {
        let last = self.tables.metering.last_at;
        let Some(last) = last.filter(|l| *l < at) else {
            if last.is_none() {
                self.tables.metering.last_at = Some(at);
            }
            return Metered {
                allocations: 0,
                ms: 0,
            };
        };
        let (now, last) = (at.as_millis(), last.as_millis());
        let from = last.max(now.saturating_sub(MAX_GAP_MS));
        // Each running allocation's bucket (its hour set per piece of the interval)
        // and what it holds per millisecond.
        let mut counted: Vec<(BucketKey, Amounts)> = Vec::new();
        // And what each costs per millisecond where its circle pays.
        let mut costs = Vec::new();
        for alloc in self.tables.allocations.values() {
            if alloc.state != AllocState::Running {
                continue;
            }
            let circle = self.job_circle(&alloc.job_id);
            let (gpu_model, gpu_milli) = self.gpus_held(alloc);
            costs.extend(self.cost_of(alloc, &circle, &gpu_model, gpu_milli));
            let r = &alloc.resources;
            let key = BucketKey {
                hour: 0,
                circle,
                job: alloc.job_id.clone(),
                node: alloc.node_id.clone(),
                gpu_model,
            };
            let held = Amounts {
                gpu_milli_ms: gpu_milli,
                cpu_milli_ms: r.cpu_millis.get(),
                memory_mib_ms: r.memory_mib.get(),
            };
            counted.push((key, held));
        }
        let metering = &mut self.tables.metering;
        metering.unmetered_ms = metering.unmetered_ms.saturating_add(from - last);
        for (key, held) in &counted {
            let mut start = from;
            while start < now {
                let hour = start / HOUR_MS;
                let end = now.min((hour + 1) * HOUR_MS);
                let amounts = held.times(end - start);
                let key = BucketKey {
                    hour,
                    ..key.clone()
                };
                metering
                    .totals
                    .entry((key.circle.clone(), key.gpu_model.clone()))
                    .or_default()
                    .add(&amounts);
                metering.buckets.entry(key).or_default().add(&amounts);
                start = end;
            }
        }
        // Buckets are ordered by hour first: the expired ones are a prefix.
        let oldest = (now / HOUR_MS).saturating_sub(RETENTION_HOURS);
        metering.buckets = metering.buckets.split_off(&BucketKey::first_of(oldest));
        metering.last_at = Some(at);
        self.accrue(costs, now - from);
        Metered {
            allocations: counted.len(),
            ms: now - from,
        }
    }

    /// The GPU model an allocation holds and how many thousandths of GPUs: 1000
    /// per whole GPU, a slice its share of the GPU's memory.
    pub(super) fn gpus_held(&self, alloc: &Allocation) -> (String, u64) {
        let Some(request) = alloc.resources.gpus.as_ref() else {
            return (String::new(), 0);
        };
        let devices = self
            .tables
            .nodes
            .get(&alloc.node_id)
            .map(|n| n.resources.gpus.as_slice())
            .unwrap_or_default();
        let device = alloc
            .gpus
            .first()
            .and_then(|uuid| devices.iter().find(|d| d.uuid == *uuid));
        let model = device
            .map(|d| d.model.clone())
            .or_else(|| request.model.clone())
            .unwrap_or_default();
        let milli = match (request.memory_slice_mib, device) {
            (Some(slice), Some(d)) if d.memory_mib.get() > 0 => {
                (1000 * slice.get() / d.memory_mib.get()).min(1000)
            }
            (Some(_), _) => 1000,
            (None, _) => 1000 * (alloc.gpus.len().max(request.count as usize) as u64),
        };
        (model, milli)
    }

    /// The use of `circle` (every circle's when `None`) from the start of the hour
    /// holding `since`.
    pub fn usage(&self, circle: Option<&str>, since: Timestamp) -> UsageReport {
        let first_hour = since.as_millis() / HOUR_MS;
        let mut total = Amounts::default();
        let mut by_model: BTreeMap<&str, Amounts> = BTreeMap::new();
        let mut by_job: BTreeMap<&str, Amounts> = BTreeMap::new();
        let mut by_node: BTreeMap<&str, Amounts> = BTreeMap::new();
        let metering = &self.tables.metering;
        for (key, amounts) in metering.buckets.range(BucketKey::first_of(first_hour)..) {
            if circle.is_some_and(|c| c != key.circle) {
                continue;
            }
            total.add(amounts);
            if !key.gpu_model.is_empty() {
                by_model.entry(&key.gpu_model).or_default().add(&Amounts {
                    gpu_milli_ms: amounts.gpu_milli_ms,
                    ..Amounts::default()
                });
            }
            by_job.entry(key.job.as_str()).or_default().add(amounts);
            by_node.entry(key.node.as_str()).or_default().add(amounts);
        }
        let lines = |map: BTreeMap<&str, Amounts>, jobs: bool| -> Vec<UsageLine> {
            map.into_iter()
                .map(|(key, a)| UsageLine {
                    key: key.to_owned(),
                    name: jobs
                        .then(|| self.tables.jobs.get(&JobId::new(key)))
                        .flatten()
                        .map(|j| j.spec.name.clone()),
                    amounts: a.to_api(),
                })
                .collect()
        };
        UsageReport {
            circle: circle.map(str::to_owned),
            from: Timestamp::from_millis(first_hour * HOUR_MS),
            metered_until: self.metered_until(),
            total: total.to_api(),
            by_gpu_model: lines(by_model, false),
            by_job: lines(by_job, true),
            by_node: lines(by_node, false),
        }
    }

    /// Use since the cluster began, per circle and GPU model.
    pub fn usage_totals(&self) -> Vec<UsageTotal> {
        self.tables
            .metering
            .totals
            .iter()
            .map(|((circle, gpu_model), a)| UsageTotal {
                circle: circle.clone(),
                gpu_model: gpu_model.clone(),
                amounts: a.to_api(),
            })
            .collect()
    }

    /// When the last meter applied.
    pub fn metered_until(&self) -> Option<Timestamp> {
        self.tables.metering.last_at
    }

    /// Milliseconds of leaderless gaps that were not metered.
    pub fn unmetered_ms(&self) -> u64 {
        self.tables.metering.unmetered_ms
    }
}
