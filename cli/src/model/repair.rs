//! Repair: one model's shards scrubbed, rebuilt and re-registered where they moved,
//! and the loop a server with a store runs over every model.

use std::sync::Arc;
use std::time::Duration;

use aigrid_api::model::ModelSummary;
use aigrid_api::ShardHealth;
use aigrid_store::manifest::Locations;
use aigrid_store::repair::{FaultKind, RepairReport};
use aigrid_store::store::Store;
use anyhow::{anyhow, Context};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use reqwest::Method;
use serde::Serialize;

use super::registry::detail;
use crate::client::Client;

#[derive(Serialize)]
struct LocationsUpdate<'a> {
    locations: &'a Locations,
    expected_version: u64,
}

/// Repairs one model and registers moved shards.
pub(super) async fn repair_one(
    client: &Client,
    store: &Store,
    digest: &str,
) -> anyhow::Result<RepairReport> {
    let detail = detail(client, digest).await?;
    let report = store
        .repair(&detail.registration())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if report.moved_any() {
        let update = LocationsUpdate {
            locations: &report.locations,
            expected_version: detail.summary.locations_version,
        };
        let _: ModelSummary = client
            .call(
                Method::PUT,
                &format!("/api/v1/models/{digest}/locations"),
                Some(&update),
            )
            .await
            .context("registering the repaired shard locations")?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let health = shard_health(&report, aigrid_api::Timestamp::from_millis(now));
    let reported: anyhow::Result<ModelSummary> = client
        .call(
            Method::PUT,
            &format!("/api/v1/models/{digest}/health"),
            Some(&health),
        )
        .await;
    if let Err(e) = reported {
        // The repair itself is done; only admins and servers keep the record.
        tracing::debug!(%digest, error = %e, "shard health not recorded");
    }
    Ok(report)
}

/// What a repair found and did, as the control plane keeps it per model.
fn shard_health(report: &RepairReport, at: aigrid_api::Timestamp) -> ShardHealth {
    let scrub = &report.scrub;
    let count = |kinds: &[FaultKind]| {
        scrub
            .faults
            .iter()
            .filter(|f| kinds.contains(&f.kind))
            .count() as u64
    };
    let (missing, corrupt) = (count(&[FaultKind::Missing]), count(&[FaultKind::Corrupt]));
    let unreachable = count(&[FaultKind::Unreachable, FaultKind::UnknownBackend]);
    let shards = scrub.shards as u64;
    ShardHealth {
        checked_at: at,
        shards,
        healthy: shards.saturating_sub(missing + corrupt + unreachable),
        missing,
        corrupt,
        unreachable,
        lost_stripes: scrub.unrecoverable.len() as u64,
        rebuilt: report.rebuilt as u64,
        unrepairable: report.failed as u64,
    }
}

/// What the repair loop did, on its server's `/metrics`:
/// `aigrid_store_scrubs_total{result}` (healthy, repaired, failed: a round's model
/// whose scrub found nothing wrong, whose bad shards were all rebuilt, or whose
/// repair failed or left shards unrepaired), `aigrid_store_shards_rebuilt_total`
/// and `aigrid_store_scrub_seconds`.
#[derive(Clone)]
pub struct RepairMetrics {
    scrubs: IntCounterVec,
    rebuilt: IntCounter,
    seconds: Histogram,
}

impl RepairMetrics {
    /// Registers the loop's metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let scrubs = IntCounterVec::new(
            Opts::new(
                "aigrid_store_scrubs_total",
                "Models scrubbed by the repair loop, by result",
            ),
            &["result"],
        )?;
        for result in ["healthy", "repaired", "failed"] {
            scrubs.with_label_values(&[result]);
        }
        let rebuilt = IntCounter::new(
            "aigrid_store_shards_rebuilt_total",
            "Shards the repair loop rebuilt from the others and wrote again",
        )?;
        let seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_store_scrub_seconds",
                "Seconds to scrub and repair one model",
            )
            .buckets(prometheus::exponential_buckets(0.01, 4.0, 9)?),
        )?;
        registry.register(Box::new(scrubs.clone()))?;
        registry.register(Box::new(rebuilt.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(RepairMetrics {
            scrubs,
            rebuilt,
            seconds,
        })
    }

    fn observe(&self, outcome: &anyhow::Result<RepairReport>, seconds: f64) {
        self.seconds.observe(seconds);
        let result = match outcome {
            Ok(r) if r.scrub.healthy() => "healthy",
            Ok(r) if r.failed == 0 && r.scrub.unrecoverable.is_empty() => "repaired",
            _ => "failed",
        };
        self.scrubs.with_label_values(&[result]).inc();
        if let Ok(r) = outcome {
            self.rebuilt.inc_by(r.rebuilt as u64);
        }
    }
}

/// Scrubs and repairs every registered model every `interval`, through the control
/// API at `base`, until `stop` turns true; with `leader_only`, only in rounds when
/// that server leads, so a cluster repairs each model once.
pub async fn repair_loop(
    base: String,
    key: Arc<aigrid_api::IdentityKey>,
    store: Arc<Store>,
    leader_only: Option<u64>,
    interval: Duration,
    metrics: RepairMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match Client::new(&base, Some(key)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "repair loop cannot start");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if let Some(id) = leader_only {
            let status: Result<aigrid_api::ClusterStatus, _> = client
                .call::<(), _>(Method::GET, "/api/v1/cluster", None)
                .await;
            if !matches!(status, Ok(s) if s.leader == Some(id)) {
                continue;
            }
        }
        let models: Vec<ModelSummary> = match client
            .call::<(), _>(Method::GET, "/api/v1/models", None)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "repair loop: cannot list models");
                continue;
            }
        };
        for model in models {
            let started = std::time::Instant::now();
            let outcome = repair_one(&client, &store, &model.digest).await;
            metrics.observe(&outcome, started.elapsed().as_secs_f64());
            match outcome {
                Ok(report) if !report.scrub.healthy() => tracing::info!(
                    model = %model.name,
                    digest = %model.digest,
                    bad = report.scrub.faults.len(),
                    rebuilt = report.rebuilt,
                    moved = report.moved,
                    failed = report.failed,
                    "repaired"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(model = %model.name, error = %e, "repair failed"),
            }
        }
    }
}
