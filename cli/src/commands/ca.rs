//! `aigrid ca`: the cluster's certificate authority, made once at bootstrap, and the
//! server and node certificates it issues for servers that must not hold its key.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;

use crate::output::say;

/// `aigrid ca` subcommands.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Make a new cluster CA: `ca.pem` (give it to clients, `--ca-cert`) and `ca.key`
    /// (mode 0600; a server given this directory with `--ca-dir` issues its own
    /// certificate at start). Prints the CA's fingerprint, which join tokens carry.
    Init {
        /// Directory to write `ca.pem` and `ca.key` into (created if missing); an
        /// existing CA there is never replaced.
        #[arg(long)]
        dir: PathBuf,
        /// When `--dir` already holds a CA, print its fingerprint and succeed (for
        /// scripts and containers that run this at every start).
        #[arg(long)]
        keep_existing: bool,
    },
    /// Issue server `--id`'s certificate into `--out` (`ca.pem`, `server.pem`,
    /// `server.key`): a directory for that server's `--ca-dir` that holds no CA key.
    /// Or node `--node`'s data port certificate (`node.pem`, `node.key`): a
    /// directory for that agent's `--data-tls-dir`, where the servers hold no CA key.
    Issue {
        /// The CA's directory (`ca.pem` and `ca.key`).
        #[arg(long)]
        dir: PathBuf,
        /// The server's Raft id.
        #[arg(long, required_unless_present = "node", conflicts_with = "node")]
        id: Option<u64>,
        /// The node's id (as its agent registers it, `--node-id`).
        #[arg(long)]
        node: Option<String>,
        /// A host name or IP address clients and peers reach the server (or the
        /// node's data port) at; repeatable (localhost and 127.0.0.1 are always
        /// included).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Directory to write the server's files into.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs an `aigrid ca` subcommand.
pub fn ca(cmd: CaCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir, keep_existing } => {
            let ca = if keep_existing && aigrid_tls::ClusterCa::exists(&dir) {
                aigrid_tls::ClusterCa::load(&dir).map_err(|e| anyhow!("{e}"))?
            } else {
                let ca = aigrid_tls::ClusterCa::create().map_err(|e| anyhow!("{e}"))?;
                ca.save(&dir).map_err(|e| anyhow!("{e}"))?;
                ca
            };
            let fingerprint = ca.fingerprint().to_string();
            if json {
                say(&format!(
                    "{}\n",
                    serde_json::json!({"dir": dir, "fingerprint": fingerprint})
                ));
            } else {
                say(&format!(
                    "cluster CA in {dir}/ca.pem and {dir}/ca.key (keep the key secret)\n  fingerprint  {fingerprint}\n  servers      aigrid server --ca-dir {dir} ...\n  clients      aigrid --ca-cert {dir}/ca.pem ...\n",
                    dir = dir.display()
                ));
            }
            Ok(())
        }
        CaCommand::Issue {
            dir,
            id,
            node,
            mut hosts,
            out,
        } => {
            let ca = aigrid_tls::ClusterCa::load(&dir).map_err(|e| anyhow!("{e}"))?;
            hosts.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
            let Some(id) = id else {
                let node = node.ok_or_else(|| anyhow!("--id or --node is required"))?;
                let identity = ca
                    .issue_node_identity(&node, &hosts)
                    .map_err(|e| anyhow!("{e}"))?;
                identity.save(&out).map_err(|e| anyhow!("{e}"))?;
                if !json {
                    say(&format!(
                        "node {node}'s data port certificate written to {}: start its agent \
                         with --data-tls-dir {}\n",
                        out.display(),
                        out.display()
                    ));
                }
                return Ok(());
            };
            let identity = ca.issue_server(id, &hosts).map_err(|e| anyhow!("{e}"))?;
            identity.save(&out).map_err(|e| anyhow!("{e}"))?;
            if !json {
                say(&format!(
                    "server {id}'s certificate written to {}: start it with --ca-dir {}\n",
                    out.display(),
                    out.display()
                ));
            }
            Ok(())
        }
    }
}
