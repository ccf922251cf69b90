//! Every metric the dashboards and alerts in `dashboards/` name is one a real
//! server exports: a panel or an alert on a name nothing exports would stay empty
//! or never fire, silently.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use aigrid_scheduler::server::ServerConfig;
use aigrid_scheduler::testkit::Sign;
use common::*;

/// The `aigrid_*` names in `text` (PromQL or anything else).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("aigrid_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Every PromQL expression of a Grafana dashboard: each `expr` field, at any depth.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The names the dashboards and alerts use, each with the file that names it.
fn named() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let found = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                let mut found = Vec::new();
                exprs(&serde_json::from_str(&text).unwrap(), &mut found);
                assert!(!found.is_empty(), "{file} has no expressions");
                found.iter().flat_map(|e| names_in(e)).collect()
            }
            Some("yml") if file.starts_with("alerts") => text
                .lines()
                .filter(|l| l.trim_start().starts_with("expr:"))
                .flat_map(names_in)
                .collect(),
            _ => BTreeSet::new(),
        };
        out.extend(found.into_iter().map(|n| (n, file.clone())));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboards_and_alerts_name_is_exported() {
    let names = named();
    assert!(names.len() > 20, "{names:?}");
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    let server = start_leader(config).await;
    let url = server.url();
    let client = reqwest::Client::new();
    // Some traffic, so labelled families have their first series.
    for path in ["/api/v1/cluster", "/api/v1/jobs", "/api/v1/proposals"] {
        client
            .get(format!("{url}{path}"))
            .signed()
            .send()
            .await
            .unwrap();
    }
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&(String, String)> = names
        .iter()
        .filter(|(name, _)| {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            !exported.contains(name.as_str()) && !exported.contains(base)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "named by a dashboard or alert, exported by no process: {missing:?}"
    );
    server.stop().await;
}
