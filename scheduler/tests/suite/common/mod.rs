//! What the scheduler's HTTP tests share: a server that leads, nodes registered
//! through Raft, and JSON over HTTP.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use aigrid_api::NodeRegistration;
use aigrid_scheduler::clock::{Clock, SystemClock};
use aigrid_scheduler::server::{Server, ServerConfig};
use aigrid_scheduler::state::Command;
use aigrid_scheduler::testkit::Sign;
use reqwest::{Client, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub mod replicas;

/// How long a test waits for something that should happen before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `found` every 20 ms until it answers something; fails the test, naming
/// `what`, once [`PATIENCE`] has passed.
pub async fn until_some<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `done` every 20 ms until it holds, as [`until_some`].
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    until_some(what, || done().then_some(())).await;
}

/// Starts a server and waits until it leads.
pub async fn start_leader(mut config: ServerConfig) -> Server {
    config.access = aigrid_scheduler::testkit::admin_access();
    let server = Server::start(config).await.unwrap();
    let id = server.raft.status().id;
    until("the server leading", || {
        server.raft.status().leader == Some(id)
    })
    .await;
    server
}

/// Registers a node as if its registration came from 127.0.0.1.
pub async fn register(server: &Server, node: NodeRegistration) {
    server
        .raft
        .propose(&Command::RegisterNode {
            node,
            join_token: None,
            address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
            at: SystemClock.now(),
        })
        .await
        .unwrap()
        .unwrap();
}

/// GETs `url` and decodes its JSON answer.
pub async fn get_json<T: DeserializeOwned>(client: &Client, url: &str) -> T {
    client
        .get(url)
        .signed()
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// An answer's status and its decoded JSON body.
pub async fn status_and_json(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

/// POSTs `body` as JSON; answers the status and the decoded answer.
pub async fn post_json(client: &Client, url: &str, body: &Value) -> (StatusCode, Value) {
    status_and_json(client.post(url).json(body).signed().send().await.unwrap()).await
}

/// Polls a job until `done` holds for it.
pub async fn wait_job(client: &Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job: Value = get_json(client, url).await;
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

/// Polls `found` every 50 ms until it answers something, as [`until_some`] does
/// for checks that must await.
pub async fn eventually<T, F>(what: &str, mut found: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = found().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's `/metrics`, as text.
pub async fn metrics_text(client: &Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first series `name` with every label of `labels`
/// (`job="llm"`), whatever their order.
pub async fn metric(client: &Client, base: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let text = metrics_text(client, base).await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Registers a signed model called `name` (two files of one chunk); answers its
/// digest, lowercase.
pub async fn push_model(server: &Server, client: &Client, name: &str) -> String {
    let model = aigrid_scheduler::testkit::model_registration(name, 1, 2);
    let digest = model.manifest.manifest.digest().to_string();
    let resp = client
        .post(format!("http://{}/api/v1/models", server.addr))
        .json(&model)
        .signed()
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    digest.to_ascii_lowercase()
}

/// Three servers of one cluster (one CA, each with its API and peer listener on
/// loopback), each configured by `tune`; the directories live as long as it.
pub struct Three {
    pub servers: Vec<Server>,
    _dirs: Vec<tempfile::TempDir>,
    _ca: tempfile::TempDir,
}

/// Starts [`Three`] servers; they elect a leader by themselves.
pub async fn start_three(tune: impl Fn(&mut ServerConfig)) -> Three {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ca = tempfile::tempdir().unwrap();
    aigrid_tls::ClusterCa::create()
        .unwrap()
        .save(ca.path())
        .unwrap();
    // An API and a peer listener address per server.
    let listeners: Vec<_> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    drop(listeners);
    let peers: std::collections::BTreeMap<u64, String> = (1..=3)
        .map(|id| (id, addrs[id as usize + 2].to_string()))
        .collect();
    let mut servers = Vec::new();
    for id in 1..=3u64 {
        let i = id as usize - 1;
        let mut config = ServerConfig::new(id, addrs[i], dirs[i].path().into());
        config.access = aigrid_scheduler::testkit::admin_access();
        config.peer_listen = Some(addrs[i + 3]);
        config.ca_dir = Some(ca.path().into());
        config.peers = peers.clone();
        tune(&mut config);
        servers.push(Server::start(config).await.unwrap());
    }
    Three {
        servers,
        _dirs: dirs,
        _ca: ca,
    }
}
