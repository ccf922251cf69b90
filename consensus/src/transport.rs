//! Raft messages between servers over HTTP.
//!
//! Each peer has its own bounded queue and its own sending task, so a slow or dead peer
//! fills only its own queue (further messages to it are dropped, which Raft tolerates)
//! and never blocks the others. A sending task drains everything queued into one
//! request: many messages per round trip under load.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use parking_lot::{Mutex, RwLock};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;

use crate::metrics::RaftMetrics;

/// The path peers post message batches to.
pub const MESSAGES_PATH: &str = "/raft/v1/messages";
const FROM_ID: &str = "x-aigrid-raft-from-id";
const FROM_ADDR: &str = "x-aigrid-raft-from-addr";
const PEER_QUEUE: usize = 4096;
const MAX_BATCH: usize = 1024;
/// Largest message batch a server accepts (a snapshot travels in one).
pub const MAX_BATCH_BYTES: usize = 1 << 30;

/// What the transport tells the replica about deliveries.
#[derive(Debug, Clone, Copy)]
pub enum Feedback {
    /// A peer could not be reached.
    Unreachable(u64),
    /// A snapshot reached (`true`) or failed to reach (`false`) a peer.
    Snapshot(u64, bool),
}

/// Sends Raft messages to peers by id.
pub struct Transport {
    self_id: u64,
    self_addr: String,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    feedback: Arc<dyn Fn(Feedback) + Send + Sync>,
    metrics: Arc<RaftMetrics>,
}

impl Transport {
    /// A transport for server `self_id`, advertised to peers as `self_addr`.
    pub fn new(
        self_id: u64,
        self_addr: String,
        runtime: tokio::runtime::Handle,
        feedback: Arc<dyn Fn(Feedback) + Send + Sync>,
        metrics: Arc<RaftMetrics>,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the peer HTTP client: {e}"))?;
        Ok(Transport {
            self_id,
            self_addr,
            addrs: Arc::default(),
            peers: Mutex::default(),
            client,
            runtime,
            feedback,
            metrics,
        })
    }

    /// Replaces the known addresses of voters (from the applied configuration).
    pub fn set_members(&self, members: &BTreeMap<u64, String>) {
        let mut addrs = self.addrs.write();
        for (id, addr) in members {
            addrs.insert(*id, addr.clone());
        }
    }

    /// Records the address a peer announced itself with, if not known yet. A server
    /// that joins learns its leader's address this way before any snapshot arrives.
    pub fn learn(&self, id: u64, addr: &str) {
        if id == self.self_id || addr.is_empty() {
            return;
        }
        let known = self.addrs.read().get(&id).is_some_and(|a| a == addr);
        if !known {
            self.addrs.write().insert(id, addr.to_owned());
        }
    }

    /// Queues a message for its recipient without waiting.
    pub fn send(&self, msg: Message) {
        let to = msg.to;
        let sender = {
            let mut peers = self.peers.lock();
            peers
                .entry(to)
                .or_insert_with(|| self.spawn_peer(to))
                .clone()
        };
        if sender.try_send(msg).is_err() {
            self.metrics.messages_dropped.inc();
        }
    }

    fn spawn_peer(&self, to: u64) -> mpsc::Sender<Message> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let peer = PeerSender {
            to,
            from_id: self.self_id,
            from_addr: self.self_addr.clone(),
            addrs: self.addrs.clone(),
            client: self.client.clone(),
            feedback: self.feedback.clone(),
            metrics: self.metrics.clone(),
        };
        self.runtime.spawn(peer.run(rx));
        tx
    }
}

struct PeerSender {
    to: u64,
    from_id: u64,
    from_addr: String,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    client: reqwest::Client,
    feedback: Arc<dyn Fn(Feedback) + Send + Sync>,
    metrics: Arc<RaftMetrics>,
}

impl PeerSender {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let has_snapshot = batch
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            match self.post(&batch, has_snapshot).await {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    if has_snapshot {
                        (self.feedback)(Feedback::Snapshot(self.to, true));
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = self.to, error = %e, "raft send failed");
                    self.metrics.messages_dropped.inc_by(batch.len() as u64);
                    (self.feedback)(Feedback::Unreachable(self.to));
                    if has_snapshot {
                        (self.feedback)(Feedback::Snapshot(self.to, false));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn post(&self, batch: &[Message], has_snapshot: bool) -> Result<(), String> {
        let addr = self
            .addrs
            .read()
            .get(&self.to)
            .cloned()
            .ok_or_else(|| format!("no address known for server {}", self.to))?;
        let body = encode_batch(batch)?;
        let timeout = if has_snapshot {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(3)
        };
        let resp = self
            .client
            .post(format!("http://{addr}{MESSAGES_PATH}"))
            .header(FROM_ID, self.from_id.to_string())
            .header(FROM_ADDR, &self.from_addr)
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("peer answered {}", resp.status()))
        }
    }
}

/// Encodes messages as a sequence of `u32` big-endian length + protobuf bytes.
pub fn encode_batch(batch: &[Message]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for msg in batch {
        let bytes = msg.write_to_bytes().map_err(|e| e.to_string())?;
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Decodes what [`encode_batch`] produced.
pub fn decode_batch(mut bytes: &[u8]) -> Result<Vec<Message>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 4 {
            return Err("truncated length prefix".into());
        }
        let len = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let body = bytes
            .get(4..4 + len)
            .ok_or_else(|| "truncated message".to_string())?;
        out.push(Message::parse_from_bytes(body).map_err(|e| e.to_string())?);
        bytes = &bytes[4 + len..];
    }
    Ok(out)
}

/// Where the receiving side hands decoded messages.
pub trait Inbox: Send + Sync + 'static {
    /// Delivers messages to the local replica; false when it is not running.
    fn deliver(&self, messages: Vec<Message>) -> bool;
    /// Records a peer's announced address.
    fn learn(&self, id: u64, addr: &str);
}

/// The HTTP route peers post message batches to.
pub fn router(inbox: Arc<dyn Inbox>) -> Router {
    Router::new()
        .route(MESSAGES_PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(inbox)
}

async fn receive(
    State(inbox): State<Arc<dyn Inbox>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let messages = match decode_batch(&body) {
        Ok(m) => m,
        Err(e) => return (StatusCode::BAD_REQUEST, e),
    };
    let from_id = headers
        .get(FROM_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let from_addr = headers.get(FROM_ADDR).and_then(|v| v.to_str().ok());
    if let (Some(id), Some(addr)) = (from_id, from_addr) {
        inbox.learn(id, addr);
    }
    if inbox.deliver(messages) {
        (StatusCode::OK, String::new())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "raft replica is not running".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(std::sync::mpsc::Sender<Message>);

    impl Inbox for Collect {
        fn deliver(&self, messages: Vec<Message>) -> bool {
            messages.into_iter().all(|m| self.0.send(m).is_ok())
        }
        fn learn(&self, _id: u64, _addr: &str) {}
    }

    fn heartbeat(to: u64, term: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 1;
        m.to = to;
        m.term = term;
        m
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_peer_does_not_hold_up_a_live_one() {
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            axum::serve(listener, router(Arc::new(Collect(tx))))
                .await
                .unwrap();
        });
        // Nothing listens on the dead peer's address (a port taken and released).
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);

        let unreachable = Arc::new(Mutex::new(Vec::new()));
        let seen = unreachable.clone();
        let metrics = Arc::new(RaftMetrics::register(&prometheus::Registry::new()).unwrap());
        let transport = Transport::new(
            1,
            "127.0.0.1:1".into(),
            tokio::runtime::Handle::current(),
            Arc::new(move |f| seen.lock().push(f)),
            metrics.clone(),
        )
        .unwrap();
        transport.set_members(&BTreeMap::from([(2, live), (3, dead_addr)]));

        let started = std::time::Instant::now();
        for term in 0..2_000 {
            transport.send(heartbeat(3, term));
            transport.send(heartbeat(2, term));
        }
        let received = tokio::task::spawn_blocking(move || {
            (0..2_000)
                .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap().term)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert_eq!(
            received,
            (0..2_000).collect::<Vec<_>>(),
            "delivered in order"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the live peer waited {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            unreachable
                .lock()
                .iter()
                .any(|f| matches!(f, Feedback::Unreachable(3))),
            "the dead peer is reported unreachable"
        );
        assert!(metrics.messages_dropped.get() > 0);
    }

    #[test]
    fn batch_round_trip() {
        let mut a = Message::default();
        a.set_msg_type(MessageType::MsgHeartbeat);
        a.to = 2;
        a.from = 1;
        a.term = 7;
        let mut b = Message::default();
        b.set_msg_type(MessageType::MsgAppend);
        b.to = 3;
        b.commit = 9;
        let bytes = encode_batch(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(decode_batch(&bytes).unwrap(), vec![a, b]);
        assert!(decode_batch(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_batch(&[0, 0]).is_err());
    }
}
