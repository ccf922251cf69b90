//! The Human Chain: governed circles (`POST /api/v1/circles`, a circle's
//! governance), proposals and the signed decisions on them, and the audit log with
//! its signed checkpoints, proofs and export.
//!
//! Who may do what:
//! - making a governed circle: admins; reading one's governance: its members (any
//!   role) and admins; changing it: its owners and admins, as a proposal when its
//!   policy guards the change;
//! - proposals: listed and shown to the members of their circle, their signers and
//!   admins; decided only by their signers, each decision signed over the
//!   proposal's digest (checked here early, and again by every server as it applies);
//! - the audit log: any known identity (it shows secrets only as commitments).
//!
//! Strangers (unsigned requests) get 401 from [`super::auth`]; nodes' keys get 403.

use std::time::Duration;

use aigrid_api::{
    AuditCheckpoint, AuditEntry, AuditProof, CircleGovernance, CreateCircle, ErrorBody, ErrorCode,
    Governance, ProposalCreated, ProposalInfo, ProposalState, Role, SignedDecision,
};
use aigrid_consensus::human::export::AuditExport;
use aigrid_consensus::human::note::Checkpoint;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::read_circle;
use super::auth::{Caller, Signed};
use super::plumbing::{
    check_name, not_found, propose, propose_change, read_query, unexpected, ApiError, ApiState,
};
use crate::state::{Action, Applied, ClusterState, Command, Principal};

/// The header a proposal list carries: the audit log's size when it was read, what
/// a watcher passes back as `after`.
pub const AUDIT_SIZE_HEADER: &str = "x-aigrid-audit-size";
/// Longest a watch waits.
const MAX_WATCH: Duration = Duration::from_secs(60);
/// Watches held at once by this process; more answer 429 at once, so waiting
/// clients cannot take every place the door admits.
static WATCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(256);
/// Most entries one `GET /api/v1/audit` answers.
const MAX_AUDIT_PAGE: u64 = 1_000;

/// The area's routes.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_circle))
        .routes(routes!(get_governance, set_governance))
        .routes(routes!(list_proposals))
        .routes(routes!(get_proposal))
        .routes(routes!(decide))
        .routes(routes!(audit_entries))
        .routes(routes!(audit_checkpoint))
        .routes(routes!(audit_proof))
        .routes(routes!(audit_export))
}

/// What signs the audit log's checkpoints: the cluster's audit key, the log's origin
/// (the name its checkpoints carry) and the key's name, the last two from the
/// cluster's id; `None` until the cluster has one.
fn audit_signer(s: &ClusterState) -> Option<(aigrid_api::IdentityKey, String, String)> {
    let cluster_id = s.cluster_id();
    Some((
        s.audit_key()?,
        format!("aigrid/{cluster_id}/human-chain"),
        format!("aigrid-{cluster_id}"),
    ))
}

fn not_ready() -> ApiError {
    ApiError::new(
        ErrorCode::NoQuorum,
        "the cluster has no id yet (its leader sets one at start); try again shortly",
    )
}

/// Checkpoints carry the ML-DSA-65 line beside the ed25519 one, always: the
/// cluster's audit key is hybrid, and a verifier pinning it requires both, so a
/// checkpoint stripped of its post-quantum line does not verify. (A root circle
/// asking for hybrid signatures asks for no more than this.)
const POST_QUANTUM: bool = true;

/// Makes a governed circle: members with weights and roles, and its policy. Admins.
#[utoipa::path(
    tag = "chain", post, path = "/api/v1/circles", request_body = CreateCircle,
    responses(
        (status = 201, description = "Created and committed", body = CircleGovernance),
        (status = 400, description = "A rule of the policy broken, named by field", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "A member the cluster does not know", body = ErrorBody),
        (status = 409, description = "The circle is governed already", body = ErrorBody),
    )
)]
async fn create_circle(
    State(state): State<ApiState>,
    Signed(caller, request): Signed<CreateCircle>,
) -> Result<(StatusCode, Json<CircleGovernance>), ApiError> {
    caller.require(&state, Action::Admin).await?;
    check_name("name", &request.name)?;
    let governance = Governance {
        members: request.members,
        policy: request.policy,
    };
    governance.validate()?;
    let command = Command::SetGovernance {
        circle: request.name,
        governance,
        create: true,
        by: caller.identity().cloned(),
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::CircleGoverned(g) => Ok((StatusCode::CREATED, Json(g))),
        other => Err(unexpected(other)),
    }
}

/// A governed circle's members, weights and policy. Its members and admins.
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/circles/{circle}/governance",
    params(("circle" = String, Path, description = "Circle name")),
    responses(
        (status = 200, body = CircleGovernance), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, description = "Not a governed circle", body = ErrorBody),
    )
)]
async fn get_governance(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    caller: Caller,
) -> Result<Json<CircleGovernance>, ApiError> {
    read_circle(&state, &caller, circle, "governed circle", |s, c| {
        s.governance(c)
    })
    .await
}

/// Replaces a governed circle's members and policy, whole: 202 with a proposal when
/// its policy guards the change (it then needs the old and the new quorum), 200 once
/// applied otherwise. Its owners and admins.
#[utoipa::path(
    tag = "chain", put, path = "/api/v1/circles/{circle}/governance",
    params(("circle" = String, Path, description = "Circle name")),
    request_body = Governance,
    responses(
        (status = 200, description = "Applied and committed", body = CircleGovernance),
        (status = 202, description = "Guarded: proposed, nothing applied yet", body = ProposalCreated),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "Not a governed circle, or an unknown member", body = ErrorBody),
        (status = 409, description = "Too many open proposals", body = ErrorBody),
    )
)]
async fn set_governance(
    State(state): State<ApiState>,
    Path(circle): Path<String>,
    Signed(caller, governance): Signed<Governance>,
) -> Result<Response, ApiError> {
    check_name("circle", &circle)?;
    caller
        .require(&state, Action::Circle(Some(&circle), Role::Owner))
        .await?;
    governance.validate()?;
    let looked = circle.clone();
    if !state
        .raft
        .read(move |s| s.governance(&looked).is_some())
        .await?
    {
        return Err(not_found("governed circle", &circle));
    }
    let command = Command::SetGovernance {
        circle,
        governance,
        create: false,
        by: caller.identity().cloned(),
        at: state.clock.now(),
    };
    propose_change(&state, caller.identity(), command)
        .await?
        .respond(None, |applied| match applied {
            Applied::CircleGoverned(g) => Ok(Json(g).into_response()),
            other => Err(unexpected(other)),
        })
}

/// Whether `caller` may see `proposal`: a member of its circle, one of its signers,
/// or an admin.
fn may_see(s: &ClusterState, who: &Principal, proposal: &ProposalInfo) -> bool {
    s.allows(who, Action::Circle(Some(&proposal.circle), Role::Viewer))
        || matches!(who, Principal::Identity(id)
            if proposal.signers.iter().any(|signer| signer.identity == *id))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ProposalQuery {
    /// Only proposals in this state.
    state: Option<ProposalState>,
    /// Only proposals of this circle.
    circle: Option<String>,
    /// Wait until the audit log has grown past `after` (a proposal was made,
    /// decided or closed, or another change applied), at most `wait` seconds.
    #[serde(default)]
    watch: bool,
    /// The audit size a watcher last saw (the `x-aigrid-audit-size` header); the
    /// size now when absent.
    after: Option<u64>,
    /// Seconds a watch waits at most (default 30, at most 60).
    wait: Option<u64>,
}

/// Proposals the caller may see, newest first; with `watch`, a long poll that
/// answers once something changed. The `x-aigrid-audit-size` header tells a
/// watcher where it is.
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/proposals",
    params(ProposalQuery),
    responses(
        (status = 200, body = [ProposalInfo], headers(("x-aigrid-audit-size" = u64, description = "The audit log's size when read"))),
        (status = 400, description = "Malformed query", body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, description = "Too many watches held", body = ErrorBody),
    )
)]
async fn list_proposals(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ProposalQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = read_query(query)?;
    if query.watch {
        let _watching = WATCHES.try_acquire().map_err(|_| {
            ApiError::new(
                ErrorCode::RateLimited,
                "too many proposal watches are held; retry later",
            )
        })?;
        let size = || state.raft.read_local(|s| s.audit_log().len());
        let after = query.after.unwrap_or_else(size);
        let wait = Duration::from_secs(query.wait.unwrap_or(30)).min(MAX_WATCH);
        let deadline = tokio::time::Instant::now() + wait;
        while size() <= after && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let who = caller.principal.clone();
    let server = caller.server;
    let (size, list) = state
        .raft
        .read(move |s| {
            let list = s.proposals_where(|p| {
                query.state.is_none_or(|st| p.state == st)
                    && query.circle.as_ref().is_none_or(|c| p.circle == *c)
                    && (server || may_see(s, &who, p))
            });
            (s.audit_log().len(), list)
        })
        .await?;
    let mut response = Json(list).into_response();
    response
        .headers_mut()
        .insert(AUDIT_SIZE_HEADER, HeaderValue::from(size));
    Ok(response)
}

/// One proposal: its payload, digest, frozen signers and decisions.
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/proposals/{id}",
    params(("id" = String, Path, description = "Proposal id")),
    responses((status = 200, body = ProposalInfo), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody))
)]
async fn get_proposal(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<ProposalInfo>, ApiError> {
    let looked = id.clone();
    let who = caller.principal.clone();
    let (found, visible) = state
        .raft
        .read(move |s| match s.proposal(&looked) {
            Some(p) => (Some(p.clone()), may_see(s, &who, p)),
            None => (None, false),
        })
        .await?;
    let proposal = found.ok_or_else(|| not_found("proposal", &id))?;
    if !(visible || caller.server) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "proposal `{id}` is shown to the members of circle `{}` and its signers",
                proposal.circle
            ),
        ));
    }
    Ok(Json(proposal))
}

/// Records the caller's signed decision (approve, reject, veto) on a proposal; the
/// change applies at the decision that completes its quorum. Its signers only.
#[utoipa::path(
    tag = "chain", post, path = "/api/v1/proposals/{id}/approvals",
    params(("id" = String, Path, description = "Proposal id")),
    request_body = SignedDecision,
    responses(
        (status = 200, description = "Recorded and committed; the proposal as it is now", body = ProposalInfo),
        (status = 400, description = "Malformed or unverifiable signature, or not hybrid where required", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not a signer, or a veto by a member outside the veto set", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already decided, wrong digest, or the proposal is expired, stale, vetoed or closed", body = ErrorBody),
    )
)]
async fn decide(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Signed(caller, signed): Signed<SignedDecision>,
) -> Result<Json<ProposalInfo>, ApiError> {
    let by = caller.identity().cloned().ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotASigner,
            "only a person's identity decides proposals",
        )
    })?;
    let looked = id.clone();
    let proposal = state
        .raft
        .read(move |s| s.proposal(&looked).cloned())
        .await?
        .ok_or_else(|| not_found("proposal", &id))?;
    if !proposal.signers.iter().any(|s| s.identity == by) {
        return Err(ApiError::new(
            ErrorCode::NotASigner,
            format!(
                "`{by}` is not a signer of proposal `{id}` (circle `{}`, version {})",
                proposal.circle, proposal.circle_version
            ),
        ));
    }
    // A second decision by one signer is refused here; the apply path takes an
    // identical replay as the same decision (a retried request).
    if let Some(d) = proposal.decisions.iter().find(|d| d.identity == by) {
        if d.signature != signed.signature {
            return Err(ApiError::new(
                ErrorCode::AlreadyDecided,
                format!("`{by}` already decided ({}) on proposal `{id}`", d.decision),
            ));
        }
    }
    let command = Command::Decide {
        proposal: id,
        by,
        signed,
        at: state.clock.now(),
    };
    match propose(&state, command).await? {
        Applied::Decided(info) => Ok(Json(info)),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// The first entry (default 0).
    from: Option<u64>,
    /// Most entries to answer (default and at most 1000).
    limit: Option<u64>,
}

fn audit_entry(seq: u64, leaf: &str) -> AuditEntry {
    AuditEntry {
        seq,
        leaf: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(leaf),
        event: serde_json::from_str(leaf).unwrap_or(serde_json::Value::Null),
    }
}

/// The audit log's entries, oldest first: every applied control change and every
/// proposal event. Any known identity.
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/audit",
    params(AuditQuery),
    responses((status = 200, body = [AuditEntry]), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody))
)]
async fn audit_entries(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let query = read_query(query)?;
    let from = query.from.unwrap_or(0);
    let limit = query.limit.unwrap_or(MAX_AUDIT_PAGE).min(MAX_AUDIT_PAGE);
    let entries = state
        .raft
        .read(move |s| {
            let leaves = s.audit_log().leaves();
            let start = usize::try_from(from)
                .unwrap_or(usize::MAX)
                .min(leaves.len());
            let end = start.saturating_add(usize::try_from(limit).unwrap_or(usize::MAX));
            leaves[start..end.min(leaves.len())]
                .iter()
                .enumerate()
                .map(|(i, leaf)| audit_entry(from + i as u64, leaf))
                .collect()
        })
        .await?;
    Ok(Json(entries))
}

/// The log's size and root now, signed by the cluster's audit key as a C2SP note
/// (an ed25519 line and an ML-DSA-65 line).
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/audit/checkpoint",
    responses((status = 200, body = AuditCheckpoint), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn audit_checkpoint(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<AuditCheckpoint>, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let signed = state
        .raft
        .read(|s| {
            let (key, origin, key_name) = audit_signer(s)?;
            let checkpoint = Checkpoint {
                origin,
                size: s.audit_log().len(),
                root: s.audit_log().root(),
            };
            Some(AuditCheckpoint {
                note: checkpoint.sign(&key, &key_name, POST_QUANTUM),
                size: checkpoint.size,
                root: hex::encode(checkpoint.root),
                cluster_key: key.public(),
            })
        })
        .await?;
    signed.map(Json).ok_or_else(not_ready)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ProofQuery {
    /// An inclusion proof of this entry.
    index: Option<u64>,
    /// A consistency proof from this older size.
    from: Option<u64>,
    /// The tree size the proof is for (default: the log's size now).
    size: Option<u64>,
}

fn hexes(hashes: Vec<[u8; 32]>) -> Vec<String> {
    hashes.into_iter().map(hex::encode).collect()
}

/// An inclusion proof (`?index=N[&size=S]`) or a consistency proof
/// (`?from=M[&size=S]`) of the audit log, RFC 6962.
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/audit/proof",
    params(ProofQuery),
    responses(
        (status = 200, body = AuditProof),
        (status = 400, description = "Neither or both of index and from, or out of range", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    )
)]
async fn audit_proof(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<ProofQuery>, QueryRejection>,
) -> Result<Json<AuditProof>, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let q = read_query(query)?;
    let bad = |m: &str| ApiError::new(ErrorCode::InvalidField, m.to_owned());
    if q.index.is_some() == q.from.is_some() {
        return Err(bad(
            "give either `index` (inclusion) or `from` (consistency)",
        ));
    }
    let proof = state
        .raft
        .read(move |s| {
            let log = s.audit_log();
            let size = q.size.unwrap_or(log.len());
            if size > log.len() {
                return None;
            }
            // A proof for an older size is the one of the log's first `size` entries,
            // whose tree is built for it; the log's own tree answers for its size now.
            let leaves = &log.leaves()[..usize::try_from(size).ok()?];
            let older_tree;
            let tree = if size == log.len() {
                log
            } else {
                older_tree =
                    aigrid_consensus::human::audit::AuditLog::from_leaves(leaves.iter().cloned());
                &older_tree
            };
            let root = hex::encode(tree.root());
            if let Some(index) = q.index {
                let hashes = tree.prove_inclusion(index)?;
                Some(AuditProof {
                    size,
                    root,
                    hashes: hexes(hashes),
                    index: Some(index),
                    leaf: Some(audit_entry(index, tree.leaf(index)?).leaf),
                    from: None,
                    from_root: None,
                })
            } else {
                let from = q.from?;
                let hashes = tree.prove_consistency(from)?;
                let older =
                    aigrid_consensus::human::audit::root_of(&leaves[..usize::try_from(from).ok()?]);
                Some(AuditProof {
                    size,
                    root,
                    hashes: hexes(hashes),
                    index: None,
                    leaf: None,
                    from: Some(from),
                    from_root: Some(hex::encode(older)),
                })
            }
        })
        .await?;
    proof.map(Json).ok_or_else(|| {
        bad("out of range: `index` below `size`, `from` from 1 to `size`, `size` at most the log's")
    })
}

/// The whole audit log with a checkpoint of it signed by the cluster's audit key:
/// the file `aigrid audit verify` checks offline. Any known identity.
#[utoipa::path(
    tag = "chain", get, path = "/api/v1/audit/export",
    responses(
        (status = 200, description = "The export file, byte for byte", content_type = "application/json", body = Object),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    )
)]
async fn audit_export(State(state): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require(&state, Action::ReadCluster).await?;
    let export = state
        .raft
        .read(|s| {
            let (key, origin, key_name) = audit_signer(s)?;
            Some(AuditExport::signed(
                &origin,
                &key_name,
                &key,
                POST_QUANTUM,
                s.audit_log()
                    .leaves()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ))
        })
        .await?
        .ok_or_else(not_ready)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        export.to_bytes(),
    )
        .into_response())
}
