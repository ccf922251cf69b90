//! A server places submitted jobs on registered nodes: its leader plans pending
//! evaluations, commits allocations with concrete GPUs, explains what cannot be
//! placed, and places it once capacity appears.

use aigrid_api::NodeRegistration;
use aigrid_scheduler::server::ServerConfig;
use serde_json::{json, Value};

use crate::common;
use common::{post_json, register, start_leader, wait_job};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_placed_explained_and_placed_when_capacity_appears() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.access = aigrid_scheduler::testkit::admin_access();
    let server = start_leader(config).await;
    let base = format!("http://{}", server.addr);
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
    let (_, resp) = post_json(&client, &format!("{base}/api/v1/jobs"), &spec).await;
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
    let (status, resp) = post_json(&client, &format!("{base}/api/v1/jobs"), &impossible).await;
    assert_eq!(status, 201);
    let id = resp["id"].as_str().unwrap().to_owned();
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
    post_json(&client, &format!("{base}/api/v1/jobs"), &smaller).await;
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
