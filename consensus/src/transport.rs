//! Raft messages between servers over HTTPS with mutual TLS under the cluster CA.
//!
//! Each peer has its own bounded queue and its own sending task, so a slow or dead peer
//! fills only its own queue (further messages to it are dropped, which Raft tolerates)
//! and never blocks the others. A sending task keeps one long-lived request open to
//! its peer ([`STREAM_PATH`]) and writes what is queued into it as one frame, up to
//! [`BATCH_BYTES`]: a message costs no request, answer or round trip of its own, and
//! many messages share a frame under load. Snapshots travel alone, each in its own
//! request to their own path with its own size limit. [`MESSAGES_PATH`] takes a
//! single batch per request, under the same checks.
//!
//! A peer is who its certificate says: the sender accepts only the certificate naming
//! the server id it dials, and the receiver drops every message whose `from` is not
//! the id in the connection's client certificate. Addresses come only from the
//! applied configuration (membership changes); nothing a message says moves them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_tls::ServerIdentity;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::{Mutex, RwLock};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, Semaphore};

use crate::metrics::RaftMetrics;
use crate::peer_listener::{PeerConn, PeerListener};

/// The path peers post message batches to.
pub const MESSAGES_PATH: &str = "/raft/v1/messages";
/// The path a snapshot message is posted to, alone.
pub const SNAPSHOT_PATH: &str = "/raft/v1/snapshot";
/// The path of a sender's long-lived request: its body is a sequence of frames, each
/// a `u32` big-endian length and a batch as [`encode_batch`] makes it.
pub const STREAM_PATH: &str = "/raft/v1/stream";
/// Frames queued for a stream before its sender waits for the connection.
const STREAM_FRAMES: usize = 64;
/// How long a sender waits for a stream to take a frame before it gives the stream
/// up as stalled and opens another.
const STREAM_STALL: Duration = Duration::from_secs(3);
const PEER_QUEUE: usize = 4096;
const MAX_BATCH: usize = 1024;
/// A sender closes a batch once its messages pass this many bytes; a single larger
/// message (one big entry) still goes, alone.
pub const BATCH_BYTES: usize = 4 << 20;
/// Largest snapshot a server accepts.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;
/// Size of one append message's entries (raft's `max_size_per_msg`) unless one entry
/// alone is larger.
const MESSAGE_BYTES: usize = 1 << 20;
/// Protobuf framing and message fields around the entries.
const FRAMING_BYTES: usize = 64 << 10;

/// What the peer listener admits: body sizes (413 beyond) and requests at once
/// (429 beyond), so that no flood can take more memory than these allow.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Largest body of a message batch.
    pub max_batch_bytes: usize,
    /// Largest body of a snapshot.
    pub max_snapshot_bytes: usize,
    /// Message batches read at once (a peer sends one at a time).
    pub max_batches: usize,
    /// Streams open at once (a peer keeps one open; a frame is limited as a batch).
    pub max_streams: usize,
    /// Snapshots read at once.
    pub max_snapshots: usize,
    /// Connections open at once, handshaking or established.
    pub max_connections: usize,
}

impl PeerLimits {
    /// Limits for a cluster whose largest log entry is `max_entry_bytes`: the largest
    /// batch a sender makes is [`BATCH_BYTES`] plus one message, and a message holds
    /// up to 1 MiB of entries or one larger entry.
    pub fn for_entries(max_entry_bytes: usize) -> Self {
        PeerLimits {
            max_batch_bytes: BATCH_BYTES + MESSAGE_BYTES.max(max_entry_bytes) + FRAMING_BYTES,
            max_snapshot_bytes: MAX_SNAPSHOT_BYTES,
            max_batches: 16,
            max_streams: 64,
            max_snapshots: 2,
            max_connections: 128,
        }
    }
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self::for_entries(16 << 20)
    }
}

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
    identity: Arc<ServerIdentity>,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    /// True once an applied configuration named the members: seeds stop counting.
    configured: std::sync::atomic::AtomicBool,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
    feedback: Arc<dyn Fn(Feedback) + Send + Sync>,
    metrics: Arc<RaftMetrics>,
}

impl Transport {
    /// A transport for the server `identity` names, dialling peers with its
    /// certificate.
    pub fn new(
        identity: Arc<ServerIdentity>,
        runtime: tokio::runtime::Handle,
        feedback: Arc<dyn Fn(Feedback) + Send + Sync>,
        metrics: Arc<RaftMetrics>,
    ) -> Self {
        Transport {
            identity,
            addrs: Arc::default(),
            configured: std::sync::atomic::AtomicBool::new(false),
            peers: Mutex::default(),
            runtime,
            feedback,
            metrics,
        }
    }

    /// This server's id, as its certificate names it.
    pub fn id(&self) -> u64 {
        self.identity.id()
    }

    /// Replaces the known peer addresses with the applied configuration's.
    pub fn set_members(&self, members: &BTreeMap<u64, String>) {
        if members.is_empty() {
            return;
        }
        self.configured.store(true, Ordering::SeqCst);
        *self.addrs.write() = members.clone();
    }

    /// The address server `id` is dialled at.
    pub fn addr_of(&self, id: u64) -> Option<String> {
        self.addrs.read().get(&id).cloned()
    }

    /// Addresses of an existing cluster's members for a server that joins it and has
    /// no configuration yet (so it can answer the leader before its first snapshot).
    /// Ignored once a configuration was applied.
    pub fn seed(&self, members: &BTreeMap<u64, String>) {
        if self.configured.load(Ordering::SeqCst) {
            return;
        }
        let mut addrs = self.addrs.write();
        for (id, addr) in members {
            if *id != self.id() {
                addrs.entry(*id).or_insert_with(|| addr.clone());
            }
        }
    }

    /// Queues a message for its recipient without waiting.
    pub fn send(&self, msg: Message) {
        let to = msg.to;
        let sender = {
            let mut peers = self.peers.lock();
            match peers.get(&to) {
                Some(sender) => Some(sender.clone()),
                None => match self.spawn_peer(to) {
                    Ok(sender) => {
                        peers.insert(to, sender.clone());
                        Some(sender)
                    }
                    Err(e) => {
                        tracing::error!(peer = to, error = %e, "cannot build the peer client");
                        None
                    }
                },
            }
        };
        if sender.is_none_or(|s| s.try_send(msg).is_err()) {
            self.metrics.messages_dropped.inc();
        }
    }

    fn spawn_peer(&self, to: u64) -> Result<mpsc::Sender<Message>, String> {
        let tls = self
            .identity
            .peer_client_config(to)
            .map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_millis(500))
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the peer HTTP client: {e}"))?;
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let peer = PeerSender {
            to,
            addrs: self.addrs.clone(),
            client,
            feedback: self.feedback.clone(),
            metrics: self.metrics.clone(),
        };
        self.runtime.spawn(peer.run(rx));
        Ok(tx)
    }

    /// Checks that server `id` answers at `addr` on its peer listener with a
    /// certificate from the CA that names it: a TLS handshake within `timeout`.
    pub async fn probe(&self, id: u64, addr: &str, timeout: Duration) -> Result<(), String> {
        let config = self
            .identity
            .peer_client_config(id)
            .map_err(|e| e.to_string())?;
        let host = addr
            .rsplit_once(':')
            .map(|(host, _)| host)
            .ok_or_else(|| format!("`{addr}` is not HOST:PORT"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        // The name only fills SNI: the peer is checked by the id its certificate names.
        let name =
            rustls::pki_types::ServerName::try_from(host).map_err(|e| format!("`{addr}`: {e}"))?;
        let handshake = async {
            // A server that is still starting refuses connections for a moment: try
            // again until the deadline. A handshake that fails is final.
            let tcp = loop {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(tcp) => break tcp,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(format!("cannot connect: {e}")),
                }
            };
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            Ok(())
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| format!("no TLS answer within {timeout:?}"))?
    }
}

struct PeerSender {
    to: u64,
    addrs: Arc<RwLock<BTreeMap<u64, String>>>,
    client: reqwest::Client,
    feedback: Arc<dyn Fn(Feedback) + Send + Sync>,
    metrics: Arc<RaftMetrics>,
}

fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}

impl PeerSender {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        let mut held: Option<Message> = None;
        let mut stream: Option<PeerStreamTx> = None;
        loop {
            let first = match held.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let snapshot = is_snapshot(&first);
            let mut bytes = first.compute_size() as usize;
            let mut batch = vec![first];
            while !snapshot && batch.len() < MAX_BATCH && bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) if is_snapshot(&m) => {
                        held = Some(m);
                        break;
                    }
                    Ok(m) => {
                        bytes += m.compute_size() as usize;
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            let sent = if snapshot {
                self.post(&batch).await
            } else {
                self.stream(&mut stream, &batch).await
            };
            match sent {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    if snapshot {
                        (self.feedback)(Feedback::Snapshot(self.to, true));
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = self.to, error = %e, "raft send failed");
                    self.metrics.messages_dropped.inc_by(batch.len() as u64);
                    (self.feedback)(Feedback::Unreachable(self.to));
                    if snapshot {
                        (self.feedback)(Feedback::Snapshot(self.to, false));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn url(&self, path: &str) -> Result<String, String> {
        let addrs = self.addrs.read();
        let addr = addrs
            .get(&self.to)
            .ok_or_else(|| format!("no address known for server {}", self.to))?;
        Ok(format!("https://{addr}{path}"))
    }

    /// Posts a snapshot message in a request of its own. It is encoded on a blocking
    /// thread: the sender runs on the replica's thread, which must not stall on it.
    async fn post(&self, batch: &[Message]) -> Result<(), String> {
        let batch = batch.to_vec();
        let body = tokio::task::spawn_blocking(move || encode_batch(&batch))
            .await
            .map_err(|e| e.to_string())??;
        let resp = self
            .client
            .post(self.url(SNAPSHOT_PATH)?)
            .timeout(Duration::from_secs(120))
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

    /// Writes `batch` as one frame into the open stream, opening one first if there
    /// is none. A stream the peer closed, or one that took no frame for
    /// [`STREAM_STALL`], is dropped (its request with it) and the error returned: the
    /// next batch opens a fresh one.
    async fn stream(
        &self,
        stream: &mut Option<PeerStreamTx>,
        batch: &[Message],
    ) -> Result<(), String> {
        let mut frame = vec![0; 4];
        encode_batch_into(batch, &mut frame)?;
        let len = u32::try_from(frame.len() - 4).map_err(|_| "frame over 4 GiB".to_string())?;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let open = match stream.take() {
            Some(open) => open,
            None => self.open_stream()?,
        };
        match tokio::time::timeout(
            STREAM_STALL,
            open.frames.send((Bytes::from(frame), batch.len() as u64)),
        )
        .await
        {
            Ok(Ok(())) => {
                *stream = Some(open);
                Ok(())
            }
            Ok(Err(_)) => Err(match open.request.now_or_never() {
                Some(Ok(Err(e))) => e,
                _ => "the stream to the peer closed".into(),
            }),
            Err(_) => Err(format!(
                "the stream to the peer took no frame for {STREAM_STALL:?}"
            )),
        }
    }

    /// Starts the long-lived request whose body is what `frames` is given. When the
    /// request ends (the peer is unreachable, or answered), the peer is reported
    /// unreachable and the frames still queued count as dropped.
    fn open_stream(&self) -> Result<PeerStreamTx, String> {
        let (frames, rx) = mpsc::channel(STREAM_FRAMES);
        let queued = QueuedFrames {
            rx,
            metrics: self.metrics.clone(),
        };
        let body = futures_util::stream::unfold(queued, |mut queued| async move {
            let (frame, _) = queued.rx.recv().await?;
            Some((Ok::<_, std::io::Error>(frame), queued))
        });
        let request = self
            .client
            .post(self.url(STREAM_PATH)?)
            .body(reqwest::Body::wrap_stream(body))
            .send();
        let (to, feedback) = (self.to, self.feedback.clone());
        let request = tokio::spawn(async move {
            let why = match request.await {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    format!("peer ended the stream: {status} {text}")
                }
                Err(e) => e.to_string(),
            };
            tracing::debug!(peer = to, error = %why, "raft stream ended");
            feedback(Feedback::Unreachable(to));
            Err(why)
        });
        Ok(PeerStreamTx {
            frames,
            request: AbortOnDrop(request),
        })
    }
}

/// The sending end of an open stream: a frame and the number of messages in it.
/// Dropping it ends the request.
struct PeerStreamTx {
    frames: mpsc::Sender<(Bytes, u64)>,
    request: AbortOnDrop,
}

/// A stream's queued frames, inside its request body: what is still queued when the
/// body is dropped never left, and counts as dropped.
struct QueuedFrames {
    rx: mpsc::Receiver<(Bytes, u64)>,
    metrics: Arc<RaftMetrics>,
}

impl Drop for QueuedFrames {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok((_, messages)) = self.rx.try_recv() {
            self.metrics.messages_dropped.inc_by(messages);
        }
    }
}

/// The task running a stream's request, aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), String>>);

impl AbortOnDrop {
    /// The request's outcome if it has ended.
    fn now_or_never(mut self) -> Option<Result<Result<(), String>, tokio::task::JoinError>> {
        use futures_util::FutureExt;
        (&mut self.0).now_or_never()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Encodes messages as a sequence of `u32` big-endian length + protobuf bytes.
pub fn encode_batch(batch: &[Message]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    encode_batch_into(batch, &mut out)?;
    Ok(out)
}

/// [`encode_batch`], appending to `out`.
fn encode_batch_into(batch: &[Message], out: &mut Vec<u8>) -> Result<(), String> {
    for msg in batch {
        let len = msg.compute_size();
        out.extend_from_slice(&len.to_be_bytes());
        msg.write_to_vec(out).map_err(|e| e.to_string())?;
    }
    Ok(())
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
}

/// Warns at most once per interval, counting what it held back.
struct WarnLimiter {
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl WarnLimiter {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        WarnLimiter {
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    /// Calls `warn` with the number of warnings held back since the last one, unless
    /// one was given less than [`Self::EVERY`] ago.
    fn warn(&self, warn: impl FnOnce(u64)) {
        let mut last = self.last.lock();
        if last.is_some_and(|at| at.elapsed() < Self::EVERY) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        warn(self.held.swap(0, Ordering::Relaxed));
    }
}

#[derive(Clone)]
struct Receiving {
    inbox: Arc<dyn Inbox>,
    self_id: u64,
    metrics: Arc<RaftMetrics>,
    forged: Arc<WarnLimiter>,
    /// Largest frame of a stream.
    max_frame: usize,
    /// True once the listener stops: open streams end, so that its graceful
    /// shutdown need not wait for requests that never end by themselves.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// The routes peers post to, for connections labelled with their certificate's
/// server id ([`PeerConn`]): batches and snapshots, each with its size limit and
/// its bound on requests at once, and streams, which end once `stopping` is true.
fn router(
    inbox: Arc<dyn Inbox>,
    self_id: u64,
    metrics: Arc<RaftMetrics>,
    limits: &PeerLimits,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let state = Receiving {
        inbox,
        self_id,
        metrics,
        forged: Arc::new(WarnLimiter::new()),
        max_frame: limits.max_batch_bytes,
        stopping,
    };
    let batches = Router::new()
        .route(MESSAGES_PATH, post(receive))
        .layer(DefaultBodyLimit::max(limits.max_batch_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::new(Semaphore::new(limits.max_batches.max(1))),
            admit,
        ));
    let snapshots = Router::new()
        .route(SNAPSHOT_PATH, post(receive))
        .layer(DefaultBodyLimit::max(limits.max_snapshot_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::new(Semaphore::new(limits.max_snapshots.max(1))),
            admit,
        ));
    // A stream's body has no end to limit: each of its frames is limited instead.
    let streams = Router::new()
        .route(STREAM_PATH, post(receive_stream))
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            Arc::new(Semaphore::new(limits.max_streams.max(1))),
            admit,
        ));
    batches.merge(snapshots).merge(streams).with_state(state)
}

/// Reads a body only while fewer than the limit are being read: 429 otherwise
/// (Raft sends again).
async fn admit(State(slots): State<Arc<Semaphore>>, req: Request, next: Next) -> Response {
    match slots.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many peer requests at once",
        )
            .into_response(),
    }
}

/// Starts accepting peers on `listener` with mutual TLS under `identity`'s CA, on the
/// caller's runtime: handshakes run there.
pub fn listen(
    listener: tokio::net::TcpListener,
    identity: &ServerIdentity,
    metrics: Arc<RaftMetrics>,
    limits: &PeerLimits,
) -> std::io::Result<PeerListener> {
    let tls = identity
        .peer_server_config()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    PeerListener::new(
        listener,
        identity.id(),
        tls,
        limits.max_connections,
        metrics,
    )
}

/// Serves the peer routes to the connections `listener` accepts until `shutdown`
/// completes, on the caller's runtime; then ends the streams peers keep open (503)
/// and returns once every connection has closed.
pub async fn serve(
    listener: PeerListener,
    self_id: u64,
    inbox: Arc<dyn Inbox>,
    metrics: Arc<RaftMetrics>,
    limits: PeerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let app = router(inbox, self_id, metrics, &limits, stopping);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<PeerConn>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop.send(true);
    })
    .await
}

/// Bodies larger than this are decoded on a blocking thread, not the replica's.
const DECODE_INLINE_BYTES: usize = 1 << 20;

async fn receive(
    State(state): State<Receiving>,
    ConnectInfo(peer): ConnectInfo<PeerConn>,
    body: Bytes,
) -> (StatusCode, String) {
    let decoded = if body.len() > DECODE_INLINE_BYTES {
        match tokio::task::spawn_blocking(move || decode_batch(&body)).await {
            Ok(decoded) => decoded,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    } else {
        decode_batch(&body)
    };
    match decoded {
        Ok(messages) => match state.accept(&peer, messages) {
            Ok(()) => (StatusCode::OK, String::new()),
            Err(refusal) => refusal,
        },
        Err(e) => (StatusCode::BAD_REQUEST, e),
    }
}

/// Reads a sender's stream frame by frame, delivering each as it completes, until
/// the sender ends it. A frame over the batch limit is refused (413) before it is
/// read; a malformed frame, or a frame of nothing but messages the peer may not
/// send, ends the stream with the answer a batch would get.
async fn receive_stream(
    State(state): State<Receiving>,
    ConnectInfo(peer): ConnectInfo<PeerConn>,
    body: axum::body::Body,
) -> (StatusCode, String) {
    use futures_util::StreamExt;
    let mut body = body.into_data_stream();
    let mut pending = bytes::BytesMut::new();
    let mut stopping = state.stopping.clone();
    loop {
        while let Some(head) = pending.get(..4) {
            let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
            if len > state.max_frame {
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "a frame of {len} bytes is over the {} byte limit",
                        state.max_frame
                    ),
                );
            }
            if pending.len() < 4 + len {
                pending.reserve(4 + len - pending.len());
                break;
            }
            let frame = pending.split_to(4 + len);
            let delivered = decode_batch(&frame[4..])
                .map_err(|e| (StatusCode::BAD_REQUEST, e))
                .and_then(|messages| state.accept(&peer, messages));
            if let Err(refusal) = delivered {
                return refusal;
            }
        }
        let next = tokio::select! {
            next = body.next() => next,
            _ = stopping.wait_for(|stop| *stop) => {
                return (StatusCode::SERVICE_UNAVAILABLE, "this server is stopping".into())
            }
        };
        match next {
            Some(Ok(chunk)) => pending.extend_from_slice(&chunk),
            Some(Err(e)) => return (StatusCode::BAD_REQUEST, e.to_string()),
            None if pending.is_empty() => return (StatusCode::OK, String::new()),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    "the stream ended inside a frame".into(),
                )
            }
        }
    }
}

impl Receiving {
    /// Delivers what `peer` may send of `messages`: only its own, only to this
    /// server. Refuses a batch of nothing else (403), and answers 503 when the
    /// replica is not running.
    fn accept(&self, peer: &PeerConn, messages: Vec<Message>) -> Result<(), (StatusCode, String)> {
        let total = messages.len();
        // A server speaks only for itself, and only to this server.
        let messages: Vec<Message> = messages
            .into_iter()
            .filter(|m| m.from == peer.server && m.to == self.self_id)
            .collect();
        let refused = total - messages.len();
        if refused > 0 {
            self.metrics.peer_messages_refused.inc_by(refused as u64);
            self.forged.warn(|held| {
                tracing::warn!(
                    peer = peer.server,
                    remote = %peer.remote,
                    refused,
                    earlier_warnings_held_back = held,
                    "dropped raft messages not from the server the connection's certificate names, or not to this server"
                )
            });
        }
        if messages.is_empty() && refused > 0 {
            return Err((
                StatusCode::FORBIDDEN,
                format!("server {} may send only its own messages", peer.server),
            ));
        }
        if messages.is_empty() || self.inbox.deliver(messages) {
            Ok(())
        } else {
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "raft replica is not running".into(),
            ))
        }
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
