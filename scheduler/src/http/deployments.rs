//! A job's rollout: `GET /api/v1/jobs/{id}/deployment` shows the latest one, and
//! `POST /api/v1/jobs/{id}/deployment/{action}` pauses, resumes, promotes or aborts
//! it. Viewers of the job's circle read; its operators steer. Promotion is a
//! guarded change (`rollout.promote`) when the circle's policy says so: it then
//! answers 202 with a proposal, and the canaries replace the running instances once
//! the quorum approves.

use aigrid_api::{
    Deployment, DeploymentAction, ErrorBody, ErrorCode, EvalId, JobId, ProposalCreated, Role,
    SteerDeployment,
};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
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
        .routes(routes!(get_deployment))
        .routes(routes!(steer_deployment))
}

/// The job (by id, or the name of a live job): its id, circle and latest rollout.
fn find(s: &ClusterState, id_or_name: &str) -> Option<(JobId, Option<String>, Option<Deployment>)> {
    let id = s.resolve_job(id_or_name)?.clone();
    let circle = s.job_spec(&id)?.0.circle.clone();
    let deployment = s.deployment_of(&id);
    Some((id, circle, deployment))
}

fn no_rollout(id: &str) -> ApiError {
    not_found("deployment", id)
}

/// The job's latest rollout: its state, per group its canaries, instances placed,
/// healthy and unhealthy, and the traffic share of its canaries.
#[utoipa::path(
    tag = "jobs", get, path = "/api/v1/jobs/{id}/deployment",
    params(("id" = String, Path, description = "Job id, or the name of a live job"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses(
        (status = 200, body = Deployment),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such job, or it never rolled out", body = ErrorBody),
    )
)]
async fn get_deployment(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Deployment>, ApiError> {
    let query = read_query(query)?;
    let (_, circle, deployment) = read(&state, &query, |s| find(s, &id))
        .await?
        .ok_or_else(|| not_found("job", &id))?;
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Viewer))
        .await?;
    deployment.map(Json).ok_or_else(|| no_rollout(&id))
}

/// Pauses, resumes, promotes or aborts the job's rollout; answers the rollout as
/// it is after the change. An abort runs the last successful version again. 202
/// with a proposal when promotion is guarded. The job's operators.
#[utoipa::path(
    tag = "jobs", post, path = "/api/v1/jobs/{id}/deployment/{action}",
    params(("id" = String, Path, description = "Job id, or the name of a live job"),
           ("action" = DeploymentAction, Path, description = "pause, resume, promote or abort")),
    request_body = SteerDeployment,
    responses(
        (status = 200, description = "Committed; the rollout now", body = Deployment),
        (status = 202, description = "Guarded: proposed, nothing applied yet", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such job, or it never rolled out", body = ErrorBody),
        (status = 409, description = "Not possible where the rollout stands, or another version rolls out", body = ErrorBody),
    )
)]
async fn steer_deployment(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
    Signed(caller, request): Signed<SteerDeployment>,
) -> Result<Response, ApiError> {
    let action: DeploymentAction = action.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidField,
            format!("`{action}` is not a rollout action: pause, resume, promote or abort"),
        )
    })?;
    let (job_id, circle, deployment) = state
        .raft
        .read(|s| find(s, &id))
        .await?
        .ok_or_else(|| not_found("job", &id))?;
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Operator))
        .await?;
    let deployment = deployment.ok_or_else(|| no_rollout(&id))?;
    let command = Command::SteerDeployment {
        job_id,
        version: request.version.unwrap_or(deployment.version),
        action,
        eval_id: new_id(EvalId::new),
        at: state.clock.now(),
        by: caller.identity().cloned(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::DeploymentChanged(Some(now)) => Ok(Json(now).into_response()),
            other => Err(unexpected(other)),
        })
}
