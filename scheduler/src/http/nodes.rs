//! Nodes as users see and steer them: list, show (with the readings their agents
//! reported to this server), their allocations, drain and undrain, revoke.

use aigrid_api::{
    Allocation, DrainSpec, ErrorBody, ErrorCode, Node, NodeId, NodeStatus, ProposalCreated,
};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, SignedOptional};
use super::plumbing::{
    not_found, propose, propose_change, read, read_query, unexpected, ApiError, ApiState, Outcome,
    ReadQuery,
};
use crate::state::{Action, Applied, Command};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_nodes))
        .routes(routes!(get_node))
        .routes(routes!(node_allocations))
        .routes(routes!(drain_node, undrain_node))
        .routes(routes!(revoke_node))
}

fn node_not_found(id: &str) -> ApiError {
    not_found("node", id)
}

/// The node as it is once `command` is committed, or 404 (without writing to the
/// log) for an unknown node. `skip` answers, from the current view, whether the
/// command would change nothing or must be refused.
async fn change_node(
    state: &ApiState,
    id: String,
    command: Command,
    skip: impl FnOnce(&Node) -> Result<bool, ApiError> + Send,
) -> Result<Json<Node>, ApiError> {
    let node_id = NodeId::new(id.clone());
    let node = state
        .raft
        .read(|s| s.node(&node_id))
        .await?
        .ok_or_else(|| node_not_found(&id))?;
    if skip(&node)? {
        return Ok(Json(node));
    }
    match propose(state, command).await? {
        Applied::NodeUpdated { .. } => {}
        other => return Err(unexpected(other)),
    }
    state
        .raft
        .read(|s| s.node(&node_id))
        .await?
        .map(Json)
        .ok_or_else(|| node_not_found(&id))
}

/// Drains a node: it gets no new work, and its allocations are migrated elsewhere,
/// at most `max_parallel` at a time. An empty body drains one at a time; draining a
/// draining node changes its pace.
#[utoipa::path(
    tag = "nodes", post, path = "/api/v1/nodes/{id}/drain", request_body(content = DrainSpec, description = "Optional: an empty body drains one at a time"),
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Drain committed; the node as it is now", body = Node),
        (status = 400, description = "Invalid drain", body = ErrorBody),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn drain_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    SignedOptional(caller, drain): SignedOptional<DrainSpec>,
) -> Result<Json<Node>, ApiError> {
    caller.require(&state, Action::Admin).await?;
    drain.validate()?;
    let command = Command::DrainNode {
        node_id: NodeId::new(id.clone()),
        drain,
        at: state.clock.now(),
    };
    change_node(&state, id, command, |node| {
        Ok(node.status == NodeStatus::Draining && node.drain == Some(drain))
    })
    .await
}

/// Ends a drain: the node takes new work again. Ending the drain of a node that is
/// not draining changes nothing; a node that is down is refused with 409, since it
/// cannot take work until its agent is heard from.
#[utoipa::path(
    tag = "nodes", delete, path = "/api/v1/nodes/{id}/drain",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Drain ended; the node as it is now", body = Node),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 409, description = "The node is down", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn undrain_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Node>, ApiError> {
    caller.require(&state, Action::Admin).await?;
    let command = Command::SetNodeStatus {
        node_id: NodeId::new(id.clone()),
        status: NodeStatus::Ready,
        at: state.clock.now(),
    };
    change_node(&state, id, command, |node| match node.status {
        NodeStatus::Ready => Ok(true),
        NodeStatus::Draining => Ok(false),
        NodeStatus::Down => Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "node `{}` is down; it can be undrained once its agent is heard from",
                node.id
            ),
        )),
    })
    .await
}

/// The allocations on a node, ordered by id, including ones being stopped: what its
/// agent should run or stop.
#[utoipa::path(
    tag = "nodes", get, path = "/api/v1/nodes/{id}/allocations",
    params(("id" = String, Path, description = "Node id"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = [Allocation]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn node_allocations(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<Allocation>>, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let query = read_query(query)?;
    let node_id = NodeId::new(id.clone());
    read(&state, &query, |s| {
        s.node(&node_id).map(|_| s.node_allocations(&node_id))
    })
    .await?
    .map(Json)
    .ok_or_else(|| node_not_found(&id))
}

/// Lists nodes with what their allocations hold.
#[utoipa::path(
    tag = "nodes", get, path = "/api/v1/nodes",
    params(("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = [Node]), (status = 400, description = "Malformed query", body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn list_nodes(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Vec<Node>>, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let query = read_query(query)?;
    let nodes = read(&state, &query, |s| s.nodes()).await?;
    Ok(Json(
        nodes
            .into_iter()
            .map(|n| state.agents.with_telemetry(n))
            .collect(),
    ))
}

/// Shows one node with what its allocations hold.
#[utoipa::path(
    tag = "nodes", get, path = "/api/v1/nodes/{id}",
    params(("id" = String, Path, description = "Node id"),
           ("stale" = Option<bool>, Query, description = "Serve from local state")),
    responses((status = 200, body = Node), (status = 400, description = "Malformed query", body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Node>, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let query = read_query(query)?;
    let node_id = NodeId::new(id.clone());
    read(&state, &query, |s| s.node(&node_id))
        .await?
        .map(|n| Json(state.agents.with_telemetry(n)))
        .ok_or_else(|| node_not_found(&id))
}

/// Revokes a node's key: its agent's requests are refused from now on, the node is
/// marked down and its instances are rescheduled. It may join again only with a
/// new key and a join token.
#[utoipa::path(
    tag = "nodes", post, path = "/api/v1/nodes/{id}/revoke",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "Revocation committed; the node as it is now", body = Node),
        (status = 202, description = "Guarded by the root circle: proposed, the key still valid until it applies", body = ProposalCreated),
        (status = 404, description = "Unknown node", body = ErrorBody),
        (status = 503, description = "No quorum", body = ErrorBody),
    )
)]
async fn revoke_node(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(&state, Action::Admin).await?;
    let node_id = NodeId::new(id.clone());
    if state.raft.read(|s| s.node(&node_id)).await?.is_none() {
        return Err(node_not_found(&id));
    }
    let command = Command::RevokeNode {
        node_id: node_id.clone(),
        at: state.clock.now(),
    };
    // Revoking again re-marks the node down and its work lost: always committed.
    let outcome = propose_change(&state, caller.identity(), command).await?;
    if let Outcome::Applied(applied) = &outcome {
        if !matches!(applied, Applied::NodeUpdated { .. }) {
            return Err(unexpected(applied.clone()));
        }
    }
    let node = state
        .raft
        .read(|s| s.node(&node_id))
        .await?
        .ok_or_else(|| node_not_found(&id))?;
    outcome.respond(None, |_| Ok(Json(node).into_response()))
}
