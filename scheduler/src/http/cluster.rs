//! The replicated control plane itself: its status, and servers joining and
//! leaving. Each change of servers is first granted by a command (so the audit log
//! records it, and the root circle's quorum approves it when its policy guards
//! `cluster.membership`), then made, then its grant is used up.

use std::time::{Duration, Instant};

use aigrid_api::{ClusterStatus, ErrorCode, JoinRequest, Member, MemberRole};
use aigrid_api::{ErrorBody, ProposalCreated};
use aigrid_consensus::{MembershipChange, RaftNode};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Caller, Signed};
use super::plumbing::{propose_change, unexpected, ApiError, ApiState, Outcome};
use crate::state::{Action, ClusterState, Command, ServerChange};

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(get_cluster))
        .routes(routes!(join_member))
        .routes(routes!(leave_member))
}

fn cluster_status(raft: &RaftNode<ClusterState>) -> ClusterStatus {
    let status = raft.status();
    ClusterStatus {
        id: status.id,
        leader: status.leader,
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        members: status
            .members
            .iter()
            .map(|(id, addr)| Member {
                id: *id,
                addr: addr.clone(),
                role: if status.learners.contains(id) {
                    MemberRole::Learner
                } else {
                    MemberRole::Voter
                },
                is_leader: status.leader == Some(*id),
            })
            .collect(),
    }
}

/// This server's view of the control plane: leader, term, indices, members.
#[utoipa::path(
    tag = "cluster", get, path = "/api/v1/cluster",
    responses((status = 200, body = ClusterStatus))
)]
async fn get_cluster(State(state): State<ApiState>) -> Json<ClusterStatus> {
    Json(cluster_status(&state.raft))
}

/// How long the joining server's peer listener has to answer the check.
const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);

/// Makes sure `change` is allowed before it is made: its grant applied already, or
/// applies now (recorded in the audit log like every control change), or, when the
/// root circle guards `cluster.membership`, is proposed: then the 202 to answer.
async fn granted(
    state: &ApiState,
    caller: &Caller,
    change: ServerChange,
) -> Result<Option<Response>, ApiError> {
    let (id, want) = (change.id(), change.clone());
    if state
        .raft
        .read(move |s| s.membership_grant(id) == Some(&want))
        .await?
    {
        return Ok(None);
    }
    let command = Command::GrantMembership {
        change,
        by: caller.identity().cloned(),
        at: state.clock.now(),
    };
    match propose_change(state, caller.identity(), command).await? {
        Outcome::Applied(_) => Ok(None),
        proposed => proposed.respond(None, |a| Err(unexpected(a))).map(Some),
    }
}

/// Uses up the grant for server `id` once its change is made.
async fn use_grant(state: &ApiState, id: u64) {
    let command = Command::UseMembershipGrant {
        id,
        at: state.clock.now(),
    };
    if let Err(e) = state.raft.propose(&command).await {
        tracing::warn!(server = id, error = %e, "using up a membership grant");
    }
}

/// Adds a server: first as a learner that catches up from a snapshot, then, once
/// caught up, as a voter. Answers after the promotion.
///
/// Before anything is proposed, the address must answer on its peer listener with a
/// certificate from the cluster CA naming the requested id: a join cannot point the
/// cluster at an address that is not that server's. A join naming a member's id or
/// address (this server's included) is a conflict.
#[utoipa::path(
    tag = "cluster", post, path = "/api/v1/cluster/members", request_body = JoinRequest,
    responses((status = 201, body = ClusterStatus),
              (status = 202, description = "Guarded by the root circle: proposed; send the request again once it applied", body = ProposalCreated),
              (status = 400, description = "Malformed or invalid request, or no server with that id answers at that address", body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn join_member(
    State(state): State<ApiState>,
    Signed(caller, req): Signed<JoinRequest>,
) -> Result<Response, ApiError> {
    caller.require(&state, Action::Admin).await?;
    req.validate()?;
    // Confirm the membership we check against is current.
    let members = state
        .raft
        .read(|_| ())
        .await
        .map(|_| state.raft.status().members)?;
    let own = state.raft.status().id;
    if let Some(addr) = members.get(&req.id) {
        let who = if req.id == own { ", this server" } else { "" };
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("server {}{who} is already a member at {addr}", req.id),
        ));
    }
    if let Some((member, _)) = members.iter().find(|(_, addr)| **addr == req.addr) {
        let who = if *member == own { " (this server)" } else { "" };
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "{} is already server {member}'s peer address{who}",
                req.addr
            ),
        ));
    }
    if let Err(why) = state
        .raft
        .probe_peer(req.id, &req.addr, PROBE_TIMEOUT)
        .await
    {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!(
                "addr: server {} does not answer on its peer listener at {} with a \
                 certificate from the cluster CA naming it: {why}",
                req.id, req.addr
            ),
        ));
    }
    let change = ServerChange::Add {
        id: req.id,
        addr: req.addr.clone(),
    };
    if let Some(proposed) = granted(&state, &caller, change).await? {
        return Ok(proposed);
    }
    state
        .raft
        .change_membership(MembershipChange::Add {
            id: req.id,
            addr: req.addr,
        })
        .await?;
    use_grant(&state, req.id).await;
    // It joined as a learner; answer once the leader has promoted it to voter.
    let deadline = Instant::now() + state.raft.request_timeout();
    loop {
        let status = state.raft.status();
        if status.members.contains_key(&req.id) && !status.learners.contains(&req.id) {
            return Ok((StatusCode::CREATED, Json(cluster_status(&state.raft))).into_response());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "server {} joined as a learner but has not caught up within {:?}; \
                     it becomes a voter once it has",
                    req.id,
                    state.raft.request_timeout()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes a voter. When it is the leader, leadership moves to another voter first.
#[utoipa::path(
    tag = "cluster", delete, path = "/api/v1/cluster/members/{id}",
    params(("id" = u64, Path, description = "Server id")),
    responses((status = 200, body = ClusterStatus),
              (status = 202, description = "Guarded by the root circle: proposed; send the request again once it applied", body = ProposalCreated),
              (status = 400, description = "The id is not a server id", body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody))
)]
async fn leave_member(
    State(state): State<ApiState>,
    id: Result<Path<u64>, PathRejection>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(&state, Action::Admin).await?;
    let Path(id) = id.map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    state.raft.read(|_| ()).await?;
    let status = state.raft.status();
    if !status.members.contains_key(&id) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("server {id} is not a member"),
        ));
    }
    if status.members.len() == 1 {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "cannot remove the last server of the cluster",
        ));
    }
    if let Some(proposed) = granted(&state, &caller, ServerChange::Remove { id }).await? {
        return Ok(proposed);
    }
    if status.leader == Some(id) {
        let target = *status
            .members
            .keys()
            .find(|m| **m != id)
            .expect("more than one member");
        state.raft.transfer_leader(target)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while state.raft.status().leader == Some(id) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    state
        .raft
        .change_membership(MembershipChange::Remove { id })
        .await?;
    use_grant(&state, id).await;
    Ok(Json(cluster_status(&state.raft)).into_response())
}
