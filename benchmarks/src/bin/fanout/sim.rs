//! The virtual-time simulation: links as token buckets shared max-min, every
//! node running the agents' own peer choice over what it knows of its peers.

use aigrid_api::rollout::{choose_peers, peer_rank};
use aigrid_api::OriginShare;
use aigrid_store::peers::HAVE_EVERY;
use aigrid_store::swarm::{origin_allowed, Holders, Outcome, PeerId, Source, Swarm, SwarmConfig};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::{Args, Outcomes};

/// A transfer under way.
struct Flow {
    /// The sender: a node, or `None` for the origin.
    from: Option<usize>,
    to: usize,
    chunk: usize,
    left_bits: f64,
    /// Time until its first byte moves (the request's round trip).
    wait: f64,
    source: Source,
}

/// Who holds what, and each node's view of it.
pub struct Grid {
    /// Per node, per chunk, when it came to hold it (infinite: not yet).
    held_at: Vec<Vec<f64>>,
    /// Per node, the peers it was named, each with whether it held the whole
    /// model when named.
    named: Vec<Vec<(u32, bool)>>,
    /// Per node, its share of what the origin gives.
    share: Vec<Option<OriginShare>>,
    /// Per node, since when nothing has been under way.
    idle_since: Vec<Option<f64>>,
    /// Per node, when in the ask period its asks of holdings go out.
    phase: Vec<f64>,
    origin_active: usize,
    origin_slots: usize,
    uploads: Vec<usize>,
    site: Vec<usize>,
    max_uploads: usize,
    peers: bool,
    /// Half a round trip: how old an answer about holdings is when it arrives.
    half_rtt: f64,
    t: f64,
    /// Per node, per chunk, how many of its peers it knows to hold it (as of its
    /// last ask), and the ask that was.
    counts: Vec<Vec<u16>>,
    counted: Vec<f64>,
}

impl Grid {
    /// Frees the upload slot (or the origin's) a finished or cancelled transfer
    /// from `from` held.
    fn release(&mut self, from: Option<usize>) {
        match from {
            Some(p) => self.uploads[p] -= 1,
            None if self.peers => self.origin_active -= 1,
            None => {}
        }
    }

    /// The instant of `me`'s last ask of holdings.
    fn last_ask(&self, me: usize) -> f64 {
        let every = HAVE_EVERY.as_secs_f64();
        ((self.t - self.phase[me]) / every).floor() * every + self.phase[me]
    }

    /// Counts again what `me` knows its peers hold, after an ask.
    fn recount(&mut self, me: usize) {
        let asked = self.last_ask(me);
        if self.counted[me] == asked {
            return;
        }
        self.counted[me] = asked;
        let mut counts = std::mem::take(&mut self.counts[me]);
        counts.iter_mut().for_each(|c| *c = 0);
        for (p, whole) in &self.named[me] {
            for (chunk, count) in counts.iter_mut().enumerate() {
                if self.knows(me, *p, *whole, chunk) {
                    *count += 1;
                }
            }
        }
        self.counts[me] = counts;
    }

    /// Whether `me` knows that `peer` (named holding the whole model or not)
    /// holds `chunk`: as of `me`'s last ask of it.
    fn knows(&self, me: usize, peer: u32, whole: bool, chunk: usize) -> bool {
        if whole {
            return true;
        }
        self.held_at[peer as usize][chunk] <= self.last_ask(me) - self.half_rtt
    }
}

/// One node's view of the grid.
struct View<'a> {
    grid: &'a mut Grid,
    me: usize,
}

impl Holders for View<'_> {
    fn holders(&self, chunk: usize) -> usize {
        usize::from(self.grid.counts[self.me][chunk])
    }

    fn sample(&mut self, chunk: usize, out: &mut Vec<(PeerId, bool)>) {
        let g = &*self.grid;
        // Numbered as the node numbers its peers: by their place in its list.
        for (at, (p, whole)) in g.named[self.me].iter().enumerate() {
            let pi = *p as usize;
            if g.uploads[pi] < g.max_uploads && g.knows(self.me, *p, *whole, chunk) {
                out.push((
                    PeerId::try_from(at).unwrap_or(PeerId::MAX),
                    g.site[pi] == g.site[self.me],
                ));
            }
        }
    }

    fn claim_origin(&mut self, chunk: usize) -> bool {
        let g = &mut *self.grid;
        if !g.peers {
            return true;
        }
        let idle = g.idle_since[self.me].map_or(0.0, |since| g.t - since);
        if g.origin_active >= g.origin_slots
            || !origin_allowed(
                g.share[self.me],
                chunk,
                std::time::Duration::from_secs_f64(idle.max(0.0)),
            )
        {
            return false;
        }
        g.origin_active += 1;
        true
    }
}

/// Shares `capacity` max-min among transfers each capped at `caps[i]`.
fn max_min(capacity: f64, caps: &mut [(f64, usize)], rates: &mut [f64]) {
    caps.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut left = capacity;
    let n = caps.len();
    for (i, (cap, flow)) in caps.iter().enumerate() {
        let fair = left / (n - i) as f64;
        let rate = cap.min(fair);
        rates[*flow] = rate;
        left -= rate;
    }
}

/// Shares each end's capacity max-min among its transfers, each capped by the rate
/// it has now (what the other end leaves it); `end` names a transfer's end on
/// this side, `capacity` an end's.
fn share(
    flows: &[Flow],
    n: usize,
    end: impl Fn(&Flow) -> usize,
    capacity: impl Fn(usize) -> f64,
    rates: &mut [f64],
    by_end: &mut [Vec<(f64, usize)>],
) {
    for e in by_end.iter_mut() {
        e.clear();
    }
    for (i, f) in flows.iter().enumerate() {
        if f.wait > 0.0 {
            rates[i] = 0.0;
        } else {
            by_end[end(f)].push((rates[i], i));
        }
    }
    for (e, caps) in by_end.iter_mut().enumerate().take(n + 1) {
        if !caps.is_empty() {
            max_min(capacity(e), caps, rates);
        }
    }
}

/// How the nodes are told of each other.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Fleet-rollout waves of these sizes (one wave of all: everyone at once); a
    /// wave starts when the one before is ready.
    Waves(Vec<usize>),
    /// No peers: every node pulls from the origin.
    OriginOnly,
}

/// A node's name, as the control plane ranks peers by.
pub fn name(i: usize) -> String {
    format!("node-{i:05}")
}

/// The peers the control plane names to `me` when its wave starts, chosen by
/// [`choose_peers`] from the nodes of earlier waves (holding the whole model) and
/// those of its own (staging it); and its origin share.
fn name_peers(grid: &mut Grid, wave_of: &[usize], wave: usize, me: usize) {
    let mine = name(me);
    let candidates: Vec<(u32, bool)> = (0..wave_of.len())
        .filter(|p| *p != me && wave_of[*p] <= wave)
        .map(|p| (u32::try_from(p).unwrap_or(u32::MAX), wave_of[p] < wave))
        .collect();
    grid.named[me] = choose_peers(candidates, |(p, whole)| {
        let p = *p as usize;
        (
            grid.site[p] == grid.site[me],
            *whole,
            peer_rank("r1", &mine, &name(p)),
        )
    });
    grid.counted[me] = f64::NAN;
    let staging: Vec<usize> = (0..wave_of.len()).filter(|p| wave_of[*p] == wave).collect();
    grid.share[me] = staging
        .iter()
        .position(|p| *p == me)
        .map(|index| OriginShare {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            of: u32::try_from(staging.len()).unwrap_or(u32::MAX),
        });
}

pub fn run(args: &Args, link_mbit: f64, mode: &Mode, dt: f64) -> Result<Outcomes> {
    let peers = !matches!(mode, Mode::OriginOnly);
    let chunk_bits = (args.chunk_mib << 20) as f64 * 8.0;
    let chunks = usize::try_from(args.model_mib.div_ceil(args.chunk_mib))?;
    let last_bits = ((args.model_mib << 20) as f64 * 8.0) - chunk_bits * (chunks - 1) as f64;
    let bits_of = |c: usize| {
        if c + 1 == chunks {
            last_bits
        } else {
            chunk_bits
        }
    };
    let link = link_mbit * 1e6;
    let download = args.download_mbit.unwrap_or(link_mbit) * 1e6;
    let origin = args.origin_mbit * 1e6;
    let n = args.nodes;
    let config = if peers {
        SwarmConfig {
            in_flight: args.in_flight,
            per_peer: args.per_peer,
            ..SwarmConfig::default()
        }
    } else {
        SwarmConfig {
            in_flight: 8,
            per_peer: 0,
            origin: 8,
        }
    };
    let mut swarms: Vec<Swarm> = (0..n)
        .map(|i| Swarm::new(chunks, |_| false, args.seed ^ (i as u64 + 1), config))
        .collect();
    let mut phases = StdRng::seed_from_u64(args.seed ^ 0xa5a5);
    let mut grid = Grid {
        held_at: vec![vec![f64::INFINITY; chunks]; n],
        named: vec![Vec::new(); n],
        share: vec![None; n],
        idle_since: vec![None; n],
        phase: (0..n)
            .map(|_| phases.random_range(0.0..HAVE_EVERY.as_secs_f64()))
            .collect(),
        origin_active: 0,
        origin_slots: args.origin_slots,
        uploads: vec![0; n],
        site: (0..n).map(|i| i % args.sites.max(1)).collect(),
        max_uploads: args.uploads,
        peers,
        half_rtt: args.rtt_ms / 2000.0,
        t: 0.0,
        counts: vec![vec![0; chunks]; n],
        counted: vec![f64::NAN; n],
    };
    // Each node's wave, and the wave under way.
    let wave_of: Vec<usize> = match mode {
        Mode::Waves(sizes) => sizes
            .iter()
            .enumerate()
            .flat_map(|(w, size)| std::iter::repeat_n(w, *size))
            .collect(),
        Mode::OriginOnly => vec![0; n],
    };
    let mut wave = usize::MAX;
    let mut waved = usize::MAX;
    let mut flows: Vec<Flow> = Vec::new();
    let mut ready = vec![f64::NAN; n];
    let mut done = 0usize;
    let mut origin_bits = 0.0;
    let mut t = 0.0;
    let limit = 100.0 * (n as f64) * (chunks as f64) * chunk_bits / origin.min(link);
    let trace = std::env::var_os("FANOUT_TRACE").is_some();
    let mut order: Vec<usize> = (0..n).collect();
    let mut turn = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let mut rates: Vec<f64> = Vec::new();
    let mut by_end: Vec<Vec<(f64, usize)>> = vec![Vec::new(); n + 1];
    while done < n {
        if t > limit {
            bail!("the spread did not finish within {limit:.0} s of virtual time");
        }
        grid.t = t;
        if done != waved {
            let was = wave;
            next_wave(&mut wave, &wave_of, &swarms);
            waved = done;
            if wave != was && peers {
                for me in (0..n).filter(|me| wave_of[*me] == wave) {
                    name_peers(&mut grid, &wave_of, wave, me);
                }
            }
        }
        // New requests, within each node's bounds, the nodes in a new order each
        // step so none is always first to the free upload slots.
        order.shuffle(&mut turn);
        for &me in &order {
            let swarm = &mut swarms[me];
            if swarm.complete() || wave_of[me] > wave {
                continue;
            }
            if peers {
                grid.recount(me);
            }
            let asked = swarm.next(&mut View {
                grid: &mut grid,
                me,
            });
            for (chunk, source) in asked {
                let from = match source {
                    Source::Origin => None,
                    Source::Peer(at) => {
                        let p = grid.named[me][at as usize].0 as usize;
                        if grid.uploads[p] >= grid.max_uploads {
                            swarm.done(chunk, source, Outcome::Refused);
                            continue;
                        }
                        grid.uploads[p] += 1;
                        Some(p)
                    }
                };
                flows.push(Flow {
                    from,
                    to: me,
                    chunk,
                    left_bits: bits_of(chunk),
                    wait: args.rtt_ms / 1000.0,
                    source,
                });
            }
            if swarm.in_flight() == 0 {
                grid.idle_since[me].get_or_insert(t);
            } else {
                grid.idle_since[me] = None;
            }
        }
        // Rates, max-min fair on both ends as TCP flows settle: each sender's upload
        // shared max-min under what the receivers leave each transfer, each
        // receiver's download shared max-min under what the senders leave it,
        // alternating a few rounds from equal shares.
        rates.clear();
        rates.resize(flows.len(), f64::INFINITY);
        for _ in 0..3 {
            share(
                &flows,
                n,
                |f| f.from.unwrap_or(n),
                |s| if s == n { origin } else { link },
                &mut rates,
                &mut by_end,
            );
            share(&flows, n, |f| f.to, |_| download, &mut rates, &mut by_end);
        }
        if trace && (t / 1.0).floor() != ((t + dt) / 1.0).floor() {
            let total: f64 = rates.iter().sum();
            let idle = (0..n)
                .filter(|i| !swarms[*i].complete() && swarms[*i].in_flight() == 0)
                .count();
            let held: usize = grid
                .held_at
                .iter()
                .map(|h| h.iter().filter(|at| at.is_finite()).count())
                .sum();
            eprintln!(
                "t={t:.1}s done={done} flows={} throughput={:.0} Mbit/s (of {:.0}) idle={idle} copies={:.1}",
                flows.len(),
                total / 1e6,
                (n - done) as f64 * link / 1e6,
                held as f64 / chunks as f64
            );
        }
        // Advance one step.
        t += dt;
        let mut i = 0;
        while i < flows.len() {
            if flows[i].wait > 0.0 {
                flows[i].wait -= dt;
                i += 1;
                continue;
            }
            let sent = (rates[i] * dt).min(flows[i].left_bits);
            flows[i].left_bits -= sent;
            if flows[i].from.is_none() {
                origin_bits += sent;
            }
            if flows[i].left_bits > 1e-6 {
                i += 1;
                continue;
            }
            let f = flows.swap_remove(i);
            rates.swap_remove(i);
            grid.release(f.from);
            // The other copy of an end-game chunk is cancelled.
            if swarms[f.to].sources(f.chunk).len() > 1 {
                if let Some(j) = flows
                    .iter()
                    .position(|o| o.to == f.to && o.chunk == f.chunk && o.source != f.source)
                {
                    let other = flows.swap_remove(j);
                    rates.swap_remove(j);
                    grid.release(other.from);
                    swarms[f.to].done(other.chunk, other.source, Outcome::Refused);
                    if j < i {
                        i -= 1;
                    }
                }
            }
            if swarms[f.to].done(f.chunk, f.source, Outcome::Verified) {
                grid.held_at[f.to][f.chunk] = t;
                if swarms[f.to].complete() {
                    ready[f.to] = t;
                    done += 1;
                }
            }
        }
    }
    Ok(Outcomes { ready, origin_bits })
}

/// Starts the next wave once every node of the current one is ready.
fn next_wave(wave: &mut usize, wave_of: &[usize], swarms: &[Swarm]) {
    let last = wave_of.iter().copied().max().unwrap_or(0);
    if *wave == usize::MAX {
        *wave = 0;
    }
    while *wave < last
        && wave_of
            .iter()
            .zip(swarms)
            .all(|(w, s)| *w != *wave || s.complete())
    {
        *wave += 1;
    }
}
