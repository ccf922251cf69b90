//! `GET /api/v1/usage`: metered use of a circle (its members, any role, and admins)
//! or of the whole cluster (admins), over whole hours back from now.

use aigrid_api::error::ErrorCode;
use aigrid_api::{ErrorBody, Role, Timestamp, UsageQuery, UsageReport};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::plumbing::{check_name, read, read_query, ApiError, ApiState, ReadQuery};
use crate::state::Action;

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(usage))
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
