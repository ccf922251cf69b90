//! Repair: one model's shards scrubbed, rebuilt and re-registered where they moved,
//! and the loop a server with a store runs over every model.

use std::sync::Arc;
use std::time::Duration;

use aigrid_api::model::ModelSummary;
use aigrid_store::manifest::Locations;
use aigrid_store::repair::RepairReport;
use aigrid_store::store::Store;
use anyhow::{anyhow, Context};
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
    Ok(report)
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
            match repair_one(&client, &store, &model.digest).await {
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
