//! The control API's door under abuse, on a real server on 127.0.0.1: slow and
//! silent connections neither delay a normal client nor stay open; a client over
//! its connection or request rate is turned away; a stalled body gets 408; an
//! oversized spec gets 413 and stores nothing; TLS serves the same API, and a slow
//! handshake blocks nobody; the server still stops cleanly with all of that open.
//! A signer's rate is its own wherever it connects from, and a request that only
//! claims a signer's key id is counted under its address. A flood of forged small
//! writes, handled on the replica's thread, costs a cluster neither its leader nor
//! its writes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::{IdentityKey, KeyAlgorithm};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::testkit::Sign;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common;
use common::{start_leader, PATIENCE};

/// How long a normal request may take while the server is being abused.
const PROMPT: Duration = Duration::from_secs(1);

async fn start(dir: &std::path::Path, tune: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.into());
    tune(&mut config);
    let server = start_leader(config).await;
    // The leader makes the test's admin an admin on its own; wait for that write
    // (and any retry of it) so that later ones are the test's alone.
    let mut last = u64::MAX;
    loop {
        let status = server.raft.status();
        let admin = server.raft.read_local(|s| s.has_admin());
        if admin && status.commit_index == last {
            return server;
        }
        last = status.commit_index;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A client with no pooled connection: every request opens its own.
fn fresh() -> Client {
    Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// A connection that sends the start of a request head and then holds.
async fn slow(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    stream
}

/// Waits until the server closes `stream` (end of stream or reset), reading and
/// dropping whatever it sends first; fails the test after `within`.
async fn closed(stream: &mut TcpStream, within: Duration) {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was still open after {within:?}"),
        }
    }
}

/// A normal client's probe, signed read and open read, each within [`PROMPT`].
async fn served_promptly(addr: SocketAddr) {
    for path in ["/health", "/api/v1/jobs?stale=true", "/api/v1/cluster"] {
        let request = fresh().get(format!("http://{addr}{path}")).signed().send();
        let response = tokio::time::timeout(PROMPT, request)
            .await
            .unwrap_or_else(|_| panic!("GET {path} took longer than {PROMPT:?}"))
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_connections_neither_delay_a_normal_client_nor_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let header_timeout = Duration::from_secs(2);
    let server = start(dir.path(), |c| {
        c.limits.listener.header_read_timeout = header_timeout;
    })
    .await;
    let addr = server.addr;
    let mut held = Vec::new();
    for _ in 0..300 {
        held.push(slow(addr).await);
    }
    // And some that send nothing at all.
    for _ in 0..50 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    served_promptly(addr).await;
    for stream in &mut held {
        closed(stream, header_timeout + PATIENCE).await;
    }
    served_promptly(addr).await;

    // It stops cleanly with slow connections open, and then refuses connections.
    let mut more = Vec::new();
    for _ in 0..20 {
        more.push(slow(addr).await);
    }
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("the server stops while slow connections are open");
    for stream in &mut more {
        closed(stream, PATIENCE).await;
    }
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_client_limit_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |c| {
        c.limits.listener.limit_loopback = true;
        c.limits.listener.max_connections_per_client = 4;
    })
    .await;
    let addr = server.addr;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(slow(addr).await);
    }
    // The fifth from this address is closed without a request being read: the
    // normal client is turned away too, until a place is free.
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    closed(&mut fifth, PATIENCE).await;
    assert!(fresh()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .is_err());
    drop(held.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        match fresh().get(format!("http://{addr}/health")).send().await {
            Ok(response) if response.status() == StatusCode::OK => break,
            other => assert!(Instant::now() < deadline, "never served again: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

fn job_with_env(name: &str, value: String) -> Value {
    json!({
        "name": name,
        "groups": [{
            "name": "g",
            "resources": {"cpu_millis": 100, "memory_mib": 64},
            "task": {"driver": "exec", "command": "/bin/true", "env": {"BIG": value}}
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_spec_is_413_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |_| {}).await;
    let base = format!("http://{}/api/v1", server.addr);
    let client = Client::new();
    // A linearizable read first: the leader's own first entry is committed by then.
    let response = client
        .get(format!("{base}/jobs"))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let commit_before = client
        .get(format!("{base}/cluster"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["commit_index"]
        .as_u64()
        .unwrap();

    // 1 MB in one variable: under the 1 MiB body limit, over the field's.
    let body = job_with_env("big", "x".repeat(1_000_000));
    assert!(serde_json::to_vec(&body).unwrap().len() < 1 << 20);
    let response = client
        .post(format!("{base}/jobs"))
        .json(&body)
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("groups[0].task.env.BIG"),
        "{error}"
    );
    // Over the body limit, declared or streamed: 413 too, never 400.
    let huge = "x".repeat(2 << 20);
    let response = client
        .post(format!("{base}/jobs"))
        .json(&job_with_env("huge", huge.clone()))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = futures_util::stream::iter(
        serde_json::to_vec(&job_with_env("huge", huge))
            .unwrap()
            .chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = client
        .post(format!("{base}/jobs"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The rest of the body was never read: the connection is not offered again.
    assert_eq!(response.headers()["connection"], "close");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "payload_too_large", "{error}");

    for name in ["big", "huge"] {
        let response = client
            .get(format!("{base}/jobs/{name}"))
            .signed()
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    let jobs: Vec<Value> = client
        .get(format!("{base}/jobs"))
        .signed()
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(jobs.is_empty(), "{jobs:?}");
    let commit_after = client
        .get(format!("{base}/cluster"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["commit_index"]
        .as_u64()
        .unwrap();
    assert_eq!(commit_after, commit_before, "something was written");
    // Just under the field's limit is accepted.
    let response = client
        .post(format!("{base}/jobs"))
        .json(&job_with_env("fits", "x".repeat(64 * 1024)))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_rate_get_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |c| {
        c.limits.listener.limit_loopback = true;
        c.limits.rate_per_second = 1;
        c.limits.rate_burst = 5;
    })
    .await;
    let url = format!("http://{}/api/v1/jobs?stale=true", server.addr);
    let client = Client::new();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = client.get(&url).signed().send().await.unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["code"], "rate_limited", "{error}");
        }
    }
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    // A burst of five, and at most one more refilled while the eight were sent.
    assert!(limited >= 2, "{statuses:?}");
    assert!(
        statuses[..5].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_is_limited_as_itself_and_a_claimed_key_id_counts_for_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |c| {
        c.limits.listener.limit_loopback = true;
        c.limits.rate_per_second = 1;
        c.limits.rate_burst = 4;
    })
    .await;
    let api = format!("http://{}/api/v1", server.addr);
    let client = Client::new();
    let bob = IdentityKey::from_seed(KeyAlgorithm::Ed25519, [7; 32]);
    let added = client
        .post(format!("{api}/identities"))
        .json(&json!({"name": "bob", "public_key": bob.public().to_string()}))
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(
        added.status(),
        StatusCode::CREATED,
        "{:?}",
        added.text().await
    );
    let jobs = format!("{api}/jobs?stale=true");
    // Requests that name the admin's key id but are not the admin's (signed for
    // another target) are 401 and counted under this address, not the admin.
    for _ in 0..6 {
        let mut forged = client.get(format!("{api}/jobs")).signed().build().unwrap();
        *forged.url_mut() = jobs.parse().unwrap();
        let status = client.execute(forged).await.unwrap().status();
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS].contains(&status),
            "{status}"
        );
    }
    // The admin still has its whole burst (three left after adding bob), then 429.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(client.get(&jobs).signed().send().await.unwrap().status());
    }
    assert!(
        statuses[..3].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // From the same address, bob has a limit of his own.
    let response = client.get(&jobs).signed_by(&bob).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), |c| {
        c.limits.listener.body_read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"name\": ",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("request_timeout") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("no answer to a stalled body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    server.stop().await;
}

/// A self-signed certificate for `localhost` and the server configuration that
/// presents it, offering HTTP/2 and HTTP/1.1.
fn tls() -> (Arc<rustls::ServerConfig>, reqwest::Certificate) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(certified.cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                certified.signing_key.serialize_der(),
            )),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let pem = certified.cert.pem();
    (
        Arc::new(config),
        reqwest::Certificate::from_pem(pem.as_bytes()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_serves_the_api_and_a_slow_handshake_blocks_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cert) = tls();
    let handshake = Duration::from_secs(2);
    let server = start(dir.path(), |c| {
        c.api_tls = Some(config);
        c.limits.listener.tls_handshake_timeout = handshake;
    })
    .await;
    let addr = server.addr;
    let client = |http1: bool| {
        let builder = Client::builder()
            .tls_certs_only([cert.clone()])
            .resolve("localhost", addr)
            .pool_max_idle_per_host(0);
        if http1 { builder.http1_only() } else { builder }
            .build()
            .unwrap()
    };
    // Connections that never start their handshake, or stop half way.
    let mut held = Vec::new();
    for i in 0..50 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            // The first bytes of a ClientHello record, and no more.
            stream
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
                .await
                .unwrap();
        }
        held.push(stream);
    }
    for http1 in [false, true] {
        let url = format!("https://localhost:{}/api/v1/cluster", addr.port());
        let response = tokio::time::timeout(PROMPT, client(http1).get(&url).send())
            .await
            .expect("a TLS request waited behind slow handshakes")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let expected = if http1 {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(response.version(), expected);
    }
    // Plain HTTP is not served on a TLS listener.
    assert!(fresh()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .is_err());
    for stream in &mut held {
        closed(stream, handshake + PATIENCE).await;
    }
    tokio::time::timeout(PATIENCE, server.stop())
        .await
        .expect("the server stops");
}

/// Small writes are handled on the replica's thread. A stranger flooding the
/// leader with them, each naming the admin's key but signed for another target (so
/// each costs a whole signature check before its 401), costs the cluster neither
/// its leader nor its writes: the followers keep hearing from the leader (no
/// election, the term stays) and the admin's writes commit meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_writes_costs_the_cluster_neither_its_leader_nor_its_writes() {
    let three = common::start_three(|_| {}).await;
    let servers = &three.servers;
    let leader_id = common::until_some("a leader", || servers[0].raft.status().leader).await;
    let leader = servers
        .iter()
        .find(|s| s.raft.status().id == leader_id)
        .unwrap();
    let term = leader.raft.status().term;
    let jobs = format!("http://{}/api/v1/jobs", leader.addr);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for n in 0..6 {
        let (jobs, stop) = (jobs.clone(), stop.clone());
        flood.push(tokio::spawn(async move {
            let client = Client::new();
            let mut refused = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut forged = client
                    .post(&jobs)
                    .json(&json!({"name": format!("forged-{n}-{refused}")}))
                    .signed()
                    .build()
                    .unwrap();
                *forged.url_mut() = format!("{jobs}?forged={n}").parse().unwrap();
                let status = client.execute(forged).await.unwrap().status();
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                refused += 1;
            }
            refused
        }));
    }
    let client = Client::new();
    for i in 0..10 {
        let body = json!({
            "name": format!("meanwhile-{i}"),
            "groups": [{"name": "g", "count": 1, "resources": {"cpu_millis": 100, "memory_mib": 64},
                        "task": {"driver": "exec", "command": "/bin/true"}}]
        });
        let resp = client
            .post(&jobs)
            .json(&body)
            .signed()
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "{:?}",
            resp.text().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for task in flood {
        refused += task.await.unwrap();
    }
    assert!(refused >= 60, "the flood sent only {refused} writes");
    for server in servers {
        let status = server.raft.status();
        assert_eq!(
            (status.term, status.leader),
            (term, Some(leader_id)),
            "server {} saw an election under the flood",
            status.id
        );
    }
}
