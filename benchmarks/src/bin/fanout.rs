//! Benchmark P7: a model spread to every site of a grid, in virtual time.
//!
//! N nodes (one per site by default) start together, none holding the model; the
//! origin (the dispersed store) holds it all. Every node runs the agent's own peer
//! choice ([`aigrid_store::swarm`]: rarest first, own site then other peers then
//! the origin, the origin asked only for chunks no peer holds or fetches, a few
//! requests per peer, a bounded number of uploads per node) over links modelled as
//! token buckets: each sender's upload is shared max-min among its transfers, each
//! capped by its receiver's download share. Nothing sleeps: time advances in fixed
//! steps. Reported: time to ready (every chunk held) at p50, p99 and max, and what
//! the origin sent, in copies of the model, beside the analytic lower bound
//! `max(F/u_origin, N·F/(u_origin + Σu_nodes), F/d_min)` and beside every node
//! pulling the model from the origin alone (the same simulation, no peers).

use aigrid_store::swarm::{Holders, Outcome, PeerId, Source, Swarm, SwarmConfig};
use anyhow::{bail, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(
    name = "fanout",
    about = "Time to spread a model to every site, peer to peer, in virtual time"
)]
struct Args {
    /// Nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Sites the nodes are spread over, round robin.
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// The model's size in MiB.
    #[arg(long, default_value_t = 1024)]
    model_mib: u64,
    /// The chunk size in MiB (the store's default is 4).
    #[arg(long, default_value_t = 4)]
    chunk_mib: u64,
    /// The origin's upload in Mbit/s.
    #[arg(long, default_value_t = 10_000.0)]
    origin_mbit: f64,
    /// Each node's link (upload and download) in Mbit/s; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1000,100")]
    link_mbit: Vec<f64>,
    /// Transfers a node serves at once; more are refused.
    #[arg(long, default_value_t = 4)]
    uploads: usize,
    /// Requests a node has under way at once.
    #[arg(long, default_value_t = SwarmConfig::default().in_flight)]
    in_flight: usize,
    /// Requests to one peer at once.
    #[arg(long, default_value_t = SwarmConfig::default().per_peer)]
    per_peer: usize,
    /// Round trip before a request's first byte, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    rtt_ms: f64,
    /// Transfers the origin serves at once (the store's request bound); more wait.
    #[arg(long, default_value_t = 32)]
    origin_slots: usize,
    /// Fetches of one chunk from the origin allowed while no node holds it yet.
    #[arg(long, default_value_t = 1)]
    origin_copies: u32,
    /// Peers sampled per chunk when choosing whom to ask.
    #[arg(long, default_value_t = 8)]
    sample: usize,
    /// Also run fleet-rollout waves (`1,10,100,all`) as the agents do today: a
    /// wave's peers are the nodes of earlier waves only.
    #[arg(long)]
    waves: Option<aigrid_api::Waves>,
    /// Also run every node pulling from the origin alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    baseline: bool,
    /// Seed of the peer samples and tie-break orders.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// What one run measured.
#[derive(Debug, Clone)]
struct Outcomes {
    ready: Vec<f64>,
    origin_bits: f64,
}

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

/// Who holds what, as every node's tracker view sees it.
struct Grid {
    holders_of: Vec<Vec<u32>>,
    /// Per chunk, fetches from the origin so far.
    claimed: Vec<u32>,
    /// Fetches of one chunk from the origin allowed while nobody holds it.
    origin_copies: u32,
    origin_active: usize,
    origin_slots: usize,
    uploads: Vec<usize>,
    site: Vec<usize>,
    max_uploads: usize,
    sample: usize,
    peers: bool,
    /// In the wave mode, the nodes holding the whole model, the only peers named.
    whole: Option<Vec<u32>>,
    rng: StdRng,
}

/// One node's view of the grid.
struct View<'a> {
    grid: &'a mut Grid,
    me: usize,
}

impl Holders for View<'_> {
    fn holders(&self, chunk: usize) -> usize {
        if let Some(whole) = &self.grid.whole {
            return whole.len();
        }
        if self.grid.peers {
            self.grid.holders_of[chunk].len()
        } else {
            0
        }
    }

    fn sample(&mut self, chunk: usize, out: &mut Vec<(PeerId, bool)>) {
        let holders = match &self.grid.whole {
            Some(whole) => whole,
            None => &self.grid.holders_of[chunk],
        };
        if holders.is_empty() {
            return;
        }
        for _ in 0..self.grid.sample.min(holders.len() * 2) {
            let p = holders[self.grid.rng.random_range(0..holders.len())];
            let pi = p as usize;
            if pi != self.me && self.grid.uploads[pi] < self.grid.max_uploads {
                out.push((p, self.grid.site[pi] == self.grid.site[self.me]));
            }
        }
    }

    fn claim_origin(&mut self, chunk: usize) -> bool {
        if !self.grid.peers {
            return true;
        }
        if let Some(whole) = &self.grid.whole {
            // The store gives what no named peer can: everything, to the first wave.
            return whole.is_empty();
        }
        if self.grid.claimed[chunk] >= self.grid.origin_copies
            || !self.grid.holders_of[chunk].is_empty()
            || self.grid.origin_active >= self.grid.origin_slots
        {
            return false;
        }
        self.grid.claimed[chunk] += 1;
        self.grid.origin_active += 1;
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

/// What the nodes know of each other.
#[derive(Debug, Clone)]
enum Mode {
    /// Every node's holdings, chunk by chunk, as they grow.
    Swarm,
    /// Fleet-rollout waves: a wave starts when the last is ready, and names as
    /// peers only the nodes of earlier waves (which hold the whole model).
    Waves(Vec<usize>),
    /// No peers: every node pulls from the origin.
    OriginOnly,
}

fn run(args: &Args, link_mbit: f64, mode: &Mode, dt: f64) -> Result<Outcomes> {
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
    let mut grid = Grid {
        holders_of: vec![Vec::new(); chunks],
        claimed: vec![0; chunks],
        origin_copies: args.origin_copies,
        origin_active: 0,
        origin_slots: args.origin_slots,
        uploads: vec![0; n],
        site: (0..n).map(|i| i % args.sites.max(1)).collect(),
        max_uploads: args.uploads,
        sample: args.sample,
        peers,
        whole: matches!(mode, Mode::Waves(_)).then(Vec::new),
        rng: StdRng::seed_from_u64(args.seed),
    };
    // Each node's wave, and the wave under way.
    let wave_of: Vec<usize> = match mode {
        Mode::Waves(sizes) => sizes
            .iter()
            .enumerate()
            .flat_map(|(w, size)| std::iter::repeat_n(w, *size))
            .collect(),
        _ => vec![0; n],
    };
    let mut wave = 0usize;
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
        if done != waved {
            next_wave(&mut wave, &wave_of, &swarms);
            waved = done;
        }
        // New requests, within each node's bounds, the nodes in a new order each
        // step so none is always first to the free upload slots.
        order.shuffle(&mut turn);
        for &me in &order {
            let swarm = &mut swarms[me];
            if swarm.complete() || wave_of[me] > wave {
                continue;
            }
            let asked = swarm.next(&mut View {
                grid: &mut grid,
                me,
            });
            for (chunk, source) in asked {
                let from = match source {
                    Source::Origin => None,
                    Source::Peer(p) => {
                        let p = p as usize;
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
            share(&flows, n, |f| f.to, |_| link, &mut rates, &mut by_end);
        }
        if trace && (t / 1.0).floor() != ((t + dt) / 1.0).floor() {
            let total: f64 = rates.iter().sum();
            let idle = (0..n)
                .filter(|i| !swarms[*i].complete() && swarms[*i].in_flight() == 0)
                .count();
            let held: usize = grid.holders_of.iter().map(Vec::len).sum();
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
            match f.from {
                Some(p) => grid.uploads[p] -= 1,
                None if peers => grid.origin_active -= 1,
                None => {}
            }
            // The other copy of an end-game chunk is cancelled.
            if swarms[f.to].sources(f.chunk).len() > 1 {
                if let Some(j) = flows
                    .iter()
                    .position(|o| o.to == f.to && o.chunk == f.chunk && o.source != f.source)
                {
                    let other = flows.swap_remove(j);
                    rates.swap_remove(j);
                    if let Some(p) = other.from {
                        grid.uploads[p] -= 1;
                    }
                    swarms[f.to].done(other.chunk, other.source, Outcome::Refused);
                    if j < i {
                        i -= 1;
                    }
                }
            }
            if swarms[f.to].done(f.chunk, f.source, Outcome::Verified) {
                if grid.whole.is_none() {
                    grid.holders_of[f.chunk].push(u32::try_from(f.to)?);
                }
                if swarms[f.to].complete() {
                    ready[f.to] = t;
                    done += 1;
                    if let Some(whole) = &mut grid.whole {
                        whole.push(u32::try_from(f.to)?);
                    }
                }
            }
        }
    }
    Ok(Outcomes { ready, origin_bits })
}

/// Starts the next wave once every node of the current one is ready.
fn next_wave(wave: &mut usize, wave_of: &[usize], swarms: &[Swarm]) {
    let last = wave_of.iter().copied().max().unwrap_or(0);
    while *wave < last
        && wave_of
            .iter()
            .zip(swarms)
            .all(|(w, s)| *w != *wave || s.complete())
    {
        *wave += 1;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes == 0 || args.chunk_mib == 0 || args.model_mib == 0 {
        bail!("nodes, model size and chunk size must be positive");
    }
    let model_bits = (args.model_mib << 20) as f64 * 8.0;
    println!(
        "## P7: {} MiB to {} nodes over {} sites, {} MiB chunks, origin {} Mbit/s\n",
        args.model_mib, args.nodes, args.sites, args.chunk_mib, args.origin_mbit
    );
    println!("| link | run | p50 ready (s) | p99 (s) | max (s) | lower bound (s) | max / bound | origin egress (copies) |");
    println!("|---|---|---|---|---|---|---|---|");
    for &link_mbit in &args.link_mbit {
        let link = link_mbit * 1e6;
        let origin = args.origin_mbit * 1e6;
        let n = args.nodes as f64;
        let bound = (model_bits / origin)
            .max(n * model_bits / (origin + n * link))
            .max(model_bits / link);
        // Steps of about a hundredth of a chunk's time on the link.
        let chunk_time = (args.chunk_mib << 20) as f64 * 8.0 / link;
        let mut runs = vec![(
            "aigrid peer to peer".to_owned(),
            run(&args, link_mbit, &Mode::Swarm, chunk_time / 20.0)?,
        )];
        if let Some(waves) = &args.waves {
            let mode = Mode::Waves(waves.cut(args.nodes));
            runs.push((
                format!("waves {waves}, peers of earlier waves"),
                run(&args, link_mbit, &mode, chunk_time / 20.0)?,
            ));
        }
        if args.baseline {
            // Steps of a five-thousandth of the time the origin takes to send
            // every node its copy.
            let alone = n * model_bits / origin.min(n * link);
            runs.push((
                "every node from the origin".to_owned(),
                run(
                    &args,
                    link_mbit,
                    &Mode::OriginOnly,
                    (chunk_time / 10.0).max(alone / 5000.0),
                )?,
            ));
        }
        for (name, out) in runs {
            let mut ready = out.ready.clone();
            ready.sort_by(f64::total_cmp);
            let max = *ready.last().unwrap_or(&0.0);
            println!(
                "| {link_mbit} Mbit/s | {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                percentile(&ready, 0.5),
                percentile(&ready, 0.99),
                max,
                bound,
                max / bound,
                out.origin_bits / model_bits
            );
        }
    }
    Ok(())
}
