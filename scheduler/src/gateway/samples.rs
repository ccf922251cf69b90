//! What the gateway measured of each replica's requests: when each was answered,
//! how long its first byte took, and whether it failed. Rollouts judge canaries on
//! these (error ratio and p99 over a window).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Requests remembered per replica; older ones are dropped first.
const KEPT_PER_REPLICA: usize = 8192;
/// Requests older than this are forgotten.
const KEPT_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    millis: u32,
    failed: bool,
}

/// One replica's requests over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaStats {
    /// Requests answered (or failed) in the window.
    pub requests: u32,
    /// Of those, answered with a server error or not at all.
    pub failed: u32,
    /// The 99th percentile of the time to the first byte; `None` without requests.
    pub p99: Option<Duration>,
}

impl ReplicaStats {
    /// The share of requests that failed.
    pub fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        f64::from(self.failed) / f64::from(self.requests)
    }
}

/// Bounded per-replica request samples.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    by_replica: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl Samples {
    /// Records one request to `endpoint`.
    pub(crate) fn record(&self, endpoint: &str, took: Duration, failed: bool) {
        let now = Instant::now();
        let mut table = self.by_replica.lock();
        let samples = table.entry(endpoint.to_owned()).or_default();
        while samples.len() >= KEPT_PER_REPLICA
            || samples.front().is_some_and(|s| now - s.at > KEPT_FOR)
        {
            samples.pop_front();
        }
        samples.push_back(Sample {
            at: now,
            millis: u32::try_from(took.as_millis()).unwrap_or(u32::MAX),
            failed,
        });
    }

    /// The requests to `endpoint` in the `window` ending now.
    pub(crate) fn stats(&self, endpoint: &str, window: Duration) -> ReplicaStats {
        let now = Instant::now();
        let table = self.by_replica.lock();
        let Some(samples) = table.get(endpoint) else {
            return ReplicaStats::default();
        };
        let mut millis: Vec<u32> = Vec::new();
        let mut failed = 0u32;
        for sample in samples.iter().rev() {
            if now - sample.at > window {
                break;
            }
            millis.push(sample.millis);
            failed += u32::from(sample.failed);
        }
        if millis.is_empty() {
            return ReplicaStats::default();
        }
        millis.sort_unstable();
        // The nearest-rank 99th percentile.
        let rank = (millis.len() * 99).div_ceil(100).max(1) - 1;
        ReplicaStats {
            requests: u32::try_from(millis.len()).unwrap_or(u32::MAX),
            failed,
            p99: Some(Duration::from_millis(u64::from(millis[rank]))),
        }
    }

    /// Forgets replicas no longer routed to.
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.by_replica.lock().retain(|endpoint, _| keep(endpoint));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_failures_and_take_the_nearest_rank_p99() {
        let samples = Samples::default();
        for i in 1..=100u64 {
            samples.record("http://a", Duration::from_millis(i), i % 10 == 0);
        }
        let stats = samples.stats("http://a", Duration::from_secs(60));
        assert_eq!(stats.requests, 100);
        assert_eq!(stats.failed, 10);
        assert!((stats.error_ratio() - 0.1).abs() < 1e-9);
        assert_eq!(stats.p99, Some(Duration::from_millis(99)));
        assert_eq!(
            samples.stats("http://b", Duration::from_secs(60)),
            ReplicaStats::default()
        );
        samples.retain(|e| e != "http://a");
        assert_eq!(
            samples.stats("http://a", Duration::from_secs(60)).requests,
            0
        );
    }
}
