//! The model registry's control API routes: register, list, show, relocate and
//! forget models. The registry itself, and the checks a manifest passes as it
//! applies, are [`crate::state::models`]. Handlers run the same checks before
//! proposing, so a bad request writes nothing to the log and gets a clear 400.
//! Manifests are large (a 70 GB model has some 17 000 chunks), so decoding and
//! verifying them runs on blocking threads, their routes have their own body limit
//! and only a few uploads are read at once.

use aigrid_api::manifest::{is_digest, Registration};
use aigrid_api::{ErrorBody, ProposalCreated, Role};
use aigrid_api::{ErrorCode, ModelSummary, ShardHealth, StorageInfo};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Request};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::router::UtoipaMethodRouterExt;
use utoipa_axum::routes;

use super::auth::{signed_bytes, Caller, Signed};
use super::plumbing::{
    check_name, decode_json, propose, propose_change, read, read_query, unexpected, ApiError,
    ApiState, ReadQuery,
};
use crate::state::models::{check_registration, ModelDetail, SetLocations};
use crate::state::Action;
use crate::state::{Applied, Command, ObjectKind, StateError};

/// The area's routes; model writes take bodies up to `max_model_body_bytes`.
pub(super) fn routes(max_model_body_bytes: usize) -> OpenApiRouter<ApiState> {
    // Set on the write routes themselves, so it overrides the router-wide limit for
    // them alone.
    let body = DefaultBodyLimit::max(max_model_body_bytes);
    OpenApiRouter::new()
        .routes(routes!(register_model).layer(body))
        .routes(routes!(list_models))
        .routes(routes!(get_model, delete_model))
        .routes(routes!(set_model_locations).layer(body))
        .routes(routes!(record_model_health))
        .routes(routes!(get_storage))
}

/// The digest in a path: 64 hex characters (case-insensitive), answered lowercase.
fn path_digest(digest: &str) -> Result<String, ApiError> {
    let lower = digest.to_ascii_lowercase();
    if is_digest(&lower) {
        Ok(lower)
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("`{digest}` is not a model digest (64 hex characters)"),
        ))
    }
}

fn model_not_found(digest: &str) -> ApiError {
    StateError::not_found(ObjectKind::Model, digest).into()
}

/// Reads a model upload's body: one of a few at a time (429 beyond), decoded off the
/// async runtime.
async fn upload<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &ApiState,
    req: Request,
    check: impl FnOnce(&T) -> Result<(), ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    upload_as(state, req, Action::Admin, check)
        .await
        .map(|(_, value)| value)
}

/// As [`upload`], for a caller who may do `action` (checked before the body is
/// decoded); answers the caller too, for checks the body decides.
async fn upload_as<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &ApiState,
    req: Request,
    action: Action<'static>,
    check: impl FnOnce(&T) -> Result<(), ApiError> + Send + 'static,
) -> Result<(Caller, T), ApiError> {
    let _permit = state
        .model_uploads
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                ErrorCode::RateLimited,
                "too many model uploads in flight; retry later",
            )
        })?;
    // The signature and the caller's standing are checked before the body is decoded.
    let (caller, bytes) = signed_bytes(state, req).await?;
    caller.require(state, action).await?;
    let value = tokio::task::spawn_blocking(move || {
        let value = decode_json::<T>(&bytes)?;
        check(&value)?;
        Ok::<T, ApiError>(value)
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("decoding the upload: {e}")))??;
    Ok((caller, value))
}

/// Registers a model: its signed manifest and where its shards are. The signature,
/// the manifest's consistency and the locations are checked before anything is
/// committed. A digest already registered is answered as it is, with 200. A model
/// of a circle is registered by the circle's operators (others' by admins), and
/// answers 202 with a proposal when the circle's policy guards registrations.
#[utoipa::path(
    tag = "models", post, path = "/api/v1/models",
    request_body(content = Registration,
        description = "A registration: the signed manifest and where its shards are"),
    responses(
        (status = 201, description = "Model registered and committed", body = ModelSummary),
        (status = 200, description = "Already registered; nothing changed", body = ModelSummary),
        (status = 202, description = "Guarded by the model's circle: proposed, nothing registered yet", body = ProposalCreated),
        (status = 400, description = "Bad signature, inconsistent manifest or locations, or an ed25519-only manifest where the circle requires hybrid ones", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many uploads in flight", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn register_model(State(state): State<ApiState>, req: Request) -> Result<Response, ApiError> {
    let (caller, registration) = upload_as(&state, req, Action::ReadCluster, |r: &Registration| {
        check_registration(r).map(|_| ()).map_err(ApiError::from)
    })
    .await?;
    if let Some(circle) = &registration.circle {
        check_name("circle", circle)?;
    }
    caller
        .require(
            &state,
            Action::Circle(registration.circle.as_deref(), Role::Operator),
        )
        .await?;
    let digest = registration.manifest.manifest.digest();
    // A known digest is answered without writing a large entry to the log again.
    if let Some(summary) = state
        .raft
        .read(|s| s.models_table().summary(&digest))
        .await?
    {
        return Ok((StatusCode::OK, Json(summary)).into_response());
    }
    let command = Command::RegisterModel {
        registration,
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::ModelRegistered { summary, created } => {
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok((status, Json(summary)).into_response())
            }
            other => Err(unexpected(other)),
        })
}

/// `GET /api/v1/models` options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Only models pushed under this name.
    #[serde(default)]
    name: Option<String>,
    /// Serve from this server's applied state.
    #[serde(default)]
    stale: bool,
}

/// Lists models, newest first.
#[utoipa::path(
    tag = "models", get, path = "/api/v1/models",
    params(("name" = Option<String>, Query, description = "Only models of this name"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = [ModelSummary]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn list_models(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<ModelSummary>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    let read_query = ReadQuery { stale: query.stale };
    let name = query.name;
    Ok(Json(
        read(&state, &read_query, |s| s.models(name.as_deref())).await?,
    ))
}

/// Shows one model: its summary, signed manifest and locations.
#[utoipa::path(
    tag = "models", get, path = "/api/v1/models/{digest}",
    params(("digest" = String, Path, description = "The model's digest"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = ModelDetail), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody))
)]
async fn get_model(
    State(state): State<ApiState>,
    Path(digest): Path<String>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<ModelDetail>, ApiError> {
    let query = read_query(query)?;
    let digest = path_digest(&digest)?;
    read(&state, &query, |s| s.model(&digest))
        .await?
        .map(Json)
        .ok_or_else(|| model_not_found(&digest))
}

/// Replaces where a model's shards are (after a repair or a rebalance) and bumps
/// `locations_version`. With `expected_version`, a version that is no longer current
/// is refused with 409. Setting the locations a model already has changes nothing.
#[utoipa::path(
    tag = "models", put, path = "/api/v1/models/{digest}/locations", request_body = SetLocations,
    params(("digest" = String, Path, description = "The model's digest")),
    responses(
        (status = 200, description = "Locations committed; the model as it is now", body = ModelSummary),
        (status = 400, description = "Locations do not fit the manifest", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 409, description = "`expected_version` is not current", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn set_model_locations(
    State(state): State<ApiState>,
    Path(digest): Path<String>,
    req: Request,
) -> Result<Json<ModelSummary>, ApiError> {
    let digest = path_digest(&digest)?;
    let body: SetLocations = upload(&state, req, |_: &SetLocations| Ok(())).await?;
    let checked = state
        .raft
        .read(|s| {
            s.models_table()
                .check_locations(&digest, &body.locations, body.expected_version)
        })
        .await??;
    if let Some(unchanged) = checked {
        return Ok(Json(unchanged));
    }
    let command = Command::SetModelLocations {
        digest,
        locations: body.locations,
        expected_version: body.expected_version,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::ModelLocationsSet(summary) => Ok(Json(summary)),
        other => Err(unexpected(other)),
    }
}

/// Records what a scrub of the model's shards found and what its repair did: the
/// repair loop of a server with a store reports each round, and `GET
/// /api/v1/models` shows the last report. Admins (and the servers) only; a report
/// older than the one kept is answered and changes nothing.
#[utoipa::path(
    tag = "models", put, path = "/api/v1/models/{digest}/health", request_body = ShardHealth,
    params(("digest" = String, Path, description = "The model's digest")),
    responses(
        (status = 200, description = "Recorded; the model as it is now", body = ModelSummary),
        (status = 400, description = "Counts that do not add up", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn record_model_health(
    State(state): State<ApiState>,
    Path(digest): Path<String>,
    Signed(caller, health): Signed<ShardHealth>,
) -> Result<Json<ModelSummary>, ApiError> {
    caller.require(&state, Action::Admin).await?;
    let digest = path_digest(&digest)?;
    health.validate()?;
    let command = Command::RecordModelHealth { digest, health };
    match propose(&state, command).await? {
        Applied::ModelHealthRecorded(summary) => Ok(Json(summary)),
        other => Err(unexpected(other)),
    }
}

/// Forgets a model. Its shards stay on the backends; deployments pinning its digest
/// no longer find it. A circle's model is deleted by the circle's operators (others'
/// by admins), as a proposal (202) when the circle's policy guards deletions.
#[utoipa::path(
    tag = "models", delete, path = "/api/v1/models/{digest}",
    params(("digest" = String, Path, description = "The model's digest")),
    responses(
        (status = 204),
        (status = 202, description = "Guarded by the model's circle: proposed, nothing deleted yet", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
async fn delete_model(
    State(state): State<ApiState>,
    Path(digest): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let digest = path_digest(&digest)?;
    // An unknown model is answered from a linearizable read, without writing.
    let summary = state
        .raft
        .read(|s| s.models_table().summary(&digest))
        .await?
        .ok_or_else(|| model_not_found(&digest))?;
    caller
        .require(
            &state,
            Action::Circle(summary.circle.as_deref(), Role::Operator),
        )
        .await?;
    let command = Command::DeleteModel {
        digest,
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::ModelDeleted { .. } => Ok(StatusCode::NO_CONTENT.into_response()),
            other => Err(unexpected(other)),
        })
}

/// The dispersed store this server was configured with: its backends (never their
/// credentials), the default erasure code and placement policy. No backends when the
/// server has no store.
#[utoipa::path(
    tag = "models", get, path = "/api/v1/storage",
    responses((status = 200, body = StorageInfo))
)]
async fn get_storage(State(state): State<ApiState>) -> Json<StorageInfo> {
    Json(state.storage.as_ref().clone())
}
