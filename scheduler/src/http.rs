//! The control API under `/api/v1`, plus `/metrics`, `/health` and `/ready`; the
//! `/v1` inference routes come from [`crate::gateway`].
//!
//! Every write is a [`Command`] proposed through Raft and answered only after it is
//! applied (so a 2xx means committed); every read goes through ReadIndex unless the
//! caller asks for `?stale=true`. Errors leave in one shape, `{"error": {"code",
//! "message"}}`, with the status [`ErrorCode`] fixes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::{
    Allocation, ClusterStatus, DeleteJobResponse, DrainSpec, ErrorBody, ErrorCode, EvalId, Job,
    JobId, JobSpec, JobSummary, JoinRequest, Member, MemberRole, Node, NodeId, NodeStatus,
    StorageInfo, SubmitJobResponse,
};
use aigrid_consensus::{MembershipChange, RaftError, RaftNode};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::Semaphore;
use utoipa::OpenApi;

use crate::clock::SharedClock;
use crate::state::{Applied, ClusterState, Command, StateError};

/// Largest body [`ApiLimits::max_model_body_bytes`] may allow. A model write becomes
/// one Raft entry of about its body's size; raft-rs refuses proposals beyond its
/// 256 MiB budget of uncommitted entries, and peers accept message batches of up to
/// [`aigrid_consensus::transport::MAX_BATCH_BYTES`] (1 GiB).
pub const MAX_MODEL_BODY_LIMIT: usize = 256 << 20;

/// Limits applied at the door of the control API.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest request body in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest body of a model write (`POST /api/v1/models`, `PUT
    /// /api/v1/models/{digest}/locations`) in bytes; larger bodies get 413. Manifests
    /// are large: a 70 GB model has some 17 000 chunks, a few MiB of JSON.
    pub max_model_body_bytes: usize,
    /// Model writes read at once; more get 429. Bounds the memory their bodies take.
    pub max_model_uploads: usize,
    /// Requests served at once; more get 429.
    pub max_in_flight: usize,
    /// Agents' long polls held at once; more get 429.
    pub max_long_polls: usize,
    /// How often plain heartbeats are committed as one batch; a node's
    /// `last_seen` lags its last heartbeat by at most this much.
    pub seen_flush: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_body_bytes: 1 << 20,
            max_model_body_bytes: 16 << 20,
            max_model_uploads: 8,
            max_in_flight: 4096,
            max_long_polls: 16_384,
            seen_flush: Duration::from_secs(2),
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) raft: RaftNode<ClusterState>,
    registry: Registry,
    in_flight: Arc<Semaphore>,
    http: HttpMetrics,
    pub(crate) agents: Arc<crate::agents::AgentHub>,
    /// What `GET /api/v1/storage` answers.
    pub(crate) storage: Arc<StorageInfo>,
    /// Model writes being read; see [`ApiLimits::max_model_uploads`].
    pub(crate) model_uploads: Arc<Semaphore>,
    /// Where handlers read the time they write into commands.
    pub(crate) clock: SharedClock,
}

#[derive(Clone)]
struct HttpMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

impl HttpMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("aigrid_http_requests_total", "Control API requests"),
            &["method", "status"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new("aigrid_http_request_seconds", "Control API request latency")
                .buckets(prometheus::exponential_buckets(0.000_25, 2.0, 16)?),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(HttpMetrics { requests, seconds })
    }
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError(ErrorBody);

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(ErrorBody::new(code, message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<RaftError> for ApiError {
    fn from(e: RaftError) -> Self {
        let code = match e {
            RaftError::NoQuorum(_) | RaftError::Stopped => ErrorCode::NoQuorum,
            RaftError::Busy => ErrorCode::RateLimited,
            RaftError::Removed => ErrorCode::NotLeader,
            RaftError::Rejected(_) => ErrorCode::Conflict,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<aigrid_api::ValidationError> for ApiError {
    fn from(e: aigrid_api::ValidationError) -> Self {
        ApiError::new(ErrorCode::InvalidField, e.to_string())
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

/// A JSON body, with errors in the API's shape: 413 over the size limit, 415 for a
/// content type other than JSON, 400 naming the offending field otherwise.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        decode_json(&bytes).map(JsonBody)
    }
}

/// Like [`JsonBody`], but an empty body stands for `T::default()`, for requests whose
/// every field has a default (`POST /api/v1/nodes/{id}/drain`).
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        decode_json(&bytes).map(OptionalJsonBody)
    }
}

/// The raw body, refused with 415 when it declares a type other than JSON and with
/// 413 over the size limit.
pub(crate) async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        // JSON, or no declared type at all (curl's `-d` default), is read as JSON.
        let ct = ct.to_str().unwrap_or_default();
        let accepted = [
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain",
        ];
        if !accepted.iter().any(|a| ct.starts_with(a)) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("expected content-type application/json, got `{ct}`"),
            ));
        }
    }
    Bytes::from_request(req, state).await.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(inner)
            if inner.status() == StatusCode::PAYLOAD_TOO_LARGE =>
        {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "request body exceeds the size limit",
            )
        }
        other => ApiError::new(ErrorCode::InvalidJson, other.body_text()),
    })
}

/// Decodes JSON, naming the path of the field that failed (`groups[0].resources`).
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let message = if path == "." || path.is_empty() {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        ApiError::new(ErrorCode::InvalidJson, message)
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadQuery {
    /// Serve from this server's applied state without confirming with the leader.
    #[serde(default)]
    pub(crate) stale: bool,
}

/// The read options, with a malformed query answered in the API's error shape.
pub(crate) fn read_query(
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<ReadQuery, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))
}

pub(crate) fn new_id<T>(make: impl Fn(String) -> T) -> T {
    make(uuid::Uuid::new_v4().to_string())
}

pub(crate) async fn read<R: Send>(
    state: &ApiState,
    query: &ReadQuery,
    f: impl FnOnce(&ClusterState) -> R,
) -> Result<R, ApiError> {
    if query.stale {
        Ok(state.raft.read_local(f))
    } else {
        Ok(state.raft.read(f).await?)
    }
}

pub(crate) async fn propose(state: &ApiState, command: Command) -> Result<Applied, ApiError> {
    Ok(state.raft.propose(&command).await??)
}

/// Submits a job; 201 when created, 200 when it updated the live job of that name.
#[utoipa::path(
    post, path = "/api/v1/jobs", request_body = JobSpec,
    responses(
        (status = 201, description = "Job created and committed", body = SubmitJobResponse),
        (status = 200, description = "Existing job of that name updated", body = SubmitJobResponse),
        (status = 400, description = "Invalid job", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn submit_job(
    State(state): State<ApiState>,
    JsonBody(spec): JsonBody<JobSpec>,
) -> Result<(StatusCode, Json<SubmitJobResponse>), ApiError> {
    spec.validate()?;
    let command = Command::SubmitJob {
        job_id: new_id(JobId::new),
        eval_id: new_id(EvalId::new),
        spec,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::JobSubmitted(resp) => {
            let status = if resp.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(resp)))
        }
        other => Err(unexpected(other)),
    }
}

pub(crate) fn unexpected(applied: Applied) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("unexpected outcome of a command: {applied:?}"),
    )
}

/// Lists jobs.
#[utoipa::path(
    get, path = "/api/v1/jobs",
    params(("stale" = Option<bool>, Query, description = "Serve from local state without a quorum read")),
    responses((status = 200, body = [JobSummary]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn list_jobs(
    State(state): State<ApiState>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<JobSummary>>, ApiError> {
    let query = read_query(query)?;
    Ok(Json(read(&state, &query, |s| s.jobs()).await?))
}

/// The job with this id or, failing that, the live job with this name.
fn find_job(s: &ClusterState, id_or_name: &str) -> Option<Job> {
    s.job(&JobId::new(id_or_name))
        .or_else(|| s.job_by_name(id_or_name))
}

fn job_not_found(id_or_name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("job `{id_or_name}` not found"))
}

/// Shows one job, by id or name, with its allocations and unplaced instances.
#[utoipa::path(
    get, path = "/api/v1/jobs/{id}",
    params(("id" = String, Path, description = "Job id, or the name of a live job"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = Job), (status = 400, description = "Malformed query", body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Job>, ApiError> {
    let query = read_query(query)?;
    read(&state, &query, |s| find_job(s, &id))
        .await?
        .map(Json)
        .ok_or_else(|| job_not_found(&id))
}

/// Deletes a job; its allocations are asked to stop.
#[utoipa::path(
    delete, path = "/api/v1/jobs/{id}",
    params(("id" = String, Path, description = "Job id, or the name of a live job")),
    responses((status = 200, body = DeleteJobResponse), (status = 404, body = ErrorBody))
)]
async fn delete_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<DeleteJobResponse>, ApiError> {
    // An unknown job is answered from a linearizable read, without writing to the log.
    let job_id = state
        .raft
        .read(|s| find_job(s, &id).map(|job| job.id))
        .await?
        .ok_or_else(|| job_not_found(&id))?;
    let command = Command::DeleteJob {
        job_id,
        eval_id: new_id(EvalId::new),
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::JobDeleted(resp) => Ok(Json(resp)),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn node_not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("node `{id}` not found"))
}

/// The node as it is once `command` is committed, or 404 (without writing to the
/// log) for an unknown node. `skip` answers, from the current view, whether the
/// command would change nothing or must be refused.
async fn change_node(
    state: &ApiState,
    id: String,
    command: Command,
    skip: impl FnOnce(&Node) -> Result<bool, ApiError> + Send,
) -> Result<Json<Node>, ApiError> {
    let node_id = NodeId::new(id.clone());
    let node = state
        .raft
        .read(|s| s.node(&node_id))
        .await?
        .ok_or_else(|| node_not_found(&id))?;
    if skip(&node)? {
        return Ok(Json(node));
    }
    match propose(state, command).await? {
        Applied::NodeUpdated { .. } => {}
        other => return Err(unexpected(other)),
    }
    state
        .raft
        .read(|s| s.node(&node_id))
        .await?
        .map(Json)
        .ok_or_else(|| node_not_found(&id))
}

/// Drains a node: it gets no new work, and its allocations are migrated elsewhere,
/// at most `max_parallel` at a time. An empty body drains one at a time; draining a
/// draining node changes its pace.
#[utoipa::path(
    post, path = "/api/v1/nodes/{id}/drain", request_body(content = DrainSpec, description = "Optional: an empty body drains one at a time"),
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Drain committed; the node as it is now", body = Node),
        (status = 400, description = "Invalid drain", body = ErrorBody),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn drain_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    OptionalJsonBody(drain): OptionalJsonBody<DrainSpec>,
) -> Result<Json<Node>, ApiError> {
    drain.validate()?;
    let command = Command::DrainNode {
        node_id: NodeId::new(id.clone()),
        drain,
        at: state.clock.now(),
    };
    change_node(&state, id, command, |node| {
        Ok(node.status == NodeStatus::Draining && node.drain == Some(drain))
    })
    .await
}

/// Ends a drain: the node takes new work again. Ending the drain of a node that is
/// not draining changes nothing; a node that is down is refused with 409, since it
/// cannot take work until its agent is heard from.
#[utoipa::path(
    delete, path = "/api/v1/nodes/{id}/drain",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Drain ended; the node as it is now", body = Node),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 409, description = "The node is down", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn undrain_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let command = Command::SetNodeStatus {
        node_id: NodeId::new(id.clone()),
        status: NodeStatus::Ready,
        at: state.clock.now(),
    };
    change_node(&state, id, command, |node| match node.status {
        NodeStatus::Ready => Ok(true),
        NodeStatus::Draining => Ok(false),
        NodeStatus::Down => Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "node `{}` is down; it can be undrained once its agent is heard from",
                node.id
            ),
        )),
    })
    .await
}

/// The allocations on a node, ordered by id, including ones being stopped: what its
/// agent should run or stop.
#[utoipa::path(
    get, path = "/api/v1/nodes/{id}/allocations",
    params(("id" = String, Path, description = "Node id"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = [Allocation]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn node_allocations(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<Allocation>>, ApiError> {
    let query = read_query(query)?;
    let node_id = NodeId::new(id.clone());
    read(&state, &query, |s| {
        s.node(&node_id).map(|_| s.node_allocations(&node_id))
    })
    .await?
    .map(Json)
    .ok_or_else(|| node_not_found(&id))
}

/// Lists nodes with what their allocations hold.
#[utoipa::path(
    get, path = "/api/v1/nodes",
    params(("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = [Node]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn list_nodes(
    State(state): State<ApiState>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<Node>>, ApiError> {
    let query = read_query(query)?;
    let nodes = read(&state, &query, |s| s.nodes()).await?;
    Ok(Json(
        nodes
            .into_iter()
            .map(|n| state.agents.with_telemetry(n))
            .collect(),
    ))
}

/// Shows one node with what its allocations hold.
#[utoipa::path(
    get, path = "/api/v1/nodes/{id}",
    params(("id" = String, Path, description = "Node id"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = Node), (status = 400, description = "Malformed query", body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Node>, ApiError> {
    let query = read_query(query)?;
    let node_id = NodeId::new(id.clone());
    read(&state, &query, |s| s.node(&node_id))
        .await?
        .map(|n| Json(state.agents.with_telemetry(n)))
        .ok_or_else(|| node_not_found(&id))
}

fn cluster_status(raft: &RaftNode<ClusterState>) -> ClusterStatus {
    let status = raft.status();
    ClusterStatus {
        id: status.id,
        leader: status.leader,
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        members: status
            .members
            .iter()
            .map(|(id, addr)| Member {
                id: *id,
                addr: addr.clone(),
                role: if status.learners.contains(id) {
                    MemberRole::Learner
                } else {
                    MemberRole::Voter
                },
                is_leader: status.leader == Some(*id),
            })
            .collect(),
    }
}

/// This server's view of the control plane: leader, term, indices, members.
#[utoipa::path(
    get, path = "/api/v1/cluster",
    responses((status = 200, body = ClusterStatus))
)]
async fn get_cluster(State(state): State<ApiState>) -> Json<ClusterStatus> {
    Json(cluster_status(&state.raft))
}

/// Adds a server: first as a learner that catches up from a snapshot, then, once
/// caught up, as a voter. Answers after the promotion.
#[utoipa::path(
    post, path = "/api/v1/cluster/members", request_body = JoinRequest,
    responses((status = 201, body = ClusterStatus),
              (status = 400, description = "Malformed or invalid request", body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn join_member(
    State(state): State<ApiState>,
    JsonBody(req): JsonBody<JoinRequest>,
) -> Result<(StatusCode, Json<ClusterStatus>), ApiError> {
    req.validate()?;
    // Confirm the membership we check against is current.
    let members = state
        .raft
        .read(|_| ())
        .await
        .map(|_| state.raft.status().members)?;
    if let Some(addr) = members.get(&req.id) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("server {} is already a member at {addr}", req.id),
        ));
    }
    state
        .raft
        .change_membership(MembershipChange::Add {
            id: req.id,
            addr: req.addr,
        })
        .await?;
    // It joined as a learner; answer once the leader has promoted it to voter.
    let deadline = Instant::now() + state.raft.request_timeout();
    loop {
        let status = state.raft.status();
        if status.members.contains_key(&req.id) && !status.learners.contains(&req.id) {
            return Ok((StatusCode::CREATED, Json(cluster_status(&state.raft))));
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "server {} joined as a learner but has not caught up within {:?}; \
                     it becomes a voter once it has",
                    req.id,
                    state.raft.request_timeout()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes a voter. When it is the leader, leadership moves to another voter first.
#[utoipa::path(
    delete, path = "/api/v1/cluster/members/{id}",
    params(("id" = u64, Path, description = "Server id")),
    responses((status = 200, body = ClusterStatus),
              (status = 400, description = "The id is not a server id", body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody))
)]
async fn leave_member(
    State(state): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<ClusterStatus>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    state.raft.read(|_| ()).await?;
    let status = state.raft.status();
    if !status.members.contains_key(&id) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("server {id} is not a member"),
        ));
    }
    if status.members.len() == 1 {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "cannot remove the last server of the cluster",
        ));
    }
    if status.leader == Some(id) {
        let target = *status
            .members
            .keys()
            .find(|m| **m != id)
            .expect("more than one member");
        state.raft.transfer_leader(target)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while state.raft.status().leader == Some(id) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    state
        .raft
        .change_membership(MembershipChange::Remove { id })
        .await?;
    Ok(Json(cluster_status(&state.raft)))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode(&state.registry.gather(), &mut buf) {
        Ok(()) => (
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            buf,
        )
            .into_response(),
        Err(e) => ApiError::new(ErrorCode::Internal, e.to_string()).into_response(),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the replica runs, knows a leader, and has applied what it knows is
/// committed.
async fn ready(State(state): State<ApiState>) -> Response {
    let status = state.raft.status();
    let reason = if state.raft.is_stopped() {
        Some("raft replica stopped".to_string())
    } else if status.removed {
        Some("removed from the cluster".to_string())
    } else if status.leader.is_none() {
        Some(format!("no leader in term {}", status.term))
    } else {
        None
    };
    match reason {
        None => {
            Json(serde_json::json!({"status": "ready", "leader": status.leader})).into_response()
        }
        Some(r) => ApiError::new(ErrorCode::NoQuorum, r).into_response(),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "aigrid control API",
        description = "Jobs, nodes, models and the replicated control plane."
    ),
    paths(
        submit_job,
        list_jobs,
        get_job,
        delete_job,
        crate::agents::register_node,
        list_nodes,
        get_node,
        crate::agents::node_heartbeat,
        crate::agents::node_assignments,
        crate::agents::revoke_node,
        crate::agents::allocation_logs,
        crate::agents::create_join_token,
        crate::agents::list_join_tokens,
        crate::agents::delete_join_token,
        drain_node,
        undrain_node,
        node_allocations,
        get_cluster,
        join_member,
        leave_member,
        crate::models::register_model,
        crate::models::list_models,
        crate::models::get_model,
        crate::models::set_model_locations,
        crate::models::delete_model,
        crate::models::get_storage
    )
)]
struct ApiDoc;

/// The OpenAPI document of the control API, generated from the wire types.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route for {method} {uri}"))
}

async fn method_not_allowed(req: Request, next: Next) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let resp = next.run(req).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        return ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {}", uri.path()),
        )
        .into_response();
    }
    resp
}

/// Counts requests and answers 429 when `max_in_flight` are already being served.
async fn admission(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        state
            .http
            .requests
            .with_label_values(&[method.as_str(), "429"])
            .inc();
        return ApiError::new(
            ErrorCode::RateLimited,
            "too many requests in flight; retry later",
        )
        .into_response();
    };
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .http
        .seconds
        .with_label_values(&[method.as_str()])
        .observe(started.elapsed().as_secs_f64());
    state
        .http
        .requests
        .with_label_values(&[method.as_str(), resp.status().as_str()])
        .inc();
    resp
}

/// The whole HTTP surface of a server: control API, `/v1` inference gateway, Raft
/// transport, metrics, probes. `storage` is what `GET /api/v1/storage` answers.
pub fn router(
    raft: RaftNode<ClusterState>,
    registry: Registry,
    limits: &ApiLimits,
    agents: Arc<crate::agents::AgentHub>,
    storage: StorageInfo,
    gateway: Arc<crate::gateway::Gateway>,
    clock: SharedClock,
) -> prometheus::Result<Router> {
    let state = ApiState {
        clock,
        http: HttpMetrics::register(&registry)?,
        agents,
        raft: raft.clone(),
        registry,
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        storage: Arc::new(storage),
        model_uploads: Arc::new(Semaphore::new(limits.max_model_uploads)),
    };
    // Set on the model write routes themselves, so it overrides the router-wide
    // limit for them alone.
    let model_body = DefaultBodyLimit::max(limits.max_model_body_bytes);
    let api = Router::new()
        .route("/api/v1/jobs", post(submit_job).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route(
            "/api/v1/nodes",
            post(crate::agents::register_node).get(list_nodes),
        )
        .route("/api/v1/nodes/{id}", get(get_node))
        .route(
            "/api/v1/nodes/{id}/heartbeat",
            post(crate::agents::node_heartbeat),
        )
        .route(
            "/api/v1/nodes/{id}/revoke",
            post(crate::agents::revoke_node),
        )
        .route(
            "/api/v1/allocations/{id}/logs",
            get(crate::agents::allocation_logs),
        )
        .route(
            "/api/v1/join-tokens",
            post(crate::agents::create_join_token).get(crate::agents::list_join_tokens),
        )
        .route(
            "/api/v1/join-tokens/{id}",
            delete(crate::agents::delete_join_token),
        )
        .route(
            "/api/v1/nodes/{id}/drain",
            post(drain_node).delete(undrain_node),
        )
        .route("/api/v1/nodes/{id}/allocations", get(node_allocations))
        .route("/api/v1/cluster", get(get_cluster))
        .route("/api/v1/cluster/members", post(join_member))
        .route("/api/v1/cluster/members/{id}", delete(leave_member))
        .route(
            "/api/v1/models",
            post(crate::models::register_model)
                .layer(model_body)
                .get(crate::models::list_models),
        )
        .route(
            "/api/v1/models/{digest}",
            get(crate::models::get_model).delete(crate::models::delete_model),
        )
        .route(
            "/api/v1/models/{digest}/locations",
            put(crate::models::set_model_locations).layer(model_body),
        )
        .route("/api/v1/storage", get(crate::models::get_storage))
        .route("/api/v1/openapi.json", get(openapi_json))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), admission))
        // Long polls hold a request open for up to minutes: they have their own
        // limit instead of taking in-flight slots from short requests.
        .route(
            "/api/v1/nodes/{id}/assignments",
            get(crate::agents::node_assignments),
        )
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(not_found)
        .layer(middleware::from_fn(method_not_allowed))
        .with_state(state);
    // The gateway has its own body limit, admission and error shape (OpenAI's).
    Ok(api
        .merge(crate::gateway::router(gateway))
        .merge(aigrid_consensus::transport::router(raft.inbox())))
}

#[cfg(test)]
mod tests {
    use aigrid_api::{
        AllocState, AllocationReport, GpuHealth, Heartbeat, NodeRegistration, Timestamp,
    };
    use aigrid_consensus::state_machine::StateMachine;
    use axum::body::Body;
    use serde_json::json;

    use super::*;

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

    #[tokio::test]
    async fn an_empty_drain_body_means_the_defaults() {
        let empty = Request::new(Body::empty());
        let OptionalJsonBody(d) = OptionalJsonBody::<DrainSpec>::from_request(empty, &())
            .await
            .unwrap();
        assert_eq!(d, DrainSpec::default());
        let body = Request::new(Body::from(r#"{"max_parallel": 3}"#));
        let OptionalJsonBody(d) = OptionalJsonBody::<DrainSpec>::from_request(body, &())
            .await
            .unwrap();
        assert_eq!(d.max_parallel, 3);
        let bad = Request::new(Body::from(r#"{"max": 3}"#));
        let err = OptionalJsonBody::<DrainSpec>::from_request(bad, &())
            .await
            .err()
            .unwrap();
        assert_eq!(err.0.code(), Some(ErrorCode::InvalidJson));
    }

    #[test]
    fn openapi_documents_the_node_routes() {
        let doc = serde_json::to_value(openapi()).unwrap();
        for (path, method) in [
            ("/api/v1/nodes", "post"),
            ("/api/v1/nodes/{id}/heartbeat", "post"),
            ("/api/v1/nodes/{id}/drain", "post"),
            ("/api/v1/nodes/{id}/drain", "delete"),
            ("/api/v1/nodes/{id}/allocations", "get"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        for schema in [
            "NodeRegistration",
            "RegisterNodeResponse",
            "Heartbeat",
            "HeartbeatResponse",
            "DrainSpec",
            "Allocation",
        ] {
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "missing schema {schema}"
            );
        }
    }
}
