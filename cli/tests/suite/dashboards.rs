//! Every metric the dashboards and alerts in `dashboards/` name is one a real process
//! exports: a server, an agent with simulated GPUs (its metrics listener and its
//! shard service) and a model server, each started here and scraped. A panel or an
//! alert on a name nothing exports would stay empty or never fire, silently.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::openai::tiny_model;
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
        let found: BTreeSet<String> = match path.extension().and_then(|e| e.to_str()) {
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

/// The metric families `url` exports now (its `# TYPE` lines).
async fn families(client: &reqwest::Client, url: &str) -> BTreeSet<String> {
    let Ok(resp) = client.get(url).send().await else {
        return BTreeSet::new();
    };
    resp.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Whether `name` (or the histogram it is a series of) is among `exported`.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    let base = ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    exported.contains(name) || exported.contains(base)
}

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_metric_the_dashboards_and_alerts_name_is_exported_by_a_process() {
    let names = named();
    assert!(names.len() > 40, "{names:?}");
    // A server with a store, so its repair loop runs and exports what it does.
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store.toml");
    let dirs = [root.path().join("site-a"), root.path().join("site-b")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(
        &store,
        format!(
            "k = 1\nm = 1\n[[backends]]\nname = \"a\"\nurl = \"{}\"\n\
             [[backends]]\nname = \"b\"\nurl = \"{}\"\n",
            dirs[0].display(),
            dirs[1].display()
        ),
    )
    .unwrap();
    let cluster = Cluster::start(
        1,
        &[
            "--store",
            store.to_str().unwrap(),
            "--repair-interval-secs",
            "1",
            "--meter-every-ms",
            "200",
        ],
    );
    let server = cluster.urls()[0].clone();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(wait_leader(
            &http(),
            &cluster.urls(),
            Duration::from_secs(20),
        ));
    let token = assert_success(&aigrid_at(&server, &["node", "token", "create"]))
        .trim()
        .to_owned();
    let ports = free_ports(3);
    let (agent_metrics, shards, serve) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
        format!("127.0.0.1:{}", ports[2]),
    );
    let data = root.path().join("agent");
    let args: Vec<std::ffi::OsString> = [
        "agent",
        "--servers",
        &server,
        "--join-token",
        &token,
        "--node-id",
        "dash",
        "--heartbeat-interval-ms",
        "300",
        "--simulate-gpus",
        "1xH100-80GB",
        "--metrics-listen",
        &agent_metrics,
        "--shard-listen",
        &shards,
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .iter()
    .map(Into::into)
    .collect();
    let _agent = Killed(spawn_logged(&args, &root.path().join("agent.log")));
    // GPU work on the agent, so that the meter has use to count.
    let marker = format!("AIGRID_TEST_MARK=dashboards-{}", std::process::id());
    let _reaper = Reaper {
        root: root.path().display().to_string(),
        marker: marker.clone(),
    };
    let resources = serde_json::json!({"cpu_millis": 100, "memory_mib": 64, "gpus": {"count": 1}});
    let job_file = job_file(root.path(), &sleeper("metered", &marker, resources, 120));
    assert_success(&aigrid_at(
        &server,
        &["job", "submit", job_file.to_str().unwrap()],
    ));
    // A scaled model service at zero (its model never pushed, so nothing starts):
    // the leader's autoscaler exports its series for it.
    let scaled = serde_json::json!({
        "name": "scaled", "kind": "service",
        "groups": [{"name": "llm", "count": 0,
                    "scaling": {"min": 0, "max": 2, "target_concurrency": 4},
                    "resources": {"cpu_millis": 100, "memory_mib": 64},
                    "task": {"driver": "model-server", "model": "ab".repeat(32)}}]
    });
    let scaled = common::job_file(root.path(), &scaled);
    assert_success(&aigrid_at(
        &server,
        &["job", "submit", scaled.to_str().unwrap()],
    ));
    let model = tiny_model(root.path(), "tiny");
    let serve_args: Vec<std::ffi::OsString> = [
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--listen",
        &serve,
        "--device",
        "cpu",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let _serve = Killed(spawn_logged(&serve_args, &root.path().join("serve.log")));

    // Traffic, so that labelled families have their first series, until every name
    // is exported or the wait is over.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = http();
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = rt.block_on(async {
        loop {
            for path in ["/api/v1/cluster", "/api/v1/jobs", "/api/v1/proposals"] {
                let _ = client.get(format!("{server}{path}")).signed().send().await;
            }
            let _ = client
                .post(format!("{server}/v1/chat/completions"))
                .json(&serde_json::json!({"model": "none", "messages": []}))
                .send()
                .await;
            let _ = client
                .get(format!("http://{shards}/shards/none"))
                .send()
                .await;
            let _ = client
                .post(format!("http://{serve}/v1/completions"))
                .json(&serde_json::json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}))
                .send()
                .await;
            let mut exported = families(&client, &format!("{server}/metrics")).await;
            for url in [
                format!("http://{agent_metrics}/metrics"),
                format!("http://{shards}/metrics"),
                format!("http://{serve}/metrics"),
            ] {
                exported.extend(families(&client, &url).await);
            }
            let missing: Vec<(String, String)> = names
                .iter()
                .filter(|(name, _)| !is_exported(name, &exported))
                .cloned()
                .collect();
            if missing.is_empty() || Instant::now() > deadline {
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    assert!(
        missing.is_empty(),
        "named by a dashboard or alert, exported by no process: {missing:?}\n{}\n{}",
        tail(&root.path().join("agent.log"), 10),
        tail(&root.path().join("serve.log"), 10)
    );
    drop(cluster);
}
