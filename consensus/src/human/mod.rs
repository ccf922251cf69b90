//! Human consensus: the rules by which a circle's members approve a guarded change,
//! and the audit log that lets anyone check afterwards what was approved and applied.
//! Pure: no clock, no I/O. The servers run it in the replicated apply path (so every
//! server checks every approval again); the CLI runs it offline (to show signers the
//! digest they sign, and to verify an exported audit log).
//!
//! | module | owns |
//! |---|---|
//! | here | the digest an approval signs (rule 1), the message a decision signs, canonical payload hashing, and the [`Ballot`] that admits decisions and counts them (rules 2 to 4, 8) |
//! | [`audit`] | the RFC 6962 Merkle log of applied changes and proposal events, its proofs, and [`audit::AuditError`] |
//! | [`note`] | checkpoints of that log as C2SP signed notes |
//! | [`export`] | the offline audit export and its check |
//!
//! Why a digest of fields rather than a signature over the request: the same change
//! proposed twice, in another circle, under another version of the circle, against
//! another base or after its expiry is a different thing to approve, and a signature
//! must not carry over from one to the other.

pub mod audit;
pub mod export;
pub mod note;

use aigrid_api::{
    ChangeKind, Decision, DecisionRecord, ErrorCode, IdentityId, KeyAlgorithm, PublicKey,
    SignedDecision, Signer, Timestamp,
};
use base64::Engine;
use sha2::{Digest, Sha256};

const B64: base64::engine::general_purpose::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Domain of the proposal digest; a signature over it can be nothing else.
const DIGEST_DOMAIN: &[u8] = b"aigrid/human-chain/proposal-digest/v1";
/// Domain of a decision's signed message.
const DECISION_DOMAIN: &[u8] = b"aigrid/human-chain/decision/v1";

/// Everything an approval is bound to (DESIGN's rule 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestInput<'a> {
    /// The cluster, so an approval never carries to another cluster.
    pub cluster_id: &'a str,
    /// The circle whose quorum decides.
    pub circle: &'a str,
    /// The circle's version when the proposal was made.
    pub circle_version: u64,
    /// The kind of change.
    pub kind: ChangeKind,
    /// SHA-256 of the canonical payload ([`payload_hash`]).
    pub payload_hash: &'a [u8; 32],
    /// The version of the target the proposal was made against.
    pub base_version: u64,
    /// The proposal's id.
    pub proposal_id: &'a str,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// The digest members sign: SHA-256 over a domain tag and every field of `input`,
/// each length-prefixed so no two inputs encode alike.
pub fn proposal_digest(input: &DigestInput<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(DIGEST_DOMAIN);
    field(input.cluster_id.as_bytes());
    field(input.circle.as_bytes());
    field(&input.circle_version.to_be_bytes());
    field(input.kind.as_str().as_bytes());
    field(input.payload_hash);
    field(&input.base_version.to_be_bytes());
    field(input.proposal_id.as_bytes());
    field(&input.expires_at.as_millis().to_be_bytes());
    h.finalize().into()
}

/// What a member signs to decide: the decision and the digest under their own
/// domain, so an approval can never be replayed as a veto or the other way round.
pub fn decision_message(digest: &[u8; 32], decision: Decision) -> Vec<u8> {
    let mut m = Vec::with_capacity(DECISION_DOMAIN.len() + 16 + 32);
    m.extend_from_slice(DECISION_DOMAIN);
    m.push(0);
    m.extend_from_slice(decision.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(digest);
    m
}

/// Signs a decision on the proposal with `digest`, as `aigrid proposal approve` does.
pub fn sign_decision(
    key: &aigrid_api::IdentityKey,
    digest: &[u8; 32],
    decision: Decision,
) -> SignedDecision {
    SignedDecision {
        decision,
        digest: hex::encode(digest),
        signature: B64.encode(key.sign(&decision_message(digest, decision))),
    }
}

/// Recomputes the digest of `proposal` from what it shows (its payload, circle,
/// versions, kind, id and expiry): what a signer checks before it signs, so a server
/// cannot show one change and have another one signed. Answers the digest, or why
/// the proposal does not hash to the digest it claims.
pub fn recompute_digest(proposal: &aigrid_api::ProposalInfo) -> Result<[u8; 32], ChainError> {
    let payload_hash = payload_hash(&proposal.payload);
    if hex::encode(payload_hash) != proposal.payload_hash {
        return Err(ChainError::DigestMismatch {
            want: proposal.payload_hash.clone(),
            got: hex::encode(payload_hash),
        });
    }
    let digest = proposal_digest(&DigestInput {
        cluster_id: &proposal.cluster_id,
        circle: &proposal.circle,
        circle_version: proposal.circle_version,
        kind: proposal.kind,
        payload_hash: &payload_hash,
        base_version: proposal.base_version,
        proposal_id: &proposal.id,
        expires_at: proposal.expires_at,
    });
    if hex::encode(digest) != proposal.digest {
        return Err(ChainError::DigestMismatch {
            want: proposal.digest.clone(),
            got: hex::encode(digest),
        });
    }
    Ok(digest)
}

/// JSON with every object's keys sorted and no whitespace: the one encoding of a
/// value that the servers hash and that a signer can recompute from what it is
/// shown, whatever order a serializer chose.
pub fn canonical_json(value: &serde_json::Value) -> Vec<u8> {
    fn write(value: &serde_json::Value, out: &mut Vec<u8>) {
        match value {
            serde_json::Value::Object(map) => {
                // serde_json's map keeps its keys sorted unless its insertion-order
                // feature is on somewhere in the build: sort only then.
                if map.keys().is_sorted() {
                    write_object(map.iter(), out);
                } else {
                    let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                    write_object(entries.into_iter(), out);
                }
            }
            serde_json::Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(item, out);
                }
                out.push(b']');
            }
            scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar serialises"),
        }
    }
    fn write_object<'a>(
        entries: impl Iterator<Item = (&'a String, &'a serde_json::Value)>,
        out: &mut Vec<u8>,
    ) {
        out.push(b'{');
        for (i, (k, v)) in entries.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Writing a string to a Vec cannot fail.
            serde_json::to_writer(&mut *out, k).expect("a string serialises");
            out.push(b':');
            write(v, out);
        }
        out.push(b'}');
    }
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

/// SHA-256 of the canonical encoding of `payload`.
pub fn payload_hash(payload: &serde_json::Value) -> [u8; 32] {
    Sha256::digest(canonical_json(payload)).into()
}

/// Why a decision is refused. Each is its own error code, so a client (and a test)
/// can tell them apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The caller is not among the frozen signers.
    #[error(
        "`{0}` is not a signer of this proposal: only the circle's members when it was made decide"
    )]
    NotASigner(IdentityId),
    /// A veto from outside the veto set.
    #[error("`{0}` may not veto: it is not in the circle's veto set")]
    NotAVetoer(IdentityId),
    /// The decision names another digest.
    #[error("the decision is for digest {got}, this proposal's is {want}: it was signed for another proposal, circle version or payload")]
    DigestMismatch {
        /// The proposal's digest, hex.
        want: String,
        /// The decision's, hex.
        got: String,
    },
    /// The signature does not verify.
    #[error("the decision's signature does not verify under `{0}`'s key")]
    BadSignature(IdentityId),
    /// An ed25519-only signature where the policy wants hybrid ones.
    #[error("the circle's policy requires hybrid (ed25519 + ML-DSA-65) signatures; `{0}` signs with ed25519 only")]
    HybridRequired(IdentityId),
    /// The identity, or another with the same key, decided already.
    #[error("`{0}` has decided on this proposal already (each identity and each key counts once)")]
    AlreadyDecided(IdentityId),
    /// The window closed.
    #[error("the proposal expired at {0}")]
    Expired(Timestamp),
    /// Its base changed.
    #[error("the proposal is stale: {0}")]
    Stale(String),
    /// Vetoed.
    #[error("the proposal was vetoed")]
    Vetoed,
    /// Applied, rejected or otherwise closed.
    #[error("the proposal is {0} already")]
    Closed(aigrid_api::ProposalState),
}

impl ChainError {
    /// The control API's code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChainError::NotASigner(_) => ErrorCode::NotASigner,
            ChainError::NotAVetoer(_) => ErrorCode::NotAVetoer,
            ChainError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            ChainError::BadSignature(_) => ErrorCode::ApprovalInvalid,
            ChainError::HybridRequired(_) => ErrorCode::HybridRequired,
            ChainError::AlreadyDecided(_) => ErrorCode::AlreadyDecided,
            ChainError::Expired(_) => ErrorCode::ProposalExpired,
            ChainError::Stale(_) => ErrorCode::ProposalStale,
            ChainError::Vetoed => ErrorCode::ProposalVetoed,
            ChainError::Closed(_) => ErrorCode::ProposalClosed,
        }
    }
}

/// The ed25519 half of a key: two identities sharing it are one signer (an
/// ed25519-only key and the hybrid key grown from the same ed25519 key are the
/// same person).
fn ed25519_part(key: &PublicKey) -> [u8; 32] {
    key.ed25519_bytes()
}

/// Where the count of a proposal's decisions stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Not there yet.
    Pending {
        /// Approving weight under the current governance.
        have: u64,
        /// The threshold.
        need: u64,
        /// For governance changes: approving weight under the new governance, and
        /// its threshold.
        new: Option<(u64, u64)>,
    },
    /// Every threshold is reached.
    Reached,
    /// Enough weight rejected it that a threshold can no longer be reached.
    Rejected,
    /// A member of the veto set vetoed it.
    Vetoed,
}

/// A proposal's frozen signer set and policy, with its decisions so far: what admits
/// a new decision and counts them. The same code runs on every server as decisions
/// apply and in the CLI.
#[derive(Debug, Clone, Copy)]
pub struct Ballot<'a> {
    /// Who may decide, with the weights frozen when the proposal was made.
    pub signers: &'a [Signer],
    /// Weight needed under the current governance.
    pub threshold: u32,
    /// Weight needed under the new governance, for `circle.members` and
    /// `circle.policy` changes (rule 4).
    pub new_threshold: Option<u32>,
    /// Decisions must be hybrid-signed.
    pub require_hybrid: bool,
    /// The proposal's digest.
    pub digest: &'a [u8; 32],
    /// The decisions recorded so far.
    pub decisions: &'a [DecisionRecord],
}

impl Ballot<'_> {
    fn signer(&self, id: &IdentityId) -> Option<&Signer> {
        self.signers.iter().find(|s| s.identity == *id)
    }

    /// Checks `signed`, made by `who`, against the ballot: a frozen signer, not yet
    /// decided (by identity or by key), the right digest, a signature that verifies
    /// (hybrid when required), and a veto only from the veto set.
    pub fn admit(&self, who: &IdentityId, signed: &SignedDecision) -> Result<(), ChainError> {
        let signer = self
            .signer(who)
            .ok_or_else(|| ChainError::NotASigner(who.clone()))?;
        let mine = ed25519_part(&signer.public_key);
        for earlier in self.decisions {
            let same_key = self
                .signer(&earlier.identity)
                .is_some_and(|s| ed25519_part(&s.public_key) == mine);
            if earlier.identity == *who || same_key {
                return Err(ChainError::AlreadyDecided(who.clone()));
            }
        }
        let want = hex::encode(self.digest);
        if !signed.digest.eq_ignore_ascii_case(&want) {
            return Err(ChainError::DigestMismatch {
                want,
                got: signed.digest.chars().take(64).collect(),
            });
        }
        if self.require_hybrid && signer.public_key.algorithm() != KeyAlgorithm::Ed25519MlDsa65 {
            return Err(ChainError::HybridRequired(who.clone()));
        }
        let signature = B64
            .decode(&signed.signature)
            .map_err(|_| ChainError::BadSignature(who.clone()))?;
        signer
            .public_key
            .verify(&decision_message(self.digest, signed.decision), &signature)
            .map_err(|_| ChainError::BadSignature(who.clone()))?;
        if signed.decision == Decision::Veto && !signer.veto {
            return Err(ChainError::NotAVetoer(who.clone()));
        }
        Ok(())
    }

    /// Counts the recorded decisions. Each identity counts once, and so does each
    /// key (two identities sharing an ed25519 key are one signer); a proposal whose
    /// signers number two or more never passes on one signer's approval alone.
    pub fn count(&self) -> Count {
        let mut seen_keys: Vec<[u8; 32]> = Vec::new();
        let (mut approve, mut approve_new, mut reject, mut reject_new) = (0u64, 0u64, 0u64, 0u64);
        let mut approvers = 0usize;
        for d in self.decisions {
            let Some(signer) = self.signer(&d.identity) else {
                continue;
            };
            let key = ed25519_part(&signer.public_key);
            if seen_keys.contains(&key) {
                continue;
            }
            seen_keys.push(key);
            match d.decision {
                Decision::Veto if signer.veto => return Count::Vetoed,
                Decision::Veto => {}
                Decision::Approve => {
                    approvers += 1;
                    approve += u64::from(signer.weight);
                    approve_new += u64::from(signer.new_weight);
                }
                Decision::Reject => {
                    reject += u64::from(signer.weight);
                    reject_new += u64::from(signer.new_weight);
                }
            }
        }
        let total: u64 = self.signers.iter().map(|s| u64::from(s.weight)).sum();
        let total_new: u64 = self.signers.iter().map(|s| u64::from(s.new_weight)).sum();
        let need = u64::from(self.threshold);
        let need_new = self.new_threshold.map(u64::from);
        let unreachable = total - reject.min(total) < need
            || need_new.is_some_and(|n| total_new - reject_new.min(total_new) < n);
        if unreachable {
            return Count::Rejected;
        }
        let voters = |new: bool| {
            self.signers
                .iter()
                .filter(|s| if new { s.new_weight > 0 } else { s.weight > 0 })
                .count()
        };
        let alone =
            approvers < 2 && (voters(false) >= 2 || (need_new.is_some() && voters(true) >= 2));
        let reached = approve >= need && need_new.is_none_or(|n| approve_new >= n);
        if reached && !alone {
            Count::Reached
        } else {
            Count::Pending {
                have: approve,
                need,
                new: need_new.map(|n| (approve_new, n)),
            }
        }
    }
}

#[cfg(test)]
mod tests;
