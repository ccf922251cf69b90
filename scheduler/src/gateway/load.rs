//! What each replica says of its load when probed (`/ready`'s `load`): requests in
//! flight now, and its request and generated-token counters, of which the last few
//! seconds give rates. Every server probes every replica, so each server's gateway
//! knows every replica's load, whichever server relayed the requests; the leader's
//! autoscaler reads its own.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use aigrid_api::ReplicaLoadReport;
use parking_lot::Mutex;

/// How far back the rates look; older samples are dropped.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// A replica's load as its latest probes found it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplicaLoad {
    /// Requests it was serving at the latest probe.
    pub in_flight: u64,
    /// Requests it answered per second over the last few seconds.
    pub requests_per_second: f64,
    /// Tokens it generated per second over the last few seconds.
    pub tokens_per_second: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    report: ReplicaLoadReport,
}

/// Every replica's recent load samples, by endpoint.
#[derive(Debug, Default)]
pub(super) struct Loads {
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl Loads {
    /// Records what `endpoint` answered at `at`.
    pub(super) fn record(&self, endpoint: &str, at: Instant, report: ReplicaLoadReport) {
        let mut samples = self.samples.lock();
        let kept = samples.entry(endpoint.to_owned()).or_default();
        if kept.back().is_some_and(|last| {
            last.report.requests > report.requests
                || last.report.generated_tokens > report.generated_tokens
        }) {
            // The counters went back: the replica restarted.
            kept.clear();
        }
        kept.push_back(Sample { at, report });
        while kept
            .front()
            .is_some_and(|s| at.duration_since(s.at) > RATE_WINDOW)
        {
            kept.pop_front();
        }
    }

    /// Forgets the replicas `keep` turns down.
    pub(super) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.samples.lock().retain(|endpoint, _| keep(endpoint));
    }

    /// `endpoint`'s load, if a probe heard from it within the rate window.
    pub(super) fn get(&self, endpoint: &str, now: Instant) -> Option<ReplicaLoad> {
        let samples = self.samples.lock();
        let kept = samples.get(endpoint)?;
        let (first, last) = (kept.front()?, kept.back()?);
        if now.saturating_duration_since(last.at) > RATE_WINDOW {
            return None;
        }
        let span = last.at.duration_since(first.at).as_secs_f64();
        let rate = |f: fn(&ReplicaLoadReport) -> u64| {
            if span > 0.0 {
                f(&last.report).saturating_sub(f(&first.report)) as f64 / span
            } else {
                0.0
            }
        };
        Some(ReplicaLoad {
            in_flight: last.report.in_flight,
            requests_per_second: rate(|r| r.requests),
            tokens_per_second: rate(|r| r.generated_tokens),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(in_flight: u64, requests: u64, generated_tokens: u64) -> ReplicaLoadReport {
        ReplicaLoadReport {
            in_flight,
            requests,
            generated_tokens,
        }
    }

    #[test]
    fn rates_come_from_the_counters_over_the_window_and_a_restart_starts_afresh() {
        let loads = Loads::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        loads.record("a", at(0), report(2, 10, 100));
        assert_eq!(
            loads.get("a", at(0)).unwrap(),
            ReplicaLoad {
                in_flight: 2,
                requests_per_second: 0.0,
                tokens_per_second: 0.0
            }
        );
        loads.record("a", at(1000), report(3, 14, 300));
        loads.record("a", at(2000), report(1, 20, 500));
        let load = loads.get("a", at(2000)).unwrap();
        assert_eq!(load.in_flight, 1);
        assert!((load.requests_per_second - 5.0).abs() < 1e-9, "{load:?}");
        assert!((load.tokens_per_second - 200.0).abs() < 1e-9, "{load:?}");
        // Samples older than the window no longer count.
        loads.record("a", at(7500), report(0, 20, 500));
        assert_eq!(loads.get("a", at(7500)).unwrap().tokens_per_second, 0.0);
        // A restarted replica's counters begin again at zero.
        loads.record("a", at(8000), report(1, 1, 10));
        assert_eq!(loads.get("a", at(8000)).unwrap().requests_per_second, 0.0);
        // Silent for longer than the window: nothing is known.
        assert_eq!(loads.get("a", at(14_000)), None);
        loads.retain(|e| e != "a");
        assert_eq!(loads.get("a", at(8000)), None);
    }
}
