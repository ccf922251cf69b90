//! Every answer the gateway gives instead of a replica, each with one status and
//! OpenAI's error shape.

use aigrid_api::openai::{OpenAiErrorBody, OpenAiErrorType};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why the gateway answered instead of a replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The body is not a JSON object.
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body has no `model`, or it is not a string.
    #[error("you must provide a model parameter: a pushed model's name or its digest")]
    MissingModel,
    /// The body is larger than the gateway accepts.
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No registered model has this name, digest or digest prefix.
    #[error("the model `{0}` does not exist; push it with `aigrid model push` or list models with GET /v1/models")]
    ModelNotFound(String),
    /// A digest prefix matches more than one model.
    #[error("the model `{asked}` matches {matches} model digests; give more of the digest")]
    AmbiguousModel {
        /// What the request named.
        asked: String,
        /// How many digests start with it.
        matches: usize,
    },
    /// The model exists but no replica of it can take the request now.
    #[error("{}", not_ready_message(.model, *.replicas, *.unreachable, *.deploying))]
    NotReady {
        /// The model, as resolved.
        model: String,
        /// Its replicas running with an endpoint.
        replicas: usize,
        /// Of them, those tried for this request that could not be reached.
        unreachable: usize,
        /// A live job deploys it: its replicas are being placed or started.
        deploying: bool,
    },
    /// A scaled model got no ready replica while the request waited.
    #[error("the model `{model}` is starting a replica and none was ready within {secs} s; retry shortly")]
    ColdStart {
        /// The model.
        model: String,
        /// How long the request waited, in seconds.
        secs: u64,
    },
    /// As many requests wait for models to scale up as this server holds.
    #[error("too many requests are waiting for models to start on this server (limit {limit}); retry shortly")]
    HoldFull {
        /// The limit.
        limit: usize,
    },
    /// The replica did not answer in time.
    #[error("the replica serving model `{model}` did not answer within {secs} s")]
    Timeout {
        /// The model.
        model: String,
        /// The read timeout, in seconds.
        secs: u64,
    },
    /// This server relays as many requests as it may.
    #[error("too many requests in flight on this server (limit {limit}); retry shortly")]
    RateLimited {
        /// The limit.
        limit: usize,
    },
    /// No inference route has this path.
    #[error("unknown URL: {method} {path}")]
    UnknownRoute {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// No API key, on a server that requires one.
    #[error("you must provide an API key (Authorization: Bearer aigrid-key...); `aigrid apikey create --circle CIRCLE` makes one")]
    MissingApiKey,
    /// An API key that is malformed, unknown or revoked.
    #[error("the API key is not valid: unknown, revoked or malformed")]
    InvalidApiKey,
    /// The route exists, not with this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
}

pub(crate) fn not_ready_message(
    model: &str,
    replicas: usize,
    unreachable: usize,
    deploying: bool,
) -> String {
    match (replicas, unreachable) {
        (0, _) if deploying => format!(
            "the model `{model}` is being deployed and no replica is ready yet (loading); retry shortly"
        ),
        (0, _) => format!(
            "the model `{model}` has no replica running; deploy it with a `model-server` job"
        ),
        (n, 0) => format!(
            "the model `{model}` has {n} replica{} and none is ready yet (loading); retry shortly",
            if n == 1 { "" } else { "s" }
        ),
        (n, u) => format!(
            "the model `{model}` has {n} replica{}; {u} could not be reached and none other is \
             ready; retry shortly",
            if n == 1 { "" } else { "s" }
        ),
    }
}

impl GatewayError {
    /// The HTTP status, code and parameter of this error: the one place they are
    /// decided (OpenAI's error type follows from the status).
    pub(crate) fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            Self::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", None),
            Self::MissingModel => (StatusCode::BAD_REQUEST, "missing_model", Some("model")),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", None),
            Self::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found", Some("model")),
            Self::AmbiguousModel { .. } => {
                (StatusCode::BAD_REQUEST, "ambiguous_model", Some("model"))
            }
            Self::NotReady { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "model_not_ready",
                Some("model"),
            ),
            Self::ColdStart { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "model_starting",
                Some("model"),
            ),
            Self::HoldFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_waiting", None),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "replica_timeout", None),
            Self::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", None)
            }
            Self::UnknownRoute { .. } => (StatusCode::NOT_FOUND, "unknown_url", None),
            Self::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            Self::MissingApiKey | Self::InvalidApiKey => {
                (StatusCode::UNAUTHORIZED, "invalid_api_key", None)
            }
        }
    }

    /// The body this error is sent with.
    pub fn body(&self) -> OpenAiErrorBody {
        let (status, code, param) = self.parts();
        OpenAiErrorBody::new(
            OpenAiErrorType::for_status(status.as_u16()),
            self.to_string(),
            Some(code),
        )
        .with_param(param)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, ..) = self.parts();
        let mut resp = (status, Json(self.body())).into_response();
        let retry_after = match self {
            Self::NotReady { .. } | Self::RateLimited { .. } | Self::HoldFull { .. } => Some("1"),
            // The replica is still starting: come back once it may be up.
            Self::ColdStart { .. } => Some("5"),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        crate::http::plumbing::close_if_body_refused(&mut resp);
        resp
    }
}
