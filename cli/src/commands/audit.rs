//! `aigrid audit ls | checkpoint | export | verify`: the Human Chain's audit log of
//! every control change and proposal event, read from the servers, and an export of
//! it checked offline (no server needed) against the cluster's audit key.

use std::path::PathBuf;

use aigrid_api::{AuditCheckpoint, AuditEntry, PublicKey};
use aigrid_consensus::human::export;
use anyhow::{anyhow, Context};
use clap::Subcommand;
use reqwest::Method;

use crate::client::Client;
use crate::output::{ms_to_text, print_json, print_table, say};

/// `aigrid audit ...`
#[derive(Subcommand)]
pub enum AuditCommand {
    /// List the audit log's entries, oldest first.
    Ls {
        /// The first entry.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most entries.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Print the log's current checkpoint, signed by the cluster, and the cluster key.
    Checkpoint {
        /// Also write the signed note to FILE (for `audit verify --older FILE`).
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
    },
    /// Write the whole log with a signed checkpoint to FILE, for `audit verify`.
    Export {
        /// Where to write it.
        file: PathBuf,
    },
    /// Check an export offline: every entry, the checkpoint's signature, and with
    /// --older that the log only grew since an earlier checkpoint. Exit 0 only if
    /// every check holds.
    Verify {
        /// The export file.
        file: PathBuf,
        /// The cluster's audit key (`aigrid audit checkpoint` prints it); without
        /// it, the key the file names is trusted.
        #[arg(long, value_name = "KEY")]
        cluster_key: Option<String>,
        /// A file holding an earlier checkpoint's signed note of the same log.
        #[arg(long, value_name = "FILE")]
        older: Option<PathBuf>,
    },
}

/// Runs `aigrid audit`.
pub async fn audit(client: &Client, cmd: AuditCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Ls { from, limit } => {
            let path = format!("/api/v1/audit?from={from}&limit={limit}");
            let entries: Vec<AuditEntry> = client.call::<(), _>(Method::GET, &path, None).await?;
            if json {
                return print_json(&entries);
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    let ev = &e.event;
                    let what = ev["event"].as_str().unwrap_or("-").to_owned();
                    let detail = ["command", "target", "proposal", "decision", "by"]
                        .iter()
                        .filter_map(|k| ev[*k].as_str().map(|v| format!("{k}={v}")))
                        .collect::<Vec<_>>()
                        .join(" ");
                    let at = ev["at"].as_u64().map_or("-".to_owned(), ms_to_text);
                    vec![e.seq.to_string(), at, what, detail]
                })
                .collect();
            print_table(0, &["SEQ", "AT", "EVENT", "DETAIL"], &rows);
        }
        AuditCommand::Checkpoint { save } => {
            let c: AuditCheckpoint = client
                .call::<(), _>(Method::GET, "/api/v1/audit/checkpoint", None)
                .await?;
            if let Some(file) = save {
                std::fs::write(&file, &c.note)
                    .with_context(|| format!("writing {}", file.display()))?;
            }
            if json {
                return print_json(&c);
            }
            say(&format!("{}\ncluster key {}\n", c.note, c.cluster_key));
        }
        AuditCommand::Export { file } => {
            let bytes = client.get_bytes("/api/v1/audit/export").await?;
            let verified = export::verify_export(&bytes, None, None)
                .map_err(|e| anyhow!("the servers' export does not verify: {e}"))?;
            std::fs::write(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
            let parsed: export::AuditExport = serde_json::from_slice(&bytes)?;
            if json {
                return print_json(&serde_json::json!({
                    "file": file, "size": verified.size, "root": hex::encode(verified.root),
                    "cluster_key": parsed.cluster_key,
                }));
            }
            say(&format!(
                "wrote {} entries to {} (root {}), signed by cluster key {}\n",
                verified.size,
                file.display(),
                hex::encode(verified.root),
                parsed.cluster_key
            ));
        }
        AuditCommand::Verify {
            file,
            cluster_key,
            older,
        } => verify(&file, cluster_key.as_deref(), older.as_deref(), json)?,
    }
    Ok(())
}

/// `aigrid audit verify`: offline, no server needed.
pub fn verify(
    file: &std::path::Path,
    cluster_key: Option<&str>,
    older: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let key: Option<PublicKey> = cluster_key
        .map(|k| k.parse().map_err(|e| anyhow!("--cluster-key: {e}")))
        .transpose()?;
    let older = older
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let verified = export::verify_export(&bytes, key.as_ref(), older.as_deref())
        .map_err(|e| anyhow!("{}: verification failed: {e}", file.display()))?;
    if json {
        return print_json(&serde_json::json!({
            "ok": true, "size": verified.size, "root": hex::encode(verified.root),
            "pinned_key": key.is_some(), "consistent_with_older": older.is_some(),
        }));
    }
    say(&format!(
        "ok: {} entries, root {}{}{}\n",
        verified.size,
        hex::encode(verified.root),
        if key.is_some() {
            ", signed by the given cluster key"
        } else {
            ", signed by the key the file names (pass --cluster-key to pin it)"
        },
        if older.is_some() {
            "; the log only grew since the older checkpoint"
        } else {
            ""
        }
    ));
    Ok(())
}
