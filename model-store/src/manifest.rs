//! The manifest: which files a model has, which chunks each file is made of, which
//! stripe holds each chunk and where every shard of every stripe lives, with a BLAKE3
//! digest for each. Its canonical encoding is hashed into the model's identity (its
//! digest) and signed by the publisher, so a node can check every byte it is handed
//! against something a person vouched for.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;

use crate::placement::Policy;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// The AEAD chunks are sealed with when a model is encrypted at rest.
pub const AEAD_NAME: &str = "xchacha20poly1305";

/// Bytes an encrypted chunk carries beyond its plaintext: its 24-byte nonce and
/// 16-byte tag.
pub const AEAD_OVERHEAD: u64 = 40;

/// The erasure code a manifest's shards were made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecInfo {
    /// The codec, [`crate::codec::CODEC_NAME`].
    pub name: String,
    /// Data shards per stripe.
    pub k: usize,
    /// Parity shards per stripe.
    pub m: usize,
}

/// How chunks are sealed at rest. The key stays with the model's owner; backends and
/// the control plane only ever see ciphertext and this description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// BLAKE3 of the stored chunk, hex.
    pub blake3: String,
    /// Its length in bytes.
    pub len: u64,
}

/// One file of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locations {
    /// Backend names, per stripe, per shard.
    pub stripes: Vec<Vec<String>>,
}

impl Locations {
    /// Checks that there is one backend per shard of every stripe of `manifest`, all
    /// distinct within a stripe.
    pub fn validate(&self, manifest: &Manifest) -> Result<(), ManifestError> {
        let n = manifest.codec.k + manifest.codec.m;
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

/// Whether `s` is a BLAKE3 digest in lowercase hex.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

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

    /// The model's identity: BLAKE3 of the canonical encoding, hex.
    pub fn digest(&self) -> String {
        blake3::hash(&self.canonical()).to_hex().to_string()
    }

    /// Bytes a chunk carries at rest beyond its plaintext.
    pub fn overhead(&self) -> u64 {
        if self.encryption.is_some() {
            AEAD_OVERHEAD
        } else {
            0
        }
    }

    /// The model's size: its files' bytes.
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Bytes its shards take on backends.
    pub fn stored_bytes(&self) -> u64 {
        let n = (self.codec.k + self.codec.m) as u64;
        self.stripes.iter().map(|s| s.shard_len * n).sum()
    }

    /// The file at `path`.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Where each stored chunk is: its stripe and its offset in the stripe.
    pub fn chunk_locations(&self) -> BTreeMap<&str, (usize, u64)> {
        let mut at = BTreeMap::new();
        for (i, stripe) in self.stripes.iter().enumerate() {
            let mut offset = 0;
            for c in &stripe.chunks {
                at.entry(c.blake3.as_str()).or_insert((i, offset));
                offset += c.len;
            }
        }
        at
    }

    /// Checks that the manifest describes one consistent model: sizes add up, paths
    /// are safe, every chunk a file uses is stored, every stripe has k+m shards.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        if self.format != MANIFEST_FORMAT {
            return bad(format!("format {} is not {MANIFEST_FORMAT}", self.format));
        }
        let (k, m) = (self.codec.k, self.codec.m);
        if self.codec.name != crate::codec::CODEC_NAME {
            return bad(format!("unknown codec `{}`", self.codec.name));
        }
        if k == 0 || m == 0 || k + m > crate::codec::MAX_SHARDS {
            return bad(format!("erasure code {k}+{m}"));
        }
        if let Some(enc) = &self.encryption {
            if enc.aead != AEAD_NAME || !is_digest(&enc.key_id) {
                return bad(format!("unknown encryption `{}`", enc.aead));
            }
        }
        let mut stored: BTreeMap<&str, u64> = BTreeMap::new();
        for (i, stripe) in self.stripes.iter().enumerate() {
            let mut total = 0u64;
            for c in &stripe.chunks {
                if !is_digest(&c.blake3) || c.len == 0 {
                    return bad(format!("stripe {i}: a malformed chunk"));
                }
                if *stored.entry(c.blake3.as_str()).or_insert(c.len) != c.len {
                    return bad(format!("chunk {} has two lengths", c.blake3));
                }
                total = total.saturating_add(c.len);
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
            if stripe.shards.len() != k + m || !stripe.shards.iter().all(|s| is_digest(s)) {
                return bad(format!("stripe {i}: needs {} shard digests", k + m));
            }
        }
        let mut paths = BTreeSet::new();
        for file in &self.files {
            if !is_safe_path(&file.path) {
                return bad(format!(
                    "file path `{}` is not a safe relative path",
                    file.path
                ));
            }
            if !paths.insert(file.path.as_str()) {
                return bad(format!("file `{}` listed twice", file.path));
            }
            let total: u64 = file
                .chunks
                .iter()
                .map(|c| c.len)
                .fold(0, u64::saturating_add);
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
                match stored.get(c.blake3.as_str()) {
                    Some(len) if *len == c.len + self.overhead() => {}
                    Some(_) => return bad(format!("chunk {} has two lengths", c.blake3)),
                    None => return bad(format!("chunk {} is in no stripe", c.blake3)),
                }
            }
        }
        Ok(())
    }
}

/// What the control plane registers for a model: the signed manifest and where its
/// shards are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The signed manifest.
    pub manifest: SignedManifest,
    /// Its shards' backends.
    pub locations: Locations,
}

impl Registration {
    /// Checks signature, manifest and locations; answers the digest.
    pub fn verify(&self) -> Result<String, ManifestError> {
        let digest = self.manifest.verify()?;
        self.locations.validate(&self.manifest.manifest)?;
        Ok(digest)
    }
}

/// A manifest with its publisher's signature over its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// The publisher's ed25519 public key, hex.
    pub publisher: String,
    /// Its signature over `aigrid-manifest-v1\n<digest>`, base64.
    pub signature: String,
}

fn signed_message(digest: &str) -> Vec<u8> {
    format!("aigrid-manifest-v1\n{digest}").into_bytes()
}

impl SignedManifest {
    /// Signs `manifest` with the publisher's key.
    pub fn sign(manifest: Manifest, key: &SigningKey) -> Self {
        let signature = key.sign(&signed_message(&manifest.digest()));
        SignedManifest {
            publisher: aigrid_api::auth::hex(&key.verifying_key().to_bytes()),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
            manifest,
        }
    }

    /// Checks the signature and the manifest's consistency; answers the digest.
    pub fn verify(&self) -> Result<String, ManifestError> {
        let sig_err = |m: &str| ManifestError::Signature(m.to_owned());
        let key = aigrid_api::auth::unhex::<32>(&self.publisher)
            .ok_or_else(|| sig_err("the publisher key is not 64 hex characters"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| sig_err("the publisher key is not an ed25519 key"))?;
        let signature: [u8; 64] = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| sig_err("the signature is not 64 base64 bytes"))?;
        let digest = self.manifest.digest();
        key.verify(&signed_message(&digest), &Signature::from_bytes(&signature))
            .map_err(|_| sig_err("it does not match the manifest and publisher"))?;
        self.manifest.validate()?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    fn manifest() -> Manifest {
        let (a, b) = (hex(b"a"), hex(b"b"));
        let chunk = |h: &String, len| ChunkRef {
            blake3: h.clone(),
            len,
        };
        Manifest {
            format: MANIFEST_FORMAT,
            name: "tiny".into(),
            codec: CodecInfo {
                name: crate::codec::CODEC_NAME.into(),
                k: 2,
                m: 1,
            },
            chunk_size: 4,
            policy: Policy::default(),
            encryption: None,
            files: vec![
                FileEntry {
                    path: "config.json".into(),
                    size: 7,
                    chunks: vec![chunk(&a, 4), chunk(&b, 3)],
                },
                FileEntry {
                    path: "sub/copy.json".into(),
                    size: 4,
                    chunks: vec![chunk(&a, 4)],
                },
            ],
            stripes: vec![Stripe {
                chunks: vec![chunk(&a, 4), chunk(&b, 3)],
                len: 7,
                shard_len: 4,
                shards: (0..3).map(|i| hex(&[i as u8])).collect(),
            }],
        }
    }

    fn locations() -> Locations {
        Locations {
            stripes: vec![(0..3).map(|i| format!("site-{i}")).collect()],
        }
    }

    #[test]
    fn a_signed_manifest_verifies_and_any_change_is_refused() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let signed = SignedManifest::sign(manifest(), &key);
        let digest = signed.verify().unwrap();
        assert_eq!(digest, manifest().digest());
        assert_eq!(
            signed.manifest.chunk_locations()[hex(b"b").as_str()],
            (0, 4)
        );

        let mut altered = signed.clone();
        altered.manifest.files[0].size += 1;
        altered.manifest.files[0].chunks[1].len += 1;
        assert!(matches!(altered.verify(), Err(ManifestError::Signature(_))));
        let mut moved = signed.clone();
        moved.manifest.stripes[0].shards[0] = hex(b"evil");
        assert!(matches!(moved.verify(), Err(ManifestError::Signature(_))));
        // Locations are not signed: repair may move shards; they must still fit.
        let mut registration = Registration {
            manifest: signed.clone(),
            locations: locations(),
        };
        assert_eq!(registration.verify().unwrap(), digest);
        registration.locations.stripes[0][1] = "site-0".into();
        assert!(matches!(
            registration.verify(),
            Err(ManifestError::Inconsistent(_))
        ));
        let mut resigned = signed.clone();
        resigned.publisher =
            SignedManifest::sign(manifest(), &SigningKey::from_bytes(&[6; 32])).publisher;
        assert!(matches!(
            resigned.verify(),
            Err(ManifestError::Signature(_))
        ));
        let mut garbled = signed.clone();
        garbled.signature = "AAAA".into();
        assert!(matches!(garbled.verify(), Err(ManifestError::Signature(_))));
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        manifest().validate().unwrap();
        type Edit = Box<dyn Fn(&mut Manifest)>;
        let broken: Vec<Edit> = vec![
            Box::new(|m| m.files[0].size = 8),
            Box::new(|m| m.stripes[0].shards.pop().map(|_| ()).unwrap()),
            Box::new(|m| m.stripes[0].shards[1] = "not hex".into()),
            Box::new(|m| m.stripes[0].len = 6),
            Box::new(|m| {
                m.stripes[0].chunks.pop();
                m.stripes[0].len = 4;
            }),
            Box::new(|m| m.files[1].path = "config.json".into()),
            Box::new(|m| m.files[1].path = "../escape".into()),
            Box::new(|m| m.files[1].path = "/etc/passwd".into()),
            Box::new(|m| m.files[1].path = "a//b".into()),
            Box::new(|m| m.codec.m = 0),
            Box::new(|m| m.codec.name = "other".into()),
        ];
        for (i, edit) in broken.iter().enumerate() {
            let mut m = manifest();
            edit(&mut m);
            assert!(
                matches!(m.validate(), Err(ManifestError::Inconsistent(_))),
                "case {i}"
            );
        }
    }
}
