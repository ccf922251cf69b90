//! Who may do what: `GET /api/v1/whoami`; identities (admins only); circles'
//! members (admins and the circle's owners; members may read); circles' API keys
//! for `/v1` (admins and the circle's owners), shown once, kept as hashes.

use aigrid_api::{
    AddIdentity, ApiKey, ApiKeyInfo, CircleInfo, CreateApiKey, CreatedApiKey, ErrorBody,
    IdentityId, IdentityInfo, ProposalCreated, Role, SetMember, WhoAmI,
};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Signed, SignedOptional};
use super::plumbing::{
    check_name, not_found, propose, propose_change, unexpected, ApiError, ApiState,
};
use crate::random_bytes;
use crate::state::{Action, Applied, Command, Principal};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(add_identity, list_identities))
        .routes(routes!(remove_identity))
        .routes(routes!(list_circles))
        .routes(routes!(get_circle))
        .routes(routes!(set_member, remove_member))
        .routes(routes!(create_api_key, list_api_keys))
        .routes(routes!(revoke_api_key))
}

/// Who the server takes the caller for: its key id, name, admin flag and roles.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/whoami",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody))
)]
async fn whoami(State(state): State<ApiState>, caller: Caller) -> Json<WhoAmI> {
    let answer = state.raft.read_local(|s| match &caller.principal {
        Principal::Identity(id) => {
            let info = s.identity(id);
            WhoAmI {
                key_id: id.to_string(),
                name: info.map(|i| i.name.clone()),
                admin: info.is_some_and(|i| i.admin),
                circles: s.roles_of(id),
            }
        }
        Principal::Node(node) => WhoAmI {
            key_id: format!("node:{node}"),
            name: Some(node.to_string()),
            admin: false,
            circles: Vec::new(),
        },
    });
    Json(answer)
}

/// Adds an identity (or changes its name or admin flag). Admins only.
#[utoipa::path(
    tag = "access", post, path = "/api/v1/identities", request_body = AddIdentity,
    responses(
        (status = 201, description = "Added and committed", body = IdentityInfo),
        (status = 202, description = "Making or unmaking an admin, guarded by the root circle: proposed", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, description = "Would demote the last admin", body = ErrorBody),
    )
)]
async fn add_identity(
    State(state): State<ApiState>,
    Signed(caller, request): Signed<AddIdentity>,
) -> Result<Response, ApiError> {
    caller.require(&state, Action::Admin).await?;
    request.validate()?;
    let command = Command::PutIdentity {
        name: request.name,
        public_key: request.public_key,
        admin: request.admin,
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::IdentityPut(info) => Ok((StatusCode::CREATED, Json(info)).into_response()),
            other => Err(unexpected(other)),
        })
}

/// Every known identity. Admins only.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/identities",
    responses((status = 200, body = [IdentityInfo]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
async fn list_identities(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<IdentityInfo>>, ApiError> {
    caller.require(&state, Action::Admin).await?;
    Ok(Json(state.raft.read(|s| s.identities()).await?))
}

/// Forgets an identity and its roles. Admins only; the last admin stays.
#[utoipa::path(
    tag = "access", delete, path = "/api/v1/identities/{id}",
    params(("id" = String, Path, description = "Identity id")),
    responses(
        (status = 200, body = IdentityInfo),
        (status = 202, description = "Removing an admin, guarded by the root circle: proposed", body = ProposalCreated),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The last admin, or a member of a governed circle", body = ErrorBody),
    )
)]
async fn remove_identity(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(&state, Action::Admin).await?;
    let id = IdentityId::new(id);
    let looked = id.clone();
    let info = state
        .raft
        .read(move |s| s.identity(&looked).cloned())
        .await?
        .ok_or_else(|| not_found("identity", id.as_str()))?;
    let command = Command::RemoveIdentity {
        id,
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::IdentityRemoved { .. } => Ok(Json(info).into_response()),
            other => Err(unexpected(other)),
        })
}

/// The circles the caller may see (all, for admins) with their members.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/circles",
    responses((status = 200, body = [CircleInfo]), (status = 401, body = ErrorBody))
)]
async fn list_circles(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<CircleInfo>>, ApiError> {
    let circles = state.raft.read(|s| s.circles()).await?;
    Ok(Json(
        circles
            .into_iter()
            .filter(|c| caller.may(&state, Action::Circle(Some(&c.name), Role::Viewer)))
            .collect(),
    ))
}

/// One circle and its members. Its members and admins.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/circles/{circle}",
    params(("circle" = String, Path, description = "Circle name")),
    responses((status = 200, body = CircleInfo), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_circle(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
) -> Result<Json<CircleInfo>, ApiError> {
    read_circle(&state, &caller, circle, "circle", |s, c| s.circle(c)).await
}

/// A view of `circle` that its members (any role) and admins may read, 404 naming
/// `what` when `view` finds nothing.
pub(super) async fn read_circle<T: Send + 'static>(
    state: &ApiState,
    caller: &Caller,
    circle: String,
    what: &str,
    view: impl FnOnce(&crate::state::ClusterState, &str) -> Option<T> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    caller
        .require(state, Action::Circle(Some(&circle), Role::Viewer))
        .await?;
    let looked = circle.clone();
    state
        .raft
        .read(move |s| view(s, &looked))
        .await?
        .map(Json)
        .ok_or_else(|| not_found(what, &circle))
}

/// Gives a known identity a role in a circle. Admins and the circle's owners.
#[utoipa::path(
    tag = "access", put, path = "/api/v1/circles/{circle}/members/{identity}",
    params(("circle" = String, Path, description = "Circle name"), ("identity" = String, Path, description = "Identity id")),
    request_body = SetMember,
    responses(
        (status = 200, description = "The circle as it is now", body = CircleInfo),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, description = "Unknown identity", body = ErrorBody),
    )
)]
async fn set_member(
    State(state): State<ApiState>,
    Path((circle, identity)): Path<(String, String)>,
    Signed(caller, request): Signed<SetMember>,
) -> Result<Json<CircleInfo>, ApiError> {
    change_member(&state, &caller, circle, identity, Some(request.role)).await
}

/// Takes a member's role away. Admins and the circle's owners.
#[utoipa::path(
    tag = "access", delete, path = "/api/v1/circles/{circle}/members/{identity}",
    params(("circle" = String, Path, description = "Circle name"), ("identity" = String, Path, description = "Identity id")),
    responses(
        (status = 200, description = "The circle as it is now", body = CircleInfo),
        (status = 400, description = "Not a circle name", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
async fn remove_member(
    State(state): State<ApiState>,
    Path((circle, identity)): Path<(String, String)>,
    caller: Caller,
) -> Result<Json<CircleInfo>, ApiError> {
    change_member(&state, &caller, circle, identity, None).await
}

/// 404 for a circle nobody has a role in: its keys would serve no one's models.
pub(super) async fn circle_exists(state: &ApiState, circle: &str) -> Result<(), ApiError> {
    let looked = circle.to_owned();
    if state
        .raft
        .read(move |s| s.circle(&looked).is_some())
        .await?
    {
        Ok(())
    } else {
        Err(not_found("circle", circle))
    }
}

async fn change_member(
    state: &ApiState,
    caller: &Caller,
    circle: String,
    identity: String,
    role: Option<Role>,
) -> Result<Json<CircleInfo>, ApiError> {
    check_name("circle", &circle)?;
    caller
        .require(state, Action::Circle(Some(&circle), Role::Owner))
        .await?;
    let command = Command::SetCircleMember {
        circle,
        identity: IdentityId::new(identity),
        role,
        at: state.clock.now(),
    };
    match propose(state, command).await? {
        Applied::CircleChanged(info) => Ok(Json(info)),
        other => Err(unexpected(other)),
    }
}

/// Creates an API key for the circle's models on `/v1`. The answer is the only
/// time it is shown. Admins and the circle's owners.
#[utoipa::path(
    tag = "access", post, path = "/api/v1/circles/{circle}/api-keys",
    params(("circle" = String, Path, description = "Circle name")),
    request_body = CreateApiKey,
    responses(
        (status = 201, description = "Created and committed", body = CreatedApiKey),
        (status = 202, description = "Guarded by the circle: proposed; the key, shown this once, works once it applies", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A circle without members", body = ErrorBody),
    )
)]
async fn create_api_key(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    SignedOptional(caller, request): SignedOptional<CreateApiKey>,
) -> Result<Response, ApiError> {
    check_name("circle", &circle)?;
    caller
        .require(&state, Action::Circle(Some(&circle), Role::Owner))
        .await?;
    request.validate()?;
    circle_exists(&state, &circle).await?;
    let bytes = random_bytes::<40>();
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&bytes[8..]);
    let key = ApiKey::from_random(id, secret);
    let command = Command::CreateApiKey {
        info: ApiKeyInfo {
            id: key.id.clone(),
            circle,
            name: request.name,
            created_at: state.clock.now(),
        },
        secret_hash: key.secret_hash(),
    };
    let shown = key.to_string();
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(Some(shown.clone()), |applied| match applied {
            Applied::ApiKeyCreated(info) => Ok((
                StatusCode::CREATED,
                Json(CreatedApiKey { key: shown, info }),
            )
                .into_response()),
            other => Err(unexpected(other)),
        })
}

/// The circle's API keys, never their secrets. Admins and the circle's owners.
#[utoipa::path(
    tag = "access", get, path = "/api/v1/circles/{circle}/api-keys",
    params(("circle" = String, Path, description = "Circle name")),
    responses((status = 200, body = [ApiKeyInfo]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, description = "A circle without members", body = ErrorBody))
)]
async fn list_api_keys(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiError> {
    caller
        .require(&state, Action::Circle(Some(&circle), Role::Owner))
        .await?;
    circle_exists(&state, &circle).await?;
    Ok(Json(
        state.raft.read(move |s| s.api_keys(Some(&circle))).await?,
    ))
}

/// Revokes an API key at once. Admins and the circle's owners.
#[utoipa::path(
    tag = "access", delete, path = "/api/v1/circles/{circle}/api-keys/{id}",
    params(("circle" = String, Path, description = "Circle name"), ("id" = String, Path, description = "The key's public id")),
    responses(
        (status = 200, body = ApiKeyInfo),
        (status = 202, description = "Guarded by the circle: proposed, still valid until it applies", body = ProposalCreated),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    )
)]
async fn revoke_api_key(
    State(state): State<ApiState>,
    Path((circle, id)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller
        .require(&state, Action::Circle(Some(&circle), Role::Owner))
        .await?;
    let looked = (circle.clone(), id.clone());
    let known = state
        .raft
        .read(move |s| {
            s.api_keys(Some(&looked.0))
                .into_iter()
                .any(|k| k.id == looked.1)
        })
        .await?;
    if !known {
        return Err(not_found("API key", &format!("{circle}/{id}")));
    }
    let command = Command::RevokeApiKey {
        id,
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::ApiKeyRevoked(info) => Ok(Json(info).into_response()),
            other => Err(unexpected(other)),
        })
}
