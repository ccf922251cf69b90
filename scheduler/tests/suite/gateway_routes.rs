//! Where the `/v1` gateway sends user requests: to the address a node registered
//! from and the port the control plane assigned its replica, and nowhere a node
//! merely claims. A node plays the attacker here: it registers and heartbeats over
//! the real, signed agent API and reports its replica at a server of its own.

use std::time::Duration;

use aigrid_api::Job;
use aigrid_scheduler::server::ServerConfig;
use axum::http::StatusCode;
use reqwest::Client;
use serde_json::{json, Value};

use crate::common;
use common::replicas::{port_block, serve, serve_on, take_port, Replica, SignedNode};
use common::{get_json, post_json, push_model, start_leader, wait_job};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_a_foreign_endpoint_gets_none_of_the_users_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    // Probes happen when the test says (`probe_now`), so what is ready is never a race.
    config.gateway.probe_interval = Duration::from_secs(3600);
    let server = start_leader(config).await;
    let base = format!("http://{}", server.addr);
    let client = Client::new();
    let digest = push_model(&server, &client, "llama").await;

    // The node joins. Its body may not name an address: the servers take the one
    // its connection comes from. An `address` attribute is a fact to match on.
    let (mut held, ports) = port_block(1);
    let node = SignedNode::new(&base, "n1", 7);
    let named = node.registration(ports, json!({"address": "203.0.113.7"}));
    let (status, body) = node.join(&named).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let attributed = node.registration(ports, json!({"attributes": {"address": "203.0.113.7"}}));
    let (status, body) = node.join(&attributed).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["address"], "127.0.0.1", "{body}");
    let view: Value = get_json(&client, &format!("{base}/api/v1/nodes/n1")).await;
    assert_eq!(view["address"], "127.0.0.1", "{view}");
    assert_eq!(view["ports"], json!(ports), "{view}");

    let job = json!({
        "name": "llama", "kind": "service",
        "groups": [{"name": "llm", "count": 1,
                    "resources": {"cpu_millis": 1000, "memory_mib": 1024},
                    "task": {"driver": "model-server", "model": digest}}]
    });
    let (status, submitted) = post_json(&client, &format!("{base}/api/v1/jobs"), &job).await;
    assert_eq!(status, StatusCode::CREATED, "{submitted}");
    let job_url = format!("{base}/api/v1/jobs/{}", submitted["id"].as_str().unwrap());
    let placed = wait_job(&client, &job_url, |j| {
        j["allocations"].as_array().unwrap().len() == 1
    })
    .await;
    let placed: Job = serde_json::from_value(placed).unwrap();
    let alloc = placed.allocations[0].id.to_string();
    let port = placed.allocations[0]
        .port
        .expect("a model server gets a port");
    assert_eq!(port, ports.first, "the node's only port");

    // The real replica listens on its assigned port; the node's own server
    // elsewhere, ready too.
    let real = Replica::new("real");
    let real_run = serve_on(real.clone(), take_port(&mut held, port));
    real.set_ready(true);
    let evil = Replica::new("evil");
    let evil_run = serve(evil.clone());
    evil.set_ready(true);
    let chat_url = format!("{base}/v1/chat/completions");
    let hello = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});

    // The node says its replica serves at its own server: on its own address but
    // another port, then on another host altogether. Neither is believed.
    let elsewhere = format!("http://203.0.113.7:{port}");
    for claimed in [evil_run.endpoint.as_str(), elsewhere.as_str()] {
        let (status, body) = node.report_running(&[(&alloc, claimed)]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let shown: Job = get_json(&client, &job_url).await;
        let shown = &shown.allocations[0];
        assert_eq!(shown.state.as_str(), "running");
        assert_eq!(
            shown.endpoint, None,
            "a claim that is not believed is not shown"
        );
        server.gateway.probe_now().await;
        for _ in 0..25 {
            let resp = client.post(&chat_url).json(&hello).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["x-replica"], "real", "claimed {claimed}");
        }
    }
    assert_eq!(real.served(), 50);
    assert_eq!(
        evil.served(),
        0,
        "no user request reached the claimed server"
    );
    assert_eq!(evil.probes(), 0, "the servers never connected to it at all");

    // Claiming where it does serve is shown as it is.
    let (status, _) = node.report_running(&[(&alloc, &real_run.endpoint)]).await;
    assert_eq!(status, StatusCode::OK);
    let shown: Job = get_json(&client, &job_url).await;
    assert_eq!(
        shown.allocations[0].endpoint.as_deref(),
        Some(real_run.endpoint.as_str())
    );

    // With the real replica not ready, and the node claiming its own server again,
    // requests fail with the documented error and still never reach that server.
    let (status, _) = node.report_running(&[(&alloc, &evil_run.endpoint)]).await;
    assert_eq!(status, StatusCode::OK);
    real.set_ready(false);
    server.gateway.probe_now().await;
    for _ in 0..5 {
        let (status, body) = post_json(&client, &chat_url, &hello).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "model_not_ready", "{body}");
    }
    assert_eq!((evil.served(), evil.probes()), (0, 0));
    let _ = real_run.stop.send(());
    let _ = evil_run.stop.send(());
    server.stop().await;
}
