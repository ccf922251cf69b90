//! Jobs and their allocations' output: submit (validated here, again as it
//! applies), list, show, delete; `GET /api/v1/allocations/{id}/logs`.
//!
//! A job belongs to its circle: operators (and owners) of the circle submit and
//! delete it, viewers read it and its output; jobs without a circle are the
//! admins'. A task's `env` values are secrets: every read shows them redacted, and a
//! resubmitted spec that carries the redacted marker keeps the value it had.

use aigrid_api::{
    AllocId, AllocationLogs, DeleteJobResponse, EvalId, Job, JobId, JobSpec, JobSummary,
};
use aigrid_api::{ErrorBody, JobVersion, ProposalCreated, RevertJob, SubmitJobResponse};
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
use aigrid_api::Role;

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(submit_job, list_jobs))
        .routes(routes!(get_job, delete_job))
        .routes(routes!(job_versions))
        .routes(routes!(revert_job))
        .routes(routes!(allocation_logs))
}

/// Submits a job; 201 when created, 200 when it updated the live job of that name,
/// 202 with a proposal when its circle's policy guards the change (nothing runs
/// until the circle's quorum approves it).
#[utoipa::path(
    tag = "jobs", post, path = "/api/v1/jobs", request_body = JobSpec,
    responses(
        (status = 201, description = "Job created and committed", body = SubmitJobResponse),
        (status = 200, description = "Existing job of that name updated", body = SubmitJobResponse),
        (status = 202, description = "Guarded: proposed, nothing applied yet", body = ProposalCreated),
        (status = 400, description = "Invalid job", body = ErrorBody),
        (status = 408, description = "The body stopped arriving", body = ErrorBody),
        (status = 413, description = "Body, spec or one of its fields too large", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn submit_job(
    State(state): State<ApiState>,
    Signed(caller, spec): Signed<JobSpec>,
) -> Result<Response, ApiError> {
    // Oversized is 413, before the rules' 400s.
    spec.check_size()?;
    spec.validate_sized()?;
    caller
        .require(
            &state,
            Action::Circle(spec.circle.as_deref(), Role::Operator),
        )
        .await?;
    // Updating a live job of this name in another circle needs that circle's
    // operators too, and env values shown redacted keep the live job's: both are
    // settled where the command applies, against the state it changes, so a
    // submission costs no quorum read here. This server's own view refuses the
    // evident cases before anything is proposed.
    let live_circle = state
        .raft
        .read_local(|s| s.live_spec(&spec.name).map(|live| live.circle.clone()));
    if let Some(circle) = live_circle {
        caller
            .require(&state, Action::Circle(circle.as_deref(), Role::Operator))
            .await?;
    }
    let command = Command::SubmitJob {
        job_id: new_id(JobId::new),
        eval_id: new_id(EvalId::new),
        spec,
        at: state.clock.now(),
        by: caller.identity().cloned(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::JobSubmitted(resp) => {
                let status = if resp.created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok((status, Json(resp)).into_response())
            }
            other => Err(unexpected(other)),
        })
}

#[utoipa::path(
    tag = "jobs", get, path = "/api/v1/jobs",
    params(("stale" = Option<bool>, Query, description = "Serve from local state without a quorum read")),
    responses((status = 200, body = [JobSummary]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn list_jobs(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<JobSummary>>, ApiError> {
    let query = read_query(query)?;
    let who = caller.principal.clone();
    Ok(Json(
        read(&state, &query, move |s| {
            s.jobs_where(|spec| {
                s.allows(&who, Action::Circle(spec.circle.as_deref(), Role::Viewer))
            })
        })
        .await?,
    ))
}

/// The job with this id or, failing that, the live job with this name.
fn find_job(s: &ClusterState, id_or_name: &str) -> Option<Job> {
    s.job(s.resolve_job(id_or_name)?)
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
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Job>, ApiError> {
    let query = read_query(query)?;
    let mut job = read(&state, &query, |s| find_job(s, &id))
        .await?
        .ok_or_else(|| job_not_found(&id))?;
    caller
        .require(
            &state,
            Action::Circle(job.spec.circle.as_deref(), Role::Viewer),
        )
        .await?;
    job.spec = job.spec.redacted();
    Ok(Json(job))
}

/// Deletes a job; its allocations are asked to stop. 202 with a proposal when its
/// circle's policy guards deletions.
#[utoipa::path(
    tag = "jobs", delete, path = "/api/v1/jobs/{id}",
    params(("id" = String, Path, description = "Job id, or the name of a live job")),
    responses(
        (status = 200, body = DeleteJobResponse),
        (status = 202, description = "Guarded: proposed, nothing applied yet", body = ProposalCreated),
        (status = 404, body = ErrorBody),
    )
)]
async fn delete_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    // An unknown job is answered from a linearizable read, without writing to the log.
    let (job_id, circle) = state
        .raft
        .read(|s| find_job(s, &id).map(|job| (job.id, job.spec.circle)))
        .await?
        .ok_or_else(|| job_not_found(&id))?;
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Operator))
        .await?;
    let command = Command::DeleteJob {
        job_id,
        eval_id: new_id(EvalId::new),
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::JobDeleted(resp) => Ok(Json(resp).into_response()),
            other => Err(unexpected(other)),
        })
}

/// The versions of a job kept, newest first: the one running now and up to ten
/// before it, secrets redacted. The job's viewers.
#[utoipa::path(
    tag = "jobs", get, path = "/api/v1/jobs/{id}/versions",
    params(("id" = String, Path, description = "Job id, or the name of a live job")),
    responses((status = 200, body = [JobVersion]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn job_versions(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Vec<JobVersion>>, ApiError> {
    let versions = state
        .raft
        .read(|s| s.job_versions(&id))
        .await?
        .ok_or_else(|| job_not_found(&id))?;
    // The first is the version running now, whose circle the job is in.
    let circle = versions[0].spec.circle.as_deref();
    caller
        .require(&state, Action::Circle(circle, Role::Viewer))
        .await?;
    Ok(Json(
        versions
            .into_iter()
            .map(|mut v| {
                v.spec = v.spec.redacted();
                v
            })
            .collect(),
    ))
}

/// Runs a kept version of a job again, as a new version (its secrets as they were
/// then). An update like any other: 202 with a proposal when the job's circle
/// guards updates. The job's operators.
#[utoipa::path(
    tag = "jobs", post, path = "/api/v1/jobs/{id}/revert",
    params(("id" = String, Path, description = "Job id, or the name of a live job")),
    request_body = RevertJob,
    responses(
        (status = 200, description = "The new version, committed", body = SubmitJobResponse),
        (status = 202, description = "Guarded: proposed, nothing applied yet", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such job, or the version is not kept", body = ErrorBody),
        (status = 409, description = "That version is the one running", body = ErrorBody),
    )
)]
async fn revert_job(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Signed(caller, request): Signed<RevertJob>,
) -> Result<Response, ApiError> {
    let versions = state
        .raft
        .read(|s| s.job_versions(&id))
        .await?
        .ok_or_else(|| job_not_found(&id))?;
    let circle = versions[0].spec.circle.clone();
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Operator))
        .await?;
    let wanted = versions
        .into_iter()
        .find(|v| v.version == request.version)
        .ok_or_else(|| not_found("job version", &format!("{id}@{}", request.version)))?;
    if wanted.current {
        return Err(ApiError::new(
            aigrid_api::ErrorCode::Conflict,
            format!("version {} of `{id}` is the one running", request.version),
        ));
    }
    caller
        .require(
            &state,
            Action::Circle(wanted.spec.circle.as_deref(), Role::Operator),
        )
        .await?;
    let command = Command::SubmitJob {
        job_id: new_id(JobId::new),
        eval_id: new_id(EvalId::new),
        spec: wanted.spec,
        at: state.clock.now(),
        by: caller.identity().cloned(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::JobSubmitted(resp) => Ok(Json(resp).into_response()),
            other => Err(unexpected(other)),
        })
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
    caller: Caller,
) -> Result<Json<AllocationLogs>, ApiError> {
    let alloc = AllocId::new(id.clone());
    let (logs, circle) = state
        .raft
        .read(|s| {
            let circle = s
                .allocation(&alloc)
                .and_then(|a| s.job(&a.job_id))
                .and_then(|j| j.spec.circle);
            (s.allocation_logs(&alloc), circle)
        })
        .await?;
    let logs = logs.ok_or_else(|| not_found("allocation", &id))?;
    caller
        .require(&state, Action::Circle(circle.as_deref(), Role::Viewer))
        .await?;
    Ok(Json(logs))
}
