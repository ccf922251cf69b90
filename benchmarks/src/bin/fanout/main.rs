//! Benchmark P7: a model spread to every site of a grid, in virtual time.
//!
//! N nodes (one per site by default) start together, none holding the model; the
//! origin (the dispersed store) holds it all. Every node is named the peers the
//! control plane names ([`aigrid_api::rollout::peer_rank`]: at most
//! [`aigrid_api::rollout::MAX_MODEL_PEERS`], own site first, at least four
//! holding the whole model where there are, the rest its own pseudo-random set),
//! sees what they hold as of its last ask (every [`aigrid_store::peers::HAVE_EVERY`]), and runs the
//! agent's own peer choice ([`aigrid_store::swarm`]: rarest first, own site then
//! other peers, the origin only for chunks no peer holds and then only its own
//! share of them until it has been idle a while, a few requests per peer, a
//! bounded number of uploads per node) over links modelled as token buckets: each
//! sender's upload is shared max-min among its transfers, each capped by its
//! receiver's download share. Nothing sleeps: time advances in fixed steps.
//!
//! Reported: time to ready (every chunk held) at p50, p99 and max, and what the
//! origin sent, in copies of the model, beside the analytic lower bound
//! `max(F/u_origin, N·F/(u_origin + Σu_nodes), F/d_min)` and beside every node
//! pulling the model from the origin alone (the same simulation, no peers).
//!
//! With `--loopback`, the same spread also runs for real ([`loopback`]): every
//! node a peer service on its own port and the agents' staging code, over HTTP on
//! loopback, uploads paced to the link, the origin a store behind a link of its
//! rate; printed beside the simulation of the same grid.

mod loopback;
mod sim;

use aigrid_store::swarm::SwarmConfig;
use anyhow::{bail, Result};
use clap::Parser;

use sim::{run, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "fanout",
    about = "Time to spread a model to every site, peer to peer, in virtual time"
)]
pub(crate) struct Args {
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
    /// Each node's download in Mbit/s, when it differs from its link.
    #[arg(long)]
    download_mbit: Option<f64>,
    /// Also run fleet-rollout waves (`1,10,100,all`): a wave starts when the one
    /// before is ready.
    #[arg(long)]
    waves: Option<aigrid_api::Waves>,
    /// Also run every node pulling from the origin alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    baseline: bool,
    /// Seed of the peer samples and tie-break orders.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also spread the model for real on loopback (a few nodes: each is a peer
    /// service and a staging agent in this process), beside the simulation.
    #[arg(long)]
    loopback: bool,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub(crate) struct Outcomes {
    /// Per node, seconds until it held every chunk.
    ready: Vec<f64>,
    /// What the origin sent.
    origin_bits: f64,
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
        let download = args.download_mbit.map_or(link, |d| d * 1e6);
        let bound = (model_bits / origin)
            .max(n * model_bits / (origin + n * link))
            .max(model_bits / download);
        // Steps of about a hundredth of a chunk's time on the link.
        let chunk_time = (args.chunk_mib << 20) as f64 * 8.0 / link;
        let mut runs = vec![(
            "aigrid peer to peer".to_owned(),
            run(
                &args,
                link_mbit,
                &Mode::Waves(vec![args.nodes]),
                chunk_time / 20.0,
            )?,
        )];
        if args.loopback {
            runs.push((
                "measured on loopback".to_owned(),
                loopback::run(&args, link_mbit)?,
            ));
        }
        if let Some(waves) = &args.waves {
            let mode = Mode::Waves(waves.cut(args.nodes));
            runs.push((
                format!("waves {waves}"),
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
