//! The `/v1` inference gateway in front of real model-server replicas: tiny axum
//! servers on 127.0.0.1 that answer `/ready` and `/v1/chat/completions` (JSON, or
//! server-sent events they release step by step), listening on the ports the
//! control plane assigned their allocations and reported the way an agent does
//! (a heartbeat with state and endpoint).

use std::sync::atomic::Ordering;
use std::time::Duration;

use aigrid_api::{
    AllocState, Allocation, AllocationReport, Job, NodeId, NodeRegistration, PortRange,
};
use aigrid_scheduler::clock::{Clock, SystemClock};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::state::Command;
use axum::http::{header, StatusCode};
use reqwest::Client;
use serde_json::{json, Value};

use crate::common;
use common::replicas::{port_block, serve_on, take_port, Replica};
use common::{
    get_json, metric, post_json, push_model, register, start_leader, status_and_json, until,
    wait_job,
};

/// A pushed model deployed as a `model-server` service of `count` replicas on one
/// node, `n1`, registered from 127.0.0.1 with `ports`: the model's digest, the
/// job's URL and its allocations once all are placed.
async fn deploy(
    server: &Server,
    client: &Client,
    name: &str,
    count: usize,
    ports: PortRange,
) -> (String, String, Vec<Allocation>) {
    let base = format!("http://{}", server.addr);
    let digest = push_model(server, client, name).await;
    let node: NodeRegistration = serde_json::from_value(json!({
        "id": "n1", "name": "n1",
        "resources": {"cpu_millis": 16000, "memory_mib": 65536, "disk_mib": 1, "gpus": []},
        "ports": ports
    }))
    .unwrap();
    register(server, node).await;
    let job = json!({
        "name": name, "kind": "service",
        "groups": [{"name": "llm", "count": count,
                    "resources": {"cpu_millis": 1000, "memory_mib": 1024},
                    "task": {"driver": "model-server", "model": digest}}]
    });
    let (status, submitted) = post_json(client, &format!("{base}/api/v1/jobs"), &job).await;
    assert_eq!(status, StatusCode::CREATED, "{submitted}");
    let job_url = format!("{base}/api/v1/jobs/{}", submitted["id"].as_str().unwrap());
    let job = wait_job(client, &job_url, |j| {
        j["allocations"].as_array().unwrap().len() == count
    })
    .await;
    let job: Job = serde_json::from_value(job).unwrap();
    (digest, job_url, job.allocations)
}

/// Reports allocations running at their endpoints, as `n1`'s agent does.
async fn report_running(server: &Server, running: &[(&Allocation, &str)]) {
    let allocations = running
        .iter()
        .map(|(alloc, endpoint)| {
            let mut report = AllocationReport::new(alloc.id.clone(), AllocState::Running);
            report.endpoint = Some((*endpoint).to_owned());
            report
        })
        .collect();
    server
        .raft
        .propose(&Command::NodeHeartbeat {
            node_id: NodeId::new("n1"),
            gpus: vec![],
            allocations,
            logs: vec![],
            at: SystemClock.now(),
        })
        .await
        .unwrap()
        .unwrap();
}

/// Asserts an OpenAI-shaped error.
fn openai_error(answer: (StatusCode, Value), status: StatusCode, kind: &str, code: &str) -> String {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"].get("param").is_some(), "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_streams_retries_and_refuses_in_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.access = aigrid_scheduler::testkit::admin_access();
    // Probes happen when the test says (`probe_now`), so what is ready is never a race.
    config.gateway.probe_interval = Duration::from_secs(3600);
    config.gateway.max_body_bytes = 64 * 1024;
    config.gateway.max_in_flight = 2;
    let server = start_leader(config).await;
    let base = format!("http://{}", server.addr);
    let chat_url = format!("{base}/v1/chat/completions");
    let client = Client::new();

    // A pushed model and a deployment of two replicas of it on one node.
    let (mut held, ports) = port_block(2);
    let (digest, job_url, allocs) = deploy(&server, &client, "llama", 2, ports).await;
    let (port_0, port_1) = (allocs[0].port.unwrap(), allocs[1].port.unwrap());
    assert_ne!(
        port_0, port_1,
        "two replicas on one node never share a port"
    );
    assert!(ports.contains(port_0) && ports.contains(port_1));

    // Deployed, nothing started yet: requests are told it is loading, not to deploy it.
    server.gateway.probe_now().await;
    let message = openai_error(
        post_json(
            &client,
            &chat_url,
            &json!({"model": "llama", "prompt": "hi"}),
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "model_not_ready",
    );
    assert!(
        message.contains("being deployed") && message.contains("loading"),
        "{message}"
    );

    // The replicas start, loading: their agent reports them running at their endpoints.
    let (a, b) = (Replica::new("a"), Replica::new("b"));
    let run_a = serve_on(a.clone(), take_port(&mut held, port_0));
    let run_b = serve_on(b.clone(), take_port(&mut held, port_1));
    report_running(
        &server,
        &[(&allocs[0], &run_a.endpoint), (&allocs[1], &run_b.endpoint)],
    )
    .await;
    let job: Job = get_json(&client, &job_url).await;
    let mut shown: Vec<_> = job
        .allocations
        .iter()
        .map(|a| a.endpoint.clone().unwrap())
        .collect();
    shown.sort();
    let mut want = vec![run_a.endpoint.clone(), run_b.endpoint.clone()];
    want.sort();
    assert_eq!(shown, want, "the job shows where its replicas serve");

    // Loading: listed nowhere, and requests are told to come back.
    server.gateway.probe_now().await;
    let models: Value = get_json(&client, &format!("{base}/v1/models")).await;
    assert_eq!(models, json!({"object": "list", "data": []}));
    let hello = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]});
    let message = openai_error(
        post_json(&client, &chat_url, &hello).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "model_not_ready",
    );
    assert!(
        message.contains("2 replicas") && message.contains("loading"),
        "{message}"
    );
    let one = client
        .get(format!("{base}/v1/models/llama"))
        .send()
        .await
        .unwrap();
    let status = one.status();
    openai_error(
        (status, one.json().await.unwrap()),
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "model_not_ready",
    );

    // Ready: listed by name with its digest, and served by name or digest prefix.
    a.ready.store(true, Ordering::SeqCst);
    b.ready.store(true, Ordering::SeqCst);
    server.gateway.probe_now().await;
    let models: Value = get_json(&client, &format!("{base}/v1/models")).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models["data"][0]["id"], "llama");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "aigrid");
    assert_eq!(models["data"][0]["digest"], digest.as_str());
    assert!(models["data"][0]["created"].as_u64().unwrap() > 1_600_000_000);
    // One model, by name, digest or digest prefix, as the list shows it.
    for asked in ["llama", digest.as_str(), &digest[..12]] {
        let one: Value = get_json(&client, &format!("{base}/v1/models/{asked}")).await;
        assert_eq!(one, models["data"][0], "GET /v1/models/{asked}");
    }
    let missing = client
        .get(format!("{base}/v1/models/no-such-model"))
        .send()
        .await
        .unwrap();
    let status = missing.status();
    let body: Value = missing.json().await.unwrap();
    openai_error(
        (status, body),
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
    );

    let resp = client.post(&chat_url).json(&hello).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let replica = resp.headers()["x-replica"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["replica"],
        replica.as_str(),
        "the replica's answer, unchanged"
    );
    assert_eq!(
        body["model"], "llama",
        "the body reached the replica as sent"
    );
    assert_eq!(
        body["echo_bytes"],
        serde_json::to_vec(&hello).unwrap().len()
    );
    let by_prefix = json!({"model": &digest[..10], "messages": []});
    let (status, body) = post_json(&client, &chat_url, &by_prefix).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Refusals, each in OpenAI's shape and without reaching a replica.
    let served_before = a.served.load(Ordering::SeqCst) + b.served.load(Ordering::SeqCst);
    openai_error(
        post_json(
            &client,
            &chat_url,
            &json!({"model": "mistral", "messages": []}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
    );
    openai_error(
        post_json(&client, &chat_url, &json!({"messages": []})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "missing_model",
    );
    let resp = client
        .post(&chat_url)
        .body("{not json")
        .send()
        .await
        .unwrap();
    openai_error(
        status_and_json(resp).await,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_json",
    );
    let huge = json!({"model": "llama", "prompt": "x".repeat(100 * 1024)});
    openai_error(
        post_json(&client, &chat_url, &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
    );
    openai_error(
        status_and_json(client.get(&chat_url).send().await.unwrap()).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
    );
    let resp = client.post(format!("{base}/v1/nope")).send().await.unwrap();
    openai_error(
        status_and_json(resp).await,
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
    );
    assert_eq!(
        a.served.load(Ordering::SeqCst) + b.served.load(Ordering::SeqCst),
        served_before
    );

    // Least outstanding: with one request held on a replica, the next goes to the
    // other; with both held (the cap is 2), a third is refused with 429.
    let (a0, b0) = (
        a.served.load(Ordering::SeqCst),
        b.served.load(Ordering::SeqCst),
    );
    let held = json!({"model": "llama", "messages": [], "hold": true});
    let mut pending = Vec::new();
    for outstanding in 1..=2 {
        pending.push(tokio::spawn({
            let (client, url, held) = (client.clone(), chat_url.clone(), held.clone());
            async move { client.post(url).json(&held).send().await.unwrap() }
        }));
        until("the held request reaching a replica", || {
            a.served.load(Ordering::SeqCst) + b.served.load(Ordering::SeqCst)
                >= a0 + b0 + outstanding
        })
        .await;
    }
    assert_eq!(
        (
            a.served.load(Ordering::SeqCst) - a0,
            b.served.load(Ordering::SeqCst) - b0
        ),
        (1, 1),
        "the second request went to the replica without one outstanding"
    );
    assert_eq!(
        metric(&client, &base, "aigrid_gateway_outstanding_requests", &[]).await,
        Some(2.0)
    );
    openai_error(
        post_json(&client, &chat_url, &hello).await,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "rate_limit_exceeded",
    );
    a.release.send_replace(true);
    b.release.send_replace(true);
    let mut answers = Vec::new();
    for request in pending {
        answers.push(request.await.unwrap());
    }
    let mut by: Vec<String> = answers
        .iter()
        .map(|r| r.headers()["x-replica"].to_str().unwrap().to_owned())
        .collect();
    by.sort();
    assert_eq!(by, ["a", "b"]);
    drop(answers);
    // Sequential requests spread over equally idle replicas in turn.
    let (a0, b0) = (
        a.served.load(Ordering::SeqCst),
        b.served.load(Ordering::SeqCst),
    );
    for _ in 0..6 {
        let (status, _) = post_json(&client, &chat_url, &hello).await;
        assert_eq!(status, StatusCode::OK);
    }
    let spread = (
        a.served.load(Ordering::SeqCst) - a0,
        b.served.load(Ordering::SeqCst) - b0,
    );
    assert_eq!(spread, (3, 3));

    // Streaming passes through event by event: the first token arrives while the
    // replica still holds back the second.
    let stream_req = json!({"model": "llama", "messages": [], "stream": true});
    let mut resp = client
        .post(&chat_url)
        .header(header::ACCEPT, "text/event-stream")
        .json(&stream_req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let first_chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("the first event arrives before the replica sends the next")
        .unwrap()
        .unwrap();
    let first_text = String::from_utf8(first_chunk.to_vec()).unwrap();
    assert!(
        first_text.contains("Hel") && !first_text.contains("lo\""),
        "{first_text}"
    );
    // Whichever replica streams, let it go on.
    a.steps.add_permits(2);
    b.steps.add_permits(2);
    let mut rest = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(rest.contains("\"lo\""), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");

    // A replica goes away: its connections are refused, and requests move to the
    // other one, once; from then on it is skipped until a probe finds it ready.
    let _ = run_a.stop.send(());
    run_a.task.await.unwrap();
    let retries_before = metric(&client, &base, "aigrid_gateway_retries_total", &[])
        .await
        .unwrap();
    let b0 = b.served.load(Ordering::SeqCst);
    for _ in 0..4 {
        let resp = client.post(&chat_url).json(&hello).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-replica"], "b");
    }
    assert_eq!(b.served.load(Ordering::SeqCst) - b0, 4);
    let retries = metric(&client, &base, "aigrid_gateway_retries_total", &[])
        .await
        .unwrap();
    assert_eq!(
        retries - retries_before,
        1.0,
        "one retry, then `a` is skipped"
    );

    // None ready: `a` is gone and `b` reports it is not ready.
    b.ready.store(false, Ordering::SeqCst);
    server.gateway.probe_now().await;
    let message = openai_error(
        post_json(&client, &chat_url, &hello).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "model_not_ready",
    );
    assert!(message.contains("2 replicas"), "{message}");
    let models: Value = get_json(&client, &format!("{base}/v1/models")).await;
    assert_eq!(models["data"], json!([]));

    assert!(
        metric(
            &client,
            &base,
            "aigrid_gateway_requests_total",
            &["route=\"chat_completions\"", "status=\"200\""]
        )
        .await
        .unwrap()
            >= 10.0
    );
    assert_eq!(
        metric(&client, &base, "aigrid_gateway_replicas", &[]).await,
        Some(2.0)
    );
    assert_eq!(
        metric(&client, &base, "aigrid_gateway_replicas_ready", &[]).await,
        Some(0.0)
    );
    let _ = run_b.stop.send(());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_probe_finds_a_replica_that_became_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.access = aigrid_scheduler::testkit::admin_access();
    config.gateway.probe_interval = Duration::from_millis(50);
    let server = start_leader(config).await;
    let base = format!("http://{}", server.addr);
    let client = Client::new();
    let (mut held, ports) = port_block(1);
    let (_, _, allocs) = deploy(&server, &client, "tiny", 1, ports).await;
    let replica = Replica::new("only");
    let running = serve_on(replica.clone(), take_port(&mut held, ports.first));
    report_running(&server, &[(&allocs[0], &running.endpoint)]).await;
    let hello = json!({"model": "tiny", "messages": []});
    let chat_url = format!("{base}/v1/chat/completions");
    // A second probe starts only once the first has been answered "not ready".
    until("the gateway probing the replica twice", || {
        replica.probes.load(Ordering::SeqCst) >= 2
    })
    .await;
    let (status, _) = post_json(&client, &chat_url, &hello).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "loading");
    replica.ready.store(true, Ordering::SeqCst);
    let mut answered = None;
    for _ in 0..100 {
        let (status, body) = post_json(&client, &chat_url, &hello).await;
        if status == StatusCode::OK {
            answered = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered.expect("became ready")["replica"], "only");
    let _ = running.stop.send(());
    server.stop().await;
}
