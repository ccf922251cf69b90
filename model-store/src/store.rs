//! The store over a set of backends, and push and removal on it: a model directory
//! in, a signed manifest and shard locations out (its chunks deduplicated against
//! models the publisher already stored); a registration's shards removed unless
//! another model uses them. Pull, reads and repair are `pull`'s, `reader`'s and
//! `repair`'s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aigrid_api::ChunkDigest;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::chunk;
use crate::codec::{Codec, Params, CODEC_NAME};
use crate::crypto::ModelKey;
use crate::error::io;
use crate::manifest::{
    shard_object, ChunkRef, CodecInfo, EncryptionInfo, Locations, Manifest, Registration,
    SignedManifest, Stripe, AEAD_NAME, MANIFEST_FORMAT,
};
use crate::placement::{Place, Policy};
use crate::source::{cut_files, walk, CutChunk};

pub use crate::error::StoreError;

/// BLAKE3 of a shard's bytes, hex: its name.
pub(crate) fn hex(data: &[u8]) -> String {
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
    /// Where shards may go.
    pub policy: Policy,
    /// Seal chunks under this key.
    pub key: Option<ModelKey>,
    /// Models already stored on these backends: a chunk one of them holds, in a
    /// stripe whose shards are all present and where the policy allows, is not stored
    /// again. Only models signed by the pushing key count: a stripe is only as good as
    /// its publisher's word, and a stranger's could hold other bytes under a chunk's
    /// name.
    pub known: Vec<Registration>,
    /// Live counters for a progress display.
    pub progress: Arc<PushProgress>,
    /// Sign the manifest hybrid: ed25519 and the ML-DSA-65 key derived from the
    /// same publisher key.
    pub hybrid: bool,
}

impl PushOptions {
    /// Options with the defaults: 4 MiB chunks, no policy, no key, nothing known.
    pub fn new(name: impl Into<String>, params: Params) -> Self {
        PushOptions {
            name: name.into(),
            params,
            chunk_size: chunk::DEFAULT_CHUNK_SIZE,
            policy: Policy::default(),
            key: None,
            known: Vec::new(),
            progress: Arc::default(),
            hybrid: false,
        }
    }
}

/// Live counters of a push.
#[derive(Debug, Default)]
pub struct PushProgress {
    /// Bytes in the model's files.
    pub total_bytes: AtomicU64,
    /// Bytes read so far.
    pub bytes_read: AtomicU64,
    /// Chunks cut so far.
    pub chunks: AtomicU64,
    /// Chunks not stored because a copy already was.
    pub dedup_chunks: AtomicU64,
    /// Their bytes.
    pub dedup_bytes: AtomicU64,
    /// Shard bytes written to backends.
    pub bytes_uploaded: AtomicU64,
}

/// What a push did, when it is done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Bytes in the model's files.
    pub total_bytes: u64,
    /// Chunks cut.
    pub chunks: u64,
    /// Chunks not stored because a copy already was.
    pub dedup_chunks: u64,
    /// Their bytes.
    pub dedup_bytes: u64,
    /// Shard bytes written to backends.
    pub bytes_uploaded: u64,
    /// Stripes written.
    pub stripes_written: u64,
    /// Stripes of earlier models reused.
    pub stripes_reused: u64,
}

impl PushProgress {
    fn reset(&self) {
        for counter in [
            &self.total_bytes,
            &self.bytes_read,
            &self.chunks,
            &self.dedup_chunks,
            &self.dedup_bytes,
            &self.bytes_uploaded,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A finished push: what to register, and what it cost.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The signed manifest and shard locations.
    pub registration: Registration,
    /// Counters.
    pub stats: PushStats,
}

/// Shards over a set of backends.
#[derive(Debug, Clone)]
pub struct Store {
    backends: Vec<Backend>,
}

/// A stripe being filled with chunks.
#[derive(Default)]
struct OpenStripe {
    chunks: Vec<ChunkRef>,
    /// The chunks' bytes, kept apart: when they are k equal chunks they are the data
    /// shards as they are.
    parts: Vec<Bytes>,
}

/// Stripes written at once by a push: enough to keep every core and backend busy.
const PUSH_STRIPES_IN_FLIGHT: usize = 4;

impl Store {
    /// A store over `backends`.
    pub fn new(backends: Vec<Backend>) -> Self {
        Store { backends }
    }

    /// Its backends.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Indices of `names` among the backends, or `None` if one is not configured.
    pub(crate) fn indices(&self, names: &[String]) -> Option<Vec<usize>> {
        names
            .iter()
            .map(|n| self.backends.iter().position(|b| &b.name == n))
            .collect()
    }

    pub(crate) fn attributes(&self) -> Vec<&BTreeMap<String, String>> {
        self.backends.iter().map(|b| &b.attributes).collect()
    }

    /// Cuts, hashes, (seals,) codes and stores every file under `dir`, and answers
    /// the signed manifest and shard locations to register. Nothing is registered
    /// here; a push that fails leaves at most unreferenced shards behind.
    pub async fn push(
        &self,
        dir: &Path,
        opts: &PushOptions,
        key: &SigningKey,
    ) -> Result<Pushed, StoreError> {
        let codec = Arc::new(Codec::new(opts.params)?);
        let Params { k, m } = opts.params;
        // Refuse an unplaceable policy before reading a byte.
        opts.policy.place(&self.attributes(), k + m, &[], 0)?;
        let mut paths = Vec::new();
        walk(dir, dir, &mut paths)?;
        paths.sort();
        let mut total = 0;
        for rel in &paths {
            let path = dir.join(rel);
            // Every file must open now, not half way through the upload.
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            total += file.metadata().map_err(io(&path))?.len();
        }
        let progress = opts.progress.clone();
        progress.reset();
        progress.total_bytes.store(total, Ordering::Relaxed);

        let (tx, mut rx) = mpsc::channel::<CutChunk>(2 * k);
        let reader = {
            let dir = dir.to_path_buf();
            let chunk_size = opts.chunk_size.max(1);
            let seal = opts.key.clone();
            let progress = progress.clone();
            tokio::task::spawn_blocking(move || {
                let read = |len| {
                    PushProgress::add(&progress.bytes_read, len);
                    PushProgress::add(&progress.chunks, 1);
                };
                cut_files(&dir, &paths, chunk_size, seal.as_ref(), &read, &tx)
            })
        };

        let publisher = aigrid_api::auth::hex(&key.verifying_key().to_bytes());
        let known = KnownChunks::new(&opts.known, &publisher, opts, self);
        let mut stats = PushStats {
            total_bytes: total,
            ..PushStats::default()
        };
        let mut stored: HashSet<ChunkDigest> = HashSet::new();
        let mut stripes: Vec<Option<Stripe>> = Vec::new();
        let mut locations: Vec<Vec<String>> = Vec::new();
        let mut reused: HashSet<(usize, usize)> = HashSet::new();
        let mut open = OpenStripe::default();
        let mut writes = futures_util::stream::FuturesUnordered::new();
        let attributes = self.attributes();
        let seal_stripe = |open: OpenStripe,
                           stripes: &mut Vec<Option<Stripe>>,
                           locations: &mut Vec<Vec<String>>|
         -> Result<_, StoreError> {
            let index = stripes.len();
            let picked = opts.policy.place(&attributes, k + m, &[], index)?;
            let targets: Vec<Backend> = picked.iter().map(|i| self.backends[*i].clone()).collect();
            locations.push(targets.iter().map(|b| b.name.clone()).collect());
            stripes.push(None);
            let codec = codec.clone();
            let progress = progress.clone();
            // Its own task: a stripe is coded and written while the next is read.
            let task = tokio::spawn(async move {
                let stripe = write_stripe(&codec, open, &targets, &progress).await?;
                Ok::<_, StoreError>((index, stripe))
            });
            Ok(async move { task.await.expect("writing a stripe does not panic") })
        };
        loop {
            // Keep a bounded number of stripes in flight.
            while writes.len() >= PUSH_STRIPES_IN_FLIGHT {
                let (i, stripe) = writes.next().await.expect("non-empty")?;
                stripes[i] = Some(stripe);
            }
            let Some(chunk) = rx.recv().await else { break };
            stats.chunks += 1;
            // Stored already: earlier in this push, or in a sound stripe of a model
            // this publisher registered (reused whole, once).
            let present = stored.contains(&chunk.hash)
                || match known.healthy(&chunk.hash).await {
                    Some(at) => {
                        if reused.insert(at) {
                            let known = &opts.known[at.0];
                            let manifest = &known.manifest.manifest;
                            stripes.push(Some(manifest.stripes[at.1].clone()));
                            locations.push(known.locations.stripes[at.1].clone());
                            stats.stripes_reused += 1;
                            for c in &manifest.stripes[at.1].chunks {
                                stored.insert(c.blake3.clone());
                            }
                        }
                        true
                    }
                    None => false,
                };
            if present {
                stats.dedup_chunks += 1;
                stats.dedup_bytes += chunk.plain_len;
                PushProgress::add(&progress.dedup_chunks, 1);
                PushProgress::add(&progress.dedup_bytes, chunk.plain_len);
                continue;
            }
            stored.insert(chunk.hash.clone());
            open.chunks.push(ChunkRef {
                blake3: chunk.hash,
                len: chunk.bytes.len() as u64,
            });
            open.parts.push(Bytes::from(chunk.bytes));
            if open.chunks.len() == k {
                let full = std::mem::take(&mut open);
                writes.push(seal_stripe(full, &mut stripes, &mut locations)?);
                stats.stripes_written += 1;
            }
        }
        let files = reader.await.expect("the reader thread does not panic")?;
        if !open.chunks.is_empty() {
            writes.push(seal_stripe(open, &mut stripes, &mut locations)?);
            stats.stripes_written += 1;
        }
        while let Some(done) = writes.next().await {
            let (i, stripe) = done?;
            stripes[i] = Some(stripe);
        }
        stats.bytes_uploaded = progress.bytes_uploaded.load(Ordering::Relaxed);
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: opts.name.clone(),
            codec: CodecInfo {
                name: CODEC_NAME.into(),
                k,
                m,
            },
            chunk_size: opts.chunk_size.max(1),
            policy: opts.policy.clone(),
            encryption: opts.key.as_ref().map(|key| EncryptionInfo {
                aead: AEAD_NAME.into(),
                key_id: key.id(),
            }),
            files,
            stripes: stripes
                .into_iter()
                .map(|s| s.expect("every stripe was written"))
                .collect(),
        };
        let registration = Registration {
            manifest: if opts.hybrid {
                SignedManifest::sign_hybrid(manifest, key)
            } else {
                SignedManifest::sign(manifest, key)
            },
            locations: Locations { stripes: locations },
            circle: None,
        };
        registration.verify()?;
        Ok(Pushed {
            registration,
            stats,
        })
    }

    /// Deletes the shards of `registration` that none of `keep` uses; answers how many
    /// were deleted. Shards on backends this store does not have are skipped.
    pub async fn remove(
        &self,
        registration: &Registration,
        keep: &[Registration],
    ) -> Result<usize, StoreError> {
        let mut kept: HashSet<(&str, &str)> = HashSet::new();
        for other in keep {
            for_each_shard(other, |backend, digest| {
                kept.insert((backend, digest));
            });
        }
        let mut doomed: Vec<(&str, &str)> = Vec::new();
        for_each_shard(registration, |backend, digest| {
            if !kept.contains(&(backend, digest)) {
                doomed.push((backend, digest));
            }
        });
        doomed.sort_unstable();
        doomed.dedup();
        let mut deleted = 0;
        let mut first_error = None;
        let mut failed = 0;
        let mut deletes =
            futures_util::stream::iter(doomed.into_iter().filter_map(|(backend, digest)| {
                let backend = self.backend(backend)?;
                Some(async move { backend.delete(&shard_object(digest)).await })
            }))
            .buffer_unordered(16);
        // Try every shard: one unreachable backend must not strand the rest.
        while let Some(result) = deletes.next().await {
            match result {
                Ok(()) => deleted += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(deleted),
            Some(e) => Err(StoreError::RemoveIncomplete {
                deleted,
                failed,
                first: e,
            }),
        }
    }
}

fn for_each_shard<'a>(registration: &'a Registration, mut f: impl FnMut(&'a str, &'a str)) {
    let manifest = &registration.manifest.manifest;
    for (stripe, backends) in manifest.stripes.iter().zip(&registration.locations.stripes) {
        for (digest, backend) in stripe.shards.iter().zip(backends) {
            f(backend.as_str(), digest.as_str());
        }
    }
}

/// Chunks of known models, by stored digest, with a memory of which of their stripes
/// were found whole.
struct KnownChunks<'a> {
    at: HashMap<&'a ChunkDigest, (usize, usize)>,
    known: &'a [Registration],
    store: &'a Store,
    policy: &'a Policy,
    checked: tokio::sync::Mutex<HashMap<(usize, usize), bool>>,
}

impl<'a> KnownChunks<'a> {
    fn new(
        known: &'a [Registration],
        publisher: &str,
        opts: &'a PushOptions,
        store: &'a Store,
    ) -> Self {
        let (params, policy) = (opts.params, &opts.policy);
        let key_id = opts.key.as_ref().map(ModelKey::id);
        let mut at = HashMap::new();
        for (i, registration) in known.iter().enumerate() {
            let manifest = &registration.manifest.manifest;
            // Its stripes must fit this model's manifest: same code, chunk size, sealing.
            let same_code = manifest.codec.name == CODEC_NAME
                && manifest.codec.k == params.k
                && manifest.codec.m == params.m
                && manifest.chunk_size == opts.chunk_size.max(1)
                && manifest.encryption.as_ref().map(|e| &e.key_id) == key_id.as_ref();
            if !same_code
                || registration.manifest.publisher != publisher
                || registration.verify().is_err()
            {
                continue;
            }
            for (s, stripe) in manifest.stripes.iter().enumerate() {
                for c in &stripe.chunks {
                    at.entry(&c.blake3).or_insert((i, s));
                }
            }
        }
        KnownChunks {
            at,
            known,
            store,
            policy,
            checked: Default::default(),
        }
    }

    /// The known stripe holding `hash`, if every one of its shards is present on a
    /// configured backend the policy allows.
    async fn healthy(&self, hash: &ChunkDigest) -> Option<(usize, usize)> {
        let at = *self.at.get(hash)?;
        let mut checked = self.checked.lock().await;
        if let Some(ok) = checked.get(&at) {
            return ok.then_some(at);
        }
        let registration = &self.known[at.0];
        let stripe = &registration.manifest.manifest.stripes[at.1];
        let names = &registration.locations.stripes[at.1];
        let ok = match self.store.indices(names) {
            Some(indices) if self.policy.admits(&self.store.attributes(), &indices) => {
                let heads = indices.iter().zip(&stripe.shards).map(|(i, digest)| {
                    let backend = &self.store.backends[*i];
                    async move { backend.head(&shard_object(digest)).await }
                });
                futures_util::future::join_all(heads)
                    .await
                    .into_iter()
                    .all(|r| matches!(r, Ok(Some(len)) if len == stripe.shard_len))
            }
            _ => false,
        };
        checked.insert(at, ok);
        ok.then_some(at)
    }
}

/// Codes one stripe ([`Codec::code_stripe`]) and writes its shards to `targets`,
/// shard j on `targets[j]`; a data shard that is exactly one chunk takes that
/// chunk's digest instead of being hashed again.
async fn write_stripe(
    codec: &Arc<Codec>,
    open: OpenStripe,
    targets: &[Backend],
    progress: &PushProgress,
) -> Result<Stripe, StoreError> {
    let len: usize = open.parts.iter().map(Bytes::len).sum();
    let shard_len = codec.shard_len(len);
    let (shards, digests, chunks) = {
        let codec = codec.clone();
        tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let OpenStripe { chunks, parts } = open;
            let shards = codec.code_stripe(parts)?;
            // Data shards that are one whole chunk already have a digest.
            let mut whole: HashMap<usize, &str> = HashMap::new();
            let mut at = 0usize;
            for c in &chunks {
                if c.len as usize == shard_len && at.is_multiple_of(shard_len) {
                    whole.insert(at / shard_len, c.blake3.as_str());
                }
                at += c.len as usize;
            }
            let digests: Vec<String> = shards
                .iter()
                .enumerate()
                .map(|(j, d)| whole.get(&j).map_or_else(|| hex(d), |h| (*h).to_owned()))
                .collect();
            Ok((shards, digests, chunks))
        })
        .await
        .expect("encoding does not panic")?
    };
    let writes = shards.into_iter().zip(targets).zip(&digests).map(
        |((shard, backend), digest)| async move {
            let n = shard.len() as u64;
            backend.put(&shard_object(digest), shard).await?;
            PushProgress::add(&progress.bytes_uploaded, n);
            Ok::<_, StoreError>(())
        },
    );
    for result in futures_util::future::join_all(writes).await {
        result?;
    }
    Ok(Stripe {
        len: len as u64,
        shard_len: shard_len as u64,
        chunks,
        shards: digests,
    })
}
