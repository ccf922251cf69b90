//! Fleet rollouts: `POST /api/v1/rollouts` sends a registered model to the nodes
//! whose attributes match, in waves; `GET /api/v1/rollouts` and
//! `GET /api/v1/rollouts/{id}` show them with every node's stage and attested
//! digest. A rollout belongs to its model's circle: operators (and owners) start
//! one, viewers read it; for a model without a circle, the admins. Starting one is
//! a guarded change (`rollout.promote`) when the circle's policy says so.

use aigrid_api::{CreateRollout, ErrorBody, FleetRollout, ProposalCreated, Role};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Signed};
use super::plumbing::{
    not_found, propose_change, read, read_query, unexpected, ApiError, ApiState, ReadQuery,
};
use crate::new_id;
use crate::state::{Action, Applied, ClusterState, Command};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_rollout, list_rollouts))
        .routes(routes!(get_rollout))
}

/// The circle of the model `digest`, or `None` for a model without one; `Err`
/// when no such model is registered.
fn model_circle(s: &ClusterState, digest: &str) -> Option<Option<String>> {
    s.model(digest).map(|m| m.summary.circle)
}

/// Starts a fleet rollout; 201 with its first wave staging, 202 with a proposal
/// when the model's circle guards `rollout.promote`.
#[utoipa::path(
    tag = "rollouts", post, path = "/api/v1/rollouts", request_body = CreateRollout,
    responses(
        (status = 201, description = "Committed; the first wave is staging", body = FleetRollout),
        (status = 202, description = "Guarded: proposed, nothing applied yet", body = ProposalCreated),
        (status = 400, description = "Invalid request, or no node matches", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody),
    )
)]
async fn create_rollout(
    State(state): State<ApiState>,
    Signed(caller, request): Signed<CreateRollout>,
) -> Result<Response, ApiError> {
    request.validate()?;
    let circle = state
        .raft
        .read(|s| model_circle(s, &request.model))
        .await?
        .ok_or_else(|| not_found("model", &request.model))?;
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Operator))
        .await?;
    let command = Command::CreateRollout {
        id: new_id(|id| id),
        request,
        at: state.clock.now(),
        by: caller.identity().cloned(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::RolloutChanged(r) => Ok((StatusCode::CREATED, Json(r)).into_response()),
            other => Err(unexpected(other)),
        })
}

/// The fleet rollouts the caller may see, newest first.
#[utoipa::path(
    tag = "rollouts", get, path = "/api/v1/rollouts",
    params(("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = [FleetRollout]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 401, body = ErrorBody))
)]
async fn list_rollouts(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<FleetRollout>>, ApiError> {
    let query = read_query(query)?;
    let who = caller.principal.clone();
    let server = caller.server;
    Ok(Json(
        read(&state, &query, move |s| {
            s.rollouts()
                .into_iter()
                .filter(|r| {
                    let circle = model_circle(s, &r.model).flatten();
                    server || s.allows(&who, Action::Circle(circle.as_deref(), Role::Viewer))
                })
                .collect()
        })
        .await?,
    ))
}

/// One fleet rollout: its waves, every node's stage, attested digest and
/// signature.
#[utoipa::path(
    tag = "rollouts", get, path = "/api/v1/rollouts/{id}",
    params(("id" = String, Path, description = "Rollout id"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = FleetRollout), (status = 400, description = "Malformed query", body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_rollout(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<FleetRollout>, ApiError> {
    let query = read_query(query)?;
    let (rollout, circle) = read(&state, &query, |s| {
        let rollout = s.rollout(&id)?;
        let circle = model_circle(s, &rollout.model).flatten();
        Some((rollout, circle))
    })
    .await?
    .ok_or_else(|| not_found("rollout", &id))?;
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Viewer))
        .await?;
    Ok(Json(rollout))
}
