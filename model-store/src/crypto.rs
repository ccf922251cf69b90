//! Encryption at rest: chunks sealed with XChaCha20-Poly1305 under a key only the
//! model's owner holds. The nonce is derived from the key and the plaintext, so the
//! same chunk sealed twice under one key gives the same bytes and still deduplicates;
//! backends and the control plane see ciphertext only.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::manifest::AEAD_OVERHEAD;

const NONCE_LEN: usize = 24;
const KEY_ID_CONTEXT: &str = "aigrid model key id v1";

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key file could not be read or written.
    #[error("model key {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A sealed chunk does not open under the key.
    #[error("a chunk does not decrypt under the model key")]
    Open,
}

/// Writes 32 key bytes as 64 hex characters to a new file readable by its owner only,
/// synced; refuses to overwrite a file. Model keys and publisher keys are kept so.
pub fn write_new_key_file(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(format!("{}\n", aigrid_api::auth::hex(key)).as_bytes())?;
    file.sync_all()
}

/// A model owner's 256-bit key.
#[derive(Clone)]
pub struct ModelKey([u8; 32]);

impl std::fmt::Debug for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelKey({})", self.id())
    }
}

impl ModelKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        ModelKey(rand::random())
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ModelKey(bytes)
    }

    /// Reads a key file: 64 hex characters.
    pub fn read(path: &Path) -> Result<Self, CryptoError> {
        let err = |reason: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        aigrid_api::auth::unhex::<32>(text.trim())
            .map(ModelKey)
            .ok_or_else(|| err("not 64 hex characters".into()))
    }

    /// Writes the key as 64 hex characters, readable by its owner only; refuses to
    /// overwrite a file.
    pub fn write_new(&self, path: &Path) -> Result<(), CryptoError> {
        let err = |reason: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        write_new_key_file(path, &self.0).map_err(|e| err(e.to_string()))
    }

    /// The key's public fingerprint, recorded in manifests.
    pub fn id(&self) -> String {
        aigrid_api::auth::hex(&blake3::derive_key(KEY_ID_CONTEXT, &self.0))
    }

    /// Seals a chunk: nonce, then ciphertext and tag.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce_bytes = blake3::keyed_hash(&self.0, plain);
        let nonce = XNonce::from_slice(&nonce_bytes.as_bytes()[..NONCE_LEN]);
        let sealed = XChaCha20Poly1305::new((&self.0).into())
            .encrypt(nonce, plain)
            .expect("in-memory encryption of a chunk cannot fail");
        let mut out = Vec::with_capacity(plain.len() + AEAD_OVERHEAD as usize);
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a sealed chunk; fails unless it was sealed under this key, unaltered.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < AEAD_OVERHEAD as usize {
            return Err(CryptoError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(XNonce::from_slice(nonce), body)
            .map_err(|_| CryptoError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_is_deterministic_per_key_and_tamper_evident() {
        let key = ModelKey::from_bytes([7; 32]);
        let sealed = key.seal(b"weights");
        assert_eq!(sealed.len(), 7 + AEAD_OVERHEAD as usize);
        assert_eq!(sealed, key.seal(b"weights"));
        assert!(!sealed.windows(7).any(|w| w == b"weights"));
        assert_eq!(key.open(&sealed).unwrap(), b"weights");
        let other = ModelKey::from_bytes([8; 32]);
        assert_ne!(other.seal(b"weights"), sealed);
        assert!(other.open(&sealed).is_err());
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert!(key.open(&flipped).is_err());
        assert!(key.open(&sealed[..10]).is_err());
        assert_ne!(key.id(), other.id());
    }

    #[test]
    fn key_files_round_trip_and_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.key");
        let key = ModelKey::generate();
        key.write_new(&path).unwrap();
        assert_eq!(ModelKey::read(&path).unwrap().id(), key.id());
        assert!(ModelKey::generate().write_new(&path).is_err());
        std::fs::write(dir.path().join("bad"), "zz").unwrap();
        assert!(ModelKey::read(&dir.path().join("bad")).is_err());
    }
}
