//! The manifest: which files a model has, which chunks each file is made of, which
//! stripe holds each chunk and where every shard of every stripe lives, with a BLAKE3
//! digest for each. Its canonical encoding is hashed into the model's identity (its
//! digest) and signed by the publisher, so a node can check every byte it is handed
//! against something a person vouched for.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

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

/// One chunk of a file: its content hash and length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk, hex.
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

/// Where one shard of a stripe lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRef {
    /// Its index in the stripe: data shards `0..k`, parity `k..k+m`.
    pub index: usize,
    /// The backend holding it.
    pub backend: String,
    /// Its object path on that backend.
    pub object: String,
    /// BLAKE3 of the shard, hex.
    pub blake3: String,
}

/// A stripe: chunks concatenated, erasure coded into k+m shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stripe {
    /// The chunks it carries, in order, by hash.
    pub chunks: Vec<String>,
    /// Their total length.
    pub len: u64,
    /// Bytes per shard.
    pub shard_len: u64,
    /// Its k+m shards.
    pub shards: Vec<ShardRef>,
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
    /// The largest chunk.
    pub chunk_size: u64,
    /// The files, ordered by path.
    pub files: Vec<FileEntry>,
    /// The stripes; a chunk shared by several files (or repeated) is stored once.
    pub stripes: Vec<Stripe>,
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

fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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

    /// Where each chunk is stored: its stripe and its offset in the stripe.
    pub fn chunk_locations(&self) -> BTreeMap<&str, (usize, u64)> {
        let mut at = BTreeMap::new();
        for (i, stripe) in self.stripes.iter().enumerate() {
            let mut offset = 0;
            for hash in &stripe.chunks {
                at.entry(hash.as_str()).or_insert((i, offset));
                // A chunk's length comes from the files that use it.
                offset += self.chunk_len(hash).unwrap_or(0);
            }
        }
        at
    }

    fn chunk_len(&self, hash: &str) -> Option<u64> {
        self.files
            .iter()
            .flat_map(|f| &f.chunks)
            .find(|c| c.blake3 == hash)
            .map(|c| c.len)
    }

    /// Checks that the manifest describes one consistent model: sizes add up, every
    /// chunk is stored, every stripe has k+m distinct shards on distinct backends.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        if self.format != MANIFEST_FORMAT {
            return bad(format!("format {} is not {MANIFEST_FORMAT}", self.format));
        }
        let (k, m) = (self.codec.k, self.codec.m);
        if k == 0 || m == 0 {
            return bad(format!("erasure code {k}+{m}"));
        }
        let mut paths = BTreeSet::new();
        let mut lens: BTreeMap<&str, u64> = BTreeMap::new();
        for file in &self.files {
            if !paths.insert(file.path.as_str()) {
                return bad(format!("file `{}` listed twice", file.path));
            }
            let total: u64 = file.chunks.iter().map(|c| c.len).sum();
            if total != file.size {
                return bad(format!(
                    "file `{}`: chunks add up to {total} bytes, not {}",
                    file.path, file.size
                ));
            }
            for c in &file.chunks {
                if !is_digest(&c.blake3) || c.len == 0 || c.len > self.chunk_size {
                    return bad(format!("file `{}`: a malformed chunk", file.path));
                }
                if *lens.entry(c.blake3.as_str()).or_insert(c.len) != c.len {
                    return bad(format!("chunk {} has two lengths", c.blake3));
                }
            }
        }
        let mut stored = BTreeSet::new();
        for (i, stripe) in self.stripes.iter().enumerate() {
            let mut total = 0;
            for hash in &stripe.chunks {
                let Some(len) = lens.get(hash.as_str()) else {
                    return bad(format!("stripe {i} holds chunk {hash} no file uses"));
                };
                total += len;
                stored.insert(hash.as_str());
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
            let indices: BTreeSet<usize> = stripe.shards.iter().map(|s| s.index).collect();
            let backends: BTreeSet<&str> =
                stripe.shards.iter().map(|s| s.backend.as_str()).collect();
            if stripe.shards.len() != k + m
                || indices != (0..k + m).collect()
                || backends.len() != k + m
            {
                return bad(format!(
                    "stripe {i}: needs {} shards with distinct indices on distinct backends",
                    k + m
                ));
            }
            if stripe.shards.iter().any(|s| !is_digest(&s.blake3)) {
                return bad(format!("stripe {i}: a shard digest is malformed"));
            }
        }
        if let Some(missing) = lens.keys().find(|h| !stored.contains(*h)) {
            return bad(format!("chunk {missing} is in no stripe"));
        }
        Ok(())
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
        Manifest {
            format: MANIFEST_FORMAT,
            name: "tiny".into(),
            codec: CodecInfo {
                name: crate::codec::CODEC_NAME.into(),
                k: 2,
                m: 1,
            },
            chunk_size: 4,
            files: vec![
                FileEntry {
                    path: "config.json".into(),
                    size: 7,
                    chunks: vec![
                        ChunkRef {
                            blake3: a.clone(),
                            len: 4,
                        },
                        ChunkRef {
                            blake3: b.clone(),
                            len: 3,
                        },
                    ],
                },
                FileEntry {
                    path: "copy.json".into(),
                    size: 4,
                    chunks: vec![ChunkRef {
                        blake3: a.clone(),
                        len: 4,
                    }],
                },
            ],
            stripes: vec![Stripe {
                chunks: vec![a, b],
                len: 7,
                shard_len: 4,
                shards: (0..3)
                    .map(|i| ShardRef {
                        index: i,
                        backend: format!("site-{i}"),
                        object: format!("shards/x/{i}"),
                        blake3: hex(&[i as u8]),
                    })
                    .collect(),
            }],
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
        moved.manifest.stripes[0].shards[0].backend = "evil".into();
        assert!(matches!(moved.verify(), Err(ManifestError::Signature(_))));
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
            Box::new(|m| m.stripes[0].shards[1].backend = "site-0".into()),
            Box::new(|m| m.stripes[0].len = 6),
            Box::new(|m| m.stripes[0].chunks.pop().map(|_| ()).unwrap()),
            Box::new(|m| m.files[1].path = "config.json".into()),
            Box::new(|m| m.codec.m = 0),
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
