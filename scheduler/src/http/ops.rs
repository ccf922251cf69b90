//! What operators and load balancers call: `/metrics` (Prometheus), `/health` (the
//! process answers) and `/ready` (this server can serve). Open to anyone: they carry
//! no secret and change nothing.

use aigrid_api::{ErrorBody, ErrorCode, Health, Readiness};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus::Encoder;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::plumbing::{ApiError, ApiState};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(health))
        .routes(routes!(ready))
}

/// Every metric of this process, in Prometheus' text format.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 500, description = "The metrics could not be encoded", body = ErrorBody),
    )
)]
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

/// Answers as long as the process serves HTTP.
#[utoipa::path(
    get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is up", body = Health))
)]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// Ready when the replica runs, knows a leader, and has applied what it knows is
/// committed.
#[utoipa::path(
    get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "This server can serve", body = Readiness),
        (status = 503, description = "Stopped, removed, or no leader known", body = ErrorBody),
    )
)]
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
        None => Json(Readiness {
            status: "ready".to_owned(),
            leader: status.leader,
        })
        .into_response(),
        Some(r) => ApiError::new(ErrorCode::NoQuorum, r).into_response(),
    }
}
