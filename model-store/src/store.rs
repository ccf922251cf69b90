//! Push and pull over a set of backends: a model directory in, a signed manifest
//! out; a manifest in, the files back, every shard and chunk verified on the way.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ed25519_dalek::SigningKey;

use crate::backend::{Backend, BackendError};
use crate::chunk;
use crate::codec::{Codec, CodecError, Params, CODEC_NAME};
use crate::manifest::{
    ChunkRef, CodecInfo, FileEntry, Manifest, ManifestError, ShardRef, SignedManifest, Stripe,
    MANIFEST_FORMAT,
};

/// Why a push or pull failed.
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
    /// Fewer backends than shards per stripe.
    #[error("a {k}+{m} code needs {need} backends, only {have} are configured")]
    NotEnoughBackends {
        /// Data shards.
        k: usize,
        /// Parity shards.
        m: usize,
        /// Backends needed.
        need: usize,
        /// Backends available.
        have: usize,
    },
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

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// What to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The model's name.
    pub name: String,
    /// The erasure code.
    pub params: Params,
    /// The largest chunk.
    pub chunk_size: u64,
}

/// Shards over a set of backends.
#[derive(Debug, Clone)]
pub struct Store {
    backends: Vec<Backend>,
}

/// A stripe being filled with chunks.
#[derive(Default)]
struct OpenStripe {
    chunks: Vec<String>,
    bytes: Vec<u8>,
}

impl Store {
    /// A store over `backends`.
    pub fn new(backends: Vec<Backend>) -> Self {
        Store { backends }
    }

    fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Cuts, hashes, codes and stores every file under `dir`, and answers the signed
    /// manifest. A chunk seen before in the push is stored once.
    pub async fn push(
        &self,
        dir: &Path,
        opts: &PushOptions,
        key: &SigningKey,
    ) -> Result<SignedManifest, StoreError> {
        let codec = Codec::new(opts.params)?;
        let Params { k, m } = opts.params;
        if self.backends.len() < k + m {
            return Err(StoreError::NotEnoughBackends {
                k,
                m,
                need: k + m,
                have: self.backends.len(),
            });
        }
        let mut paths = Vec::new();
        walk(dir, dir, &mut paths)?;
        paths.sort();
        let mut files = Vec::new();
        let mut stripes = Vec::new();
        let mut seen = HashSet::new();
        let mut open = OpenStripe::default();
        for rel in paths {
            let path = dir.join(&rel);
            let mut file = std::fs::File::open(&path).map_err(io(&path))?;
            let size = file.metadata().map_err(io(&path))?.len();
            let bounds = if rel.ends_with(".safetensors") && size >= 8 {
                let mut prefix = [0u8; 8];
                file.read_exact(&mut prefix).map_err(io(&path))?;
                let len = chunk::safetensors_header_len(&prefix)
                    .unwrap_or(0)
                    .min(size);
                let mut header = vec![0u8; usize::try_from(len).unwrap_or(0)];
                file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
                file.read_exact(&mut header).map_err(io(&path))?;
                // A file that only looks like safetensors is cut by size alone.
                chunk::safetensors_boundaries(&header).unwrap_or_default()
            } else {
                Vec::new()
            };
            let mut chunks = Vec::new();
            for range in chunk::cut(size, opts.chunk_size, &bounds) {
                let mut buf = vec![0u8; usize::try_from(range.end - range.start).unwrap_or(0)];
                file.seek(SeekFrom::Start(range.start)).map_err(io(&path))?;
                file.read_exact(&mut buf).map_err(io(&path))?;
                let hash = hex(&buf);
                chunks.push(ChunkRef {
                    blake3: hash.clone(),
                    len: buf.len() as u64,
                });
                if seen.insert(hash.clone()) {
                    open.chunks.push(hash);
                    open.bytes.extend_from_slice(&buf);
                    if open.chunks.len() == k {
                        let full = std::mem::take(&mut open);
                        stripes.push(self.store_stripe(&codec, stripes.len(), full).await?);
                    }
                }
            }
            files.push(FileEntry {
                path: rel,
                size,
                chunks,
            });
        }
        if !open.chunks.is_empty() {
            stripes.push(self.store_stripe(&codec, stripes.len(), open).await?);
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: opts.name.clone(),
            codec: CodecInfo {
                name: CODEC_NAME.into(),
                k,
                m,
            },
            chunk_size: opts.chunk_size,
            files,
            stripes,
        };
        manifest.validate()?;
        Ok(SignedManifest::sign(manifest, key))
    }

    /// Codes one stripe and writes its shards, shard j of stripe i on backend
    /// (i + j) mod n, so consecutive stripes spread over every backend.
    async fn store_stripe(
        &self,
        codec: &Codec,
        index: usize,
        stripe: OpenStripe,
    ) -> Result<Stripe, StoreError> {
        let shards = codec.encode(&stripe.bytes);
        let n = self.backends.len();
        let mut refs = Vec::new();
        let mut writes = Vec::new();
        for (j, shard) in shards.into_iter().enumerate() {
            let backend = &self.backends[(index + j) % n];
            let digest = hex(&shard);
            let object = format!("shards/{digest}");
            refs.push(ShardRef {
                index: j,
                backend: backend.name.clone(),
                object: object.clone(),
                blake3: digest,
            });
            writes.push(async move { backend.put(&object, Bytes::from(shard)).await });
        }
        for result in futures_util::future::join_all(writes).await {
            result?;
        }
        Ok(Stripe {
            len: stripe.bytes.len() as u64,
            shard_len: codec.shard_len(stripe.bytes.len()) as u64,
            chunks: stripe.chunks,
            shards: refs,
        })
    }

    /// One stripe's bytes, from whichever shards are there and intact: a shard whose
    /// digest does not match counts as missing.
    async fn read_stripe(
        &self,
        manifest: &Manifest,
        codec: &Codec,
        index: usize,
        file: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let stripe = &manifest.stripes[index];
        let fetches = stripe.shards.iter().map(|s| async move {
            let backend = self.backend(&s.backend)?;
            match backend.get(&s.object).await {
                Ok(Some(bytes)) if hex(&bytes) == s.blake3 => Some((s.index, bytes.to_vec())),
                _ => None,
            }
        });
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; stripe.shards.len()];
        for (i, bytes) in futures_util::future::join_all(fetches)
            .await
            .into_iter()
            .flatten()
        {
            shards[i] = Some(bytes);
        }
        let len = usize::try_from(stripe.len).unwrap_or(usize::MAX);
        codec.decode(shards, len).map_err(|e| match e {
            CodecError::TooFewShards { have, k } => StoreError::Unrecoverable {
                file: file.to_owned(),
                stripe: index,
                have,
                k,
            },
            other => StoreError::Codec(other),
        })
    }

    /// Writes the model `signed` describes under `dest`, after checking its signature;
    /// every chunk is checked against its hash before it is written.
    pub async fn pull(&self, signed: &SignedManifest, dest: &Path) -> Result<(), StoreError> {
        signed.verify()?;
        let manifest = &signed.manifest;
        let codec = Codec::new(Params {
            k: manifest.codec.k,
            m: manifest.codec.m,
        })?;
        let locations = manifest.chunk_locations();
        let mut cached: Option<(usize, Vec<u8>)> = None;
        for entry in &manifest.files {
            let path = dest.join(&entry.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let tmp = path.with_extension("aigrid-partial");
            let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            for c in &entry.chunks {
                let (stripe, offset) = locations[c.blake3.as_str()];
                if cached.as_ref().map(|(i, _)| *i) != Some(stripe) {
                    let bytes = self
                        .read_stripe(manifest, &codec, stripe, &entry.path)
                        .await?;
                    cached = Some((stripe, bytes));
                }
                let bytes = &cached.as_ref().expect("just filled").1;
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let end = start + usize::try_from(c.len).unwrap_or(usize::MAX);
                let chunk = &bytes[start..end];
                if hex(chunk) != c.blake3 {
                    // Shards checked out but the chunk does not: never write it.
                    return Err(StoreError::Manifest(ManifestError::Inconsistent(format!(
                        "file `{}`: a chunk in stripe {stripe} does not match its hash",
                        entry.path
                    ))));
                }
                out.write_all(chunk).map_err(io(&tmp))?;
            }
            out.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// Every regular file under `dir`, as `/`-separated paths relative to `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).expect("under root");
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn backends(root: &Path, n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend::local(format!("site-{i}"), &root.join(format!("site-{i}"))).unwrap())
            .collect()
    }

    /// Pushes a model of one file of `size` random bytes with `k`+`m` over k+m
    /// backends and chunks of 1 KiB.
    async fn pushed(
        k: usize,
        m: usize,
        size: usize,
    ) -> (tempfile::TempDir, Store, SignedManifest, Vec<u8>) {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(size as u64);
        let bytes: Vec<u8> = (0..size).map(|_| rng.random()).collect();
        std::fs::write(model.join("sub/weights.bin"), &bytes).unwrap();
        let store = Store::new(backends(root.path(), k + m));
        let opts = PushOptions {
            name: "m".into(),
            params: Params { k, m },
            chunk_size: 1024,
        };
        let signed = store
            .push(&model, &opts, &SigningKey::from_bytes(&[1; 32]))
            .await
            .unwrap();
        (root, store, signed, bytes)
    }

    #[tokio::test]
    async fn any_m_lost_backends_pull_back_the_same_bytes_and_m_plus_one_fail() {
        for (k, m) in [(2, 1), (4, 2)] {
            for size in [0usize, 1, 1023, 1024, 1025, 37 * 1024 + 5] {
                let (root, store, signed, bytes) = pushed(k, m, size).await;
                let manifest = &signed.manifest;
                for lose in 0..=m + 1 {
                    // Drop the shards of `lose` backends (every shard they hold).
                    let store = Store::new(store.backends[lose..].to_vec());
                    let dest = root.path().join(format!("out-{lose}"));
                    let result = store.pull(&signed, &dest).await;
                    if lose <= m || manifest.stripes.is_empty() {
                        result.unwrap();
                        let back = std::fs::read(dest.join("sub/weights.bin")).unwrap();
                        assert!(back == bytes, "{k}+{m} size {size} lost {lose}");
                    } else {
                        let err = result.unwrap_err();
                        assert!(
                            matches!(&err, StoreError::Unrecoverable { file, .. } if file == "sub/weights.bin"),
                            "{err}"
                        );
                        assert!(!dest.join("sub/weights.bin").exists());
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_flipped_bit_in_a_shard_counts_as_missing() {
        let (root, store, signed, bytes) = pushed(4, 2, 9000).await;
        let shard = &signed.manifest.stripes[0].shards[1];
        let file = root.path().join(&shard.backend).join(&shard.object);
        let mut data = std::fs::read(&file).unwrap();
        data[3] ^= 0x10;
        std::fs::write(&file, data).unwrap();
        let dest = root.path().join("out");
        store.pull(&signed, &dest).await.unwrap();
        assert_eq!(std::fs::read(dest.join("sub/weights.bin")).unwrap(), bytes);
        // An altered manifest is refused before anything is read.
        let mut forged = signed.clone();
        forged.manifest.files[0].path = "other.bin".into();
        assert!(matches!(
            store.pull(&forged, &root.path().join("forged")).await,
            Err(StoreError::Manifest(ManifestError::Signature(_)))
        ));
    }

    #[tokio::test]
    async fn too_few_backends_and_a_missing_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(backends(root.path(), 3));
        let opts = PushOptions {
            name: "m".into(),
            params: Params { k: 4, m: 2 },
            chunk_size: 1024,
        };
        let key = SigningKey::from_bytes(&[1; 32]);
        assert!(matches!(
            store.push(root.path(), &opts, &key).await,
            Err(StoreError::NotEnoughBackends {
                need: 6,
                have: 3,
                ..
            })
        ));
        let opts = PushOptions {
            params: Params { k: 2, m: 1 },
            ..opts
        };
        assert!(matches!(
            store.push(&root.path().join("nope"), &opts, &key).await,
            Err(StoreError::Io { .. })
        ));
    }
}
