//! `aigrid cluster`: the control plane's leader, term, indices and members, and
//! adding and removing servers.

use aigrid_api::{ClusterStatus, JoinRequest};
use anyhow::anyhow;
use clap::Subcommand;
use reqwest::Method;

use crate::client::{proposed_or, Client};
use crate::output::print_json;

/// `aigrid cluster ...`
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Show the leader, term, indices and members.
    Status,
    /// Add a server (started with `--join` or with an empty data dir) as a voter.
    Join {
        /// The new server's id.
        #[arg(long)]
        id: u64,
        /// Its HOST:PORT.
        #[arg(long)]
        addr: String,
    },
    /// Remove a server from the voters.
    Leave {
        /// The server's id.
        id: u64,
    },
}

fn print_cluster(status: &ClusterStatus) {
    println!("server        {}", status.id);
    match status.leader {
        Some(l) => println!("leader        {l}"),
        None => println!("leader        none (election in progress or no quorum)"),
    }
    println!("term          {}", status.term);
    println!("commit index  {}", status.commit_index);
    println!("applied index {}", status.applied_index);
    println!("members");
    for m in &status.members {
        let lead = if m.is_leader { "  leader" } else { "" };
        println!("  {:<4} {:<24} {}{lead}", m.id, m.addr, m.role);
    }
}

/// Runs a `cluster` subcommand.
pub async fn cluster(client: &Client, cmd: ClusterCommand, json: bool) -> anyhow::Result<()> {
    let status: ClusterStatus = match cmd {
        ClusterCommand::Status => {
            client
                .call::<(), _>(Method::GET, "/api/v1/cluster", None)
                .await?
        }
        ClusterCommand::Join { id, addr } => {
            let req = JoinRequest { id, addr };
            req.validate().map_err(|e| anyhow!("{e}"))?;
            let answer = client
                .call_guarded(Method::POST, "/api/v1/cluster/members", Some(&req))
                .await?;
            match proposed_or(answer, json)? {
                Some(status) => status,
                None => return Ok(()),
            }
        }
        ClusterCommand::Leave { id } => {
            let path = format!("/api/v1/cluster/members/{id}");
            let answer = client
                .call_guarded::<(), _>(Method::DELETE, &path, None)
                .await?;
            match proposed_or(answer, json)? {
                Some(status) => status,
                None => return Ok(()),
            }
        }
    };
    if json {
        return print_json(&status);
    }
    print_cluster(&status);
    Ok(())
}
