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
//!
//! Every request here but registration is signed by the node's registered key
//! ([`authenticate_node`]); registration is signed by the key it registers and, for a
//! new node, carries a join token.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aigrid_api::ErrorBody;
use aigrid_api::{
    ErrorCode, Heartbeat, HeartbeatResponse, JoinToken, KeyRef, NodeAssignments, NodeId,
    NodePublicKey, NodeRegistration, RegisterNodeResponse, Timestamp,
};
use axum::extract::rejection::QueryRejection;
use axum::extract::Request;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::http::{HeaderMap, Method, Uri};
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, check_signature, parse_signature, EdgeVerified};
use super::plumbing::{
    body_bytes, decode_json, not_found, propose, unauthorized, unexpected, ApiError, ApiState,
};
use crate::state::{Applied, Command, StateError, TokenUse};

/// Longest a long poll is held.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(300);
/// How long a long poll is held when the agent does not say.
pub const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(30);

/// The area's routes. The long poll is apart: it holds a request open for minutes,
/// so it has its own limit instead of taking in-flight slots from short requests.
pub(super) fn routes() -> (OpenApiRouter<ApiState>, OpenApiRouter<ApiState>) {
    let short = OpenApiRouter::new()
        .routes(routes!(register_node))
        .routes(routes!(node_heartbeat));
    let long_polls = OpenApiRouter::new().routes(routes!(node_assignments));
    (short, long_polls)
}

/// Checks that a request is signed by `node` (key id `node:<id>`) with `key`.
fn verify(
    state: &ApiState,
    headers: &HeaderMap,
    request: (&Method, &Uri, Option<&EdgeVerified>),
    body: &[u8],
    node: &NodeId,
    key: &NodePublicKey,
) -> Result<(), ApiError> {
    let sig = parse_signature(headers)?;
    if sig.key()? != KeyRef::Node(node.clone()) {
        return Err(unauthorized(format!(
            "request signed by `{}` for node `{node}`",
            sig.params.key_id
        )));
    }
    check_signature(state, &sig, request, body, &(*key).into())
}

/// Checks that a request comes from `node`, signed with the key it registered and
/// that was not revoked. Unknown nodes are refused alike, so a caller cannot tell
/// which node ids exist.
async fn authenticate_node(
    state: &ApiState,
    headers: &HeaderMap,
    request: (&Method, &Uri, Option<&EdgeVerified>),
    body: &[u8],
    node: &NodeId,
) -> Result<(), ApiError> {
    // The node addressed must hold a key first: an unknown or revoked node is
    // refused alike whoever signs, so the agent knows to register again.
    let key = auth::key_of(state, &KeyRef::Node(node.clone())).await?;
    let sig = parse_signature(headers)?;
    match sig.key()? {
        KeyRef::Node(signer) if signer == *node => {}
        KeyRef::Node(signer) => {
            return Err(unauthorized(format!(
                "request signed by node `{signer}` for node `{node}`"
            )))
        }
        KeyRef::Identity(id) => {
            return Err(unauthorized(format!(
            "request signed by identity `{id}` for node `{node}`: agents sign with their node key"
        )))
        }
    }
    check_signature(state, &sig, request, body, &key)
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

/// The source address of the connection a request came over: where the servers
/// reach the node that sent it (agents dial out, so this is the node's own address
/// as the servers' network sees it). The listener must record it
/// (`into_make_service_with_connect_info`); without it no node can be registered.
fn peer_address(req: &Request) -> Result<IpAddr, ApiError> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip().to_canonical())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Internal,
                "this listener does not record connections' source addresses, so it cannot register nodes",
            )
        })
}

/// Registers a node, or refreshes a known node's inventory (an agent restart); 201
/// when created, 200 when it refreshed a known node. The request is signed with the
/// key the body registers (proving the agent holds it). A new node, or one whose key
/// was revoked, also presents a join token as `Authorization: Bearer <token>`; a
/// known node must keep its key. The node's address, where the servers reach its
/// workloads, is the source address of this request's connection, whatever the
/// body says. A registration with a `data_csr` is answered the node's data port
/// certificate, issued from the cluster CA for the key the request carries, naming
/// the node, the hosts it asks for and that address.

#[utoipa::path(
    tag = "agents", post, path = "/api/v1/nodes", request_body = NodeRegistration,
    responses(
        (status = 201, description = "Node created and committed", body = RegisterNodeResponse),
        (status = 200, description = "Known node refreshed", body = RegisterNodeResponse),
        (status = 400, description = "Invalid registration", body = ErrorBody),
        (status = 401, description = "Bad signature, key or join token", body = ErrorBody),
        (status = 409, description = "A data port certificate asked of a server without the CA key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn register_node(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    edge: Option<Extension<EdgeVerified>>,
    req: Request,
) -> Result<(StatusCode, Json<RegisterNodeResponse>), ApiError> {
    let address = peer_address(&req)?;
    let body = body_bytes(req, &state).await?;
    let mut node: NodeRegistration = decode_json(&body)?;
    node.validate()?;
    let key = node.public_key.ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidField,
            "public_key: a node registers with its ed25519 public key",
        )
    })?;
    let request = (&method, &uri, edge.as_ref().map(|e| &e.0));
    verify(&state, &headers, request, &body, &node.id, &key)?;
    let token = join_token(&headers)?;
    state
        .raft
        .read_local(|s| s.check_registration(&node, token.as_ref(), state.clock.now()))?;
    // Issued before anything is committed, so a request this server cannot answer
    // changes nothing; the request itself is not kept in the log.
    let data_certificate = match node.data_csr.take() {
        Some(csr) => Some(issue_data_certificate(&state, &node.id, &csr, address)?),
        None => None,
    };
    let command = Command::RegisterNode {
        node,
        join_token: token,
        address: Some(address),
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
                    address: Some(address),
                    data_certificate,
                }),
            ))
        }
        other => Err(unexpected(other)),
    }
}

/// The data port certificate for `node`'s request, from this server's CA key;
/// 409 where the key is kept off this server, 400 for a request that is not one.
fn issue_data_certificate(
    state: &ApiState,
    node: &NodeId,
    csr: &str,
    address: IpAddr,
) -> Result<String, ApiError> {
    let issuer = state.node_issuer.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            "data_csr: this server does not hold the cluster CA's key, so it issues no \
             data port certificates; issue the node's ahead (`aigrid ca issue --node ID \
             --out DIR`) and start its agent with --data-tls-dir DIR",
        )
    })?;
    issuer
        .issue_node(node.as_str(), csr, Some(address))
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, format!("data_csr: {e}")))
}

/// Records that a node is alive, its readings, the health of its GPUs and the
/// states of its allocations. A GPU reported unhealthy is cordoned and only the
/// allocations holding it are rescheduled. Signed by the node's key.
#[utoipa::path(
    tag = "agents", post, path = "/api/v1/nodes/{id}/heartbeat", request_body = Heartbeat,
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Heartbeat recorded; changes committed", body = HeartbeatResponse),
        (status = 400, description = "Invalid heartbeat or unknown GPU", body = ErrorBody),
        (status = 401, description = "Not signed by the node's key", body = ErrorBody),
        (status = 409, description = "Reports another node's allocation", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn node_heartbeat(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: Request,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let started = Instant::now();
    let outcome = heartbeat(&state, NodeId::new(id), method, uri, headers, req).await;
    let label = match &outcome {
        Ok((_, true)) => "committed",
        Ok((_, false)) => "seen",
        Err(_) => "rejected",
    };
    state
        .agents
        .observe_heartbeat(started.elapsed().as_secs_f64(), label);
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
    let edge = req.extensions().get::<EdgeVerified>().cloned();
    let body = body_bytes(req, state).await?;
    let request = (&method, &uri, edge.as_ref());
    authenticate_node(state, &headers, request, &body, &node_id).await?;
    let hb: Heartbeat = decode_json(&body)?;
    hb.validate()?;
    let (changes, status, foreign) = state.raft.read_local(|s| {
        s.check_heartbeat(&node_id, &hb.gpus, &hb.allocations)?;
        let status = s.node_status(&node_id);
        let foreign = s.foreign_endpoints(&node_id, &hb.allocations);
        Ok::<_, StateError>((s.heartbeat_changes(&node_id, &hb), status, foreign))
    })?;
    if let Some((alloc, claimed, actual)) = foreign.first() {
        FOREIGN_ENDPOINTS.warn(state.clock.now(), |skipped| {
            tracing::warn!(
                node = %node_id,
                %alloc,
                %claimed,
                actual = actual.as_deref().unwrap_or("nowhere"),
                in_this_heartbeat = foreign.len(),
                earlier_not_logged = skipped,
                "a node reported an endpoint other than its address and the assigned port; ignored"
            );
        });
    }
    if let Some(t) = hb.telemetry {
        state.agents.report(&node_id, t);
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
    if !changes.models.is_empty() {
        // Attestations and staging failures move fleet rollouts; they are checked
        // again (the node's key, the rollout's digest) as they apply.
        let command = Command::ReportModels {
            node_id: node_id.clone(),
            models: changes.models,
            at,
        };
        match propose(state, command).await? {
            Applied::RolloutsMoved { .. } => {}
            other => return Err(unexpected(other)),
        }
    }
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

/// Warnings about reported endpoints that were not believed: at most one per
/// [`RateLimitedWarning::EVERY_MS`] over all nodes, so a node repeating its claim
/// every heartbeat cannot flood the log.
static FOREIGN_ENDPOINTS: RateLimitedWarning = RateLimitedWarning::new();

/// A warning logged at most once per interval, counting what it held back.
struct RateLimitedWarning {
    /// When it was last logged, in Unix milliseconds; 0 before the first time.
    last_ms: AtomicU64,
    /// Occurrences since it was last logged.
    skipped: AtomicU64,
}

impl RateLimitedWarning {
    const EVERY_MS: u64 = 10_000;

    const fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Calls `log` with how many occurrences were held back since the last time,
    /// if the interval has passed; otherwise counts this one.
    fn warn(&self, now: Timestamp, log: impl FnOnce(u64)) {
        let now = now.as_millis();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::EVERY_MS;
        if due
            && self
                .last_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log(self.skipped.swap(0, Ordering::Relaxed));
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
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
    tag = "agents", get, path = "/api/v1/nodes/{id}/assignments",
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
async fn node_assignments(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<PollQuery>, QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    edge: Option<Extension<EdgeVerified>>,
) -> Result<Json<NodeAssignments>, ApiError> {
    let query = query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    let node_id = NodeId::new(id);
    let request = (&method, &uri, edge.as_ref().map(|e| &e.0));
    authenticate_node(&state, &headers, request, &[], &node_id).await?;
    let hub = &state.agents;
    hub.connected(&state.raft)?;
    let _held = hub.hold_poll(&node_id)?;
    let wait = query
        .wait_ms
        .map_or(DEFAULT_POLL_WAIT, Duration::from_millis)
        .min(MAX_POLL_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut changed = hub.subscribe(&node_id);
    loop {
        let current = state
            .raft
            .read_local(|s| s.assignments(&node_id))
            .ok_or_else(|| not_found("node", node_id.as_str()))?;
        if query.index.is_none_or(|seen| current.index > seen) {
            return Ok(Json(current));
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return Ok(Json(current)),
        }
    }
}

#[cfg(test)]
mod tests {
    use aigrid_api::{
        AllocState, AllocationReport, GpuHealth, Heartbeat, NodeRegistration, Timestamp,
    };
    use aigrid_consensus::state_machine::StateMachine;

    use serde_json::json;

    use aigrid_api::{Allocation, EvalId, JobId, JobSpec};

    use super::*;
    use crate::state::ClusterState;

    fn registration(id: &str, gpus: &[&str]) -> NodeRegistration {
        let gpus: Vec<_> = gpus
            .iter()
            .enumerate()
            .map(|(i, uuid)| {
                json!({"index": i, "uuid": uuid, "vendor": "nvidia", "model": "H100",
                       "memory_mib": 81920, "healthy": true})
            })
            .collect();
        serde_json::from_value(json!({
            "id": id, "name": id,
            "resources": {"cpu_millis": 8000, "memory_mib": 65536, "disk_mib": 1, "gpus": gpus}
        }))
        .unwrap()
    }

    /// Two nodes and one job with an allocation on `b` holding `GPU-b0`.
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let at = Timestamp::from_millis(1);
        for (id, gpu) in [("a", "GPU-a0"), ("b", "GPU-b0")] {
            s.apply(
                1,
                Command::RegisterNode {
                    node: registration(id, &[gpu]),
                    join_token: None,
                    address: None,
                    at,
                },
            )
            .unwrap();
        }
        let spec: JobSpec = serde_json::from_value(json!({
            "name": "web", "kind": "service",
            "groups": [{"name": "web", "count": 1,
                        "resources": {"cpu_millis": 500, "memory_mib": 256, "gpus": {"count": 1}},
                        "task": {"driver": "exec", "command": "/bin/true"}}]
        }))
        .unwrap();
        s.apply(
            3,
            Command::SubmitJob {
                job_id: JobId::new("j"),
                eval_id: EvalId::new("e"),
                spec,
                at,
                by: None,
            },
        )
        .unwrap();
        let alloc: Allocation = serde_json::from_value(json!({
            "id": "x", "job_id": "j", "job_version": 1, "node_id": "b", "group": "web",
            "index": 0, "gpus": ["GPU-b0"], "state": "pending", "desired": "run",
            "resources": {"cpu_millis": 500, "memory_mib": 256, "gpus": {"count": 1}},
            "created_at": 1, "updated_at": 1
        }))
        .unwrap();
        s.apply(
            4,
            Command::UpsertAllocations {
                allocations: vec![alloc],
                at,
            },
        )
        .unwrap();
        s
    }

    fn heartbeat(gpu: &str, alloc: Option<&str>) -> Heartbeat {
        Heartbeat {
            gpus: vec![GpuHealth {
                uuid: gpu.to_owned(),
                healthy: false,
                reason: Some("XID 79".to_owned()),
            }],
            allocations: alloc
                .map(|id| AllocationReport::new(id.into(), AllocState::Running))
                .into_iter()
                .collect(),
            telemetry: None,
            logs: Vec::new(),
            models: Vec::new(),
        }
    }

    /// The read-side check refuses what the state machine refuses, with the same code,
    /// and lets through what it accepts.
    #[test]
    fn heartbeat_check_agrees_with_the_state_machine() {
        let cases = [
            ("nope", heartbeat("GPU-a0", None), Some(ErrorCode::NotFound)),
            (
                "a",
                heartbeat("GPU-b0", None),
                Some(ErrorCode::InvalidField),
            ),
            (
                "a",
                heartbeat("GPU-a0", Some("x")),
                Some(ErrorCode::Conflict),
            ),
            ("a", heartbeat("GPU-a0", Some("gone")), None),
            ("b", heartbeat("GPU-b0", Some("x")), None),
        ];
        for (node, hb, want) in cases {
            let mut s = cluster();
            let id = NodeId::new(node);
            let checked = s
                .check_heartbeat(&id, &hb.gpus, &hb.allocations)
                .err()
                .map(|e| e.code());
            let applied = s
                .apply(
                    9,
                    Command::NodeHeartbeat {
                        node_id: id,
                        gpus: hb.gpus,
                        allocations: hb.allocations,
                        logs: Vec::new(),
                        at: Timestamp::from_millis(2),
                    },
                )
                .err()
                .map(|e| e.code());
            assert_eq!(checked, want, "{node}");
            assert_eq!(applied, want, "{node}");
        }
    }
}
