//! A server places submitted jobs on registered nodes: its leader plans pending
//! evaluations, commits allocations with concrete GPUs, explains what cannot be
//! placed, and places it once capacity appears.

use std::time::{Duration, Instant};

use aigrid_api::{NodeRegistration, Timestamp};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::state::Command;
use serde_json::{json, Value};

fn node(id: &str, country: &str, site: &str, model: &str, gpus: u32) -> NodeRegistration {
    let devices: Vec<Value> = (0..gpus)
        .map(|i| {
            json!({"index": i, "uuid": format!("GPU-{id}-{i}"), "vendor": "nvidia",
                   "model": format!("NVIDIA {model}"), "memory_mib": 81920, "healthy": true})
        })
        .collect();
    serde_json::from_value(json!({
        "id": id, "name": id,
        "attributes": {"country": country, "site": site},
        "resources": {"cpu_millis": 32000, "memory_mib": 262144, "disk_mib": 1000000,
                      "gpus": devices}
    }))
    .unwrap()
}

async fn register(server: &Server, node: NodeRegistration) {
    server
        .raft
        .propose(&Command::RegisterNode {
            node,
            join_token: None,
            at: Timestamp::from_millis(1),
        })
        .await
        .unwrap()
        .unwrap();
}

/// Polls a job until `done` holds for it.
async fn wait_job(client: &reqwest::Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job never reached the state: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_placed_explained_and_placed_when_capacity_appears() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    let server = Server::start(config).await.unwrap();
    let base = format!("http://{}", server.addr);
    while server.raft.status().leader != Some(1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    register(&server, node("node-a", "BE", "ghent-1", "H100", 2)).await;
    register(&server, node("node-b", "NL", "delft-1", "H100", 2)).await;
    register(&server, node("node-c", "DE", "berlin-1", "H100", 8)).await;

    let client = reqwest::Client::new();
    let spec = json!({
        "name": "llama-chat", "kind": "service",
        "groups": [{"name": "replica", "count": 2,
            "resources": {"cpu_millis": 2000, "memory_mib": 8192,
                          "gpus": {"count": 1, "model": "H100", "min_memory_mib": 40000}},
            "constraints": [{"attribute": "country", "op": "in", "value": ["BE", "NL"]}],
            "spread": [{"attribute": "site"}],
            "task": {"driver": "exec", "command": "/usr/bin/python3", "args": ["serve.py"]}}]
    });
    let resp: Value = client
        .post(format!("{base}/api/v1/jobs"))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = format!("{base}/api/v1/jobs/{}", resp["id"].as_str().unwrap());
    let job = wait_job(&client, &url, |j| {
        j["allocations"].as_array().unwrap().len() == 2
    })
    .await;
    let allocs = job["allocations"].as_array().unwrap();
    let nodes: Vec<&str> = allocs
        .iter()
        .map(|a| a["node_id"].as_str().unwrap())
        .collect();
    assert!(
        nodes.contains(&"node-a") && nodes.contains(&"node-b"),
        "spread over BE and NL: {nodes:?}"
    );
    for a in allocs {
        let gpus = a["gpus"].as_array().unwrap();
        assert_eq!(gpus.len(), 1);
        let node = a["node_id"].as_str().unwrap();
        assert!(gpus[0]
            .as_str()
            .unwrap()
            .starts_with(&format!("GPU-{node}-")));
        assert_eq!(a["state"], "pending");
    }
    assert_eq!(job["unplaced"], json!([]));

    // Nothing offers a B200: the job is accepted, stays unplaced and says why.
    let mut impossible = spec.clone();
    impossible["name"] = json!("needs-b200");
    impossible["groups"][0]["resources"]["gpus"]["model"] = json!("B200");
    impossible["groups"][0]["constraints"] = json!([]);
    let resp = client
        .post(format!("{base}/api/v1/jobs"))
        .json(&impossible)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("{base}/api/v1/jobs/{id}");
    let job = wait_job(&client, &url, |j| {
        !j["unplaced"].as_array().unwrap().is_empty()
    })
    .await;
    let reason = job["unplaced"][0]["reason"].as_str().unwrap();
    eprintln!("unplaced reason: {reason}");
    assert!(reason.starts_with("0/3 nodes"), "{reason}");
    assert!(reason.contains("B200"), "{reason}");

    // A node with B200s registers: the blocked job is planned again and placed.
    register(&server, node("node-d", "BE", "ghent-2", "B200", 4)).await;
    let job = wait_job(&client, &url, |j| {
        j["allocations"].as_array().unwrap().len() == 2
    })
    .await;
    assert_eq!(job["unplaced"], json!([]));
    for a in job["allocations"].as_array().unwrap() {
        assert_eq!(a["node_id"], "node-d");
    }
    let gpus: std::collections::BTreeSet<&str> = job["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["gpus"][0].as_str().unwrap())
        .collect();
    assert_eq!(gpus.len(), 2, "no GPU is shared");

    // Scaling the job down stops the instance it no longer has.
    let mut smaller = impossible.clone();
    smaller["groups"][0]["count"] = json!(1);
    client
        .post(format!("{base}/api/v1/jobs"))
        .json(&smaller)
        .send()
        .await
        .unwrap();
    wait_job(&client, &url, |j| {
        j["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["desired"] == "run")
            .count()
            == 1
    })
    .await;
    server.stop().await;
}
