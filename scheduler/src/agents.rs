//! The agent-facing half of the control API. Agents dial out and never accept a
//! connection, so everything they need comes through here: joining with a token,
//! signed heartbeats, long polls for what to run, and the log tails users read.
//!
//! Heartbeats are the bulk of a large fleet's traffic and almost all of them say only
//! "still alive". Those are not committed one by one: the server answering keeps
//! the node in a batch and commits one [`Command::NodesSeen`] per batch interval,
//! and keeps host/GPU readings in memory. A heartbeat that changes something (a GPU
//! health, an allocation state, log tails, a down node coming back) is committed
//! before it is answered, like every other write.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::auth::{NODE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use aigrid_api::{
    AllocId, AllocationLogs, CreateJoinToken, CreatedJoinToken, ErrorBody, ErrorCode, Heartbeat,
    HeartbeatResponse, JoinToken, JoinTokenInfo, Node, NodeAssignments, NodeId, NodePublicKey,
    NodeRegistration, NodeTelemetry, RegisterNodeResponse, RequestToSign, Timestamp,
};
use aigrid_consensus::RaftNode;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Json;
use parking_lot::{Mutex, RwLock};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::http::{body_bytes, decode_json, propose, unexpected, ApiError, ApiLimits, ApiState};
use crate::state::{Applied, ClusterState, Command, EventSink, StateError, StateEvent, TokenUse};

/// Longest a long poll is held.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(300);
/// How long a long poll is held when the agent does not say.
pub const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(30);

/// Wakes agents' long polls when their node's assignments change. Not part of the
/// replicated state: each server hands one to its [`ClusterState`] as an
/// [`EventSink`] and wakes the polls it holds as the state emits [`StateEvent`]s.
#[derive(Default)]
pub struct NodeWatch {
    senders: parking_lot::Mutex<std::collections::HashMap<NodeId, tokio::sync::watch::Sender<u64>>>,
}

impl std::fmt::Debug for NodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeWatch({} nodes watched)", self.senders.lock().len())
    }
}

impl NodeWatch {
    /// A receiver that changes when `node`'s assignments change. Subscribe before
    /// reading the state so no change between the read and the wait is missed.
    pub fn subscribe(&self, node: &NodeId) -> tokio::sync::watch::Receiver<u64> {
        self.senders
            .lock()
            .entry(node.clone())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn touch(&self, node: &NodeId, index: u64) {
        let mut senders = self.senders.lock();
        if let Some(tx) = senders.get(node) {
            if tx.receiver_count() == 0 {
                senders.remove(node);
            } else {
                tx.send_replace(index);
            }
        }
    }

    fn touch_all(&self, index: u64) {
        let mut senders = self.senders.lock();
        senders.retain(|_, tx| tx.receiver_count() > 0);
        for tx in senders.values() {
            tx.send_replace(index);
        }
    }
}

impl EventSink for NodeWatch {
    fn publish(&self, event: StateEvent) {
        match event {
            StateEvent::AssignmentsChanged { node, index } => self.touch(&node, index),
            StateEvent::Restored => self.touch_all(u64::MAX),
        }
    }
}

/// What a server holds for the agents talking to it, beside the replicated state.
pub struct AgentHub {
    watch: Arc<NodeWatch>,
    seen: Mutex<SeenBatch>,
    telemetry: RwLock<HashMap<NodeId, NodeTelemetry>>,
    long_polls: Arc<Semaphore>,
    /// Long polls held per node; a node may hold [`POLLS_PER_NODE`].
    polls_by_node: Mutex<HashMap<NodeId, usize>>,
    /// False after a batch of heartbeats failed to commit, until one commits: this
    /// server may be cut off from the leader, so it sends agents elsewhere.
    flushing: std::sync::atomic::AtomicBool,
    metrics: AgentMetrics,
}

/// Long polls one node may hold at once (an agent holds one; the second covers a
/// poll that is being replaced).
pub const POLLS_PER_NODE: usize = 2;

/// Nodes heard from since the last flush, and when the first of them was.
#[derive(Default)]
struct SeenBatch {
    nodes: HashSet<NodeId>,
    earliest: Option<Timestamp>,
}

#[derive(Clone)]
struct AgentMetrics {
    heartbeats: IntCounterVec,
    heartbeat_seconds: Histogram,
    long_polls: IntGauge,
    seen_flushes: IntCounter,
}

impl AgentMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "aigrid_agent_heartbeats_total",
                "Agent heartbeats by outcome: seen (batched), committed, rejected",
            ),
            &["outcome"],
        )?;
        let heartbeat_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "aigrid_agent_heartbeat_seconds",
                "Time to answer an agent heartbeat",
            )
            .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 18)?),
        )?;
        let long_polls = IntGauge::new(
            "aigrid_agent_long_polls",
            "Agents' assignment long polls held open",
        )?;
        let seen_flushes = IntCounter::new(
            "aigrid_agent_seen_flushes_total",
            "Batches of plain heartbeats committed",
        )?;
        registry.register(Box::new(heartbeats.clone()))?;
        registry.register(Box::new(heartbeat_seconds.clone()))?;
        registry.register(Box::new(long_polls.clone()))?;
        registry.register(Box::new(seen_flushes.clone()))?;
        Ok(AgentMetrics {
            heartbeats,
            heartbeat_seconds,
            long_polls,
            seen_flushes,
        })
    }
}

impl AgentHub {
    /// The hub of a server; [`run_flusher`] commits its batches.
    pub fn new(
        _raft: &RaftNode<ClusterState>,
        registry: &Registry,
        limits: &ApiLimits,
        watch: Arc<NodeWatch>,
    ) -> prometheus::Result<Self> {
        let hub = AgentHub {
            watch,
            seen: Mutex::default(),
            telemetry: RwLock::default(),
            long_polls: Arc::new(Semaphore::new(limits.max_long_polls.max(1))),
            polls_by_node: Mutex::default(),
            flushing: std::sync::atomic::AtomicBool::new(true),
            metrics: AgentMetrics::register(registry)?,
        };
        Ok(hub)
    }

    fn saw(&self, node: NodeId, at: Timestamp) {
        let mut seen = self.seen.lock();
        seen.nodes.insert(node);
        seen.earliest = Some(seen.earliest.map_or(at, |e| e.min(at)));
    }

    /// Commits the nodes heard from since the last call, as one entry. On failure
    /// the batch is kept for the next call.
    async fn flush(&self, raft: &RaftNode<ClusterState>) {
        let batch = std::mem::take(&mut *self.seen.lock());
        let Some(at) = batch.earliest else {
            return;
        };
        let nodes: Vec<NodeId> = batch.nodes.iter().cloned().collect();
        let command = Command::NodesSeen { nodes, at };
        match raft.propose(&command).await {
            Ok(_) => {
                self.metrics.seen_flushes.inc();
                self.flushing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                self.flushing
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "committing a batch of heartbeats failed; retrying");
                let mut seen = self.seen.lock();
                seen.nodes.extend(batch.nodes);
                seen.earliest = Some(seen.earliest.map_or(at, |e| e.min(at)));
            }
        }
    }

    /// Whether this server can vouch for what it answers agents from its own
    /// state: it knows a leader and its last batch of heartbeats committed. A server
    /// cut off from the majority answers 503 instead, so agents move to one that
    /// is not, rather than be kept running work the majority has moved.
    fn connected(&self, raft: &RaftNode<ClusterState>) -> Result<(), ApiError> {
        let leader = raft.leader().is_some();
        if leader && self.flushing.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::NoQuorum,
                "this server cannot reach a quorum; try another",
            ))
        }
    }

    /// Takes one of `node`'s long-poll slots, or refuses when it holds them all.
    fn hold_poll(self: &Arc<Self>, node: &NodeId) -> Result<impl Drop, ApiError> {
        {
            let mut held = self.polls_by_node.lock();
            let n = held.entry(node.clone()).or_insert(0);
            if *n >= POLLS_PER_NODE {
                return Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!("node `{node}` already holds {POLLS_PER_NODE} long polls"),
                ));
            }
            *n += 1;
        }
        let hub = self.clone();
        let node = node.clone();
        Ok(scopeguard(move || {
            let mut held = hub.polls_by_node.lock();
            if let Some(n) = held.get_mut(&node) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&node);
                }
            }
        }))
    }

    /// The latest readings of a node's agent, if it reported to this server.
    pub fn telemetry(&self, node: &NodeId) -> Option<NodeTelemetry> {
        self.telemetry.read().get(node).cloned()
    }

    /// Fills in readings this server holds.
    pub(crate) fn with_telemetry(&self, mut node: Node) -> Node {
        node.telemetry = self.telemetry(&node.id);
        node
    }
}

/// Commits batches of plain heartbeats every `every` until `shutdown` turns true.
pub async fn run_flusher(
    raft: RaftNode<ClusterState>,
    hub: Arc<AgentHub>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(every) => {}
        }
        hub.flush(&raft).await;
    }
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, message)
}

impl From<aigrid_api::AuthError> for ApiError {
    fn from(e: aigrid_api::AuthError) -> Self {
        unauthorized(e.to_string())
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized(format!("missing or unreadable `{name}` header")))
}

/// Checks that a request is signed by `node` with `key`.
fn verify(
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    node: &NodeId,
    key: &NodePublicKey,
    now: Timestamp,
) -> Result<(), ApiError> {
    let signer = header(headers, NODE_HEADER)?;
    if signer != node.as_str() {
        return Err(unauthorized(format!(
            "request signed by node `{signer}` for node `{node}`"
        )));
    }
    let timestamp = header(headers, TIMESTAMP_HEADER)?
        .parse::<u64>()
        .map_err(|_| unauthorized(format!("`{TIMESTAMP_HEADER}` is not Unix milliseconds")))?;
    let signature = header(headers, SIGNATURE_HEADER)?;
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    RequestToSign {
        method: method.as_str(),
        path_and_query,
        node,
        timestamp: Timestamp::from_millis(timestamp),
        body,
    }
    .verify(key, signature, now)?;
    Ok(())
}

/// Checks that a request comes from `node`, signed with the key it registered and
/// that was not revoked. Unknown nodes are refused alike, so a caller cannot tell
/// which node ids exist.
async fn authenticate(
    state: &ApiState,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    node: &NodeId,
) -> Result<(), ApiError> {
    let mut key = state.raft.read_local(|s| s.node_key(node));
    if !matches!(key, Some((Some(_), false))) {
        // A refusal tells the agent to register again or to stop its work: make
        // sure it is not just this server lagging behind.
        key = state.raft.read(|s| s.node_key(node)).await?;
    }
    match key {
        Some((Some(key), false)) => {
            verify(headers, method, uri, body, node, &key, state.clock.now())
        }
        Some((_, true)) => Err(ApiError::new(
            ErrorCode::KeyRevoked,
            format!("the key of node `{node}` was revoked"),
        )),
        Some((None, false)) | None => Err(ApiError::new(
            ErrorCode::UnknownNode,
            format!("node `{node}` has no registered key"),
        )),
    }
}

/// The join token in `Authorization: Bearer ...`, if any.
fn join_token(headers: &HeaderMap) -> Result<Option<TokenUse>, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token: JoinToken = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("Authorization must be `Bearer <join token>`"))?
        .parse()
        .map_err(unauthorized)?;
    Ok(Some(TokenUse {
        secret_hash: token.secret_hash(),
        id: token.id,
    }))
}

/// Registers a node, or refreshes a known node's inventory (an agent restart); 201
/// when created, 200 when it refreshed a known node. The request is signed with the
/// key the body registers (proving the agent holds it). A new node, or one whose key
/// was revoked, also presents a join token as `Authorization: Bearer <token>`; a
/// known node must keep its key.
#[utoipa::path(
    post, path = "/api/v1/nodes", request_body = NodeRegistration,
    responses(
        (status = 201, description = "Node created and committed", body = RegisterNodeResponse),
        (status = 200, description = "Known node refreshed", body = RegisterNodeResponse),
        (status = 400, description = "Invalid registration", body = ErrorBody),
        (status = 401, description = "Bad signature, key or join token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
pub(crate) async fn register_node(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: Request,
) -> Result<(StatusCode, Json<RegisterNodeResponse>), ApiError> {
    let body = body_bytes(req, &state).await?;
    let node: NodeRegistration = decode_json(&body)?;
    node.validate()?;
    let key = node.public_key.ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidField,
            "public_key: a node registers with its ed25519 public key",
        )
    })?;
    verify(
        &headers,
        &method,
        &uri,
        &body,
        &node.id,
        &key,
        state.clock.now(),
    )?;
    let token = join_token(&headers)?;
    state
        .raft
        .read_local(|s| s.check_registration(&node, token.as_ref(), state.clock.now()))?;
    let command = Command::RegisterNode {
        node,
        join_token: token,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::NodeRegistered {
            id,
            created,
            eval_ids,
        } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((
                status,
                Json(RegisterNodeResponse {
                    id,
                    created,
                    eval_ids,
                }),
            ))
        }
        other => Err(unexpected(other)),
    }
}

/// Records that a node is alive, its readings, the health of its GPUs and the
/// states of its allocations. A GPU reported unhealthy is cordoned and only the
/// allocations holding it are rescheduled. Signed by the node's key.
#[utoipa::path(
    post, path = "/api/v1/nodes/{id}/heartbeat", request_body = Heartbeat,
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Heartbeat recorded; changes committed", body = HeartbeatResponse),
        (status = 400, description = "Invalid heartbeat or unknown GPU", body = ErrorBody),
        (status = 401, description = "Not signed by the node's key", body = ErrorBody),
        (status = 409, description = "Reports another node's allocation", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
pub(crate) async fn node_heartbeat(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: Request,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let started = Instant::now();
    let outcome = heartbeat(&state, NodeId::new(id), method, uri, headers, req).await;
    let metrics = &state.agents.metrics;
    metrics
        .heartbeat_seconds
        .observe(started.elapsed().as_secs_f64());
    let label = match &outcome {
        Ok((_, true)) => "committed",
        Ok((_, false)) => "seen",
        Err(_) => "rejected",
    };
    metrics.heartbeats.with_label_values(&[label]).inc();
    outcome.map(|(resp, _)| Json(resp))
}

/// Answers a heartbeat and whether it was committed.
async fn heartbeat(
    state: &ApiState,
    node_id: NodeId,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: Request,
) -> Result<(HeartbeatResponse, bool), ApiError> {
    let body = body_bytes(req, state).await?;
    authenticate(state, &headers, &method, &uri, &body, &node_id).await?;
    let hb: Heartbeat = decode_json(&body)?;
    hb.validate()?;
    let (changes, status) = state.raft.read_local(|s| {
        s.check_heartbeat(&node_id, &hb.gpus, &hb.allocations)?;
        let status = s.node_status(&node_id);
        Ok::<_, StateError>((s.heartbeat_changes(&node_id, &hb), status))
    })?;
    if let Some(t) = hb.telemetry {
        state.agents.telemetry.write().insert(node_id.clone(), t);
    }
    let at = state.clock.now();
    let Some(changes) = changes else {
        state.agents.connected(&state.raft)?;
        state.agents.saw(node_id.clone(), at);
        return Ok((
            HeartbeatResponse {
                id: node_id,
                status: status.unwrap_or(aigrid_api::NodeStatus::Ready),
                eval_ids: Vec::new(),
            },
            false,
        ));
    };
    let command = Command::NodeHeartbeat {
        node_id,
        gpus: changes.gpus,
        allocations: changes.allocations,
        logs: changes.logs,
        at,
    };
    match propose(state, command).await? {
        Applied::NodeUpdated {
            id,
            status,
            eval_ids,
        } => Ok((
            HeartbeatResponse {
                id,
                status,
                eval_ids,
            },
            true,
        )),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PollQuery {
    /// Answer once the node's assignments changed after this index; at once when
    /// absent.
    index: Option<u64>,
    /// Longest wait, in milliseconds (default 30 s, at most 5 min).
    wait_ms: Option<u64>,
}

/// What a node's agent must run. With `index`, a long poll: answered when the
/// node's assignments change after that index, or when `wait_ms` runs out (with
/// the unchanged assignments). Served from this server's applied state, so any
/// server answers. Signed by the node's key.
#[utoipa::path(
    get, path = "/api/v1/nodes/{id}/assignments",
    params(("id" = String, Path, description = "Node id"),
           ("index" = Option<u64>, Query, description = "Wait for a change after this index"),
           ("wait_ms" = Option<u64>, Query, description = "Longest wait in milliseconds")),
    responses(
        (status = 200, body = NodeAssignments),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, description = "Not signed by the node's key", body = ErrorBody),
        (status = 429, description = "Too many long polls held", body = ErrorBody),
    )
)]
pub(crate) async fn node_assignments(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<PollQuery>, QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<NodeAssignments>, ApiError> {
    let query = query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    let node_id = NodeId::new(id);
    authenticate(&state, &headers, &method, &uri, &[], &node_id).await?;
    let hub = &state.agents;
    hub.connected(&state.raft)?;
    let _per_node = hub.hold_poll(&node_id)?;
    let _permit = hub.long_polls.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorCode::RateLimited,
            "too many long polls held; retry later",
        )
    })?;
    hub.metrics.long_polls.inc();
    let _held = scopeguard(|| hub.metrics.long_polls.dec());
    let wait = query
        .wait_ms
        .map_or(DEFAULT_POLL_WAIT, Duration::from_millis)
        .min(MAX_POLL_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut changed = hub.watch.subscribe(&node_id);
    loop {
        let current = state
            .raft
            .read_local(|s| s.assignments(&node_id))
            .ok_or_else(|| crate::http::node_not_found(node_id.as_str()))?;
        if query.index.is_none_or(|seen| current.index > seen) {
            return Ok(Json(current));
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return Ok(Json(current)),
        }
    }
}

/// Runs `f` when dropped, so a gauge comes down however a handler ends.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Revokes a node's key: its agent's requests are refused from now on, the node is
/// marked down and its instances are rescheduled. It may join again only with a
/// new key and a join token.
#[utoipa::path(
    post, path = "/api/v1/nodes/{id}/revoke",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Revocation committed; the node as it is now", body = Node),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
pub(crate) async fn revoke_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let node_id = NodeId::new(id.clone());
    let command = Command::RevokeNode {
        node_id: node_id.clone(),
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::NodeUpdated { .. } => {}
        other => return Err(unexpected(other)),
    }
    state
        .raft
        .read(|s| s.node(&node_id))
        .await?
        .map(Json)
        .ok_or_else(|| crate::http::node_not_found(&id))
}

/// The end of an allocation's output, as its agent last shipped it.
#[utoipa::path(
    get, path = "/api/v1/allocations/{id}/logs",
    params(("id" = String, Path, description = "Allocation id")),
    responses((status = 200, body = AllocationLogs), (status = 404, body = ErrorBody))
)]
pub(crate) async fn allocation_logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<AllocationLogs>, ApiError> {
    let alloc = AllocId::new(id.clone());
    state
        .raft
        .read(|s| s.allocation_logs(&alloc))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("allocation `{id}` not found")))
}

/// Creates a join token. The answer is the only time its secret is shown; the
/// servers keep only its hash.
#[utoipa::path(
    post, path = "/api/v1/join-tokens", request_body = CreateJoinToken,
    responses(
        (status = 201, description = "Token created and committed", body = CreatedJoinToken),
        (status = 400, body = ErrorBody),
    )
)]
pub(crate) async fn create_join_token(
    State(state): State<ApiState>,
    crate::http::OptionalJsonBody(request): crate::http::OptionalJsonBody<CreateJoinToken>,
) -> Result<(StatusCode, Json<CreatedJoinToken>), ApiError> {
    request.validate()?;
    let random = || *uuid::Uuid::new_v4().as_bytes();
    let (a, b, c) = (random(), random(), random());
    let mut id = [0u8; 8];
    id.copy_from_slice(&a[..8]);
    let mut secret = [0u8; 32];
    secret[..16].copy_from_slice(&b);
    secret[16..].copy_from_slice(&c);
    let token = JoinToken::from_random(id, secret);
    let command = Command::CreateJoinToken {
        id: token.id.clone(),
        secret_hash: token.secret_hash(),
        ttl_secs: request
            .ttl_secs
            .unwrap_or(aigrid_api::auth::DEFAULT_TOKEN_TTL_SECS),
        max_uses: request.max_uses,
        description: request.description,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::JoinTokenCreated(info) => Ok((
            StatusCode::CREATED,
            Json(CreatedJoinToken {
                token: token.to_string(),
                info,
            }),
        )),
        other => Err(unexpected(other)),
    }
}

/// Lists join tokens, without their secrets.
#[utoipa::path(
    get, path = "/api/v1/join-tokens",
    responses((status = 200, body = [JoinTokenInfo]))
)]
pub(crate) async fn list_join_tokens(
    State(state): State<ApiState>,
) -> Result<Json<Vec<JoinTokenInfo>>, ApiError> {
    Ok(Json(state.raft.read(|s| s.join_tokens()).await?))
}

/// Deletes a join token; nodes that joined with it stay.
#[utoipa::path(
    delete, path = "/api/v1/join-tokens/{id}",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204), (status = 404, body = ErrorBody))
)]
pub(crate) async fn delete_join_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let command = Command::DeleteJoinToken {
        id,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::JoinTokenDeleted { .. } => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}
