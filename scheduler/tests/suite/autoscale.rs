//! Autoscaling through a real server: a scaled `model-server` service whose
//! replicas (tiny axum servers on the ports the control plane assigned, reporting
//! their load on `/ready`) are started and stopped by a node that follows its
//! assignments as an agent does. Load rises and replicas are added within the
//! scale-up window; it falls and they are removed after the scale-down window;
//! idle, the group goes to zero; the first request after zero is held and
//! answered once a replica is ready. Past the hold's timeout a request gets 503
//! with `Retry-After`, beyond its bound 429, and a caller whose key may not call
//! the model wakes nothing, and one held at a follower wakes the group through
//! the leader. Above its circle's scale limit, the leader proposes
//! the scale to the circle's owners and the group grows once they approve.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aigrid_api::{
    AllocState, AllocationReport, ApiKey, ApiKeyInfo, ChangeKind, CirclePolicy, Decision,
    DesiredState, Governance, IdentityKey, Job, KeyAlgorithm, NodeId, NodeRegistration,
    PolicyMember, Role, Timestamp,
};
use aigrid_consensus::human::sign_decision;
use aigrid_scheduler::clock::{Clock, SystemClock};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::state::Command;
use axum::http::{header, StatusCode};
use reqwest::Client;
use serde_json::{json, Value};

use crate::common;
use common::replicas::{port_block, serve_on, Replica, Running};
use common::{
    eventually, get_json, metric, post_json, push_model, register, start_leader, start_three,
    status_and_json, until_some,
};

/// Registers model `name` and submits it as service `name` of group `llm` with
/// `scaling`, starting at `count`; answers the model's digest.
async fn deploy(
    server: &Server,
    client: &Client,
    name: &str,
    count: u32,
    scaling: Value,
) -> String {
    let digest = push_model(server, client, name).await;
    submit(server, client, name, &digest, count, scaling).await;
    digest
}

/// Submits the model of `digest` as service `name` of group `llm` with `scaling`,
/// starting at `count`.
async fn submit(
    server: &Server,
    client: &Client,
    name: &str,
    digest: &str,
    count: u32,
    scaling: Value,
) {
    let base = format!("http://{}", server.addr);
    let job = json!({
        "name": name, "kind": "service", "circle": "ml",
        "groups": [{"name": "llm", "count": count, "scaling": scaling,
                    "resources": {"cpu_millis": 1000, "memory_mib": 1024},
                    "task": {"driver": "model-server", "model": digest}}]
    });
    let (status, body) = post_json(client, &format!("{base}/api/v1/jobs"), &job).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

fn job(server: &Server, name: &str) -> Job {
    server
        .raft
        .read_local(|s| s.job_by_name(name))
        .expect("the job exists")
}

fn count(server: &Server, name: &str) -> u32 {
    job(server, name).spec.groups[0].count
}

/// Follows node `n1`'s assignments for job `name` as its agent would: wanted
/// instances are reported running at their assigned port (where the test's
/// replica listens), stopped ones as stopped.
async fn follow(server: &Server, name: &str) {
    let job = job(server, name);
    let reports: Vec<AllocationReport> = job
        .allocations
        .iter()
        .filter_map(|a| {
            let (state, endpoint) = match (a.desired, a.state) {
                (DesiredState::Run, s) if s != AllocState::Running => (
                    AllocState::Running,
                    Some(format!("http://127.0.0.1:{}", a.port?)),
                ),
                (DesiredState::Stop, s) if !s.is_terminal() => (AllocState::Stopped, None),
                _ => return None,
            };
            let mut report = AllocationReport::new(a.id.clone(), state);
            report.endpoint = endpoint;
            Some(report)
        })
        .collect();
    if reports.is_empty() {
        return;
    }
    let _ = server
        .raft
        .propose(&Command::NodeHeartbeat {
            node_id: NodeId::new("n1"),
            gpus: vec![],
            allocations: reports,
            logs: vec![],
            at: SystemClock.now(),
        })
        .await;
}

/// Waits until `name`'s count is `want` and as many replicas run.
async fn settle_at(server: &Server, name: &str, want: u32) -> Duration {
    let started = Instant::now();
    loop {
        follow(server, name).await;
        let job = job(server, name);
        let running = job
            .allocations
            .iter()
            .filter(|a| a.desired == DesiredState::Run && a.state == AllocState::Running)
            .count();
        if job.spec.groups[0].count == want && running == want as usize {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < common::PATIENCE,
            "{name} did not settle at {want} replicas: count {}, {running} running; events {:?}",
            job.spec.groups[0].count,
            job.scale_events
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the gateway lists `llm` (a replica of it answered ready), or with
/// `want` false until it no longer does.
async fn listed(client: &Client, base: &str, want: bool) {
    let url = format!("{base}/v1/models");
    eventually(&format!("llm listed: {want}"), || async {
        let models: Value = get_json(client, &url).await;
        let found = models["data"].as_array()?.iter().any(|m| m["id"] == "llm");
        (found == want).then_some(())
    })
    .await;
}

/// Waits until series `name` with `labels` reads `want`.
async fn metric_reaches(client: &Client, base: &str, name: &str, labels: &[&str], want: f64) {
    eventually(&format!("{name}{labels:?} at {want}"), || async {
        (metric(client, base, name, labels).await == Some(want)).then_some(())
    })
    .await;
}

/// A leader that looks at scaled groups and probes replicas every 200 ms (with
/// `tune`'s changes), and node `n1` whose `ports` ports all have `replica`
/// listening: ready, reporting the requests it is answering as its load.
struct Fixture {
    server: Server,
    base: String,
    client: Client,
    replica: Replica,
    _running: Vec<Running>,
    _dir: tempfile::TempDir,
}

async fn fixture(ports: u16, tune: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.autoscale_every = Duration::from_millis(200);
    config.gateway.probe_interval = Duration::from_millis(200);
    tune(&mut config);
    let server = start_leader(config).await;
    let (held, range) = port_block(ports);
    let replica = Replica::new("r");
    replica.set_ready(true);
    let running = held
        .into_iter()
        .map(|l| serve_on(replica.clone(), l))
        .collect();
    let node: NodeRegistration = serde_json::from_value(json!({
        "id": "n1", "name": "n1",
        "resources": {"cpu_millis": 16000, "memory_mib": 65536, "disk_mib": 1, "gpus": []},
        "ports": range
    }))
    .unwrap();
    register(&server, node).await;
    Fixture {
        base: format!("http://{}", server.addr),
        server,
        client: Client::new(),
        replica,
        _running: running,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaled_service_follows_its_load_down_to_zero_and_back() {
    let f = fixture(4, |config| {
        config.gateway.hold_timeout = Duration::from_secs(4);
        config.gateway.max_held = 3;
    })
    .await;
    let (server, base, client, replica) = (&f.server, &f.base, &f.client, &f.replica);
    let chat_url = format!("{base}/v1/chat/completions");
    let scaling = json!({"min": 0, "max": 3, "target_concurrency": 2,
                         "scale_up_window": "1s", "scale_down_window": "2s",
                         "idle_to_zero": "5s"});
    deploy(server, client, "llm", 1, scaling).await;
    settle_at(server, "llm", 1).await;
    listed(client, base, true).await;

    // Load rises: six requests in flight at a target of two per replica want
    // three replicas, added once the 1 s window agrees.
    let hold = json!({"model": "llm", "hold": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let mut waiting = Vec::new();
    for _ in 0..6 {
        let client = client.clone();
        let (url, body) = (chat_url.clone(), hold.clone());
        waiting.push(tokio::spawn(async move {
            client.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    until_some("six requests in flight", || {
        (replica.in_flight.load(Ordering::SeqCst) == 6).then_some(())
    })
    .await;
    let rose = settle_at(server, "llm", 3).await;
    assert!(
        rose < Duration::from_secs(6),
        "added within the window, plus a look and a placement: {rose:?}"
    );
    let events = job(server, "llm").scale_events;
    let event = events.last().unwrap();
    assert_eq!(event.to, 3, "{events:?}");
    assert!(event.reason.starts_with("load rose"), "{event:?}");
    assert!(events.iter().all(|e| e.to > e.from), "{events:?}");
    let group = ["job=\"llm\"", "group=\"llm\""];
    metric_reaches(client, base, "aigrid_autoscaler_replicas", &group, 3.0).await;

    // Load falls: the requests finish, and after the 2 s window one replica stays
    // while requests were answered lately.
    replica.release.send_replace(true);
    for w in waiting {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    replica.release.send_replace(false);
    settle_at(server, "llm", 1).await;
    let event = job(server, "llm").scale_events.last().cloned().unwrap();
    assert!(event.reason.starts_with("load fell"), "{event:?}");

    // Idle: no request for 5 s, and the group goes to zero.
    settle_at(server, "llm", 0).await;
    let event = job(server, "llm").scale_events.last().cloned().unwrap();
    assert_eq!(event.reason, "no request for 5s");
    let zero = ["job=\"llm\"", "group=\"llm\"", "direction=\"zero\""];
    metric_reaches(
        client,
        base,
        "aigrid_autoscaler_decisions_total",
        &zero,
        1.0,
    )
    .await;

    // The first request after zero: held while a replica is placed and loads, then
    // answered. The replica turns ready only once it runs.
    listed(client, base, false).await;
    replica.set_ready(false);
    let asked = Instant::now();
    let first = {
        let client = client.clone();
        let url = chat_url.clone();
        tokio::spawn(async move {
            let body = json!({"model": "llm", "messages": [{"role": "user", "content": "hi"}]});
            status_and_json(client.post(url).json(&body).send().await.unwrap()).await
        })
    };
    settle_at(server, "llm", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished(), "held while no replica is ready");
    replica.set_ready(true);
    let (status, body) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(asked.elapsed() >= Duration::from_millis(300));
    let event = job(server, "llm").scale_events.last().cloned().unwrap();
    assert_eq!((event.from, event.to), (0, 1), "{event:?}");
    assert_eq!(
        event.reason,
        "a request for `llm` arrived while it had no replica"
    );
    let served = ["outcome=\"served\""];
    metric_reaches(client, base, "aigrid_gateway_held_total", &served, 1.0).await;

    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_bounded_time_out_with_retry_after_and_strangers_wake_nothing() {
    let f = fixture(2, |config| {
        config.gateway.hold_timeout = Duration::from_secs(2);
        config.gateway.max_held = 2;
    })
    .await;
    let (server, base, client) = (&f.server, &f.base, &f.client);
    let chat_url = format!("{base}/v1/chat/completions");
    let scaling = json!({"min": 0, "max": 2, "target_concurrency": 2, "idle_to_zero": "1h"});
    let digest = deploy(server, client, "stuck", 0, scaling).await;
    assert_eq!(count(server, "stuck"), 0);

    // A key of another circle sees no such model, and an unknown key is refused:
    // neither wakes the group.
    let other = ApiKey::from_random([1; 8], [2; 32]);
    server
        .raft
        .propose(&Command::CreateApiKey {
            info: ApiKeyInfo {
                id: other.id.clone(),
                circle: "other".into(),
                name: None,
                created_at: Timestamp::from_millis(1),
            },
            secret_hash: other.secret_hash(),
        })
        .await
        .unwrap()
        .unwrap();
    let body = json!({"model": "stuck", "messages": []});
    for (key, status) in [
        (other.to_string(), StatusCode::NOT_FOUND),
        (
            ApiKey::from_random([3; 8], [4; 32]).to_string(),
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let resp = client
            .post(&chat_url)
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(server, "stuck"), 0, "a stranger woke the group");

    // Two requests are held (the bound), the third is refused at once with 429.
    let started = Instant::now();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (client, url, body) = (client.clone(), chat_url.clone(), body.clone());
        waiting.push(tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            let retry = resp.headers().get(header::RETRY_AFTER).cloned();
            (status_and_json(resp).await, retry)
        }));
    }
    until_some("two requests held", || {
        (server.gateway.held(&digest) == 2).then_some(())
    })
    .await;
    let resp = client.post(&chat_url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    let (_, refused) = status_and_json(resp).await;
    assert_eq!(refused["error"]["code"], "too_many_waiting", "{refused}");

    // They woke the group: its first replica is placed (here it never turns
    // ready), and past the 2 s timeout both get 503 with Retry-After.
    for w in waiting {
        let ((status, body), retry) = w.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "model_starting", "{body}");
        assert_eq!(retry.unwrap(), "5");
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        count(server, "stuck"),
        1,
        "the held requests woke the group"
    );
    let held = "aigrid_gateway_held_total";
    metric_reaches(client, base, held, &["outcome=\"timed_out\""], 2.0).await;
    metric_reaches(client, base, held, &["outcome=\"refused\""], 1.0).await;
    f.server.stop().await;
}

/// Two owners govern circle `ml` and guard `job.scale` above one instance.
async fn govern(server: &Server) -> [IdentityKey; 2] {
    let owners = [1u8, 2].map(|seed| IdentityKey::from_seed(KeyAlgorithm::Ed25519, [seed; 32]));
    let at = SystemClock.now();
    for (i, key) in owners.iter().enumerate() {
        let command = Command::PutIdentity {
            name: format!("owner{i}"),
            public_key: key.public(),
            admin: false,
            at,
        };
        server.raft.propose(&command).await.unwrap().unwrap();
    }
    let mut policy = CirclePolicy::new(2);
    policy.guarded = [ChangeKind::JobScale].into();
    policy.scale_limit = Some(1);
    let members = owners
        .iter()
        .map(|k| PolicyMember {
            identity: k.id(),
            weight: 1,
            role: Role::Owner,
        })
        .collect();
    let command = Command::SetGovernance {
        circle: "ml".into(),
        governance: Governance { members, policy },
        create: true,
        by: None,
        at,
    };
    server.raft.propose(&command).await.unwrap().unwrap();
    owners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_above_the_circles_limit_waits_for_its_owners() {
    let f = fixture(3, |_| {}).await;
    let (server, base, client, replica) = (&f.server, &f.base, &f.client, &f.replica);
    let owners = govern(server).await;
    let scaling = json!({"min": 1, "max": 3, "target_concurrency": 2, "scale_up_window": "1s"});
    deploy(server, client, "llm", 1, scaling).await;
    settle_at(server, "llm", 1).await;
    listed(client, base, true).await;

    // Six requests in flight want three replicas; the circle allows one without
    // its owners, so the leader proposes the rest, once.
    let hold = json!({"model": "llm", "hold": true, "messages": []});
    let mut waiting = Vec::new();
    for _ in 0..6 {
        let (client, url, body) = (
            client.clone(),
            format!("{base}/v1/chat/completions"),
            hold.clone(),
        );
        waiting.push(tokio::spawn(async move {
            client.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    let proposal = eventually("the autoscaler's proposal", || async {
        server.raft.read_local(|s| {
            s.proposals_where(|p| p.kind == ChangeKind::JobScale)
                .into_iter()
                .next()
        })
    })
    .await;
    assert_eq!(proposal.proposer.to_string(), "autoscaler");
    assert_eq!(proposal.target, "job:llm");
    assert_eq!(proposal.payload["to"], 3, "{}", proposal.payload);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(server, "llm"),
        1,
        "scaled past the limit without the quorum"
    );
    let open = server
        .raft
        .read_local(|s| s.proposals_where(|p| p.kind == ChangeKind::JobScale).len());
    assert_eq!(open, 1, "proposed again while one is open");

    // Both owners approve: the group grows to three.
    let digest: [u8; 32] = hex::decode(&proposal.digest).unwrap().try_into().unwrap();
    for key in &owners {
        let command = Command::Decide {
            proposal: proposal.id.clone(),
            by: key.id(),
            signed: sign_decision(key, &digest, Decision::Approve),
            at: SystemClock.now(),
        };
        server.raft.propose(&command).await.unwrap().unwrap();
    }
    settle_at(server, "llm", 3).await;
    let event = job(server, "llm").scale_events.last().cloned().unwrap();
    assert!(event.reason.contains("its quorum decides"), "{event:?}");
    replica.release.send_replace(true);
    for w in waiting {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    f.server.stop().await;
}

/// The gateway's table is rebuilt in the background only every probe interval: a
/// request arriving right after a scaled job was committed is still held (and wakes
/// the group), never refused by a table built before the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_right_after_the_deploy_is_held_not_refused() {
    let f = fixture(2, |config| {
        config.gateway.probe_interval = Duration::from_secs(3600);
        config.gateway.hold_timeout = Duration::from_secs(2);
    })
    .await;
    let (server, base, client) = (&f.server, &f.base, &f.client);
    let chat_url = format!("{base}/v1/chat/completions");
    let body = json!({"model": "late", "messages": []});
    let digest = push_model(server, client, "late").await;
    // Pushed, deployed by no job: no replica, answered at once (and the table now
    // knows the model).
    let (status, answer) =
        status_and_json(client.post(&chat_url).json(&body).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(server.gateway.held(&digest), 0);

    let scaling = json!({"min": 0, "max": 2, "target_concurrency": 2, "idle_to_zero": "1h"});
    submit(server, client, "late", &digest, 0, scaling).await;
    let held = {
        let (client, url, body) = (client.clone(), chat_url.clone(), body.clone());
        tokio::spawn(async move {
            status_and_json(client.post(url).json(&body).send().await.unwrap()).await
        })
    };
    until_some("the request held", || {
        (server.gateway.held(&digest) == 1).then_some(())
    })
    .await;
    until_some("the group woken", || {
        (count(server, "late") == 1).then_some(())
    })
    .await;
    // Nothing follows the assignment here: past the timeout, 503 `model_starting`.
    let (status, answer) = held.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "model_starting", "{answer}");
    f.server.stop().await;
}

/// A stranger asking for models that do not exist while the state keeps moving
/// gets 404 each time and costs at most one rebuild of the routing table every
/// 20 ms, however many it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_unknown_models_rebuild_the_table_a_bounded_number_of_times() {
    let f = fixture(1, |config| {
        config.gateway.probe_interval = Duration::from_secs(3600);
    })
    .await;
    let (server, base, client) = (&f.server, &f.base, &f.client);
    let chat_url = format!("{base}/v1/chat/completions");
    let rebuilds = || async {
        common::metric(client, base, "aigrid_gateway_route_rebuilds_total", &[])
            .await
            .unwrap_or(0.0)
    };
    // The applied state keeps moving while the requests arrive.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (raft, stop) = (server.raft.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u8;
            while !stop.load(Ordering::SeqCst) {
                n = n.wrapping_add(1);
                let key = ApiKey::from_random([n; 8], [n; 32]);
                let command = Command::CreateApiKey {
                    info: ApiKeyInfo {
                        id: key.id.clone(),
                        circle: "ml".into(),
                        name: None,
                        created_at: Timestamp::from_millis(1),
                    },
                    secret_hash: key.secret_hash(),
                };
                raft.propose(&command).await.unwrap().unwrap();
            }
        })
    };
    let before = rebuilds().await;
    let started = Instant::now();
    let streams = (0..4).map(|stream| {
        let (client, url) = (client.clone(), chat_url.clone());
        async move {
            for i in 0..30 {
                let body = json!({"model": format!("nothing-{stream}-{i}"), "messages": []});
                let status = client.post(&url).json(&body).send().await.unwrap().status();
                assert_eq!(status, StatusCode::NOT_FOUND);
            }
        }
    });
    futures_util::future::join_all(streams).await;
    let sent = 4 * 30;
    let elapsed = started.elapsed();
    let made = rebuilds().await - before;
    let bound = (elapsed.as_millis() / 20 + 2) as f64;
    assert!(made >= 1.0, "the table was never brought up to date");
    assert!(
        made <= bound,
        "{made} rebuilds for {sent} requests in {elapsed:?}, more than {bound}"
    );
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    f.server.stop().await;
}

/// Three servers: a request held at a follower's gateway wakes a group at zero
/// (the wake is forwarded to the leader), with nothing held at the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_at_a_follower_wakes_the_group() {
    let three = start_three(|config| {
        config.gateway.probe_interval = Duration::from_millis(200);
        config.gateway.hold_timeout = Duration::from_secs(3);
    })
    .await;
    let servers = &three.servers;
    let leader_id = until_some("a leader", || servers[0].raft.status().leader).await;
    let leader = servers
        .iter()
        .find(|s| s.raft.status().id == leader_id)
        .unwrap();
    let follower = servers
        .iter()
        .find(|s| s.raft.status().id != leader_id)
        .unwrap();
    let client = Client::new();
    let node: NodeRegistration = serde_json::from_value(json!({
        "id": "n1", "name": "n1",
        "resources": {"cpu_millis": 16000, "memory_mib": 65536, "disk_mib": 1, "gpus": []},
        "ports": port_block(2).1
    }))
    .unwrap();
    register(leader, node).await;
    let scaling = json!({"min": 0, "max": 2, "target_concurrency": 2, "idle_to_zero": "1h"});
    let digest = deploy(leader, &client, "stuck", 0, scaling).await;
    until_some("the follower applying the job", || {
        follower.raft.read_local(|s| s.job_by_name("stuck"))
    })
    .await;

    let url = format!("http://{}/v1/chat/completions", follower.addr);
    let held = {
        let client = client.clone();
        tokio::spawn(async move {
            let body = json!({"model": "stuck", "messages": []});
            status_and_json(client.post(url).json(&body).send().await.unwrap()).await
        })
    };
    until_some("the request held at the follower", || {
        (follower.gateway.held(&digest) == 1).then_some(())
    })
    .await;
    assert_eq!(leader.gateway.held(&digest), 0);
    until_some("the group woken on the leader", || {
        (count(leader, "stuck") == 1).then_some(())
    })
    .await;
    let event = job(leader, "stuck").scale_events.last().cloned().unwrap();
    assert_eq!(
        event.reason,
        "a request for `stuck` arrived while it had no replica"
    );
    // No replica turns ready here (no agent runs it): past the timeout, 503.
    let (status, body) = held.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "model_starting", "{body}");
    for server in three.servers {
        server.stop().await;
    }
}
