//! The manifest: which files a model has, which chunks each file is made of, which
//! stripe holds each chunk and where every shard of every stripe lives, with a BLAKE3
//! digest for each. Its canonical encoding is hashed into the model's identity (its
//! [`ModelDigest`]) and signed by the publisher, so a node can check every byte it is
//! handed against something a person vouched for. Checking a signature and computing
//! a digest are pure: the store that writes shards and the control plane that
//! registers models share these rules without sharing any I/O.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::digest::is_digest;
use crate::digest::{ChunkDigest, ModelDigest};
use crate::placement::Policy;

/// The erasure code shards are made with, as a manifest names it: Reed-Solomon over
/// GF(2^8) as `reed-solomon-erasure` computes it. A manifest naming another code is
/// refused, since no reader could rebuild its stripes.
pub const CODEC_NAME: &str = "reed-solomon-erasure/gf8";

/// Largest total shard count GF(2^8) allows.
pub const MAX_SHARDS: usize = 256;

/// Whether k data and m parity shards make a code GF(2^8) can hold: both at least
/// one and k+m at most [`MAX_SHARDS`], checked without overflowing for huge k or m
/// (a manifest is untrusted input).
pub fn params_in_range(k: usize, m: usize) -> bool {
    k >= 1 && m >= 1 && k.checked_add(m).is_some_and(|n| n <= MAX_SHARDS)
}

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// The AEAD chunks are sealed with when a model is encrypted at rest.
pub const AEAD_NAME: &str = "xchacha20poly1305";

/// Bytes an encrypted chunk carries beyond its plaintext: its 24-byte nonce and
/// 16-byte tag.
pub const AEAD_OVERHEAD: u64 = 40;

/// The erasure code a manifest's shards were made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodecInfo {
    /// The codec, [`CODEC_NAME`].
    pub name: String,
    /// Data shards per stripe.
    pub k: usize,
    /// Parity shards per stripe.
    pub m: usize,
}

/// How chunks are sealed at rest. The key stays with the model's owner; backends and
/// the control plane only ever see ciphertext and this description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncryptionInfo {
    /// The AEAD, [`AEAD_NAME`].
    pub aead: String,
    /// Which key: a BLAKE3-derived fingerprint of it, hex.
    pub key_id: String,
}

/// One chunk: the BLAKE3 of its stored bytes and its length. In a file's list the
/// length is the plaintext's; in a stripe's list it is the stored length (plaintext
/// plus [`AEAD_OVERHEAD`] when encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// BLAKE3 of the stored chunk, hex.
    pub blake3: ChunkDigest,
    /// Its length in bytes.
    pub len: u64,
}

/// One file of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the model directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Its chunks in order; their lengths add up to `size`.
    pub chunks: Vec<ChunkRef>,
}

/// A stripe: stored chunks concatenated, erasure coded into k+m shards. Shards are
/// named by content; where each one lives is kept apart, in [`Locations`], so repair
/// can move a shard without changing the model's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Stripe {
    /// The chunks it carries, in order, with their stored lengths. A stripe shared
    /// with an earlier model may carry chunks this model does not use.
    pub chunks: Vec<ChunkRef>,
    /// Their total length.
    pub len: u64,
    /// Bytes per shard.
    pub shard_len: u64,
    /// BLAKE3 of each of its k+m shards, hex: data shards `0..k`, parity `k..k+m`.
    pub shards: Vec<String>,
}

/// A model as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The name it was pushed under.
    pub name: String,
    /// The erasure code.
    pub codec: CodecInfo,
    /// The largest chunk (plaintext).
    pub chunk_size: u64,
    /// Where its shards may be placed.
    pub policy: Policy,
    /// Present when chunks are encrypted at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionInfo>,
    /// The files, ordered by path.
    pub files: Vec<FileEntry>,
    /// The stripes; a chunk shared by several files (or repeated) is stored once.
    pub stripes: Vec<Stripe>,
}

/// The object path of a shard on any backend: named by its digest.
pub fn shard_object(blake3: &str) -> String {
    format!("shards/{}/{blake3}", &blake3[..2.min(blake3.len())])
}

/// Where each shard of each stripe lives: `stripes[i][j]` names the backend holding
/// shard j of stripe i. Not part of the model's identity: repair updates it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Locations {
    /// Backend names, per stripe, per shard.
    pub stripes: Vec<Vec<String>>,
}

impl Locations {
    /// Checks that there is one backend per shard of every stripe of `manifest`, all
    /// distinct within a stripe.
    pub fn validate(&self, manifest: &Manifest) -> Result<(), ManifestError> {
        let n = manifest.shards_per_stripe()?;
        if self.stripes.len() != manifest.stripes.len() {
            return Err(ManifestError::Inconsistent(format!(
                "locations name {} stripes, the manifest has {}",
                self.stripes.len(),
                manifest.stripes.len()
            )));
        }
        for (i, backends) in self.stripes.iter().enumerate() {
            let distinct: BTreeSet<&str> = backends.iter().map(String::as_str).collect();
            if backends.len() != n || distinct.len() != n || distinct.contains("") {
                return Err(ManifestError::Inconsistent(format!(
                    "stripe {i}: needs {n} distinct backends, one per shard"
                )));
            }
        }
        Ok(())
    }
}

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The signature does not match the manifest and publisher key.
    #[error("manifest signature invalid: {0}")]
    Signature(String),
    /// The manifest contradicts itself.
    #[error("manifest inconsistent: {0}")]
    Inconsistent(String),
}

/// The suffix a pull gives a file while writing it; no file of a model may carry it,
/// or a pull could take one file's half-written copy for another.
pub const PARTIAL_SUFFIX: &str = ".aigrid-partial";

/// Whether a manifest's file path is safe to write under a directory: relative,
/// `/`-separated, no empty, `.` or `..` parts.
pub fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

impl Manifest {
    /// The canonical encoding: compact JSON with fields in declaration order and lists
    /// in their stored order, so the same manifest always has the same bytes.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }

    /// The model's identity: BLAKE3 of the canonical encoding.
    pub fn digest(&self) -> ModelDigest {
        ModelDigest::from_hash(blake3::hash(&self.canonical()))
    }

    /// Bytes a chunk carries at rest beyond its plaintext.
    pub fn overhead(&self) -> u64 {
        if self.encryption.is_some() {
            AEAD_OVERHEAD
        } else {
            0
        }
    }

    /// The model's size: its files' bytes. [`Manifest::validate`] checks that the
    /// sum fits; an unchecked manifest saturates rather than overflowing.
    pub fn size(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.size)
            .fold(0, u64::saturating_add)
    }

    /// Bytes its shards take on backends. [`Manifest::validate`] checks that the sum
    /// fits; an unchecked manifest saturates rather than overflowing.
    pub fn stored_bytes(&self) -> u64 {
        let n = self.codec.k.saturating_add(self.codec.m) as u64;
        self.stripes
            .iter()
            .map(|s| s.shard_len.saturating_mul(n))
            .fold(0, u64::saturating_add)
    }

    /// Shards per stripe, k+m, once the code is one GF(2^8) can hold.
    fn shards_per_stripe(&self) -> Result<usize, ManifestError> {
        let (k, m) = (self.codec.k, self.codec.m);
        if !params_in_range(k, m) {
            return Err(ManifestError::Inconsistent(format!("erasure code {k}+{m}")));
        }
        Ok(k + m)
    }

    /// The file at `path`.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Where each stored chunk is: its stripe and its offset in the stripe.
    pub fn chunk_locations(&self) -> BTreeMap<&ChunkDigest, (usize, u64)> {
        let mut at = BTreeMap::new();
        for (i, stripe) in self.stripes.iter().enumerate() {
            let mut offset = 0u64;
            for c in &stripe.chunks {
                at.entry(&c.blake3).or_insert((i, offset));
                // Validation bounds a stripe's chunks by its length.
                offset = offset.saturating_add(c.len);
            }
        }
        at
    }

    /// Checks that the manifest describes one consistent model: sizes add up without
    /// overflow, paths are safe and sorted, every chunk a file uses is stored, every
    /// stripe has k+m shards.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        if self.format != MANIFEST_FORMAT {
            return bad(format!("format {} is not {MANIFEST_FORMAT}", self.format));
        }
        if self.codec.name != CODEC_NAME {
            return bad(format!("unknown codec `{}`", self.codec.name));
        }
        let n = self.shards_per_stripe()?;
        let k = self.codec.k;
        // A stored chunk is at most a plaintext chunk and its seal.
        let max_stored = self.chunk_size.saturating_add(self.overhead());
        if let Some(enc) = &self.encryption {
            if enc.aead != AEAD_NAME || !is_digest(&enc.key_id) {
                return bad(format!("unknown encryption `{}`", enc.aead));
            }
        }
        let mut stored: BTreeMap<&ChunkDigest, u64> = BTreeMap::new();
        let mut stored_bytes = 0u64;
        for (i, stripe) in self.stripes.iter().enumerate() {
            let mut total = 0u64;
            for c in &stripe.chunks {
                // The digest is one by its type.
                if c.len == 0 || c.len > max_stored {
                    return bad(format!("stripe {i}: a malformed chunk"));
                }
                if *stored.entry(&c.blake3).or_insert(c.len) != c.len {
                    return bad(format!("chunk {} has two lengths", c.blake3));
                }
                let Some(sum) = total.checked_add(c.len) else {
                    return bad(format!("stripe {i}: chunk lengths overflow"));
                };
                total = sum;
            }
            if total != stripe.len {
                return bad(format!(
                    "stripe {i}: chunks add up to {total}, not {}",
                    stripe.len
                ));
            }
            if stripe.shard_len != stripe.len.div_ceil(k as u64).max(1) {
                return bad(format!(
                    "stripe {i}: shard length {} is wrong",
                    stripe.shard_len
                ));
            }
            if stripe.shards.len() != n || !stripe.shards.iter().all(|s| is_digest(s)) {
                return bad(format!("stripe {i}: needs {n} shard digests"));
            }
            match stripe
                .shard_len
                .checked_mul(n as u64)
                .and_then(|b| stored_bytes.checked_add(b))
            {
                Some(sum) => stored_bytes = sum,
                None => return bad(format!("stripe {i}: stored bytes overflow")),
            }
        }
        self.validate_paths()?;
        let mut size = 0u64;
        for file in &self.files {
            let total = file
                .chunks
                .iter()
                .try_fold(0u64, |sum, c| sum.checked_add(c.len));
            let Some(total) = total else {
                return bad(format!("file `{}`: chunk lengths overflow", file.path));
            };
            let Some(sum) = size.checked_add(total) else {
                return bad(format!("file `{}`: the model's size overflows", file.path));
            };
            size = sum;
            if total != file.size {
                return bad(format!(
                    "file `{}`: chunks add up to {total} bytes, not {}",
                    file.path, file.size
                ));
            }
            for c in &file.chunks {
                if c.len == 0 || c.len > self.chunk_size {
                    return bad(format!("file `{}`: a malformed chunk", file.path));
                }
                match stored.get(&c.blake3) {
                    Some(len) if Some(*len) == c.len.checked_add(self.overhead()) => {}
                    Some(_) => return bad(format!("chunk {} has two lengths", c.blake3)),
                    None => return bad(format!("chunk {} is in no stripe", c.blake3)),
                }
            }
        }
        Ok(())
    }

    /// Checks the file list is safe to write under one directory: every path safe,
    /// listed once in byte order (as push writes them, so the encoding is canonical),
    /// none also a directory of another (`x` and `x/y`), none ending in
    /// [`PARTIAL_SUFFIX`].
    fn validate_paths(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        for file in &self.files {
            if !is_safe_path(&file.path) {
                return bad(format!(
                    "file path `{}` is not a safe relative path",
                    file.path
                ));
            }
            if file.path.split('/').any(|p| p.ends_with(PARTIAL_SUFFIX)) {
                return bad(format!(
                    "file path `{}` ends in `{PARTIAL_SUFFIX}`, which pull reserves",
                    file.path
                ));
            }
        }
        for pair in self.files.windows(2) {
            if pair[0].path >= pair[1].path {
                return bad(format!(
                    "file `{}` is listed after `{}`: files must be sorted by path, once each",
                    pair[1].path, pair[0].path
                ));
            }
        }
        let paths: BTreeSet<&str> = self.files.iter().map(|f| f.path.as_str()).collect();
        for file in &self.files {
            let mut dirs = file.path.match_indices('/').map(|(at, _)| &file.path[..at]);
            if let Some(dir) = dirs.find(|d| paths.contains(d)) {
                return bad(format!(
                    "file `{dir}` is also a directory of `{}`",
                    file.path
                ));
            }
        }
        Ok(())
    }
}

/// What the control plane registers for a model: the signed manifest and where its
/// shards are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The signed manifest.
    pub manifest: SignedManifest,
    /// Its shards' backends.
    pub locations: Locations,
    /// The circle the model belongs to: its policy decides whether registering and
    /// deleting the model need the circle's quorum, and whether its manifest must be
    /// hybrid-signed. Without one, the model is the admins'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circle: Option<String>,
}

impl Registration {
    /// Checks signature, manifest and locations; answers the digest.
    pub fn verify(&self) -> Result<ModelDigest, ManifestError> {
        let digest = self.manifest.verify()?;
        self.locations.validate(&self.manifest.manifest)?;
        Ok(digest)
    }
}

/// A manifest with its publisher's signature over its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// The publisher's ed25519 public key, hex.
    pub publisher: String,
    /// Its signature, base64: over `aigrid-manifest-v1\n<digest>`, or, for a
    /// hybrid-signed manifest, over the hybrid message that names both keys (see
    /// `ml_dsa`).
    pub signature: String,
    /// For a hybrid-signed manifest: the publisher's ML-DSA-65 key and its signature
    /// over `aigrid-manifest-hybrid-v1\n<digest>\n<publisher>\n<ML-DSA key>`, the
    /// message the ed25519 signature covers too. Both must verify, and removing
    /// this breaks the ed25519 signature, so a hybrid manifest cannot be passed off
    /// as an ed25519-only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ml_dsa: Option<PostQuantumSignature>,
}

/// The post-quantum half of a hybrid-signed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostQuantumSignature {
    /// The publisher's ML-DSA-65 public key (1952 bytes), base64.
    pub public_key: String,
    /// Its ML-DSA-65 signature (3309 bytes), base64.
    pub signature: String,
}

/// The signature schemes a manifest may carry, as `model show` names them.
pub const MANIFEST_ED25519: &str = "ed25519";
/// See [`MANIFEST_ED25519`].
pub const MANIFEST_HYBRID: &str = "ed25519+ml-dsa-65";

fn signed_message(digest: &ModelDigest) -> Vec<u8> {
    format!("aigrid-manifest-v1\n{digest}").into_bytes()
}

fn hybrid_message(digest: &ModelDigest, publisher: &str, ml_dsa_key: &str) -> Vec<u8> {
    format!("aigrid-manifest-hybrid-v1\n{digest}\n{publisher}\n{ml_dsa_key}").into_bytes()
}

impl SignedManifest {
    /// Signs `manifest` with the publisher's key.
    pub fn sign(manifest: Manifest, key: &SigningKey) -> Self {
        let signature = key.sign(&signed_message(&manifest.digest()));
        SignedManifest {
            publisher: crate::auth::hex(&key.verifying_key().to_bytes()),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
            manifest,
            ml_dsa: None,
        }
    }

    /// Signs `manifest` with the publisher's key and with the ML-DSA-65 key derived
    /// from it (the same publisher key file makes both).
    pub fn sign_hybrid(manifest: Manifest, key: &SigningKey) -> Self {
        let b64 = base64::engine::general_purpose::STANDARD;
        let pq = crate::IdentityKey::from_seed(
            crate::KeyAlgorithm::Ed25519MlDsa65,
            blake3::derive_key("aigrid publisher ml-dsa-65 v1", &key.to_bytes()),
        );
        let ml_key = b64.encode(pq.public().ml_dsa_bytes().expect("a hybrid key"));
        let publisher = crate::auth::hex(&key.verifying_key().to_bytes());
        let message = hybrid_message(&manifest.digest(), &publisher, &ml_key);
        let ml_signature = pq.sign_ml_dsa(&message).expect("a hybrid key");
        SignedManifest {
            signature: b64.encode(key.sign(&message).to_bytes()),
            publisher,
            manifest,
            ml_dsa: Some(PostQuantumSignature {
                public_key: ml_key,
                signature: b64.encode(ml_signature),
            }),
        }
    }

    /// The signature scheme the manifest carries: [`MANIFEST_ED25519`] or
    /// [`MANIFEST_HYBRID`].
    pub fn scheme(&self) -> &'static str {
        if self.ml_dsa.is_some() {
            MANIFEST_HYBRID
        } else {
            MANIFEST_ED25519
        }
    }

    /// Checks the signature (both, for a hybrid manifest) and the manifest's
    /// consistency; answers the digest.
    pub fn verify(&self) -> Result<ModelDigest, ManifestError> {
        let sig_err = |m: &str| ManifestError::Signature(m.to_owned());
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = crate::auth::unhex::<32>(&self.publisher)
            .ok_or_else(|| sig_err("the publisher key is not 64 hex characters"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| sig_err("the publisher key is not an ed25519 key"))?;
        let signature: [u8; 64] = b64
            .decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| sig_err("the signature is not 64 base64 bytes"))?;
        let digest = self.manifest.digest();
        let message = match &self.ml_dsa {
            None => signed_message(&digest),
            Some(pq) => hybrid_message(&digest, &self.publisher, &pq.public_key),
        };
        key.verify(&message, &Signature::from_bytes(&signature))
            .map_err(|_| sig_err("it does not match the manifest and publisher"))?;
        if let Some(pq) = &self.ml_dsa {
            let (Ok(ml_key), Ok(ml_signature)) =
                (b64.decode(&pq.public_key), b64.decode(&pq.signature))
            else {
                return Err(sig_err("the ML-DSA-65 key or signature is not base64"));
            };
            crate::identity::verify_ml_dsa_65(&ml_key, &message, &ml_signature)
                .map_err(|e| sig_err(&format!("the ML-DSA-65 signature: {e}")))?;
        }
        self.manifest.validate()?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests;
