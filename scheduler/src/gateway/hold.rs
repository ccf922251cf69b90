//! Requests held while a scaled model has no ready replica: instead of answering
//! 503 at once, the gateway keeps such a request (at most
//! [`GatewayConfig::max_held`] over all models, 429 beyond), asks for the model's
//! groups at zero to get their first replica, probes the model's replicas often
//! while anything waits, and sends the request on as soon as one is ready. Past
//! [`GatewayConfig::hold_timeout`] it answers 503 with `Retry-After`.
//!
//! Waking is a [`Command::ScaleGroup`] from zero, proposed by whichever server
//! holds the request (a follower forwards it to the leader): it applies only while
//! the group is still at zero, so many servers waking one group start one replica.
//! Only a request the gateway would relay wakes a group: its API key was checked
//! and may call the model.
//!
//! [`GatewayConfig::max_held`]: super::GatewayConfig::max_held
//! [`GatewayConfig::hold_timeout`]: super::GatewayConfig::hold_timeout

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::{EvalId, JobId};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::error::GatewayError;
use super::table::Routes;
use super::Gateway;
use crate::state::Command;

/// How often the replicas of models with held requests are probed.
pub(super) const FAST_PROBE: Duration = Duration::from_millis(25);
/// How long after waking a group this server waits before asking again.
const WAKE_AGAIN: Duration = Duration::from_secs(2);

/// What the gateway keeps of held requests.
#[derive(Debug, Default)]
pub(super) struct Holding {
    /// Requests waiting, per model digest.
    held: Mutex<HashMap<String, usize>>,
    /// When this server last asked each group at zero for a replica.
    woken: Mutex<HashMap<(JobId, String), Instant>>,
    /// Signalled after every probe.
    pub(super) probed: Notify,
    /// Asks the prober to probe at once.
    pub(super) hurry: Notify,
}

impl Holding {
    /// The digests with requests waiting.
    pub(super) fn digests(&self) -> Vec<String> {
        self.held.lock().keys().cloned().collect()
    }
}

/// One held request's place, given back when it is dropped.
struct Place<'a> {
    gateway: &'a Gateway,
    digest: String,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut held = self.gateway.holding.held.lock();
        if let Some(n) = held.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.digest);
            }
        }
        self.gateway.metrics.held.dec();
    }
}

impl Gateway {
    /// Requests waiting here for the model of `digest` to get a ready replica.
    pub fn held(&self, digest: &str) -> usize {
        self.holding.held.lock().get(digest).copied().unwrap_or(0)
    }

    /// Waits until the model of `digest` (named `name`) has a ready replica, waking
    /// its groups at zero; answers the routes it then has.
    pub(super) async fn hold(&self, name: &str, digest: &str) -> Result<Arc<Routes>, GatewayError> {
        let _place = self.take_place(digest)?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.hold_timeout;
        self.holding.hurry.notify_one();
        let outcome = loop {
            let probed = self.holding.probed.notified();
            tokio::pin!(probed);
            probed.as_mut().enable();
            let routes = self.routes();
            if self.has_ready(&routes, digest) {
                break Ok(routes);
            }
            self.wake(&routes, name, digest);
            tokio::select! {
                _ = probed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(GatewayError::ColdStart {
                        model: name.to_owned(),
                        secs: self.config.hold_timeout.as_secs(),
                    });
                }
            }
        };
        let label = if outcome.is_ok() {
            "served"
        } else {
            "timed_out"
        };
        self.metrics.held_outcomes.with_label_values(&[label]).inc();
        self.metrics
            .held_seconds
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    fn take_place(&self, digest: &str) -> Result<Place<'_>, GatewayError> {
        let mut held = self.holding.held.lock();
        let total: usize = held.values().sum();
        if total >= self.config.max_held {
            self.metrics
                .held_outcomes
                .with_label_values(&["refused"])
                .inc();
            return Err(GatewayError::HoldFull {
                limit: self.config.max_held,
            });
        }
        *held.entry(digest.to_owned()).or_insert(0) += 1;
        self.metrics.held.inc();
        Ok(Place {
            gateway: self,
            digest: digest.to_owned(),
        })
    }

    /// Asks for a first replica of every group serving `digest` that is at zero,
    /// unless this server asked for it a moment ago.
    fn wake(&self, routes: &Routes, name: &str, digest: &str) {
        let Some(groups) = routes.elastic.get(digest) else {
            return;
        };
        let now = Instant::now();
        for group in groups.iter().filter(|g| g.count == 0) {
            let key = (group.job_id.clone(), group.group.clone());
            {
                let mut woken = self.holding.woken.lock();
                if woken.get(&key).is_some_and(|at| now - *at < WAKE_AGAIN) {
                    continue;
                }
                woken.insert(key, now);
                woken.retain(|_, at| now - *at < WAKE_AGAIN);
            }
            self.metrics.wakes.inc();
            let command = Command::ScaleGroup {
                job_id: group.job_id.clone(),
                group: group.group.clone(),
                from: Some(0),
                to: group.min.max(1),
                reason: format!("a request for `{name}` arrived while it had no replica"),
                eval_id: crate::new_id(EvalId::new),
                at: self.clock.now(),
            };
            let raft = self.raft.clone();
            tokio::spawn(async move {
                match raft.propose(&command).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "waking a group at zero was refused"),
                    Err(e) => tracing::debug!(error = %e, "waking a group at zero"),
                }
            });
        }
    }
}
