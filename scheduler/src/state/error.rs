//! Why a command is rejected: [`StateError`], each with the control API's error
//! code.

use aigrid_api::manifest::ManifestError;
use aigrid_api::{ErrorCode, ValidationError};

/// The kinds of object a command can address, for [`StateError::NotFound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A job.
    Job,
    /// A node.
    Node,
    /// An allocation.
    Allocation,
    /// An evaluation.
    Evaluation,
    /// A join token.
    JoinToken,
    /// A registered model.
    Model,
    /// A known identity.
    Identity,
    /// A circle membership (`circle/identity`).
    Member,
    /// A circle's API key.
    ApiKey,
    /// A governed circle.
    Circle,
    /// A proposal.
    Proposal,
    /// A fleet rollout.
    Rollout,
    /// A circle's quota.
    Quota,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Job => "job",
            Self::Node => "node",
            Self::Allocation => "allocation",
            Self::Evaluation => "evaluation",
            Self::JoinToken => "join token",
            Self::Model => "model",
            Self::Identity => "identity",
            Self::Member => "circle member",
            Self::ApiKey => "API key",
            Self::Circle => "governed circle",
            Self::Proposal => "proposal",
            Self::Rollout => "rollout",
            Self::Quota => "quota of circle",
        })
    }
}

/// Why a command was rejected. A rejected command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The command addresses an object that does not exist.
    #[error("{kind} `{id}` not found")]
    NotFound {
        /// What kind of object.
        kind: ObjectKind,
        /// Its id.
        id: String,
    },
    /// A field of the command breaks a rule.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// The command contradicts the state (an id reused for something else, a GPU
    /// already held).
    #[error("{message}")]
    Conflict {
        /// What contradicts what.
        message: String,
    },
    /// The registration's key or join token is not accepted.
    #[error("{0}")]
    Unauthorized(String),
    /// The identity behind the command may not do it (see
    /// [`ClusterState::denial`](super::ClusterState::denial)).
    #[error("{0}")]
    Forbidden(String),
    /// A model's manifest is not signed by its publisher, or contradicts itself.
    #[error("{0}")]
    Manifest(ManifestError),
    /// A model's shard locations do not fit its manifest.
    #[error("shard locations do not fit the manifest: {0}")]
    BadLocations(String),
    /// A decision on a proposal is refused, or the proposal is closed.
    #[error("{0}")]
    Chain(#[from] aigrid_consensus::human::ChainError),
    /// A direct command makes a change its circle's policy guards.
    #[error(
        "`{target}` is guarded by circle `{circle}` ({kind}): it must be proposed and approved"
    )]
    Guarded {
        /// The circle.
        circle: String,
        /// The kind of change.
        kind: aigrid_api::ChangeKind,
        /// What it changes.
        target: String,
    },
}

impl StateError {
    /// The API error code this rejection is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound { .. } => ErrorCode::NotFound,
            Self::Invalid(_) => ErrorCode::InvalidField,
            Self::Conflict { .. } => ErrorCode::Conflict,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::Manifest(ManifestError::Signature(_)) => ErrorCode::SignatureInvalid,
            Self::Manifest(ManifestError::Inconsistent(_)) | Self::BadLocations(_) => {
                ErrorCode::InvalidManifest
            }
            Self::Chain(e) => e.code(),
            Self::Guarded { .. } => ErrorCode::Guarded,
        }
    }

    pub(crate) fn not_found(kind: ObjectKind, id: impl std::fmt::Display) -> Self {
        Self::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict {
            message: message.into(),
        }
    }
}
