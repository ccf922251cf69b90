//! Jobs and their allocations' output: submit (validated here, again as it
//! applies), list, show, delete; `GET /api/v1/allocations/{id}/logs`.

use aigrid_api::{
    AllocId, AllocationLogs, DeleteJobResponse, EvalId, Job, JobId, JobSpec, JobSummary,
};
use aigrid_api::{ErrorBody, SubmitJobResponse};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::plumbing::{
    new_id, not_found, propose, read, read_query, unexpected, ApiError, ApiState, JsonBody,
    ReadQuery,
};
use crate::state::{Applied, ClusterState, Command};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(submit_job, list_jobs))
        .routes(routes!(get_job, delete_job))
        .routes(routes!(allocation_logs))
}

/// Submits a job; 201 when created, 200 when it updated the live job of that name.
#[utoipa::path(
    tag = "jobs", post, path = "/api/v1/jobs", request_body = JobSpec,
    responses(
        (status = 201, description = "Job created and committed", body = SubmitJobResponse),
        (status = 200, description = "Existing job of that name updated", body = SubmitJobResponse),
        (status = 400, description = "Invalid job", body = ErrorBody),
        (status = 408, description = "The body stopped arriving", body = ErrorBody),
        (status = 413, description = "Body, spec or one of its fields too large", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn submit_job(
    State(state): State<ApiState>,
    JsonBody(spec): JsonBody<JobSpec>,
) -> Result<(StatusCode, Json<SubmitJobResponse>), ApiError> {
    // Oversized is 413, before the rules' 400s.
    spec.check_size()?;
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

#[utoipa::path(
    tag = "jobs", get, path = "/api/v1/jobs",
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
    not_found("job", id_or_name)
}

/// Shows one job, by id or name, with its allocations and unplaced instances.
#[utoipa::path(
    tag = "jobs", get, path = "/api/v1/jobs/{id}",
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
    tag = "jobs", delete, path = "/api/v1/jobs/{id}",
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

/// The end of an allocation's output, as its agent last shipped it.
#[utoipa::path(
    tag = "jobs", get, path = "/api/v1/allocations/{id}/logs",
    params(("id" = String, Path, description = "Allocation id")),
    responses((status = 200, body = AllocationLogs), (status = 404, body = ErrorBody))
)]
async fn allocation_logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<AllocationLogs>, ApiError> {
    let alloc = AllocId::new(id.clone());
    state
        .raft
        .read(|s| s.allocation_logs(&alloc))
        .await?
        .map(Json)
        .ok_or_else(|| not_found("allocation", &id))
}
