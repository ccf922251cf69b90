//! Which chunk to fetch next, and from whom: the peer choice of a node spreading a
//! model peer to peer. Pure and deterministic (its only randomness is a seeded
//! order), so the agent's fetcher and the fan-out simulation run the same code.
//!
//! - **Rarest first**: of the chunks still missing and not under way, those the
//!   fewest peers hold go first (ties in an order of the node's own), so a swarm
//!   spreads every chunk at once instead of all nodes chasing the same ones.
//! - **Own site, then other peers, then the store**: a chunk some peer holds comes
//!   from a peer of the node's site when one has a free slot, else from another
//!   peer; only a chunk no peer holds is asked of the store (the origin), and only
//!   when no other node is already fetching it from there, so the origin sends each
//!   chunk about once.
//! - **Bounded**: a few requests per peer and to the origin, and a total per node.
//! - **End game**: once every missing chunk is under way, a chunk may also be asked
//!   of a second peer, so one slow sender does not hold the whole transfer back;
//!   the first verified copy wins and the caller cancels the other.
//! - **A bad peer is dropped**: a chunk that fails its check against the signed
//!   manifest bans the peer that sent it for the rest of the transfer; a peer that
//!   refuses (its upload is full) is only released.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aigrid_api::OriginShare;

/// How long a node staging beside others may have nothing to fetch and nothing
/// under way before it asks the store for chunks outside its share: the node
/// whose share they are may be gone or slow.
pub const ORIGIN_AFTER_IDLE: Duration = Duration::from_secs(2);

/// Whether a node may ask the store for the chunk at `position` (of the model's
/// chunk list) that none of its peers holds: always its own share, anything once
/// it has been idle [`ORIGIN_AFTER_IDLE`]; with no share, anything.
pub fn origin_allowed(share: Option<OriginShare>, position: usize, idle: Duration) -> bool {
    share.is_none_or(|s| s.owns(position)) || idle >= ORIGIN_AFTER_IDLE
}

/// A peer, as the caller numbers them.
pub type PeerId = u32;

/// Where a chunk is fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A peer holding it.
    Peer(PeerId),
    /// The dispersed store.
    Origin,
}

/// How a fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The chunk arrived and matched the manifest.
    Verified,
    /// The peer refused (its upload is full) or could not be reached.
    Refused,
    /// The bytes did not match the manifest: the sender is dropped.
    Corrupt,
}

/// Bounds on one node's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwarmConfig {
    /// Requests under way at once.
    pub in_flight: usize,
    /// Requests to one peer at once.
    pub per_peer: usize,
    /// Requests to the origin at once.
    pub origin: usize,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            in_flight: 4,
            per_peer: 4,
            origin: 2,
        }
    }
}

/// What a node knows of the others: who holds which chunk, and whether the
/// origin may be asked for one.
pub trait Holders {
    /// How many peers hold `chunk`.
    fn holders(&self, chunk: usize) -> usize;
    /// Some peers holding `chunk` that take requests now, each with whether it is
    /// of the node's own site, appended to `out`.
    fn sample(&mut self, chunk: usize, out: &mut Vec<(PeerId, bool)>);
    /// Claims fetching `chunk` from the origin: true when no other node holds it or
    /// is fetching it from there.
    fn claim_origin(&mut self, chunk: usize) -> bool;
}

/// One node's transfer of one model.
#[derive(Debug, Clone)]
pub struct Swarm {
    config: SwarmConfig,
    have: Vec<bool>,
    /// Per chunk, where it is being fetched from now (two sources at most, in the
    /// end game).
    pending: Vec<Vec<Source>>,
    missing: usize,
    /// A tie-break order of the node's own, so equally rare chunks differ between
    /// nodes.
    order: Vec<u32>,
    busy: HashMap<PeerId, usize>,
    banned: HashSet<PeerId>,
    origin_busy: usize,
    in_flight: usize,
}

/// A small deterministic generator (SplitMix64) for the tie-break order.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Swarm {
    /// A transfer of `chunks` chunks, `have(i)` telling those already held (the
    /// node's cache); `seed` orders equally rare chunks.
    pub fn new(
        chunks: usize,
        have: impl Fn(usize) -> bool,
        seed: u64,
        config: SwarmConfig,
    ) -> Self {
        let have: Vec<bool> = (0..chunks).map(have).collect();
        let missing = have.iter().filter(|h| !**h).count();
        let mut order: Vec<u32> = (0..u32::try_from(chunks).unwrap_or(u32::MAX)).collect();
        let mut state = seed;
        for i in (1..order.len()).rev() {
            let j = usize::try_from(splitmix(&mut state) % (i as u64 + 1)).unwrap_or(0);
            order.swap(i, j);
        }
        Swarm {
            config,
            pending: vec![Vec::new(); chunks],
            have,
            missing,
            order,
            busy: HashMap::new(),
            banned: HashSet::new(),
            origin_busy: 0,
            in_flight: 0,
        }
    }

    /// True once every chunk is held.
    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    /// Chunks still missing.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// Whether the node holds `chunk`.
    pub fn has(&self, chunk: usize) -> bool {
        self.have[chunk]
    }

    /// Requests under way.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether `peer` was dropped for sending a bad chunk.
    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.banned.contains(&peer)
    }

    /// The requests to start now, each a chunk and where to fetch it, within the
    /// bounds; they count as under way until [`Swarm::done`].
    pub fn next(&mut self, holders: &mut impl Holders) -> Vec<(usize, Source)> {
        let mut out = Vec::new();
        if self.in_flight >= self.config.in_flight || self.missing == 0 {
            return out;
        }
        let mut wanted: Vec<(usize, u32, usize)> = (0..self.have.len())
            .filter(|c| !self.have[*c] && self.pending[*c].is_empty())
            .map(|c| (holders.holders(c), self.order[c], c))
            .collect();
        // The end game: everything missing is under way; ask a second peer for the
        // chunks with one source.
        let end_game = wanted.is_empty();
        if end_game {
            wanted = (0..self.have.len())
                .filter(|c| !self.have[*c] && self.pending[*c].len() == 1)
                .map(|c| (holders.holders(c), self.order[c], c))
                .filter(|(count, ..)| *count > 0)
                .collect();
        }
        wanted.sort_unstable();
        let mut sample = Vec::new();
        for (count, _, chunk) in wanted {
            if self.in_flight >= self.config.in_flight {
                break;
            }
            let source = if count == 0 {
                if self.origin_busy >= self.config.origin || !holders.claim_origin(chunk) {
                    continue;
                }
                Source::Origin
            } else {
                sample.clear();
                holders.sample(chunk, &mut sample);
                let per_peer = self.config.per_peer;
                let already = &self.pending[chunk];
                let best = sample
                    .iter()
                    .filter(|(p, _)| !self.banned.contains(p))
                    .filter(|(p, _)| !already.contains(&Source::Peer(*p)))
                    .filter(|(p, _)| self.busy.get(p).copied().unwrap_or(0) < per_peer)
                    .min_by_key(|(p, same_site)| {
                        (!same_site, self.busy.get(p).copied().unwrap_or(0), *p)
                    });
                match best {
                    Some((p, _)) => Source::Peer(*p),
                    None => continue,
                }
            };
            match source {
                Source::Origin => self.origin_busy += 1,
                Source::Peer(p) => *self.busy.entry(p).or_insert(0) += 1,
            }
            self.pending[chunk].push(source);
            self.in_flight += 1;
            out.push((chunk, source));
        }
        out
    }

    /// Where `chunk` is being fetched from now: after it arrives, the caller
    /// cancels the other fetch of it (reporting it [`Outcome::Refused`]).
    pub fn sources(&self, chunk: usize) -> &[Source] {
        &self.pending[chunk]
    }

    /// Records how the fetch of `chunk` from `source` ended (a cancelled one as
    /// [`Outcome::Refused`]); answers true when the node now holds the chunk.
    pub fn done(&mut self, chunk: usize, source: Source, outcome: Outcome) -> bool {
        let Some(at) = self.pending[chunk].iter().position(|s| *s == source) else {
            return false;
        };
        self.pending[chunk].swap_remove(at);
        self.in_flight -= 1;
        match source {
            Source::Origin => self.origin_busy -= 1,
            Source::Peer(p) => {
                if let Some(n) = self.busy.get_mut(&p) {
                    *n -= 1;
                    if *n == 0 {
                        self.busy.remove(&p);
                    }
                }
                if outcome == Outcome::Corrupt {
                    self.banned.insert(p);
                }
            }
        }
        if outcome == Outcome::Verified && !self.have[chunk] {
            self.have[chunk] = true;
            self.missing -= 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers by the chunks they hold; peer 0 is of the node's site.
    struct Table {
        peers: Vec<Vec<bool>>,
        claimed: HashSet<usize>,
    }

    impl Holders for Table {
        fn holders(&self, chunk: usize) -> usize {
            self.peers.iter().filter(|p| p[chunk]).count()
        }
        fn sample(&mut self, chunk: usize, out: &mut Vec<(PeerId, bool)>) {
            for (i, p) in self.peers.iter().enumerate() {
                if p[chunk] {
                    out.push((PeerId::try_from(i).unwrap(), i == 0));
                }
            }
        }
        fn claim_origin(&mut self, chunk: usize) -> bool {
            self.claimed.insert(chunk)
        }
    }

    #[test]
    fn the_store_is_asked_for_a_nodes_own_share_and_for_the_rest_only_when_idle() {
        let share = Some(OriginShare { index: 1, of: 3 });
        let owned: Vec<usize> = (0..9)
            .filter(|c| origin_allowed(share, *c, Duration::ZERO))
            .collect();
        assert_eq!(owned, vec![1, 4, 7]);
        assert!(origin_allowed(share, 0, ORIGIN_AFTER_IDLE));
        assert!(origin_allowed(None, 0, Duration::ZERO));
        let none = Some(OriginShare { index: 0, of: 0 });
        assert!(origin_allowed(none, 5, Duration::ZERO));
    }

    #[test]
    fn rarest_first_own_site_first_and_the_origin_only_for_what_no_peer_holds() {
        // Chunk 0: both peers; chunk 1: peer 1 only; chunk 2: nobody.
        let mut table = Table {
            peers: vec![vec![true, false, false], vec![true, true, false]],
            claimed: HashSet::new(),
        };
        let config = SwarmConfig {
            in_flight: 8,
            per_peer: 4,
            origin: 1,
        };
        let mut swarm = Swarm::new(3, |_| false, 7, config);
        let asked = swarm.next(&mut table);
        assert_eq!(
            asked,
            vec![
                (2, Source::Origin),
                (1, Source::Peer(1)),
                (0, Source::Peer(0))
            ]
        );
        // Another node finds chunk 2 claimed at the origin and waits for it.
        let mut other = Swarm::new(3, |c| c != 2, 9, config);
        assert!(other.next(&mut table).is_empty());
        assert!(swarm.done(2, Source::Origin, Outcome::Verified));
        assert!(swarm.done(1, Source::Peer(1), Outcome::Verified));
        assert!(!swarm.complete());
        assert!(swarm.done(0, Source::Peer(0), Outcome::Verified));
        assert!(swarm.complete());
    }

    #[test]
    fn a_peer_that_sends_a_bad_chunk_is_dropped_and_a_busy_one_only_released() {
        let mut table = Table {
            peers: vec![vec![true, true], vec![true, true]],
            claimed: HashSet::new(),
        };
        let config = SwarmConfig {
            in_flight: 1,
            per_peer: 1,
            origin: 1,
        };
        let mut swarm = Swarm::new(2, |_| false, 1, config);
        let first = swarm.next(&mut table);
        assert_eq!(first.len(), 1, "one at a time");
        let (chunk, source) = first[0];
        assert_eq!(source, Source::Peer(0), "its own site first");
        assert!(!swarm.done(chunk, source, Outcome::Refused));
        assert!(!swarm.is_banned(0));
        let again = swarm.next(&mut table);
        assert_eq!(again[0].1, Source::Peer(0));
        assert!(!swarm.done(again[0].0, Source::Peer(0), Outcome::Corrupt));
        assert!(swarm.is_banned(0));
        for _ in 0..2 {
            let next = swarm.next(&mut table);
            assert_eq!(next[0].1, Source::Peer(1), "never the dropped peer again");
            assert!(swarm.done(next[0].0, next[0].1, Outcome::Verified));
        }
        assert!(swarm.complete());
    }

    #[test]
    fn in_the_end_game_a_chunk_is_also_asked_of_a_second_peer() {
        let mut table = Table {
            peers: vec![vec![true], vec![true]],
            claimed: HashSet::new(),
        };
        let mut swarm = Swarm::new(1, |_| false, 3, SwarmConfig::default());
        let first = swarm.next(&mut table);
        let second = swarm.next(&mut table);
        assert_eq!(first, vec![(0, Source::Peer(0))]);
        assert_eq!(
            second,
            vec![(0, Source::Peer(1))],
            "the same chunk, another peer"
        );
        assert!(swarm.next(&mut table).is_empty(), "two sources at most");
        assert!(swarm.done(0, Source::Peer(1), Outcome::Verified));
        assert_eq!(swarm.sources(0), &[Source::Peer(0)], "the copy to cancel");
        assert!(!swarm.done(0, Source::Peer(0), Outcome::Refused));
        assert!(swarm.complete());
        assert_eq!(swarm.in_flight(), 0);
    }
}
