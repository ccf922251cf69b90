//! Chunks spread peer to peer. A node that staged a model serves the verified
//! chunks in its model cache to the nodes staging it after it, on its private data
//! port (the shard service's listener, `GET /.peer/chunks/{digest}`), at most a
//! configured number at once (more are refused with 429, so the asker turns to
//! another peer). A node staging a model asks the peers the control plane named
//! (those of earlier waves that attest it) before the store, choosing with
//! [`crate::swarm`]: every chunk a peer sends is checked against the signed
//! manifest before it enters the cache, and a peer that sends a bad one is dropped
//! for the rest of the transfer; a peer whose uploads are full is asked again after
//! a short rest. Whatever no peer gave is then fetched from the
//! store as usual. Nothing but chunks is asked or answered on that port: no control
//! arrives over it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::ChunkDigest;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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

/// What a node offers its peers: the chunks of its model cache.
#[derive(Debug, Clone)]
pub struct PeerChunks {
    chunks: PathBuf,
    uploads: Arc<Semaphore>,
    pace: Option<Arc<Pace>>,
}

/// An upload rate: each answer starts once the bytes before it have had their
/// time at the rate, so the node's upload to peers averages at most the rate.
#[derive(Debug)]
struct Pace {
    bytes_per_sec: f64,
    next: parking_lot::Mutex<tokio::time::Instant>,
}

impl Pace {
    /// Waits for `bytes`' turn.
    async fn turn(&self, bytes: usize) {
        let start = {
            let mut next = self.next.lock();
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl PeerChunks {
    /// The chunks of the model cache in `cache_dir`, served at most `uploads` at once.
    pub fn new(cache_dir: impl Into<PathBuf>, uploads: usize) -> Self {
        PeerChunks {
            chunks: cache_dir.into().join("chunks"),
            uploads: Arc::new(Semaphore::new(uploads.max(1))),
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

    /// `GET /.peer/chunks/{digest}`, to merge into the data port's router.
    pub fn router(self) -> Router {
        Router::new()
            .route(&format!("{PEER_CHUNK_PATH}/{{digest}}"), get(serve_chunk))
            .with_state(self)
    }
}

async fn serve_chunk(State(peer): State<PeerChunks>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = ChunkDigest::try_from(digest) else {
        return (StatusCode::BAD_REQUEST, "not a chunk digest").into_response();
    };
    let Ok(_permit) = peer.uploads.clone().try_acquire_owned() else {
        return (StatusCode::TOO_MANY_REQUESTS, "uploads full").into_response();
    };
    match tokio::fs::read(peer.chunks.join(digest.as_str())).await {
        Ok(bytes) => {
            if let Some(pace) = &peer.pace {
                pace.turn(bytes.len()).await;
            }
            (StatusCode::OK, bytes).into_response()
        }
        Err(_) => (StatusCode::NOT_FOUND, "not held").into_response(),
    }
}

/// A peer holding a model, as the control plane names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Where its data port answers (`http://10.0.0.7:7100`).
    pub url: String,
    /// Whether it is of the asking node's site.
    pub same_site: bool,
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

/// The peers the control plane named, each holding the whole model (it names
/// only peers that attest it), less those that refused a chunk (a chunk every peer
/// refused is left for the store) and those resting after a busy answer. The
/// origin is never asked here.
struct Named<'a> {
    peers: &'a [Peer],
    refused: std::collections::HashSet<(usize, PeerId)>,
    resting: std::collections::HashMap<PeerId, tokio::time::Instant>,
    busy: std::collections::HashMap<(usize, PeerId), u32>,
}

impl Named<'_> {
    /// When the first resting peer may be asked again.
    fn first_awake(&mut self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.resting.retain(|_, until| *until > now);
        self.resting.values().min().copied()
    }
}

impl Named<'_> {
    fn ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        (0..self.peers.len()).map(|i| PeerId::try_from(i).unwrap_or(PeerId::MAX))
    }
}

impl Holders for Named<'_> {
    fn holders(&self, chunk: usize) -> usize {
        self.ids()
            .filter(|p| !self.refused.contains(&(chunk, *p)))
            .count()
    }

    fn sample(&mut self, chunk: usize, out: &mut Vec<(PeerId, bool)>) {
        let now = tokio::time::Instant::now();
        for p in self.ids() {
            let resting = self.resting.get(&p).is_some_and(|until| *until > now);
            if !resting && !self.refused.contains(&(chunk, p)) {
                out.push((p, self.peers[p as usize].same_site));
            }
        }
    }

    fn claim_origin(&mut self, _: usize) -> bool {
        false
    }
}

/// Fetches `wanted` (stored chunk digests) from `peers` into `cache`, each checked
/// before it is kept; answers what came from peers. Chunks no peer gave are left
/// for the store.
pub async fn fetch_from_peers(
    client: &reqwest::Client,
    peers: &[Peer],
    wanted: &[ChunkDigest],
    cache: &ChunkCache,
    timeout: Duration,
) -> PeerFetch {
    let mut out = PeerFetch::default();
    if peers.is_empty() || wanted.is_empty() {
        return out;
    }
    let mut holders = Named {
        peers,
        refused: std::collections::HashSet::new(),
        resting: std::collections::HashMap::new(),
        busy: std::collections::HashMap::new(),
    };
    let seed = wanted.first().map_or(0, |d| {
        u64::from_le_bytes(d.as_str().as_bytes()[..8].try_into().unwrap_or([0; 8]))
    });
    let mut swarm = Swarm::new(
        wanted.len(),
        |i| cache.contains(&wanted[i]),
        seed,
        SwarmConfig::default(),
    );
    let mut under_way = FuturesUnordered::new();
    loop {
        for (chunk, source) in swarm.next(&mut holders) {
            let Source::Peer(p) = source else { continue };
            let url = format!(
                "{}{PEER_CHUNK_PATH}/{}",
                peers[p as usize].url.trim_end_matches('/'),
                wanted[chunk]
            );
            let request = client.get(url).timeout(timeout).send();
            under_way.push(async move {
                let got: Result<Vec<u8>, bool> = match request.await {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        resp.bytes().await.map(|b| b.to_vec()).map_err(|_| false)
                    }
                    Ok(resp) => Err(resp.status() == StatusCode::TOO_MANY_REQUESTS),
                    Err(_) => Err(false),
                };
                (chunk, source, got)
            });
        }
        if under_way.is_empty() {
            // Nothing to ask now: wait for a busy peer to rest, or end.
            match holders.first_awake() {
                Some(until) if !swarm.complete() => {
                    tokio::time::sleep_until(until).await;
                    continue;
                }
                _ => break,
            }
        }
        let next: Option<(usize, Source, Result<Vec<u8>, bool>)> = under_way.next().await;
        let Some((chunk, source, got)) = next else {
            break;
        };
        let Source::Peer(peer) = source else { continue };
        let outcome = match got {
            Err(busy) => {
                let tries = holders.busy.entry((chunk, peer)).or_insert(0);
                *tries += 1;
                if busy && *tries < BUSY_TRIES {
                    // Its uploads are full: ask it again after a rest.
                    holders
                        .resting
                        .insert(peer, tokio::time::Instant::now() + BUSY_REST);
                } else {
                    holders.refused.insert((chunk, peer));
                }
                Outcome::Refused
            }
            Ok(bytes) if ChunkOpener::verify(&wanted[chunk], &bytes) => {
                if let Err(e) = cache.insert(&wanted[chunk], &bytes) {
                    tracing::warn!(error = %e, "cannot cache a chunk from a peer");
                }
                out.bytes += bytes.len() as u64;
                Outcome::Verified
            }
            Ok(_) => Outcome::Corrupt,
        };
        match outcome {
            Outcome::Verified => out.chunks += 1,
            Outcome::Refused => out.refused += 1,
            Outcome::Corrupt => {
                if let Source::Peer(p) = source {
                    let url = peers[p as usize].url.clone();
                    tracing::warn!(peer = %url, chunk = %wanted[chunk], "a peer sent a chunk that does not match the manifest; dropped");
                    if !out.dropped.contains(&url) {
                        out.dropped.push(url);
                    }
                }
            }
        }
        swarm.done(chunk, source, outcome);
    }
    out
}

impl Reader {
    /// Stages the whole model into the cache, pinned: first every chunk `peers`
    /// give (each checked against the manifest), then the rest from the store.
    /// Answers the bytes fetched from the store and what came from peers.
    pub async fn stage(
        &self,
        client: &reqwest::Client,
        peers: &[Peer],
        timeout: Duration,
    ) -> Result<(u64, PeerFetch), StoreError> {
        let cache = self.cache.as_ref().ok_or(StoreError::NoCache)?;
        let mut wanted: Vec<ChunkDigest> = self
            .used
            .iter()
            .filter(|c| !cache.contains(c))
            .cloned()
            .collect();
        wanted.sort();
        let from_peers = fetch_from_peers(client, peers, &wanted, cache, timeout).await;
        let from_store = self.prewarm(&[], true).await?;
        Ok((from_store, from_peers))
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
            let status = serve_chunk(State(peer.clone()), Path(digest.to_string()))
                .await
                .status();
            assert_eq!(status, StatusCode::OK);
        }
        // The first goes at once; the third waits for the two before it.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(2), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
    }
}
