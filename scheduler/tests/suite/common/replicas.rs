//! Fake model servers for the gateway's tests: tiny axum servers on 127.0.0.1 that
//! answer `/ready` and `/v1/chat/completions` (JSON, or server-sent events they
//! release step by step), on ports the test holds before the control plane
//! assigns them, and a node that talks to the control API the way an agent does.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use aigrid_api::{NodeId, NodeKey, NodeSigner, PortRange};
use aigrid_scheduler::testkit::Sign;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use reqwest::Client;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

/// One fake model server.
#[derive(Clone)]
pub struct Replica {
    pub name: &'static str,
    /// What `/ready` answers: 200 when set, 503 otherwise.
    pub ready: Arc<AtomicBool>,
    /// Chat requests it received.
    pub served: Arc<AtomicUsize>,
    /// `/ready` probes it received.
    pub probes: Arc<AtomicUsize>,
    /// Chat requests it is answering now, which `/ready` reports as its load.
    pub in_flight: Arc<AtomicUsize>,
    /// Requests with `"hold": true` answer only once this turns true.
    pub release: watch::Sender<bool>,
    /// Each permit lets a streaming answer send its next event.
    pub steps: Arc<Semaphore>,
}

impl Replica {
    pub fn new(name: &'static str) -> Self {
        Replica {
            name,
            ready: Arc::new(AtomicBool::new(false)),
            served: Arc::new(AtomicUsize::new(0)),
            probes: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            release: watch::Sender::new(false),
            steps: Arc::new(Semaphore::new(0)),
        }
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    pub fn probes(&self) -> usize {
        self.probes.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// Answers as a model server does: ready or not, with its load.
async fn ready(State(r): State<Replica>) -> Response {
    r.probes.fetch_add(1, Ordering::SeqCst);
    let ready = r.ready.load(Ordering::SeqCst);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let load = json!({
        "in_flight": r.in_flight.load(Ordering::SeqCst),
        "requests": r.served.load(Ordering::SeqCst),
        "generated_tokens": 0,
    });
    (status, axum::Json(json!({"ready": ready, "load": load}))).into_response()
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat(State(r): State<Replica>, body: Bytes) -> Response {
    r.in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(r.in_flight.clone());
    r.served.fetch_add(1, Ordering::SeqCst);
    let request: Value = serde_json::from_slice(&body).unwrap();
    if request["hold"] == true {
        let mut released = r.release.subscribe();
        let _ = released.wait_for(|go| *go).await;
    }
    if request["stream"] == true {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let steps = r.steps.clone();
        tokio::spawn(async move {
            for token in ["Hel", "lo"] {
                let event = format!(
                    "data: {}\n\n",
                    json!({"choices": [{"delta": {"content": token}}]})
                );
                if tx.send(Ok(Bytes::from(event))).await.is_err() {
                    return;
                }
                steps.acquire().await.unwrap().forget();
            }
            let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        });
        let events = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        return (
            [(header::CONTENT_TYPE, "text/event-stream")],
            Body::from_stream(events),
        )
            .into_response();
    }
    let answer = json!({
        "object": "chat.completion",
        "replica": r.name,
        "model": request["model"],
        "echo_bytes": body.len(),
    });
    (
        StatusCode::OK,
        [("content-type", "application/json"), ("x-replica", r.name)],
        answer.to_string(),
    )
        .into_response()
}

/// A running fake replica: its endpoint and how to take it away.
pub struct Running {
    pub endpoint: String,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves `replica` on `listener`, already bound.
pub fn serve_on(replica: Replica, listener: TcpListener) -> Running {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/v1/chat/completions", post(chat))
        .with_state(replica);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running {
        endpoint,
        stop,
        task,
    }
}

/// Serves `replica` on a port of the system's choosing.
pub fn serve(replica: Replica) -> Running {
    serve_on(replica, TcpListener::bind("127.0.0.1:0").unwrap())
}

/// `n` consecutive ports of 127.0.0.1, bound, and the range they make: a node
/// registered with that range gets its workloads' ports assigned among them,
/// and the test already holds them.
pub fn port_block(n: u16) -> (Vec<TcpListener>, PortRange) {
    for _ in 0..200 {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let start = first.local_addr().unwrap().port();
        let Some(last) = start.checked_add(n - 1) else {
            continue;
        };
        let mut held = vec![first];
        for port in start + 1..=last {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => held.push(l),
                Err(_) => break,
            }
        }
        if held.len() == usize::from(n) {
            return (held, PortRange { first: start, last });
        }
    }
    panic!("found no {n} free consecutive ports");
}

/// Takes the listener on `port` out of `listeners`.
pub fn take_port(listeners: &mut Vec<TcpListener>, port: u16) -> TcpListener {
    let i = listeners
        .iter()
        .position(|l| l.local_addr().unwrap().port() == port)
        .unwrap_or_else(|| panic!("port {port} is not one the test holds"));
    listeners.swap_remove(i)
}

/// A node talking to the control API as its agent does: every request signed
/// with its key, the first registration with a join token.
pub struct SignedNode {
    pub id: NodeId,
    key: NodeKey,
    base: String,
    client: Client,
}

impl SignedNode {
    pub fn new(base: &str, id: &str, seed: u8) -> Self {
        SignedNode {
            id: NodeId::new(id),
            key: NodeKey::from_secret([seed; 32]),
            base: base.to_owned(),
            client: Client::new(),
        }
    }

    /// Sends `body` to `path`, signed; answers the status and the JSON answer.
    pub async fn send(&self, path: &str, body: &Value, token: Option<&str>) -> (StatusCode, Value) {
        let bytes = serde_json::to_vec(body).unwrap();
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let signer = NodeSigner {
            node: &self.id,
            key: &self.key,
        };
        let resp = req.signed_by(&signer).send().await.unwrap();
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
        (status, resp.json().await.unwrap())
    }

    /// The registration body this node sends, with `ports` and `extra` fields
    /// merged in.
    pub fn registration(&self, ports: PortRange, extra: Value) -> Value {
        let mut body = json!({
            "id": self.id.as_str(), "name": self.id.as_str(),
            "resources": {"cpu_millis": 16000, "memory_mib": 65536, "disk_mib": 1, "gpus": []},
            "public_key": self.key.public(),
            "ports": ports,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    /// Joins with a fresh join token; answers the registration's answer.
    pub async fn join(&self, body: &Value) -> (StatusCode, Value) {
        let (status, created) = super::post_json(
            &self.client,
            &format!("{}/api/v1/join-tokens", self.base),
            &json!({}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let token = created["token"].as_str().unwrap().to_owned();
        self.send("/api/v1/nodes", body, Some(&token)).await
    }

    /// Reports allocations running, each with the endpoint it claims.
    pub async fn report_running(&self, claims: &[(&str, &str)]) -> (StatusCode, Value) {
        let allocations: Vec<Value> = claims
            .iter()
            .map(|(id, endpoint)| json!({"id": id, "state": "running", "endpoint": endpoint}))
            .collect();
        let path = format!("/api/v1/nodes/{}/heartbeat", self.id);
        self.send(&path, &json!({"allocations": allocations}), None)
            .await
    }
}
