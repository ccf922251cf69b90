//! `/api/v1/treasury`: circles' balances and ledgers (the circle's members, any
//! role, and admins), deposits (admins: they record credits coming in from
//! outside), transfers out (the circle's owners, always through the circle's
//! quorum), every account at once (admins), and a farmer's own ledger (that
//! farmer, and admins).

use aigrid_api::error::ErrorCode;
use aigrid_api::{
    Accounts, Deposit, ErrorBody, IdentityId, LedgerPage, ProposalCreated, Role, Transfer,
    TreasuryView,
};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Signed};
use super::plumbing::{
    check_name, propose, propose_change, read, read_query, unexpected, ApiError, ApiState, Outcome,
    ReadQuery,
};
use crate::state::{Action, Applied, Command};

/// Most ledger entries one page answers.
pub const MAX_LEDGER_PAGE: usize = 1_000;

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(accounts))
        .routes(routes!(show))
        .routes(routes!(ledger))
        .routes(routes!(deposit))
        .routes(routes!(transfer))
        .routes(routes!(farmer_ledger))
}

/// A ledger page's query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct LedgerQuery {
    /// Entries answered, newest first: 1 to 1000 (default 100).
    #[serde(default)]
    limit: Option<usize>,
}

fn page_limit(query: &LedgerQuery) -> Result<usize, ApiError> {
    match query.limit.unwrap_or(100) {
        n @ 1..=MAX_LEDGER_PAGE => Ok(n),
        _ => Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("limit: 1 to {MAX_LEDGER_PAGE}"),
        )),
    }
}

/// Refuses `caller` unless it may read `circle` (its members and admins), and a
/// circle without members.
async fn circle_viewer(state: &ApiState, caller: &Caller, circle: &str) -> Result<(), ApiError> {
    check_name("circle", circle)?;
    caller
        .require(state, Action::Circle(Some(circle), Role::Viewer))
        .await?;
    super::access::circle_exists(state, circle).await
}

/// Every account's balance and their sum (zero). Admins.
#[utoipa::path(
    tag = "treasury", get, path = "/api/v1/treasury",
    responses(
        (status = 200, body = Accounts),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
async fn accounts(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Accounts>, ApiError> {
    caller.require(&state, Action::Admin).await?;
    Ok(Json(
        read(&state, &ReadQuery::default(), |s| s.accounts()).await?,
    ))
}

/// A circle's treasury: balance, what it accrued since the last settlement, its
/// rate now, and whether its new work is held. The circle's members and admins.
#[utoipa::path(
    tag = "treasury", get, path = "/api/v1/treasury/{circle}",
    params(("circle" = String, Path, description = "Circle name")),
    responses(
        (status = 200, body = TreasuryView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A circle without members", body = ErrorBody),
    )
)]
async fn show(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
) -> Result<Json<TreasuryView>, ApiError> {
    circle_viewer(&state, &caller, &circle).await?;
    Ok(Json(view(&state, circle).await?))
}

/// A circle's ledger: the entries debiting or crediting it, newest first. The
/// circle's members and admins.
#[utoipa::path(
    tag = "treasury", get, path = "/api/v1/treasury/{circle}/ledger",
    params(("circle" = String, Path, description = "Circle name"), LedgerQuery),
    responses(
        (status = 200, body = LedgerPage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A circle without members", body = ErrorBody),
    )
)]
async fn ledger(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
    query: Result<Query<LedgerQuery>, QueryRejection>,
) -> Result<Json<LedgerPage>, ApiError> {
    let limit = page_limit(&read_query(query)?)?;
    circle_viewer(&state, &caller, &circle).await?;
    ledger_page(&state, format!("circle:{circle}"), limit).await
}

/// `account`'s newest `limit` entries, read through ReadIndex.
async fn ledger_page(
    state: &ApiState,
    account: String,
    limit: usize,
) -> Result<Json<LedgerPage>, ApiError> {
    let page = read(state, &ReadQuery::default(), move |s| {
        s.ledger(&account, limit)
    })
    .await?;
    Ok(Json(page))
}

/// A farmer's ledger: what its nodes earned, newest first. That farmer and admins.
#[utoipa::path(
    tag = "treasury", get, path = "/api/v1/farmers/{identity}/ledger",
    params(("identity" = String, Path, description = "The farmer's identity id"), LedgerQuery),
    responses(
        (status = 200, body = LedgerPage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
async fn farmer_ledger(
    State(state): State<ApiState>,
    Path(identity): Path<String>,
    caller: Caller,
    query: Result<Query<LedgerQuery>, QueryRejection>,
) -> Result<Json<LedgerPage>, ApiError> {
    let farmer = IdentityId::new(identity);
    if !farmer.is_well_formed() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "identity: 32 lowercase hex characters",
        ));
    }
    let limit = page_limit(&read_query(query)?)?;
    if caller.identity() != Some(&farmer) {
        caller.require(&state, Action::Admin).await?;
    }
    ledger_page(&state, format!("farmer:{farmer}"), limit).await
}

/// Records credits coming in for a circle from outside the grid (a payment the
/// operator received), opening its treasury: from then on its use is charged at
/// its nodes' prices. Admins.
#[utoipa::path(
    tag = "treasury", post, path = "/api/v1/treasury/{circle}/deposits",
    params(("circle" = String, Path, description = "Circle name")),
    request_body = Deposit,
    responses(
        (status = 200, description = "Committed; the treasury as it is now", body = TreasuryView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A circle without members", body = ErrorBody),
    )
)]
async fn deposit(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    Signed(caller, request): Signed<Deposit>,
) -> Result<Json<TreasuryView>, ApiError> {
    check_name("circle", &circle)?;
    caller.require(&state, Action::Admin).await?;
    aigrid_api::treasury::check_movement(&circle, request.amount, &request.memo)?;
    super::access::circle_exists(&state, &circle).await?;
    let command = Command::Deposit {
        circle,
        amount: request.amount,
        memo: request.memo,
        by: caller.identity().cloned(),
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::TreasuryChanged { circle } => Ok(Json(view(&state, circle).await?)),
        other => Err(unexpected(other)),
    }
}

/// `circle`'s treasury as the state holds it now.
async fn view(state: &ApiState, circle: String) -> Result<TreasuryView, ApiError> {
    read(state, &ReadQuery::default(), move |s| {
        s.treasury_view(&circle)
    })
    .await
}

/// Moves credits out of a circle to another account. Always a guarded change of
/// the circle (`treasury.transfer`): the answer is the proposal its quorum
/// approves; a circle that is not governed cannot move credits out (409). The
/// circle's owners.
#[utoipa::path(
    tag = "treasury", post, path = "/api/v1/treasury/{circle}/transfers",
    params(("circle" = String, Path, description = "Circle name")),
    request_body = Transfer,
    responses(
        (status = 202, description = "Proposed; it applies once the circle's quorum approves", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A circle without members", body = ErrorBody),
        (status = 409, description = "Not governed, or more than it has available", body = ErrorBody),
    )
)]
async fn transfer(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    Signed(caller, request): Signed<Transfer>,
) -> Result<Response, ApiError> {
    check_name("circle", &circle)?;
    caller
        .require(&state, Action::Circle(Some(&circle), Role::Owner))
        .await?;
    super::access::circle_exists(&state, &circle).await?;
    let (looked, to, amount, memo) = (
        circle.clone(),
        request.to.clone(),
        request.amount,
        request.memo.clone(),
    );
    state
        .raft
        .read(move |s| s.check_transfer(&looked, &to, amount, &memo))
        .await??;
    let command = Command::Transfer {
        circle,
        to: request.to,
        amount: request.amount,
        memo: request.memo,
        by: caller.identity().cloned(),
        at: state.clock.now(),
    };
    match propose_change(&state, caller.identity(), command).await? {
        Outcome::Applied(Applied::TreasuryChanged { circle }) => {
            Ok(Json(view(&state, circle).await?).into_response())
        }
        outcome => outcome.respond(None, |applied| Err(unexpected(applied))),
    }
}
