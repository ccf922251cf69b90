//! Chunks spread peer to peer. A node serves the verified chunks in its model
//! cache to the nodes staging a model, on its private data port (the shard
//! service's listener, `GET /.peer/chunks/{digest}`), at most a configured number
//! at once (more are refused with 429, so the asker turns to another peer), and
//! says which of a list of chunks it holds (`POST /.peer/have`) while it is
//! staging the model itself.
//!
//! A node staging a model asks the peers the control plane named (those of
//! earlier waves that attest it, and those of its own wave, whose holdings it
//! asks for every [`HAVE_EVERY`]), choosing with [`crate::swarm`]; the chunks no
//! peer holds it fetches from the store, its own share of them first, so a wave
//! of nodes takes about one copy from the store and the rest from each other.
//! Every chunk a peer sends is checked against the signed manifest before it
//! enters the cache, and a peer that sends a bad one is dropped for the rest of
//! the transfer; a peer whose uploads are full is asked again after a short rest.
//! Whatever is still missing at the end is fetched from the store as usual.
//! Nothing but chunks and holdings is asked or answered on that port: no control
//! arrives over it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::{ChunkDigest, OriginShare};
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::cache::ChunkCache;
use crate::error::StoreError;
use crate::opener::ChunkOpener;
use crate::reader::Reader;
use crate::swarm::{Holders, Outcome, PeerId, Source, Swarm, SwarmConfig};

/// The path peers ask a chunk at; its leading `.` keeps it apart from every
/// object the shard service stores.
pub const PEER_CHUNK_PATH: &str = "/.peer/chunks";
/// The path peers ask which chunks a node holds at: the body is the chunks'
/// digests, 32 bytes each; the answer one bit per chunk, in the same order.
pub const PEER_HAVE_PATH: &str = "/.peer/have";
/// Most chunks one ask of holdings may name (a 256 GiB model of 4 MiB chunks).
pub const MAX_HAVE_CHUNKS: usize = 65_536;
/// Asks of holdings a node answers at once.
const MAX_ASKS: usize = 32;

/// What a node offers its peers: the chunks of its model cache.
#[derive(Debug, Clone)]
pub struct PeerChunks {
    chunks: PathBuf,
    uploads: Arc<Semaphore>,
    /// Asks of holdings answered at once; more are refused (429).
    asks: Arc<Semaphore>,
    pace: Option<Arc<Pace>>,
}

/// An upload rate, as a link of that rate would send: each answer goes once its
/// bytes, after those before it, have had their time at the rate, so the node's
/// upload to peers averages at most the rate.
#[derive(Debug)]
struct Pace {
    bytes_per_sec: f64,
    next: parking_lot::Mutex<tokio::time::Instant>,
}

impl Pace {
    /// Waits until `bytes` would have gone over the link.
    async fn turn(&self, bytes: usize) {
        let sent = {
            let mut next = self.next.lock();
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            *next
        };
        tokio::time::sleep_until(sent).await;
    }
}

impl PeerChunks {
    /// The chunks of the model cache in `cache_dir`, served at most `uploads` at once.
    pub fn new(cache_dir: impl Into<PathBuf>, uploads: usize) -> Self {
        PeerChunks {
            chunks: cache_dir.into().join("chunks"),
            uploads: Arc::new(Semaphore::new(uploads.max(1))),
            asks: Arc::new(Semaphore::new(MAX_ASKS)),
            pace: None,
        }
    }

    /// Uploads to peers average at most `mbit` megabits per second.
    pub fn with_upload_mbit(mut self, mbit: f64) -> Self {
        if mbit.is_finite() && mbit > 0.0 {
            self.pace = Some(Arc::new(Pace {
                bytes_per_sec: mbit * 1e6 / 8.0,
                next: parking_lot::Mutex::new(tokio::time::Instant::now()),
            }));
        }
        self
    }

    /// `GET /.peer/chunks/{digest}` and `POST /.peer/have`, to merge into the data
    /// port's router.
    pub fn router(self) -> Router {
        Router::new()
            .route(&format!("{PEER_CHUNK_PATH}/{{digest}}"), get(serve_chunk))
            .route(
                PEER_HAVE_PATH,
                post(serve_have).layer(DefaultBodyLimit::max(MAX_HAVE_CHUNKS * 32)),
            )
            .with_state(self)
    }
}

/// Which of the chunks named in the body this node holds, as a bitmap.
async fn serve_have(State(peer): State<PeerChunks>, body: axum::body::Bytes) -> Response {
    if !body.len().is_multiple_of(32) {
        return (
            StatusCode::BAD_REQUEST,
            "the body is chunk digests of 32 bytes each",
        )
            .into_response();
    }
    let Ok(_permit) = peer.asks.clone().try_acquire_owned() else {
        return (StatusCode::TOO_MANY_REQUESTS, "asks full").into_response();
    };
    let dir = peer.chunks.clone();
    let bits = tokio::task::spawn_blocking(move || {
        let mut bits = vec![0u8; (body.len() / 32).div_ceil(8)];
        for (i, raw) in body.chunks_exact(32).enumerate() {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(raw);
            let name = blake3::Hash::from_bytes(hash).to_hex();
            if dir.join(name.as_str()).is_file() {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        bits
    })
    .await;
    match bits {
        Ok(bits) => (StatusCode::OK, bits).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn serve_chunk(State(peer): State<PeerChunks>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = ChunkDigest::try_from(digest) else {
        return (StatusCode::BAD_REQUEST, "not a chunk digest").into_response();
    };
    let Ok(permit) = peer.uploads.clone().try_acquire_owned() else {
        return (StatusCode::TOO_MANY_REQUESTS, "uploads full").into_response();
    };
    let bytes = match tokio::fs::read(peer.chunks.join(digest.as_str())).await {
        Ok(bytes) => bytes::Bytes::from(bytes),
        Err(_) => return (StatusCode::NOT_FOUND, "not held").into_response(),
    };
    let Some(pace) = peer.pace.clone() else {
        return (StatusCode::OK, bytes).into_response();
    };
    // Paced piece by piece, so the answers under way share the rate as flows
    // share a link; the upload slot is held until the last piece has gone.
    let len = bytes.len();
    let pieces = futures_util::stream::unfold((bytes, 0, permit), move |(bytes, at, permit)| {
        let pace = pace.clone();
        async move {
            if at >= bytes.len() {
                return None;
            }
            let end = (at + PACE_PIECE).min(bytes.len());
            pace.turn(end - at).await;
            let piece = bytes.slice(at..end);
            Some((Ok::<_, std::io::Error>(piece), (bytes, end, permit)))
        }
    });
    let mut response = axum::body::Body::from_stream(pieces).into_response();
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_LENGTH, len.into());
    response
}

/// Bytes a paced answer sends at a time.
const PACE_PIECE: usize = 64 << 10;

/// A peer, as the control plane names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Where its data port answers (`http://10.0.0.7:7100`).
    pub url: String,
    /// Whether it is of the asking node's site.
    pub same_site: bool,
    /// Whether it holds the whole model; false for one staging it too, which is
    /// asked what it holds as it goes.
    pub whole: bool,
}

/// What fetching from peers came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFetch {
    /// Chunks taken from peers, verified.
    pub chunks: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Chunks refused (a peer's uploads full, not held, unreachable).
    pub refused: usize,
    /// Peers dropped for sending a chunk that did not match the manifest.
    pub dropped: Vec<String>,
}

/// How long a peer whose uploads were full is left alone before it is asked again.
const BUSY_REST: Duration = Duration::from_millis(100);
/// Busy answers one peer may give for one chunk before the chunk is left to the
/// other peers and the store.
const BUSY_TRIES: u32 = 50;
/// How often a peer staging the model too is asked what it holds.
pub const HAVE_EVERY: Duration = Duration::from_millis(250);
/// Failed asks in a row after which a staging peer is given up.
const HAVE_TRIES: u32 = 8;

/// What a node knows of the peers the control plane named: who holds which
/// chunk (all of them for a peer holding the whole model, what it last said for
/// one staging it), less those that refused a chunk (left for another peer or the
/// store) and those resting after a busy answer; and when the store may be asked.
struct Known<'a> {
    peers: &'a [Peer],
    /// Per peer staging the model, per chunk, whether it said it holds it.
    have: Vec<Vec<bool>>,
    /// Per peer staging the model, failed asks in a row.
    have_failed: Vec<u32>,
    refused: HashSet<(usize, PeerId)>,
    resting: HashMap<PeerId, tokio::time::Instant>,
    busy: HashMap<(usize, PeerId), u32>,
    /// The store may be asked (a reader to ask it with, and it has not failed).
    origin: bool,
    share: Option<OriginShare>,
    /// Since when nothing has been under way.
    idle_since: Option<tokio::time::Instant>,
}

impl Known<'_> {
    fn ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        (0..self.peers.len()).map(|i| PeerId::try_from(i).unwrap_or(PeerId::MAX))
    }

    fn holds(&self, p: PeerId, chunk: usize) -> bool {
        let at = p as usize;
        (self.peers[at].whole || self.have[at][chunk]) && !self.refused.contains(&(chunk, p))
    }

    /// Whether a peer staging the model may still come to hold more.
    fn growing(&self) -> bool {
        self.ids().any(|p| {
            let at = p as usize;
            !self.peers[at].whole && self.have_failed[at] < HAVE_TRIES
        })
    }

    /// When the first resting peer may be asked again.
    fn first_awake(&mut self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.resting.retain(|_, until| *until > now);
        self.resting.values().min().copied()
    }
}

impl Holders for Known<'_> {
    fn holders(&self, chunk: usize) -> usize {
        self.ids().filter(|p| self.holds(*p, chunk)).count()
    }

    fn sample(&mut self, chunk: usize, out: &mut Vec<(PeerId, bool)>) {
        let now = tokio::time::Instant::now();
        for p in self.ids() {
            let resting = self.resting.get(&p).is_some_and(|until| *until > now);
            if !resting && self.holds(p, chunk) {
                out.push((p, self.peers[p as usize].same_site));
            }
        }
    }

    fn claim_origin(&mut self, chunk: usize) -> bool {
        let idle = self
            .idle_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        self.origin && crate::swarm::origin_allowed(self.share, chunk, idle)
    }
}

/// How one fetch ended.
enum Fetched {
    /// A peer's bytes, not yet checked.
    Bytes(Vec<u8>),
    /// The store gave it, checked and cached.
    Stored,
    /// A peer's uploads were full.
    Busy,
    /// Not held, unreachable, or the store failed.
    Failed,
}

type Fetching<'a> = Pin<Box<dyn Future<Output = (usize, Source, Fetched)> + Send + 'a>>;
/// A peer asked what it holds: the peer, the chunks asked about, the answer.
type Asking = Pin<Box<dyn Future<Output = (usize, Vec<usize>, Option<Vec<bool>>)> + Send>>;

/// Asks `peer` which of `chunks` (digests as 32 raw bytes) it holds.
fn ask_have<'c>(
    client: &reqwest::Client,
    peer: &Peer,
    chunks: impl Iterator<Item = &'c [u8; 32]>,
    timeout: Duration,
) -> impl Future<Output = Option<Vec<bool>>> + Send + 'static {
    let body: Vec<u8> = chunks.flatten().copied().collect();
    let count = body.len() / 32;
    let request = client
        .post(format!(
            "{}{PEER_HAVE_PATH}",
            peer.url.trim_end_matches('/')
        ))
        .timeout(timeout)
        .body(body)
        .send();
    async move {
        let resp = request.await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let bits = resp.bytes().await.ok()?;
        (bits.len() == count.div_ceil(8)).then(|| {
            (0..count)
                .map(|i| bits[i / 8] & (1 << (i % 8)) != 0)
                .collect()
        })
    }
}

impl Reader {
    /// Stages the whole model into the cache, pinned. With `peers`, chunks come
    /// from them first, chosen with [`crate::swarm`] and each checked against the
    /// manifest, while the node's `share` of the chunks no peer holds comes from
    /// the store (every chunk no peer holds when there is no share); peers staging
    /// the model too are asked what they hold every [`HAVE_EVERY`]. Whatever no peer
    /// gave then comes from the store. Answers the bytes fetched from the store and
    /// what came from peers.
    pub async fn stage(
        &self,
        client: &reqwest::Client,
        peers: &[Peer],
        share: Option<OriginShare>,
        timeout: Duration,
    ) -> Result<(u64, PeerFetch), StoreError> {
        let cache = self.cache.as_ref().ok_or(StoreError::NoCache)?;
        let before = self.stats().bytes;
        let mut chunks: Vec<ChunkDigest> = self.used.iter().cloned().collect();
        chunks.sort();
        let from_peers = if peers.is_empty() || chunks.iter().all(|c| cache.contains(c)) {
            PeerFetch::default()
        } else {
            self.swarm(client, peers, share, &chunks, cache, timeout)
                .await
        };
        self.prewarm(&[], true).await?;
        Ok((self.stats().bytes - before, from_peers))
    }

    /// Fetches `chunks` from `peers` and, for what no peer holds, from the store as
    /// [`Known::claim_origin`] allows, into `cache`.
    async fn swarm(
        &self,
        client: &reqwest::Client,
        peers: &[Peer],
        share: Option<OriginShare>,
        chunks: &[ChunkDigest],
        cache: &ChunkCache,
        timeout: Duration,
    ) -> PeerFetch {
        let mut out = PeerFetch::default();
        let growing = peers.iter().any(|p| !p.whole);
        let mut known = Known {
            peers,
            have: vec![vec![false; chunks.len()]; peers.len()],
            have_failed: vec![0; peers.len()],
            refused: HashSet::new(),
            resting: HashMap::new(),
            busy: HashMap::new(),
            // With only whole peers and no share, what they do not give is left to
            // the store's stripe-wide fetch afterwards.
            origin: growing || share.is_some(),
            share,
            idle_since: None,
        };
        // An order of its own for equally rare chunks, so nodes spread apart.
        let mut swarm = Swarm::new(
            chunks.len(),
            |i| cache.contains(&chunks[i]),
            rand::random::<u64>(),
            SwarmConfig::default(),
        );
        let mut under_way: FuturesUnordered<Fetching<'_>> = FuturesUnordered::new();
        let mut asking: FuturesUnordered<Asking> = FuturesUnordered::new();
        let mut next_ask = tokio::time::Instant::now();
        let mut asked = vec![false; peers.len()];
        // The digests as asks of holdings carry them, decoded once.
        let raw: Vec<[u8; 32]> = chunks
            .iter()
            .map(|c| blake3::Hash::from_hex(c.as_str()).map_or([0; 32], |h| *h.as_bytes()))
            .collect();
        loop {
            let now = tokio::time::Instant::now();
            if growing && now >= next_ask {
                next_ask = now + HAVE_EVERY;
                for (at, peer) in peers.iter().enumerate() {
                    if peer.whole || asked[at] || known.have_failed[at] >= HAVE_TRIES {
                        continue;
                    }
                    // Only what this node misses and the peer did not hold yet.
                    let unknown: Vec<usize> = (0..chunks.len())
                        .filter(|c| !swarm.has(*c) && !known.have[at][*c])
                        .collect();
                    if unknown.is_empty() {
                        continue;
                    }
                    asked[at] = true;
                    let ask = ask_have(
                        client,
                        peer,
                        unknown.iter().map(|c| &raw[*c]),
                        timeout.min(HAVE_EVERY * 8),
                    );
                    asking.push(Box::pin(async move { (at, unknown, ask.await) }));
                }
            }
            for (chunk, source) in swarm.next(&mut known) {
                under_way.push(match source {
                    Source::Peer(p) => {
                        let url = format!(
                            "{}{PEER_CHUNK_PATH}/{}",
                            peers[p as usize].url.trim_end_matches('/'),
                            chunks[chunk]
                        );
                        let request = client.get(url).timeout(timeout).send();
                        Box::pin(async move {
                            let got = match request.await {
                                Ok(resp) if resp.status() == StatusCode::OK => resp
                                    .bytes()
                                    .await
                                    .map_or(Fetched::Failed, |b| Fetched::Bytes(b.to_vec())),
                                Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                                    Fetched::Busy
                                }
                                _ => Fetched::Failed,
                            };
                            (chunk, source, got)
                        })
                    }
                    Source::Origin => {
                        let hash = &chunks[chunk];
                        Box::pin(async move {
                            let got = match self.fetch_chunk(hash).await {
                                Ok(()) if cache.contains(hash) => Fetched::Stored,
                                Ok(()) => Fetched::Failed,
                                Err(e) => {
                                    tracing::warn!(error = %e, chunk = %hash, "the store could not give a chunk");
                                    Fetched::Failed
                                }
                            };
                            (chunk, source, got)
                        })
                    }
                });
            }
            if swarm.complete() {
                break;
            }
            if under_way.is_empty() {
                known.idle_since.get_or_insert(now);
            } else {
                known.idle_since = None;
            }
            // Wake for a resting peer, and for the next ask of holdings while a
            // peer may still come to hold more; with neither and nothing under
            // way, the rest is the store's.
            let wake = match (known.first_awake(), known.growing()) {
                (Some(w), true) => Some(w.min(next_ask)),
                (Some(w), false) => Some(w),
                (None, true) => Some(next_ask),
                (None, false) => None,
            };
            if under_way.is_empty() && asking.is_empty() && wake.is_none() {
                break;
            }
            let wake_at = wake.unwrap_or(now + HAVE_EVERY);
            tokio::select! {
                Some((chunk, source, got)) = under_way.next(), if !under_way.is_empty() => {
                    let outcome = self.judge(&mut known, &mut out, chunks, cache, chunk, source, got);
                    swarm.done(chunk, source, outcome);
                }
                Some((at, unknown, said)) = asking.next(), if !asking.is_empty() => {
                    asked[at] = false;
                    match said {
                        Some(bits) => {
                            for (c, held) in unknown.into_iter().zip(bits) {
                                known.have[at][c] |= held;
                            }
                            known.have_failed[at] = 0;
                        }
                        None => known.have_failed[at] += 1,
                    }
                }
                () = tokio::time::sleep_until(wake_at), if wake.is_some() => {}
            }
        }
        out
    }

    /// What a finished fetch comes to: a peer's bytes checked against the manifest
    /// and cached, a busy peer rested, a failing one left out for the chunk.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        known: &mut Known<'_>,
        out: &mut PeerFetch,
        chunks: &[ChunkDigest],
        cache: &ChunkCache,
        chunk: usize,
        source: Source,
        got: Fetched,
    ) -> Outcome {
        let Source::Peer(peer) = source else {
            return match got {
                Fetched::Stored => Outcome::Verified,
                _ => {
                    // The store failed: what is left is the stripe-wide fetch's,
                    // which says why.
                    known.origin = false;
                    Outcome::Refused
                }
            };
        };
        match got {
            Fetched::Bytes(bytes) if ChunkOpener::verify(&chunks[chunk], &bytes) => {
                if let Err(e) = cache.insert(&chunks[chunk], &bytes) {
                    tracing::warn!(error = %e, "cannot cache a chunk from a peer");
                }
                out.bytes += bytes.len() as u64;
                out.chunks += 1;
                Outcome::Verified
            }
            Fetched::Bytes(_) => {
                let url = known.peers[peer as usize].url.clone();
                tracing::warn!(peer = %url, chunk = %chunks[chunk], "a peer sent a chunk that does not match the manifest; dropped");
                if !out.dropped.contains(&url) {
                    out.dropped.push(url);
                }
                Outcome::Corrupt
            }
            Fetched::Busy | Fetched::Failed | Fetched::Stored => {
                out.refused += 1;
                let tries = known.busy.entry((chunk, peer)).or_insert(0);
                *tries += 1;
                if matches!(got, Fetched::Busy) && *tries < BUSY_TRIES {
                    // Its uploads are full: ask it again after a rest.
                    known
                        .resting
                        .insert(peer, tokio::time::Instant::now() + BUSY_REST);
                } else {
                    known.refused.insert((chunk, peer));
                }
                Outcome::Refused
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_its_upload_bound_a_peer_refuses_and_it_serves_only_chunks_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("chunks")).unwrap();
        let held = b"a stored chunk";
        let digest = ChunkDigest::of(held);
        std::fs::write(dir.path().join("chunks").join(digest.as_str()), held).unwrap();
        let peer = PeerChunks::new(dir.path(), 1);
        let ask = |peer: PeerChunks, digest: String| async move {
            serve_chunk(State(peer), Path(digest)).await.status()
        };
        assert_eq!(ask(peer.clone(), digest.to_string()).await, StatusCode::OK);
        let other = ChunkDigest::of(b"not held");
        assert_eq!(
            ask(peer.clone(), other.to_string()).await,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ask(peer.clone(), "../../etc/passwd".into()).await,
            StatusCode::BAD_REQUEST
        );
        let _busy = peer.uploads.clone().try_acquire_owned().unwrap();
        assert_eq!(
            ask(peer, digest.to_string()).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_rate_paces_the_answers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("chunks")).unwrap();
        let held = vec![7u8; 125_000];
        let digest = ChunkDigest::of(&held);
        std::fs::write(dir.path().join("chunks").join(digest.as_str()), &held).unwrap();
        // 1 Mbit/s: 125,000 bytes take a second.
        let peer = PeerChunks::new(dir.path(), 4).with_upload_mbit(1.0);
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            let answer = serve_chunk(State(peer.clone()), Path(digest.to_string())).await;
            assert_eq!(answer.status(), StatusCode::OK);
            let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(body.len(), held.len());
        }
        // Each is done when its bytes would have crossed the link, after those
        // before it.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(3), "{waited:?}");
        assert!(waited < Duration::from_secs(4), "{waited:?}");
    }
}
