//! Why a store operation failed: one error for pushing, pulling, reading, caching
//! and repairing, since they share their causes (a backend, the code, the manifest).

use std::path::{Path, PathBuf};

use crate::backend::BackendError;
use crate::codec::CodecError;
use crate::crypto::CryptoError;
use crate::manifest::ManifestError;
use crate::placement::PlacementError;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The erasure code cannot be built.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The manifest is refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The shards cannot be placed.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Encryption failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The model is encrypted and no key was given.
    #[error("the model is encrypted at rest: its owner's key (id {key_id}) is needed")]
    KeyRequired {
        /// The key the manifest names.
        key_id: String,
    },
    /// The key given is not the one the model was sealed with.
    #[error("the model key given (id {given}) is not the model's (id {expected})")]
    WrongKey {
        /// The manifest's key id.
        expected: String,
        /// The given key's id.
        given: String,
    },
    /// The manifest names a backend this store does not have.
    #[error("backend `{0}` is not configured")]
    UnknownBackend(String),
    /// No such file in the model.
    #[error("the model has no file `{0}`")]
    NoSuchFile(String),
    /// A read past the end of a file.
    #[error("file `{file}` is {size} bytes: cannot read {len} bytes at {offset}")]
    OutOfRange {
        /// The file.
        file: String,
        /// Where the read starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's size.
        size: u64,
    },
    /// The file is not a readable safetensors file.
    #[error("file `{file}`: {reason}")]
    Safetensors {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
    /// Some shards could not be deleted.
    #[error("deleted {deleted} shards, {failed} could not be deleted (first: {first})")]
    RemoveIncomplete {
        /// Shards deleted.
        deleted: usize,
        /// Shards left behind.
        failed: usize,
        /// The first failure.
        first: BackendError,
    },
    /// The cache cannot hold what was asked to be pinned.
    #[error("the cache ({max} bytes) is too small to pin {want} more bytes")]
    CacheTooSmall {
        /// The cache's budget.
        max: u64,
        /// Bytes asked to be pinned.
        want: u64,
    },
    /// Pre-warming needs a cache.
    #[error("this reader has no cache to warm")]
    NoCache,
    /// A file a manifest names cannot be rebuilt: too few intact shards survive.
    #[error(
        "file `{file}`: stripe {stripe} cannot be rebuilt: {have} intact shards of the {k} needed"
    )]
    Unrecoverable {
        /// The file.
        file: String,
        /// The stripe.
        stripe: usize,
        /// Intact shards found.
        have: usize,
        /// Shards needed.
        k: usize,
    },
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}
