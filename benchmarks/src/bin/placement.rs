//! Placement throughput: how many instances per second aigrid places on a large
//! simulated GPU cluster, beside a naive first-fit planner given the same seeded
//! workload, and how good the resulting packing is.
//!
//! `placement planner` runs aigrid's pure planner in process, job after job, with
//! no network, Raft or disk in the way. Each subcommand prints a side-by-side
//! markdown table.
//!
//! | module | owns |
//! |---|---|
//! | [`workload`] | the seeded cluster (node registrations) and job stream (job specs), in their wire types |
//! | [`occupancy`] | what every node holds: checks each placement against its spec and node, and measures fragmentation and spread |
//! | [`first_fit`] | the baseline planner: the first node in id order that fits, no ranking, no index |
//! | [`planner`] | the `planner` subcommand: aigrid's planner alone, beside first-fit |
//! | [`pass`] | the `pass` subcommand: the leader's whole scheduling pass over the real state, circles' quotas on beside off |
//! | [`table`] | the side-by-side table both columns are printed in |

// A binary's root resolves modules beside itself (`src/bin/`), where every
// binary's files would mix; this one keeps its own in `src/bin/placement/`.
#[path = "placement/first_fit.rs"]
mod first_fit;
#[path = "placement/occupancy.rs"]
mod occupancy;
#[path = "placement/pass.rs"]
mod pass;
#[path = "placement/planner.rs"]
mod planner;
#[path = "placement/table.rs"]
mod table;
#[path = "placement/workload.rs"]
mod workload;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "placement",
    about = "Placement throughput and quality of aigrid against a naive first-fit planner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// aigrid's pure planner alone, in process, beside a naive first-fit planner.
    Planner(planner::Args),
    /// The leader's scheduling pass over the real state, circles' quotas on beside off.
    Pass(pass::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Planner(args) => planner::run(&args),
        Command::Pass(args) => pass::run(&args),
    }
}
