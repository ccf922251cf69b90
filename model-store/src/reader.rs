//! The verified lazy reader. `read_at(file, offset, len)` fetches only the stripes
//! that cover the range, each from any k of its k+m shards in parallel (the fastest
//! backends first, one more request whenever a shard is late or bad), checks every
//! shard and chunk against the signed manifest before a byte is returned, and keeps
//! verified chunks in a bounded on-disk cache. A safetensors view on top gives tensors
//! by name, fetched on demand.

mod range;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

use crate::backend::Backend;
use crate::cache::ChunkCache;
use crate::codec::{Codec, Params};
use crate::crypto::ModelKey;
use crate::error::StoreError;
use crate::manifest::{shard_object, Locations, Manifest, Registration};
use crate::opener::ChunkOpener;
use crate::store::{hex, Store};
use aigrid_api::{ChunkDigest, ModelDigest};

/// Stripes of `manifest` fetched at once within the options' byte budget.
fn stripes_in_parallel(manifest: &Manifest, options: &FetchOptions) -> usize {
    let largest = manifest
        .stripes
        .iter()
        .map(|s| s.len)
        .max()
        .unwrap_or(1)
        .max(1);
    (options.bytes_in_flight / largest).clamp(2, 32) as usize
}

/// How stripes are fetched.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Ask one more shard when a request is slower than this many times the
    /// backend's usual latency.
    pub hedge_factor: f64,
    /// Never hedge sooner than this.
    pub hedge_min: Duration,
    /// Hedge after this long when nothing is known about the backends yet.
    pub hedge_initial: Duration,
    /// Bytes of stripes fetched at once by bulk reads (pull, pre-warm).
    pub bytes_in_flight: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            hedge_factor: 3.0,
            hedge_min: Duration::from_millis(50),
            hedge_initial: Duration::from_millis(500),
            bytes_in_flight: 256 << 20,
        }
    }
}

/// Counters of what a reader fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Shard requests sent.
    pub requests: u64,
    /// Extra requests sent because one was late.
    pub hedged: u64,
    /// Shards that were missing, unreachable or corrupt.
    pub bad_shards: u64,
    /// Shard bytes received and verified.
    pub bytes: u64,
    /// Stripes rebuilt from parity.
    pub reconstructed: u64,
    /// Chunks served from the cache.
    pub cache_hits: u64,
}

/// Fetches whole stripes of one model.
pub(crate) struct Fetcher {
    store: Store,
    manifest: Arc<Manifest>,
    locations: Locations,
    codec: Arc<Codec>,
    options: FetchOptions,
    /// Smoothed shard latency per backend, seconds.
    latency: Mutex<HashMap<String, f64>>,
    stats: Mutex<FetchStats>,
    /// Stripe fetches in flight across every caller of this fetcher.
    slots: tokio::sync::Semaphore,
}

/// How one shard's request ended.
enum Outcome {
    Shard(usize, Bytes),
    Bad(usize),
}

impl Fetcher {
    pub(crate) fn new(
        store: Store,
        manifest: Manifest,
        locations: Locations,
        options: FetchOptions,
    ) -> Result<Self, StoreError> {
        let codec = Codec::new(Params {
            k: manifest.codec.k,
            m: manifest.codec.m,
        })?;
        let mut options = options;
        if !(options.hedge_factor.is_finite() && options.hedge_factor > 0.0) {
            options.hedge_factor = FetchOptions::default().hedge_factor;
        }
        let slots = tokio::sync::Semaphore::new(stripes_in_parallel(&manifest, &options));
        Ok(Fetcher {
            slots,
            store,
            manifest: Arc::new(manifest),
            locations,
            codec: Arc::new(codec),
            options,
            latency: Mutex::default(),
            stats: Mutex::default(),
        })
    }

    pub(crate) fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub(crate) fn stats(&self) -> FetchStats {
        *self.stats.lock().expect("stats lock")
    }

    /// Stripes worth fetching at once within the byte budget.
    pub(crate) fn stripes_in_parallel(&self) -> usize {
        stripes_in_parallel(&self.manifest, &self.options)
    }

    fn latency_of(&self, backend: &str) -> f64 {
        self.latency
            .lock()
            .expect("latency lock")
            .get(backend)
            .copied()
            .unwrap_or(0.0)
    }

    fn observe(&self, backend: &str, seconds: f64) {
        let mut latency = self.latency.lock().expect("latency lock");
        let slot = latency.entry(backend.to_owned()).or_insert(seconds);
        *slot = 0.7 * *slot + 0.3 * seconds;
    }

    fn count(&self, f: impl FnOnce(&mut FetchStats)) {
        f(&mut self.stats.lock().expect("stats lock"));
    }

    /// One shard, verified: `None` when it is missing, unreachable or corrupt.
    async fn shard(&self, backend: Option<&Backend>, digest: &str, len: u64) -> Option<Bytes> {
        let backend = backend?;
        let started = Instant::now();
        let got = backend.get(&shard_object(digest)).await;
        let elapsed = started.elapsed().as_secs_f64();
        match got {
            Ok(Some(bytes)) if bytes.len() as u64 == len && hex(&bytes) == digest => {
                self.observe(&backend.name, elapsed);
                Some(bytes)
            }
            Err(e) => {
                tracing::debug!(error = %e, "shard fetch failed");
                // An unreachable backend goes to the back of the queue until it has
                // answered well again.
                self.observe(&backend.name, elapsed + 1.0);
                None
            }
            // Missing or damaged: this shard's fault, not the backend's speed.
            Ok(_) => None,
        }
    }

    /// At least bytes `from..to` of stripe `index`: when they lie in fewer than k data
    /// shards, just those shards are fetched; if one of them is missing, bad or late,
    /// more shards are asked for (those already on their way still count) and the
    /// whole stripe is rebuilt from any k. Answers where the bytes start in the
    /// stripe, and the bytes.
    pub(crate) async fn stripe_part(
        &self,
        index: usize,
        file: &str,
        from: u64,
        to: u64,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        let shard_len = self.manifest.stripes[index].shard_len;
        let (first, last) = (
            (from / shard_len) as usize,
            (to.max(from + 1) - 1) as usize / shard_len as usize,
        );
        self.gather(index, file, Some((first, last))).await
    }

    /// Stripe `index`'s bytes, from any k intact shards. `file` names the file the
    /// caller wants, for the error when too few shards survive.
    pub(crate) async fn stripe(&self, index: usize, file: &str) -> Result<Vec<u8>, StoreError> {
        let _slot = self.slots.acquire().await.expect("never closed");
        Ok(self.gather(index, file, None).await?.1)
    }

    /// Fetches shards of stripe `index` until it has either the data shards
    /// `wanted` (a run of fewer than k; answered as they are, from where they start
    /// in the stripe) or any k (answered as the whole stripe, from 0). A wanted
    /// shard that is missing, bad or late turns the first into the second, keeping
    /// the requests already out. A shard whose backend is slower than usual is
    /// hedged by asking one more.
    async fn gather(
        &self,
        index: usize,
        file: &str,
        wanted: Option<(usize, usize)>,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let stripe = &self.manifest.stripes[index];
        let names = &self.locations.stripes[index];
        let Params { k, m } = self.codec.params();
        let shard_len = stripe.shard_len as usize;
        let mut partial = wanted.filter(|&(first, last)| first <= last && last - first + 1 < k);
        // The wanted shards first; then data shards (no decoding), then by how fast
        // their backend has been.
        let mut order: Vec<usize> = (0..k + m).collect();
        let cost: Vec<f64> = (0..k + m)
            .map(|j| self.latency_of(&names[j]) * if j < k { 1.0 } else { 1.25 })
            .collect();
        order.sort_by(|a, b| {
            let in_wanted = |j: &usize| partial.is_some_and(|(f, l)| (f..=l).contains(j));
            in_wanted(b)
                .cmp(&in_wanted(a))
                .then(cost[*a].total_cmp(&cost[*b]))
                .then(a.cmp(b))
        });
        // The room of the data shards wanted (the run, or all k): each shard is put
        // in its place as it arrives, so the stripe is not copied again once its
        // shards are in, and a rebuild writes only the lost shards.
        let initial = partial.map_or(k, |(first, last)| last - first + 1);
        let mut base = partial.map_or(0, |(first, _)| first);
        let mut room = vec![0u8; initial * shard_len];
        let mut present = vec![false; k];
        let mut parity: Vec<Option<Vec<u8>>> = vec![None; m];
        let mut next = order.into_iter();
        let mut running = FuturesUnordered::new();
        let launch = |j: usize| {
            let backend = self.store.backend(&names[j]);
            let digest = stripe.shards[j].as_str();
            async move {
                match self.shard(backend, digest, stripe.shard_len).await {
                    Some(bytes) => Outcome::Shard(j, bytes),
                    None => Outcome::Bad(j),
                }
            }
        };
        // Shards whose requests are still out.
        let mut launched: Vec<usize> = Vec::new();
        for j in next.by_ref().take(initial) {
            launched.push(j);
            running.push(launch(j));
        }
        self.count(|s| s.requests += initial as u64);
        let mut have = 0;
        loop {
            match partial {
                Some((first, last)) if present[first..=last].iter().all(|p| *p) => {
                    room.truncate(stripe.len.saturating_sub((first * shard_len) as u64) as usize);
                    return Ok(((first * shard_len) as u64, room));
                }
                None if have >= k => break,
                _ => {}
            }
            let usual = launched
                .iter()
                .map(|j| self.latency_of(&names[*j]))
                .fold(0.0, f64::max);
            let hedge_after = if usual == 0.0 {
                self.options.hedge_initial
            } else {
                Duration::from_secs_f64(usual * self.options.hedge_factor)
                    .max(self.options.hedge_min)
            };
            let outcome = if running.is_empty() {
                None
            } else {
                tokio::time::timeout(hedge_after, running.next()).await.ok()
            };
            let late = outcome.is_none() && !running.is_empty();
            match outcome {
                Some(Some(Outcome::Shard(j, bytes))) => {
                    launched.retain(|x| *x != j);
                    self.count(|s| s.bytes += bytes.len() as u64);
                    if j < k {
                        let at = (j - base) * shard_len;
                        room[at..at + shard_len].copy_from_slice(&bytes);
                        present[j] = true;
                    } else {
                        parity[j - k] = Some(Vec::from(bytes));
                    }
                    have += 1;
                    continue;
                }
                Some(Some(Outcome::Bad(j))) => {
                    launched.retain(|x| *x != j);
                    self.count(|s| s.bad_shards += 1);
                }
                // Late (or nothing running): ask more, keep waiting.
                _ => {}
            }
            if partial.take().is_some() {
                // A wanted shard failed us: rebuild from any k, counting the shards
                // in hand and those on their way, in a room for all k.
                let mut whole = vec![0u8; k * shard_len];
                whole[base * shard_len..base * shard_len + room.len()].copy_from_slice(&room);
                (room, base) = (whole, 0);
                self.count(|s| s.hedged += 1);
                while have + launched.len() < k {
                    let Some(j) = next.next() else { break };
                    launched.push(j);
                    running.push(launch(j));
                    self.count(|s| s.requests += 1);
                }
                if !running.is_empty() {
                    continue;
                }
            }
            match next.next() {
                Some(j) => {
                    if late {
                        self.count(|s| s.hedged += 1);
                    }
                    launched.push(j);
                    running.push(launch(j));
                    self.count(|s| s.requests += 1);
                }
                None if running.is_empty() => {
                    return Err(StoreError::Unrecoverable {
                        file: file.to_owned(),
                        stripe: index,
                        have,
                        k,
                    })
                }
                None => {}
            }
        }
        drop(running);
        if !present.iter().all(|p| *p) {
            self.count(|s| s.reconstructed += 1);
            let codec = self.codec.clone();
            room = tokio::task::spawn_blocking(move || {
                codec
                    .rebuild(&mut room, &present, &mut parity)
                    .map(|()| room)
            })
            .await
            .expect("decoding does not panic")?;
        }
        room.truncate(stripe.len as usize);
        Ok((0, room))
    }
}

/// Options for a [`Reader`].
#[derive(Debug, Clone, Default)]
pub struct ReaderOptions {
    /// Keep verified chunks here.
    pub cache: Option<Arc<ChunkCache>>,
    /// The owner's key, for an encrypted model.
    pub key: Option<ModelKey>,
    /// How stripes are fetched.
    pub fetch: FetchOptions,
}

/// Where a file's chunks are.
struct FileIndex {
    /// Offset of each chunk in the file, and the file's size last.
    starts: Vec<u64>,
}

/// Random access to a registered model's files, verified.
pub struct Reader {
    fetcher: Arc<Fetcher>,
    opener: ChunkOpener,
    pub(crate) cache: Option<Arc<ChunkCache>>,
    files: HashMap<String, FileIndex>,
    locate: HashMap<ChunkDigest, (usize, u64)>,
    /// Every stored chunk the model's files use.
    pub(crate) used: HashSet<ChunkDigest>,
    digest: ModelDigest,
    /// One fetch of a stripe at a time.
    stripe_locks: Mutex<HashMap<usize, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reader({})", self.digest)
    }
}

impl Store {
    /// A fetcher for a registered model's stripes.
    pub(crate) fn fetcher(
        &self,
        registration: &Registration,
        options: FetchOptions,
    ) -> Result<Fetcher, StoreError> {
        registration.verify()?;
        Fetcher::new(
            self.clone(),
            registration.manifest.manifest.clone(),
            registration.locations.clone(),
            options,
        )
    }

    /// A lazy reader over a registered model, after checking its signature.
    pub fn reader(
        &self,
        registration: &Registration,
        options: ReaderOptions,
    ) -> Result<Reader, StoreError> {
        let fetcher = self.fetcher(registration, options.fetch.clone())?;
        let manifest = fetcher.manifest().clone();
        let opener = ChunkOpener::new(&manifest, options.key.as_ref())?;
        let mut files = HashMap::new();
        let mut used = HashSet::new();
        for entry in &manifest.files {
            let mut starts = Vec::with_capacity(entry.chunks.len() + 1);
            let mut at = 0;
            for c in &entry.chunks {
                starts.push(at);
                at += c.len;
                used.insert(c.blake3.clone());
            }
            starts.push(at);
            files.insert(entry.path.clone(), FileIndex { starts });
        }
        let locate = manifest
            .chunk_locations()
            .into_iter()
            .map(|(h, at)| (h.clone(), at))
            .collect();
        Ok(Reader {
            digest: manifest.digest(),
            fetcher: Arc::new(fetcher),
            opener,
            cache: options.cache,
            files,
            locate,
            used,
            stripe_locks: Mutex::default(),
        })
    }
}

impl Reader {
    /// The manifest being read.
    pub fn manifest(&self) -> &Manifest {
        self.fetcher.manifest()
    }

    /// The model's digest.
    pub fn digest(&self) -> &ModelDigest {
        &self.digest
    }

    /// What has been fetched so far.
    pub fn stats(&self) -> FetchStats {
        self.fetcher.stats()
    }

    /// `len` bytes of `file` from `offset`, every chunk verified.
    pub async fn read_at(&self, file: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let index = self
            .files
            .get(file)
            .ok_or_else(|| StoreError::NoSuchFile(file.to_owned()))?;
        let size = *index.starts.last().expect("a size");
        let end = offset.checked_add(len).filter(|e| *e <= size);
        let Some(end) = end else {
            return Err(StoreError::OutOfRange {
                file: file.to_owned(),
                offset,
                len,
                size,
            });
        };
        if len == 0 {
            return Ok(Bytes::new());
        }
        let entry = self.manifest().file(file).expect("indexed files exist");
        // Chunks [first, last] cover the range.
        let first = index.starts.partition_point(|s| *s <= offset) - 1;
        let last = index.starts.partition_point(|s| *s < end) - 1;
        let hashes: Vec<&ChunkDigest> = entry.chunks[first..=last]
            .iter()
            .map(|c| &c.blake3)
            .collect();
        let plain = self.chunks(file, &hashes).await?;
        let mut out = Vec::with_capacity(len as usize);
        for (i, hash) in hashes.iter().enumerate() {
            let chunk_start = index.starts[first + i];
            let bytes = &plain[*hash];
            let from = offset.saturating_sub(chunk_start) as usize;
            let to = (end - chunk_start).min(bytes.len() as u64) as usize;
            out.extend_from_slice(&bytes[from..to]);
        }
        Ok(Bytes::from(out))
    }

    /// A whole file.
    pub async fn read_file(&self, file: &str) -> Result<Bytes, StoreError> {
        let size = self
            .manifest()
            .file(file)
            .ok_or_else(|| StoreError::NoSuchFile(file.to_owned()))?
            .size;
        self.read_at(file, 0, size).await
    }

    /// The plaintext of each of `hashes`, from the cache or fetched.
    async fn chunks(
        &self,
        file: &str,
        hashes: &[&ChunkDigest],
    ) -> Result<HashMap<ChunkDigest, Vec<u8>>, StoreError> {
        let mut out = HashMap::new();
        let mut stripes: BTreeSet<usize> = BTreeSet::new();
        for hash in hashes {
            if out.contains_key(*hash) {
                continue;
            }
            match self.cached(hash)? {
                Some(plain) => {
                    out.insert((*hash).clone(), plain);
                }
                None => {
                    stripes.insert(self.locate[*hash].0);
                }
            }
        }
        let parallel = self.fetcher.stripes_in_parallel();
        let mut fetches = futures_util::stream::iter(
            stripes
                .into_iter()
                .map(|i| async move { self.fetch_stripe(i, file, hashes).await }),
        )
        .buffer_unordered(parallel);
        while let Some(found) = fetches.next().await {
            for (hash, plain) in found? {
                if hashes.contains(&&hash) {
                    out.insert(hash, plain);
                }
            }
        }
        Ok(out)
    }

    /// A chunk from the cache, verified; a damaged one is dropped.
    fn cached(&self, hash: &ChunkDigest) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(cache) = &self.cache else {
            return Ok(None);
        };
        let Some(stored) = cache.get(hash) else {
            return Ok(None);
        };
        if !ChunkOpener::verify(hash, &stored) {
            cache.remove(hash);
            return Ok(None);
        }
        self.fetcher.count(|s| s.cache_hits += 1);
        self.opener.unseal(&stored).map(Some)
    }

    /// Fetches the part of a stripe holding `only` (the whole stripe when empty) and
    /// answers the plaintext of the model's chunks fetched, after caching them.
    /// Concurrent callers wanting the same stripe fetch it once.
    async fn fetch_stripe(
        &self,
        index: usize,
        file: &str,
        only: &[&ChunkDigest],
    ) -> Result<Vec<(ChunkDigest, Vec<u8>)>, StoreError> {
        let lock = self
            .stripe_locks
            .lock()
            .expect("stripe locks")
            .entry(index)
            .or_default()
            .clone();
        let _held = lock.lock().await;
        let stripe = &self.manifest().stripes[index];
        let mut out = Vec::new();
        // Another caller may have fetched it meanwhile.
        let mut all_cached = self.cache.is_some();
        for c in stripe.chunks.iter().filter(|c| {
            self.used.contains(&c.blake3) && (only.is_empty() || only.contains(&&c.blake3))
        }) {
            match self.cached(&c.blake3)? {
                Some(plain) => out.push((c.blake3.clone(), plain)),
                None => {
                    all_cached = false;
                    break;
                }
            }
        }
        if all_cached {
            return Ok(out);
        }
        out.clear();
        // The span of the stripe holding the model's chunks (all of them when warming).
        let mut at = 0u64;
        let (mut from, mut to) = (u64::MAX, 0);
        for c in &stripe.chunks {
            if self.used.contains(&c.blake3) && (only.is_empty() || only.contains(&&c.blake3)) {
                from = from.min(at);
                to = to.max(at + c.len);
            }
            at += c.len;
        }
        let (start, bytes) = if only.is_empty() || from >= to {
            (0, self.fetcher.stripe(index, file).await?)
        } else {
            self.fetcher.stripe_part(index, file, from, to).await?
        };
        let end = start + bytes.len() as u64;
        let mut at = 0u64;
        for c in &stripe.chunks {
            let (c_start, c_end) = (at, at + c.len);
            at = c_end;
            if !self.used.contains(&c.blake3) || c_start < start || c_end > end {
                continue;
            }
            let stored = &bytes[(c_start - start) as usize..(c_end - start) as usize];
            let plain = self.opener.open(&c.blake3, stored)?;
            if let Some(cache) = &self.cache {
                if let Err(e) = cache.insert(&c.blake3, stored) {
                    tracing::warn!(error = %e, "cannot cache a chunk");
                }
            }
            out.push((c.blake3.clone(), plain));
        }
        Ok(out)
    }

    /// Fetches every chunk of `files` (all files when empty) into the cache, and keeps
    /// them from eviction if `pin`. Answers the bytes fetched from backends.
    pub async fn prewarm(&self, files: &[String], pin: bool) -> Result<u64, StoreError> {
        let cache = self.cache.as_ref().ok_or(StoreError::NoCache)?;
        let manifest = self.manifest();
        if let Some(missing) = files.iter().find(|f| manifest.file(f).is_none()) {
            return Err(StoreError::NoSuchFile(missing.clone()));
        }
        // Each wanted chunk once, with its stored size and a file using it (for errors).
        let overhead = manifest.overhead();
        let mut wanted: BTreeMap<&ChunkDigest, (u64, &str)> = BTreeMap::new();
        for entry in &manifest.files {
            if files.is_empty() || files.contains(&entry.path) {
                for c in &entry.chunks {
                    wanted
                        .entry(&c.blake3)
                        .or_insert((c.len + overhead, entry.path.as_str()));
                }
            }
        }
        if pin {
            if !cache.pin_would_fit(wanted.iter().map(|(h, (len, _))| (*h, *len))) {
                return Err(StoreError::CacheTooSmall {
                    max: cache.stats().max_bytes,
                    want: wanted.values().map(|(len, _)| len).sum(),
                });
            }
            cache
                .pin(wanted.keys().map(|h| (*h).clone()))
                .map_err(crate::error::io(std::path::Path::new("cache")))?;
        }
        let before = self.stats().bytes;
        let mut stripes: BTreeMap<usize, String> = BTreeMap::new();
        for (hash, (_, file)) in &wanted {
            if !cache.contains(hash) {
                let (stripe, _) = self.locate[*hash];
                stripes.entry(stripe).or_insert_with(|| (*file).to_owned());
            }
        }
        let parallel = self.fetcher.stripes_in_parallel();
        let mut fetches =
            futures_util::stream::iter(stripes.into_iter().map(|(i, file)| async move {
                self.fetch_stripe(i, &file, &[]).await.map(|_| ())
            }))
            .buffer_unordered(parallel);
        while let Some(done) = fetches.next().await {
            done?;
        }
        Ok(self.stats().bytes - before)
    }

    /// The tensors of a safetensors file, read from its header.
    pub async fn safetensors(&self, file: &str) -> Result<SafetensorsView<'_>, StoreError> {
        let bad = |reason: String| StoreError::Safetensors {
            file: file.to_owned(),
            reason,
        };
        let size = self
            .manifest()
            .file(file)
            .ok_or_else(|| StoreError::NoSuchFile(file.to_owned()))?
            .size;
        if size < 8 {
            return Err(bad("too short for a safetensors header".into()));
        }
        let prefix = self.read_at(file, 0, 8).await?;
        let header_len =
            crate::chunk::safetensors_header_len(&prefix).map_err(|e| bad(e.to_string()))?;
        if header_len > size {
            return Err(bad("the header runs past the end of the file".into()));
        }
        let header = self.read_at(file, 8, header_len - 8).await?;
        let metadata = crate::chunk::parse_safetensors_header(&header).map_err(bad)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let (start, end) = (start as u64, end as u64);
            if header_len + end > size {
                return Err(bad(format!("tensor `{name}` lies outside the file")));
            }
            let tensor = TensorInfo {
                dtype: info.dtype.to_string(),
                shape: info.shape.clone(),
                data_offsets: [start, end],
            };
            tensors.insert(name, tensor);
        }
        Ok(SafetensorsView {
            reader: self,
            file: file.to_owned(),
            data_start: header_len,
            tensors,
        })
    }
}

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct TensorInfo {
    /// Element type, e.g. `F32`.
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Start and end of its bytes after the header.
    pub data_offsets: [u64; 2],
}

/// A safetensors file of a model: tensors by name, fetched on demand.
pub struct SafetensorsView<'a> {
    reader: &'a Reader,
    file: String,
    data_start: u64,
    tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsView<'_> {
    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's dtype, shape and place.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A tensor's bytes, verified.
    pub async fn tensor(&self, name: &str) -> Result<Bytes, StoreError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| StoreError::Safetensors {
                file: self.file.clone(),
                reason: format!("no tensor `{name}`"),
            })?;
        let [start, end] = info.data_offsets;
        self.reader
            .read_at(&self.file, self.data_start + start, end - start)
            .await
    }
}
