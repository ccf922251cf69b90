//! The Human Chain as the control API shows it: circles with members, weights and an
//! approval policy; proposals (guarded changes waiting for their quorum); the
//! approvals, rejections and vetoes members sign; and the audit log's entries,
//! checkpoints and proofs.
//!
//! The rules themselves (what a digest covers, how approvals are counted, how the
//! audit log is hashed and its checkpoints signed) are `aigrid_consensus::human`'s;
//! these are only the shapes that cross the wire.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::access::Role;
use crate::identity::{IdentityId, PublicKey};
use crate::units::Timestamp;
use crate::ValidationError;

wire_enum!(
    /// A kind of change a circle's policy may guard. A guarded change is not applied
    /// when requested: it becomes a proposal that applies once the circle's quorum
    /// approves it.
    ChangeKind {
        /// Submitting a job whose name is new.
        JobCreate => "job.create",
        /// Submitting a new spec for a live job.
        JobUpdate => "job.update",
        /// Deleting a job.
        JobDelete => "job.delete",
        /// Raising a job's instance count above the policy's `scale_limit`, even where
        /// `job.update` is not guarded.
        JobScale => "job.scale",
        /// Registering a model for the circle.
        ModelRegister => "model.register",
        /// Deleting one of the circle's models.
        ModelDelete => "model.delete",
        /// Promoting a rollout past its canaries.
        RolloutPromote => "rollout.promote",
        /// Creating or revoking one of the circle's API keys.
        ApiKeys => "api_keys",
        /// Revoking a node's key (the root circle's).
        NodeRevoke => "node.revoke",
        /// Adding or removing a control-plane server, or an admin (the root circle's).
        ClusterMembership => "cluster.membership",
        /// The circle's own members: adding, removing, changing a weight or role.
        CircleMembers => "circle.members",
        /// The circle's own policy.
        CirclePolicy => "circle.policy",
        /// Moving credits out of the circle's treasury: guarded in every governed
        /// circle, whatever its policy lists.
        TreasuryTransfer => "treasury.transfer",
        /// Submitting a job that raises what the circle's jobs may cost per hour
        /// (at the highest prices nodes ask) above the policy's `spend_limit`,
        /// even where `job.create` and `job.update` are not guarded.
        TreasurySpend => "treasury.spend",
    }
);

impl ChangeKind {
    /// What a new circle guards until its policy says otherwise: every change to its
    /// jobs, models, keys, members and policy.
    pub fn circle_default() -> BTreeSet<ChangeKind> {
        [
            ChangeKind::JobCreate,
            ChangeKind::JobUpdate,
            ChangeKind::JobDelete,
            ChangeKind::JobScale,
            ChangeKind::ModelRegister,
            ChangeKind::ModelDelete,
            ChangeKind::RolloutPromote,
            ChangeKind::ApiKeys,
            ChangeKind::CircleMembers,
            ChangeKind::CirclePolicy,
            ChangeKind::TreasuryTransfer,
        ]
        .into_iter()
        .collect()
    }

    /// What the root circle guards: cluster-wide changes (node keys, servers and
    /// admins) and its own members and policy.
    pub fn root_default() -> BTreeSet<ChangeKind> {
        [
            ChangeKind::NodeRevoke,
            ChangeKind::ClusterMembership,
            ChangeKind::CircleMembers,
            ChangeKind::CirclePolicy,
        ]
        .into_iter()
        .collect()
    }

    /// Whether changing this kind needs the old and the new quorum (rule 4).
    pub fn changes_signers(self) -> bool {
        matches!(self, ChangeKind::CircleMembers | ChangeKind::CirclePolicy)
    }
}

/// The name of the circle that guards cluster-wide changes.
pub const ROOT_CIRCLE: &str = "root";

/// Most members a circle may have.
pub const MAX_MEMBERS: usize = 64;
/// Largest weight of one member.
pub const MAX_WEIGHT: u32 = 1_000;
/// Longest approval window a policy may set: 90 days.
pub const MAX_WINDOW_SECS: u64 = 90 * 24 * 3600;
/// The approval window of a new circle: 7 days.
pub const DEFAULT_WINDOW_SECS: u64 = 7 * 24 * 3600;

/// One member of a governed circle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyMember {
    /// The member.
    pub identity: IdentityId,
    /// Its weight in approvals.
    #[serde(default = "one")]
    pub weight: u32,
    /// Its role: what it may request (operators submit jobs, owners manage the circle).
    #[serde(default = "owner")]
    pub role: Role,
}

fn one() -> u32 {
    1
}

fn owner() -> Role {
    Role::Owner
}

/// A circle's approval policy. Every number here comes from the circle, never from
/// whoever proposes a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CirclePolicy {
    /// The change kinds that need the quorum; others apply at once.
    pub guarded: BTreeSet<ChangeKind>,
    /// Total weight of approvals a guarded change needs.
    pub threshold: u32,
    /// Members any one of whom can veto a proposal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub veto: Vec<IdentityId>,
    /// Seconds a proposal stays open at least before it may apply, so every member
    /// has time to see it (and veto it).
    #[serde(default)]
    pub min_window_secs: u64,
    /// Seconds after which an unapplied proposal expires.
    #[serde(default = "default_window")]
    pub max_window_secs: u64,
    /// Approvals must be signed with hybrid (ed25519 + ML-DSA-65) keys.
    #[serde(default)]
    pub require_hybrid: bool,
    /// The circle's models must have hybrid-signed manifests (ed25519 + ML-DSA-65);
    /// an ed25519-only manifest is refused as it registers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_hybrid_manifests: bool,
    /// With `job.scale` guarded: the instance count a job may reach without the
    /// quorum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_limit: Option<u32>,
    /// With `treasury.spend` guarded: the credits per hour the circle's jobs may
    /// cost, at the highest prices nodes ask for what they request, without the
    /// quorum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<crate::Credits>,
}

fn default_window() -> u64 {
    DEFAULT_WINDOW_SECS
}

impl CirclePolicy {
    /// The policy of a new circle: every kind of [`ChangeKind::circle_default`]
    /// guarded, with `threshold`.
    pub fn new(threshold: u32) -> Self {
        CirclePolicy {
            guarded: ChangeKind::circle_default(),
            threshold,
            veto: Vec::new(),
            min_window_secs: 0,
            max_window_secs: DEFAULT_WINDOW_SECS,
            require_hybrid: false,
            require_hybrid_manifests: false,
            scale_limit: None,
            spend_limit: None,
        }
    }

    /// Whether `kind` needs the quorum.
    pub fn guards(&self, kind: ChangeKind) -> bool {
        kind == ChangeKind::TreasuryTransfer || self.guarded.contains(&kind)
    }
}

/// `POST /api/v1/circles`: a governed circle with its members and policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCircle {
    /// The circle's name.
    pub name: String,
    /// Its members, known identities.
    pub members: Vec<PolicyMember>,
    /// Its policy; a new circle's default ([`CirclePolicy::new`]) with the threshold
    /// when only `threshold` is given.
    pub policy: CirclePolicy,
}

/// A circle's members and policy as one document: what `circle.members` and
/// `circle.policy` proposals change, whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Governance {
    /// Members with weights and roles.
    pub members: Vec<PolicyMember>,
    /// The policy.
    pub policy: CirclePolicy,
}

impl Governance {
    /// Checks the rules every governed circle keeps: at least one member, each once,
    /// weights from 1 to [`MAX_WEIGHT`], a threshold the members can reach and that
    /// no single member reaches alone when there are two or more (rule 3), vetoes by
    /// members only, and windows within bounds.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let err = |field: &str, message: String| Err(ValidationError::new(field, message));
        if self.members.is_empty() || self.members.len() > MAX_MEMBERS {
            return err("members", format!("1 to {MAX_MEMBERS} members"));
        }
        let mut seen = BTreeSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.identity.is_well_formed() {
                return err(
                    &format!("members[{i}].identity"),
                    "an identity id: 32 lowercase hex characters".into(),
                );
            }
            if !seen.insert(&m.identity) {
                return err(
                    &format!("members[{i}].identity"),
                    format!("`{}` is listed twice", m.identity),
                );
            }
            if m.weight == 0 || m.weight > MAX_WEIGHT {
                return err(
                    &format!("members[{i}].weight"),
                    format!("1 to {MAX_WEIGHT}"),
                );
            }
        }
        let total: u64 = self.members.iter().map(|m| u64::from(m.weight)).sum();
        let heaviest = self.members.iter().map(|m| m.weight).max().unwrap_or(0);
        let p = &self.policy;
        if p.threshold == 0 || u64::from(p.threshold) > total {
            return err(
                "policy.threshold",
                format!("1 to the members' total weight ({total})"),
            );
        }
        if self.members.len() >= 2 && p.threshold <= heaviest {
            return err(
                "policy.threshold",
                format!(
                    "with two or more members no one member may reach the threshold alone: \
                     it must be above the heaviest weight ({heaviest})"
                ),
            );
        }
        for (i, v) in p.veto.iter().enumerate() {
            if !seen.contains(v) {
                return err(
                    &format!("policy.veto[{i}]"),
                    format!("`{v}` is not a member"),
                );
            }
        }
        if p.max_window_secs == 0 || p.max_window_secs > MAX_WINDOW_SECS {
            return err(
                "policy.max_window_secs",
                format!("1 to {MAX_WINDOW_SECS} seconds"),
            );
        }
        if p.min_window_secs >= p.max_window_secs {
            return err("policy.min_window_secs", "below max_window_secs".to_owned());
        }
        if p.scale_limit.is_some() && !p.guards(ChangeKind::JobScale) {
            return err(
                "policy.scale_limit",
                "only meaningful with `job.scale` guarded".to_owned(),
            );
        }
        if let Some(limit) = p.spend_limit {
            limit.check("policy.spend_limit", true)?;
            if !p.guards(ChangeKind::TreasurySpend) {
                return err(
                    "policy.spend_limit",
                    "only meaningful with `treasury.spend` guarded".to_owned(),
                );
            }
        }
        Ok(())
    }

    /// The total weight of the members.
    pub fn total_weight(&self) -> u64 {
        self.members.iter().map(|m| u64::from(m.weight)).sum()
    }
}

/// A governed circle as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircleGovernance {
    /// The circle's name.
    pub name: String,
    /// Bumped by every change to its members or policy; approvals name it.
    pub version: u64,
    /// Its members and policy.
    #[serde(flatten)]
    pub governance: Governance,
}

/// [`CircleGovernance`] as its document shows it: the derive would document the
/// flattened [`Governance`] as `allOf` an object that refuses every other field
/// (`name`, `version`), a schema no answer satisfies; this lists the fields as
/// serde writes them.
#[derive(ToSchema)]
#[schema(as = CircleGovernance)]
#[allow(dead_code)]
struct CircleGovernanceDoc {
    /// The circle's name.
    name: String,
    /// Bumped by every change to its members or policy; approvals name it.
    version: u64,
    /// Members with weights and roles.
    members: Vec<PolicyMember>,
    /// The policy.
    policy: CirclePolicy,
}

impl utoipa::PartialSchema for CircleGovernance {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        CircleGovernanceDoc::schema()
    }
}

impl ToSchema for CircleGovernance {
    fn name() -> std::borrow::Cow<'static, str> {
        CircleGovernanceDoc::name()
    }

    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        CircleGovernanceDoc::schemas(schemas);
    }
}

wire_enum!(
    /// Where a proposal stands.
    ProposalState {
        /// Waiting for approvals.
        Pending => "pending",
        /// Reached its threshold; applies once its minimum window has passed.
        Approved => "approved",
        /// Applied, exactly once.
        Applied => "applied",
        /// Enough weight rejected it that the threshold can no longer be reached.
        Rejected => "rejected",
        /// A member of the veto set vetoed it.
        Vetoed => "vetoed",
        /// Its window closed before it applied.
        Expired => "expired",
        /// What it was based on changed before it could apply; propose it again.
        Stale => "stale",
    }
);

impl ProposalState {
    /// Whether nothing can happen to the proposal any more.
    pub fn is_final(self) -> bool {
        !matches!(self, ProposalState::Pending | ProposalState::Approved)
    }
}

wire_enum!(
    /// What a member says of a proposal.
    Decision {
        /// Counts its weight toward the threshold.
        Approve => "approve",
        /// Counts against: once the rest cannot reach the threshold, it is rejected.
        Reject => "reject",
        /// Ends it at once; only members of the policy's veto set.
        Veto => "veto",
    }
);

/// One signer of a proposal, frozen when it was made: who may decide and with
/// what weight, whatever the circle becomes afterwards (rule 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Signer {
    /// The member.
    pub identity: IdentityId,
    /// Its public key, as it was when the proposal was made.
    pub public_key: PublicKey,
    /// Its weight under the circle's current policy (0 when it is only in the new one).
    pub weight: u32,
    /// Its weight under the proposed governance, for `circle.members` and
    /// `circle.policy` proposals (rule 4); 0 when it is not in it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub new_weight: u32,
    /// Whether it may veto.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub veto: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `POST /api/v1/proposals/{id}/approvals`: a member's signed decision. The
/// signature is over the proposal's digest and the decision (see
/// `aigrid_consensus::human::decision_message`); every server checks it again as
/// the decision applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedDecision {
    /// approve, reject or veto.
    pub decision: Decision,
    /// The proposal's digest, hex, as the signer saw it.
    pub digest: String,
    /// The signature, base64url, by the caller's identity key.
    pub signature: String,
}

/// A decision as the proposal keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DecisionRecord {
    /// Who decided.
    pub identity: IdentityId,
    /// What.
    pub decision: Decision,
    /// The signature, base64url.
    pub signature: String,
    /// When it was recorded.
    pub at: Timestamp,
}

/// A proposal as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProposalInfo {
    /// Its id.
    pub id: String,
    /// The cluster it was made in; the digest names it, so an approval cannot be
    /// replayed in another cluster.
    #[serde(default)]
    pub cluster_id: String,
    /// Where it stands.
    pub state: ProposalState,
    /// The circle whose quorum decides.
    pub circle: String,
    /// The circle's version when it was made.
    pub circle_version: u64,
    /// What kind of change.
    pub kind: ChangeKind,
    /// What it changes (`job:NAME`, `circle:NAME`, ...).
    pub target: String,
    /// The change as it will apply, with secret values shown only as commitments.
    pub payload: serde_json::Value,
    /// SHA-256 of the canonical payload, hex.
    pub payload_hash: String,
    /// The version of the target it was made against; a change to the target before
    /// it applies makes it stale.
    pub base_version: u64,
    /// Who proposed it.
    pub proposer: IdentityId,
    /// When it was made.
    pub created_at: Timestamp,
    /// The earliest time it may apply.
    pub not_before: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
    /// The digest members sign, hex.
    pub digest: String,
    /// Who may decide, with frozen weights.
    pub signers: Vec<Signer>,
    /// The weight needed.
    pub threshold: u32,
    /// For `circle.members` and `circle.policy`: the weight needed under the new
    /// governance as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_threshold: Option<u32>,
    /// Whether decisions must be hybrid-signed.
    pub require_hybrid: bool,
    /// The decisions recorded, in order.
    pub decisions: Vec<DecisionRecord>,
    /// Approving weight so far (under the current governance).
    pub approved_weight: u64,
    /// For governance changes: approving weight under the new governance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_approved_weight: Option<u64>,
    /// Why it ended, for final states other than applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Timestamp>,
}

/// The answer to a guarded request: 202 with the proposal made in its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProposalCreated {
    /// The proposal's id.
    pub proposal: String,
    /// `pending`.
    pub state: ProposalState,
    /// The circle whose quorum decides.
    pub circle: String,
    /// What kind of change.
    pub kind: ChangeKind,
    /// The digest members sign, hex.
    pub digest: String,
    /// For a proposed API key: the key itself, shown this once. It works once the
    /// proposal applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl ProposalCreated {
    /// The answer for `info`, just made.
    pub fn of(info: &ProposalInfo) -> Self {
        ProposalCreated {
            proposal: info.id.clone(),
            state: info.state,
            circle: info.circle.clone(),
            kind: info.kind,
            digest: info.digest.clone(),
            key: None,
        }
    }
}

/// One entry of the audit log, as the control API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Its position in the log, from 0.
    pub seq: u64,
    /// The leaf as hashed (RFC 6962 leaf input), base64url: canonical JSON of the
    /// event.
    pub leaf: String,
    /// The event, decoded from `leaf`.
    pub event: serde_json::Value,
}

/// `GET /api/v1/audit/checkpoint`: the log's size and root, signed by the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditCheckpoint {
    /// The checkpoint as a C2SP signed note.
    pub note: String,
    /// Entries it covers.
    pub size: u64,
    /// Its root hash, hex.
    pub root: String,
    /// The cluster's audit key, which signed it.
    pub cluster_key: PublicKey,
}

/// `GET /api/v1/audit/proof`: an inclusion proof (`?index=&size=`) or a consistency
/// proof (`?from=&size=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditProof {
    /// The size of the tree the proof is for.
    pub size: u64,
    /// The root hash of that tree, hex.
    pub root: String,
    /// The proof's hashes, hex, in RFC 6962 order.
    pub hashes: Vec<String>,
    /// For an inclusion proof: the entry's position and leaf (base64url).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// For an inclusion proof: the leaf, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf: Option<String>,
    /// For a consistency proof: the older size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// For a consistency proof: the older root, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_root: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IdentityKey, KeyAlgorithm};

    fn member(seed: u8, weight: u32) -> PolicyMember {
        PolicyMember {
            identity: IdentityKey::from_seed(KeyAlgorithm::Ed25519, [seed; 32]).id(),
            weight,
            role: Role::Owner,
        }
    }

    #[test]
    fn kinds_are_written_as_the_wire_says() {
        assert_eq!(
            serde_json::to_string(&ChangeKind::JobCreate).unwrap(),
            "\"job.create\""
        );
        assert_eq!("circle.policy".parse(), Ok(ChangeKind::CirclePolicy));
        assert!(ChangeKind::CircleMembers.changes_signers());
        assert!(!ChangeKind::JobUpdate.changes_signers());
    }

    #[test]
    fn a_single_member_never_reaches_the_threshold_of_two_or_more() {
        let ok = |members: Vec<PolicyMember>, threshold| {
            Governance {
                members,
                policy: CirclePolicy::new(threshold),
            }
            .validate()
        };
        // One member: its own weight is the threshold.
        ok(vec![member(1, 1)], 1).unwrap();
        // 2 of 3.
        ok(vec![member(1, 1), member(2, 1), member(3, 1)], 2).unwrap();
        // 1 of 3: the proposer alone would reach it.
        let e = ok(vec![member(1, 1), member(2, 1), member(3, 1)], 1).unwrap_err();
        assert_eq!(e.field, "policy.threshold");
        // A heavy member: threshold must exceed its weight.
        assert!(ok(vec![member(1, 3), member(2, 1), member(3, 1)], 3).is_err());
        ok(vec![member(1, 3), member(2, 1), member(3, 1)], 4).unwrap();
        // Unreachable, zero, duplicate, zero weight.
        assert!(ok(vec![member(1, 1), member(2, 1)], 3).is_err());
        assert!(ok(vec![member(1, 1)], 0).is_err());
        assert!(ok(vec![member(1, 1), member(1, 1)], 2).is_err());
        assert!(ok(vec![member(1, 0), member(2, 1)], 1).is_err());
    }

    #[test]
    fn windows_and_vetoes_are_checked() {
        let mut g = Governance {
            members: vec![member(1, 1), member(2, 1)],
            policy: CirclePolicy::new(2),
        };
        g.policy.veto = vec![member(3, 1).identity];
        assert_eq!(g.validate().unwrap_err().field, "policy.veto[0]");
        g.policy.veto = vec![member(2, 1).identity];
        g.validate().unwrap();
        g.policy.min_window_secs = g.policy.max_window_secs;
        assert_eq!(g.validate().unwrap_err().field, "policy.min_window_secs");
        g.policy.min_window_secs = 0;
        g.policy.max_window_secs = MAX_WINDOW_SECS + 1;
        assert!(g.validate().is_err());
    }
}
