//! `GET /api/v1/usage`: metered use of a circle (its members, any role, and admins)
//! or of the whole cluster (admins), over whole hours back from now; a circle's
//! quota and what it holds, borrows and its fair share now
//! (`/api/v1/circles/{circle}/usage`, its members and admins), and setting the
//! quota (admins).

use aigrid_api::error::ErrorCode;
use aigrid_api::{CircleUsage, ErrorBody, Quota, Role, Timestamp, UsageQuery, UsageReport};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Signed};
use super::plumbing::{
    check_name, propose, read, read_query, unexpected, ApiError, ApiState, ReadQuery,
};
use crate::state::{Action, Applied, Command};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(usage))
        .routes(routes!(circle_usage))
        .routes(routes!(set_quota, clear_quota))
}

/// What allocations held while they ran: GPU-seconds by GPU model, CPU-seconds and
/// memory, by job and by node, from the start of the hour `since` ago (default
/// `24h`). A circle's members (any role) read its use; the whole cluster's is the
/// admins'.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/usage",
    params(
        ("circle" = Option<String>, Query, description = "The circle; the whole cluster without it (admins)"),
        ("since" = Option<String>, Query, description = "How far back: 90m, 24h, 7d (default 24h)"),
    ),
    responses(
        (status = 200, body = UsageReport),
        (status = 400, description = "Malformed circle or duration", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody),
    )
)]
async fn usage(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
    let query = read_query(query)?;
    if let Some(circle) = &query.circle {
        check_name("circle", circle)?;
    }
    let back = aigrid_api::usage::parse_since(query.since.as_deref().unwrap_or("24h"))
        .map_err(|e| ApiError::new(ErrorCode::InvalidField, format!("since: {e}")))?;
    let action = match &query.circle {
        Some(circle) => Action::Circle(Some(circle), Role::Viewer),
        None => Action::Admin,
    };
    caller.require(&state, action).await?;
    let since = Timestamp::from_millis(state.clock.now().as_millis().saturating_sub(back));
    let circle = query.circle;
    Ok(Json(
        read(&state, &ReadQuery::default(), move |s| {
            s.usage(circle.as_deref(), since)
        })
        .await?,
    ))
}

/// A circle's quota, what its live allocations hold, what of that is borrowed
/// idle capacity (taken back when a circle within its quota needs it), its
/// dominant share, and its instances waiting. The circle's members and admins.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/circles/{circle}/usage",
    params(("circle" = String, Path, description = "Circle name")),
    responses(
        (status = 200, body = CircleUsage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A circle without members, governance, quota or jobs", body = ErrorBody),
    )
)]
async fn circle_usage(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
) -> Result<Json<CircleUsage>, ApiError> {
    check_name("circle", &circle)?;
    caller
        .require(&state, Action::Circle(Some(&circle), Role::Viewer))
        .await?;
    let looked = circle.clone();
    let usage = read(&state, &ReadQuery::default(), move |s| {
        s.circle_known(&looked).then(|| s.circle_usage(&looked))
    })
    .await?;
    usage
        .map(Json)
        .ok_or_else(|| super::plumbing::not_found("circle", &circle))
}

/// Sets what a circle is guaranteed: whole GPUs by model (`{"H100": 8}`, a key
/// matching every GPU model containing it), GPU memory, CPU and memory. Beyond it
/// the circle borrows idle capacity only. Admins.
#[utoipa::path(
    tag = "access", put, path = "/api/v1/circles/{circle}/quota",
    params(("circle" = String, Path, description = "Circle name")),
    request_body = Quota,
    responses(
        (status = 200, description = "Committed; the circle's usage under it", body = CircleUsage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
async fn set_quota(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    Signed(caller, quota): Signed<Quota>,
) -> Result<Json<CircleUsage>, ApiError> {
    change_quota(state, circle, caller, Some(quota)).await
}

/// Removes a circle's quota: it is guaranteed nothing and limited by nothing but
/// fair share. Admins.
#[utoipa::path(
    tag = "access", delete, path = "/api/v1/circles/{circle}/quota",
    params(("circle" = String, Path, description = "Circle name")),
    responses(
        (status = 200, description = "Committed; the circle's usage now", body = CircleUsage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "The circle has no quota", body = ErrorBody),
    )
)]
async fn clear_quota(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
) -> Result<Json<CircleUsage>, ApiError> {
    change_quota(state, circle, caller, None).await
}

async fn change_quota(
    state: ApiState,
    circle: String,
    caller: Caller,
    quota: Option<Quota>,
) -> Result<Json<CircleUsage>, ApiError> {
    check_name("circle", &circle)?;
    caller.require(&state, Action::Admin).await?;
    if let Some(q) = &quota {
        q.validate()?;
    }
    let command = Command::SetQuota {
        circle,
        quota,
        by: caller.identity().cloned(),
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::QuotaSet { circle } => Ok(Json(
            read(&state, &ReadQuery::default(), move |s| {
                s.circle_usage(&circle)
            })
            .await?,
        )),
        other => Err(unexpected(other)),
    }
}
