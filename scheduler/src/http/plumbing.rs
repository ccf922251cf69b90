//! What every control API route shares, and nothing that belongs to one area: the
//! handlers' state, the error every answer leaves in (`{"error": {"code",
//! "message"}}` with the status [`ErrorCode`] fixes), the body extractors (413 over
//! the limit, 415 for a type other than JSON, 400 naming the field at fault),
//! [`propose`] (a write answered once Raft has committed and applied it) and
//! [`read`] (ReadIndex, or this server's applied state with `?stale=true`).

use std::sync::Arc;
use std::time::Duration;

use aigrid_api::{ErrorBody, ErrorCode, StorageInfo};
use aigrid_consensus::{RaftError, RaftNode};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, Query, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::clock::SharedClock;
use crate::hub::{AgentHub, HubError};
use crate::listener::ListenerLimits;
use crate::state::{Applied, ClusterState, Command, StateError};

/// Largest body [`ApiLimits::max_model_body_bytes`] may allow. A model write becomes
/// one Raft entry of about its body's size; raft-rs refuses proposals beyond its
/// 256 MiB budget of uncommitted entries; peers size the message batches they accept
/// after the configured limit ([`aigrid_consensus::transport::PeerLimits`]).
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
    /// Requests per second one client may make, on average; 0 for no limit. More
    /// get 429 with `Retry-After`. A client is its authenticated identity when a
    /// layer put a [`RateKey`] in the request, else its address.
    pub rate_per_second: u32,
    /// Requests one client may make at once, above its average rate.
    pub rate_burst: u32,
    /// Clients whose rate is tracked at once; see `http::rate`.
    pub rate_max_keys: usize,
    /// The listener's connection limits and timeouts.
    pub listener: ListenerLimits,
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
            rate_per_second: 100,
            rate_burst: 200,
            rate_max_keys: 65_536,
            listener: ListenerLimits::default(),
        }
    }
}

/// Who a request is counted as by the rate limits, when it is more than its
/// address: an authentication layer that has verified the request's signer puts
/// one in the request's extensions (`req.extensions_mut().insert(RateKey(..))`),
/// outside the rate limit layer, and the limit is then kept per identity (a person's
/// key id, a node id) wherever it connects from. The text is the identity's own
/// stable name; two requests with equal text share one limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateKey(pub String);

/// Shared by every handler: one pointer, so each extraction of it (every layer
/// and handler of every request takes one) costs one reference count.
#[derive(Clone)]
pub struct ApiState(Arc<ApiStateInner>);

impl std::ops::Deref for ApiState {
    type Target = ApiStateInner;

    fn deref(&self) -> &ApiStateInner {
        &self.0
    }
}

impl ApiState {
    pub(crate) fn new(inner: ApiStateInner) -> Self {
        ApiState(Arc::new(inner))
    }
}

/// What [`ApiState`] shares.
pub struct ApiStateInner {
    pub(crate) raft: RaftNode<ClusterState>,
    pub(crate) registry: Registry,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) http: HttpMetrics,
    pub(crate) agents: Arc<AgentHub>,
    /// What `GET /api/v1/storage` answers.
    pub(crate) storage: Arc<StorageInfo>,
    /// Model writes being read; see [`ApiLimits::max_model_uploads`].
    pub(crate) model_uploads: Arc<Semaphore>,
    /// Where handlers read the time they write into commands.
    pub(crate) clock: SharedClock,
    /// Nonces of signed requests accepted within the clock-skew window.
    pub(crate) nonces: Arc<super::replay::NonceCache>,
    /// Where requests' signatures are checked, together when several come at once.
    pub(crate) verifier: super::verifier::Verifier,
    /// The admins this server was started with (`--admin`).
    pub(crate) bootstrap_admins: Arc<Vec<(String, aigrid_api::PublicKey)>>,
    /// This server's own identity, which its own loops (repairs) sign with.
    pub(crate) server_key: Option<aigrid_api::PublicKey>,
    /// The CA nodes' data-port certificates are issued with, when this server holds
    /// its key.
    pub(crate) node_issuer: Option<Arc<aigrid_tls::ClusterCa>>,
}

#[derive(Clone)]
pub(crate) struct HttpMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) seconds: HistogramVec,
}

impl HttpMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<Self> {
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
        let mut response = (status, Json(self.0)).into_response();
        close_if_body_refused(&mut response);
        response
    }
}

/// Marks an answer refusing a request's body (too large, or too slow) as its
/// connection's last. The body may be partly unread: the connection cannot carry
/// another request, and the client is told so rather than finding out on its next
/// request. The control API's errors and the gateway's both answer through it.
pub(crate) fn close_if_body_refused(response: &mut Response) {
    if matches!(
        response.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
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

impl From<aigrid_api::SizeError> for ApiError {
    fn from(e: aigrid_api::SizeError) -> Self {
        ApiError::new(ErrorCode::PayloadTooLarge, e.to_string())
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

/// The raw body, refused with 415 when it declares a type other than JSON, with
/// 413 over the size limit and with 408 when the client paused sending it for
/// longer than the listener waits.
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
        other if body_timed_out(&other) => ApiError::new(
            ErrorCode::RequestTimeout,
            "the request body stopped arriving; send the request again",
        ),
        other => ApiError::new(ErrorCode::InvalidJson, other.body_text()),
    })
}

/// Whether reading a body failed because the client stopped sending it.
fn body_timed_out(rejection: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Decodes JSON, naming the path of the field that failed (`groups[0].resources`).
/// A body that decodes is read once, plainly; only a refused one is read again,
/// tracking the path, for the message (the two readings accept the same bodies).
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = T::deserialize(&mut serde_json::Deserializer::from_slice(bytes)) {
        return Ok(value);
    }
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

/// A route's query options (the read options, or its own), with a malformed query
/// answered in the API's error shape.
pub(crate) fn read_query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))
}

/// 400 unless `value` is a valid circle (or job, group) name.
pub(crate) fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    Ok(aigrid_api::spec::check_name(field, value)?)
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

/// What a write came to: applied at once, or made into a proposal because its
/// circle's policy guards it.
pub(crate) enum Outcome {
    /// Committed and applied.
    Applied(Applied),
    /// Waiting for its circle's quorum; nothing applied.
    Proposed(aigrid_api::ProposalInfo),
}

impl Outcome {
    /// 202 with the proposal, for a proposed change; `applied` answers the rest.
    pub(crate) fn respond(
        self,
        key: Option<String>,
        applied: impl FnOnce(Applied) -> Result<Response, ApiError>,
    ) -> Result<Response, ApiError> {
        match self {
            Outcome::Applied(done) => applied(done),
            Outcome::Proposed(info) => {
                let mut created = aigrid_api::ProposalCreated::of(&info);
                created.key = key;
                Ok((StatusCode::ACCEPTED, Json(created)).into_response())
            }
        }
    }
}

/// Proposes `command`, or, when its circle's policy guards the change it makes, a
/// proposal of it by `by` (a guarded change must have a person to answer for it:
/// 403 without one). Which it is is settled where commands apply: a command this
/// server took for unguarded but that the state refuses as guarded becomes a
/// proposal, and a proposal of a change that is no longer guarded is sent directly.
pub(crate) async fn propose_change(
    state: &ApiState,
    by: Option<&aigrid_api::IdentityId>,
    command: Command,
) -> Result<Outcome, ApiError> {
    let mut guarded = state
        .raft
        .read_local(|s| s.guarded_change(&command).is_some());
    for _ in 0..2 {
        if !guarded {
            match state.raft.propose(&command).await? {
                Err(StateError::Guarded { .. }) => guarded = true,
                output => return Ok(Outcome::Applied(output?)),
            }
            continue;
        }
        let by = by.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Forbidden,
                "this change is guarded by its circle's policy, and only a person's \
                 identity may propose it",
            )
        })?;
        let proposal = Command::Propose {
            id: crate::new_id(|id| id),
            command: Box::new(command.clone()),
            by: by.clone(),
            at: state.clock.now(),
        };
        match state.raft.propose(&proposal).await? {
            Ok(Applied::Proposed(info)) => return Ok(Outcome::Proposed(info)),
            Ok(other) => return Err(unexpected(other)),
            Err(StateError::Conflict { .. })
                if !state
                    .raft
                    .read_local(|s| s.guarded_change(&command).is_some()) =>
            {
                guarded = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "the circle's policy changed while this request was being made; send it again",
    ))
}

pub(crate) fn unexpected(applied: Applied) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("unexpected outcome of a command: {applied:?}"),
    )
}

/// 404 for a `kind` (`job`, `node`, `allocation`) that does not exist.
pub(crate) fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("{kind} `{id}` not found"))
}

/// 401 saying why.
pub(crate) fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, message)
}

impl From<aigrid_api::AuthError> for ApiError {
    fn from(e: aigrid_api::AuthError) -> Self {
        unauthorized(e.to_string())
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use aigrid_api::DrainSpec;
    use axum::body::Body;

    use super::*;

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
}
