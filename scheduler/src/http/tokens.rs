//! Join tokens: what a new node presents, once, to register. Created with their
//! secret shown once; the servers keep only its hash.

use aigrid_api::ErrorBody;
use aigrid_api::{CreateJoinToken, CreatedJoinToken, JoinToken, JoinTokenInfo};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, SignedOptional};
use super::plumbing::{propose, unexpected, ApiError, ApiState};
use crate::random_bytes;
use crate::state::{Action, Applied, Command};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_join_token, list_join_tokens))
        .routes(routes!(delete_join_token))
}

/// Creates a join token. The answer is the only time its secret is shown; the
/// servers keep only its hash.
#[utoipa::path(
    tag = "join-tokens", post, path = "/api/v1/join-tokens", request_body = CreateJoinToken,
    responses(
        (status = 201, description = "Token created and committed", body = CreatedJoinToken),
        (status = 400, body = ErrorBody),
    )
)]
async fn create_join_token(
    State(state): State<ApiState>,
    SignedOptional(caller, request): SignedOptional<CreateJoinToken>,
) -> Result<(StatusCode, Json<CreatedJoinToken>), ApiError> {
    caller.require(&state, Action::Admin).await?;
    request.validate()?;
    let id: [u8; 8] = random_bytes();
    let secret: [u8; 32] = random_bytes();
    // The token pins the cluster CA, so the agent that uses it trusts only its servers.
    let token = JoinToken::from_random(id, secret).with_ca(Some(state.raft.ca_fingerprint()));
    let command = Command::CreateJoinToken {
        id: token.id.clone(),
        secret_hash: token.secret_hash(),
        ttl_secs: request
            .ttl_secs
            .unwrap_or(aigrid_api::auth::DEFAULT_TOKEN_TTL_SECS),
        max_uses: request.max_uses,
        description: request.description,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::JoinTokenCreated(info) => Ok((
            StatusCode::CREATED,
            Json(CreatedJoinToken {
                token: token.to_string(),
                info,
            }),
        )),
        other => Err(unexpected(other)),
    }
}

/// Lists join tokens, without their secrets.
#[utoipa::path(
    tag = "join-tokens", get, path = "/api/v1/join-tokens",
    responses((status = 200, body = [JoinTokenInfo]))
)]
async fn list_join_tokens(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<JoinTokenInfo>>, ApiError> {
    caller.require(&state, Action::Admin).await?;
    Ok(Json(state.raft.read(|s| s.join_tokens()).await?))
}

/// Deletes a join token; nodes that joined with it stay.
#[utoipa::path(
    tag = "join-tokens", delete, path = "/api/v1/join-tokens/{id}",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204), (status = 404, body = ErrorBody))
)]
async fn delete_join_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<StatusCode, ApiError> {
    caller.require(&state, Action::Admin).await?;
    let command = Command::DeleteJoinToken {
        id,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::JoinTokenDeleted { .. } => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}
