//! Stored chunks checked against their digests, and opened (unsealed) when the
//! model is encrypted at rest.

use aigrid_api::ChunkDigest;

use crate::crypto::ModelKey;
use crate::error::StoreError;
use crate::manifest::{Manifest, ManifestError};

/// Checks stored chunks against their digests and opens sealed ones.
pub(crate) struct ChunkOpener {
    key: Option<ModelKey>,
}

impl ChunkOpener {
    pub(crate) fn new(manifest: &Manifest, key: Option<&ModelKey>) -> Result<Self, StoreError> {
        match (&manifest.encryption, key) {
            (None, _) => Ok(ChunkOpener { key: None }),
            (Some(enc), None) => Err(StoreError::KeyRequired {
                key_id: enc.key_id.clone(),
            }),
            (Some(enc), Some(key)) if key.id() != enc.key_id => Err(StoreError::WrongKey {
                expected: enc.key_id.clone(),
                given: key.id(),
            }),
            (Some(_), Some(key)) => Ok(ChunkOpener {
                key: Some(key.clone()),
            }),
        }
    }

    /// Whether `stored` is the chunk named `hash`.
    pub(crate) fn verify(hash: &ChunkDigest, stored: &[u8]) -> bool {
        ChunkDigest::of(stored) == *hash
    }

    /// The plaintext of a stored chunk, after checking it is the chunk named `hash`.
    pub(crate) fn open(&self, hash: &ChunkDigest, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        if !Self::verify(hash, stored) {
            // Shards checked out but the chunk does not: the manifest lies.
            return Err(StoreError::Manifest(ManifestError::Inconsistent(format!(
                "chunk {hash} does not match its digest"
            ))));
        }
        self.unseal(stored)
    }

    /// The plaintext of a stored chunk already checked against its digest.
    pub(crate) fn unseal(&self, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        match &self.key {
            None => Ok(stored.to_vec()),
            Some(key) => Ok(key.open(stored)?),
        }
    }
}
