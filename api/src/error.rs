//! Errors as they cross the wire. Every failure the control API reports maps to one
//! [`ErrorCode`], and the code alone decides the stable string clients match on and
//! the HTTP status, so the mapping lives in exactly one table ([`ErrorCode::info`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every control API error: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code from [`ErrorCode`]. A string rather than the enum so
    /// an older client still reads errors carrying codes added later.
    pub code: String,
    /// A human-readable explanation; its wording may change between releases.
    pub message: String,
}

impl ErrorBody {
    /// Builds the body for `code`, so handlers cannot misspell a code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.as_str().to_owned(),
                message: message.into(),
            },
        }
    }

    /// The code as an enum, or `None` for a code this build does not know.
    pub fn code(&self) -> Option<ErrorCode> {
        self.error.code.parse().ok()
    }

    /// The HTTP status this body is sent with; unknown codes count as internal.
    pub fn http_status(&self) -> u16 {
        self.code().unwrap_or(ErrorCode::Internal).http_status()
    }
}

impl From<&ValidationError> for ErrorBody {
    fn from(error: &ValidationError) -> Self {
        Self::new(ErrorCode::InvalidField, error.to_string())
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error.code, self.error.message)
    }
}

/// Every kind of control API failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The body is not JSON, or not the expected shape (unknown field, wrong type).
    InvalidJson,
    /// The body parsed but a field's value breaks a rule; the message names the field.
    InvalidField,
    /// The addressed object does not exist.
    NotFound,
    /// The request contradicts the current state (an id reused for something else).
    Conflict,
    /// The request method is not served on this path.
    MethodNotAllowed,
    /// The body is larger than the server accepts.
    PayloadTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The client stopped sending its request (its body) for longer than the server
    /// waits; send it again.
    RequestTimeout,
    /// The server is at its concurrency or queue limit; retry later.
    RateLimited,
    /// A bug or an unexpected failure on the server.
    Internal,
    /// The control plane cannot reach a Raft quorum, so nothing can be committed.
    NoQuorum,
    /// The change was proposed but not committed in time; it may still apply, so
    /// retry with the same request.
    Timeout,
    /// This server is not the leader and no leader is known to forward to.
    NotLeader,
    /// The request's signature, timestamp or join token is not valid.
    Unauthorized,
    /// The request is signed by a known identity that may not do this.
    Forbidden,
    /// The request is signed as a node the servers hold no key for.
    UnknownNode,
    /// The node's key was revoked; it may join again only with a new key.
    KeyRevoked,
    /// A model manifest contradicts itself, or its shard locations do not fit it.
    InvalidManifest,
    /// A model manifest's signature does not match its contents and publisher key.
    SignatureInvalid,
    /// The caller is not among the proposal's signers: members of its circle when it was made.
    NotASigner,
    /// The caller may not veto: it is not in the policy's veto set.
    NotAVetoer,
    /// A decision names a digest other than the proposal's: it was signed for another proposal, circle version or payload.
    DigestMismatch,
    /// A decision's signature does not verify under the signer's key over the proposal's digest.
    ApprovalInvalid,
    /// The circle's policy requires hybrid (ed25519 + ML-DSA-65) signatures and this one is ed25519 only.
    HybridRequired,
    /// This identity (or another identity with the same key) has already decided on the proposal: each counts once.
    AlreadyDecided,
    /// The proposal's window closed before it applied.
    ProposalExpired,
    /// What the proposal was based on changed; propose it again.
    ProposalStale,
    /// The proposal was vetoed.
    ProposalVetoed,
    /// The proposal was applied or rejected already.
    ProposalClosed,
    /// The change is guarded by its circle's policy and must go through a proposal.
    Guarded,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [Self] = &[
        Self::InvalidJson,
        Self::InvalidField,
        Self::NotFound,
        Self::Conflict,
        Self::MethodNotAllowed,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::RequestTimeout,
        Self::RateLimited,
        Self::Internal,
        Self::NoQuorum,
        Self::Timeout,
        Self::NotLeader,
        Self::Unauthorized,
        Self::Forbidden,
        Self::UnknownNode,
        Self::KeyRevoked,
        Self::InvalidManifest,
        Self::SignatureInvalid,
        Self::NotASigner,
        Self::NotAVetoer,
        Self::DigestMismatch,
        Self::ApprovalInvalid,
        Self::HybridRequired,
        Self::AlreadyDecided,
        Self::ProposalExpired,
        Self::ProposalStale,
        Self::ProposalVetoed,
        Self::ProposalClosed,
        Self::Guarded,
    ];

    /// The single table of wire code and HTTP status per variant.
    const fn info(self) -> (&'static str, u16) {
        match self {
            Self::InvalidJson => ("invalid_json", 400),
            Self::InvalidField => ("invalid_field", 400),
            Self::NotFound => ("not_found", 404),
            Self::Conflict => ("conflict", 409),
            Self::MethodNotAllowed => ("method_not_allowed", 405),
            Self::PayloadTooLarge => ("payload_too_large", 413),
            Self::UnsupportedMediaType => ("unsupported_media_type", 415),
            Self::RequestTimeout => ("request_timeout", 408),
            Self::RateLimited => ("rate_limited", 429),
            Self::Internal => ("internal", 500),
            Self::NoQuorum => ("no_quorum", 503),
            Self::Timeout => ("timeout", 503),
            Self::NotLeader => ("not_leader", 503),
            Self::Unauthorized => ("unauthorized", 401),
            Self::Forbidden => ("forbidden", 403),
            Self::UnknownNode => ("unknown_node", 401),
            Self::KeyRevoked => ("key_revoked", 401),
            Self::InvalidManifest => ("invalid_manifest", 400),
            Self::SignatureInvalid => ("signature_invalid", 400),
            Self::NotASigner => ("not_a_signer", 403),
            Self::NotAVetoer => ("not_a_vetoer", 403),
            Self::DigestMismatch => ("digest_mismatch", 409),
            Self::ApprovalInvalid => ("approval_invalid", 400),
            Self::HybridRequired => ("hybrid_required", 400),
            Self::AlreadyDecided => ("already_decided", 409),
            Self::ProposalExpired => ("proposal_expired", 409),
            Self::ProposalStale => ("proposal_stale", 409),
            Self::ProposalVetoed => ("proposal_vetoed", 409),
            Self::ProposalClosed => ("proposal_closed", 409),
            Self::Guarded => ("guarded", 409),
        }
    }

    /// The stable snake_case code clients match on.
    pub const fn as_str(self) -> &'static str {
        self.info().0
    }

    /// The HTTP status sent with this code.
    pub const fn http_status(self) -> u16 {
        self.info().1
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| ParseEnumError {
                kind: "ErrorCode",
                value: s.to_owned(),
            })
    }
}

/// A field whose value breaks a rule. `field` is a path into the submitted document
/// (`groups[0].resources.cpu_millis`) so users can find the line to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Path of the offending field, in the document's own field names.
    pub field: String,
    /// What is wrong with it and what would be accepted.
    pub message: String,
}

impl ValidationError {
    /// A validation failure of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A word that names no variant of a wire enum (a CLI flag, an error code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct ParseEnumError {
    /// The enum that was parsed.
    pub kind: &'static str,
    /// The rejected word.
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn codes_are_unique_and_statuses_are_errors() {
        let words: BTreeSet<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(words.len(), ErrorCode::ALL.len());
        for code in ErrorCode::ALL {
            assert!((400..600).contains(&code.http_status()), "{code}");
            assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), *code);
        }
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
        assert_eq!(ErrorCode::PayloadTooLarge.http_status(), 413);
        assert_eq!(ErrorCode::RateLimited.http_status(), 429);
        assert_eq!(ErrorCode::RequestTimeout.http_status(), 408);
        assert_eq!(ErrorCode::NoQuorum.http_status(), 503);
    }

    #[test]
    fn body_has_the_documented_shape() {
        let body = ErrorBody::new(ErrorCode::NotFound, "job x not found");
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {"code": "not_found", "message": "job x not found"}})
        );
        assert_eq!(body.code(), Some(ErrorCode::NotFound));
        assert_eq!(body.http_status(), 404);
    }

    #[test]
    fn unknown_codes_are_kept_and_count_as_internal() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"from_the_future","message":"m"}}"#).unwrap();
        assert_eq!(body.code(), None);
        assert_eq!(body.http_status(), 500);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let e = ValidationError::new("groups[0].count", "must be at least 1");
        assert_eq!(e.to_string(), "groups[0].count: must be at least 1");
        let body = ErrorBody::from(&e);
        assert_eq!(body.code(), Some(ErrorCode::InvalidField));
        assert!(body.error.message.contains("groups[0].count"));
    }
}
