//! `aigrid model`: push, list, show, pull, verify, repair and remove models in the
//! dispersed store, and the periodic repair loop a server with a store runs.
//!
//! The store's backends come from `--store FILE` or, by default, from what the server
//! announces at `GET /api/v1/storage`; credentials for S3 backends come from the
//! caller's environment or the file, never from the server.
//!
//! | module | owns |
//! |---|---|
//! | this one | the subcommands and what they print |
//! | `registry` | registered models as the server answers them, each checked to be the model asked for |
//! | `store` | the store a command works on, the publisher's and the owner's keys |
//! | `push` | a directory pushed and registered |
//! | `repair` | one model repaired, and the periodic repair loop |

pub(crate) mod push;
mod registry;
mod repair;
pub(crate) mod store;

use std::path::PathBuf;

use aigrid_api::model::ModelSummary;
use aigrid_store::crypto::ModelKey;
use aigrid_store::manifest::{shard_object, Registration};
use anyhow::{anyhow, bail};
use clap::Subcommand;
use reqwest::Method;

use crate::client::Client;
use crate::output::{bytes_text, count, print_json};

pub use push::PushArgs;
use registry::all_details_unchecked;
pub use registry::{detail, registered_chunks, resolve, short, ModelDetail};
use repair::repair_one;
pub use repair::{repair_loop, RepairMetrics};
pub use store::{open_store, read_model_key, store_from, StoreArgs};

/// `aigrid model …`
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Push a model directory: cut into chunks, hash, skip chunks already stored,
    /// erasure code k+m, spread over the store's backends, sign, register.
    Push(PushArgs),
    /// List registered models, newest first.
    Ls {
        /// Only models pushed under this name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show a model's manifest: files, stripes, every shard's backend and object.
    Show {
        /// The model's digest (or a unique prefix of it).
        digest: String,
    },
    /// Fetch a model's files into DIR, verifying every chunk.
    Pull {
        /// The model's digest (or a unique prefix of it).
        digest: String,
        /// Where to write its files.
        dir: PathBuf,
        /// The owner's key file, for a model encrypted at rest.
        #[arg(long, env = "AIGRID_MODEL_KEY")]
        key: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Read every shard of a model and report missing or corrupt ones; exits non-zero
    /// when any is bad.
    Verify {
        /// The model's digest (or a unique prefix of it).
        digest: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Rebuild a model's missing or corrupt shards from the survivors, onto backends
    /// its policy allows, and register where they now are.
    Repair {
        /// The model's digest (or a unique prefix of it).
        digest: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Unregister a model and delete the shards no other model uses.
    Rm {
        /// The model's digest (or a unique prefix of it).
        digest: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write the tiny demo model `aigrid up` deploys (random weights, a real
    /// tokenizer) into DIR once, push it and submit its model-server job (left alone
    /// when a job of its name exists): `/v1` then answers for `tiny-llama`.
    Demo {
        /// Where the model and its publisher key are kept between runs.
        #[arg(long, default_value = "aigrid-demo-model")]
        dir: PathBuf,
        /// The circle the model and its job belong to (the admins' when none); a
        /// circle's API keys reach its models on `/v1`.
        #[arg(long)]
        circle: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write a new encryption key file for `push --encrypt-key` (never overwrites).
    Keygen {
        /// Where to write it.
        path: PathBuf,
    },
}

/// Runs `aigrid model …`.
pub async fn model(client: &Client, cmd: ModelCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Push(args) => push::push(client, args, json).await,
        ModelCommand::Ls { name } => {
            let path = match &name {
                Some(n) => format!("/api/v1/models?name={}", urlencode(n)),
                None => "/api/v1/models".to_owned(),
            };
            let all: Vec<ModelSummary> = client.call::<(), _>(Method::GET, &path, None).await?;
            if json {
                return print_json(&all);
            }
            if all.is_empty() {
                println!("no models");
                return Ok(());
            }
            println!(
                "{:<16} {:<24} {:>10} {:>10} {:>5} {:>5}  POLICY",
                "DIGEST", "NAME", "SIZE", "STORED", "CODE", "FILES"
            );
            for m in &all {
                println!(
                    "{:<16} {:<24} {:>10} {:>10} {:>5} {:>5}  {}{}",
                    &m.digest[..16],
                    m.name,
                    bytes_text(m.size),
                    bytes_text(m.stored_bytes),
                    format!("{}+{}", m.k, m.m),
                    m.files,
                    if m.policy.is_empty() {
                        "any backend"
                    } else {
                        &m.policy
                    },
                    if m.encrypted { "  (encrypted)" } else { "" },
                );
            }
            Ok(())
        }
        ModelCommand::Show { digest } => {
            let digest = resolve(client, &digest).await?;
            let detail = detail(client, &digest).await?;
            if json {
                return print_json(&detail);
            }
            print_manifest(&detail, &digest);
            Ok(())
        }
        ModelCommand::Pull {
            digest,
            dir,
            key,
            store,
        } => {
            let digest = resolve(client, &digest).await?;
            let key = read_model_key(key.as_deref())?;
            let detail = detail(client, &digest).await?;
            let (store, _) = open_store(client, &store).await?;
            let stats = store
                .pull(&detail.registration(), &dir, key.as_ref())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if json {
                return print_json(&serde_json::json!({
                    "digest": digest, "files": stats.files, "bytes": stats.bytes, "stripes": stats.stripes,
                }));
            }
            println!(
                "pulled {} ({}, {}, every chunk verified) into {}",
                detail.summary.name,
                count(stats.files, "file"),
                bytes_text(stats.bytes),
                dir.display()
            );
            Ok(())
        }
        ModelCommand::Verify { digest, store } => {
            let digest = resolve(client, &digest).await?;
            let detail = detail(client, &digest).await?;
            let (store, _) = open_store(client, &store).await?;
            let report = store
                .scrub(&detail.registration())
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "checked {} in {} of {}",
                    count(report.shards, "shard"),
                    count(report.stripes, "stripe"),
                    detail.summary.name
                );
                for f in &report.faults {
                    println!(
                        "  stripe {} shard {} on {}: {}",
                        f.stripe, f.shard, f.backend, f.kind
                    );
                }
            }
            if !report.unrecoverable.is_empty() {
                bail!(
                    "{} fewer than k intact shards: data is lost ({:?})",
                    match report.unrecoverable.len() {
                        1 => "1 stripe has".to_owned(),
                        n => format!("{n} stripes have"),
                    },
                    report.unrecoverable
                );
            }
            if !report.healthy() {
                bail!(
                    "{}; run `aigrid model repair {}`",
                    count(report.faults.len(), "bad shard"),
                    &digest[..16]
                );
            }
            if !json {
                println!("every shard is intact");
            }
            Ok(())
        }
        ModelCommand::Repair { digest, store } => {
            let digest = resolve(client, &digest).await?;
            let (store, _) = open_store(client, &store).await?;
            let report = repair_one(client, &store, &digest).await?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "{} found, {} rebuilt ({} moved to other backends), {} failed",
                    count(report.scrub.faults.len(), "bad shard"),
                    report.rebuilt,
                    report.moved,
                    report.failed
                );
            }
            if report.failed > 0 || !report.scrub.unrecoverable.is_empty() {
                bail!(
                    "{} could not be repaired",
                    count(report.failed.max(report.scrub.unrecoverable.len()), "shard")
                );
            }
            Ok(())
        }
        ModelCommand::Rm { digest, store } => {
            let digest = resolve(client, &digest).await?;
            let detail = detail(client, &digest).await?;
            let (store, _) = open_store(client, &store).await?;
            client
                .call_no_content(Method::DELETE, &format!("/api/v1/models/{digest}"))
                .await?;
            // Every other registration, verified or not: one that does not verify
            // only keeps shards from deletion, and a model whose registration is
            // damaged should not lose its shards too.
            let keep: Vec<Registration> = all_details_unchecked(client)
                .await?
                .iter()
                .map(|(_, d)| d.registration())
                .collect();
            let deleted = store
                .remove(&detail.registration(), &keep)
                .await
                .map_err(|e| anyhow!("model unregistered, but deleting its shards failed: {e}"))?;
            if json {
                return print_json(
                    &serde_json::json!({"digest": digest, "shards_deleted": deleted}),
                );
            }
            println!(
                "removed {} ({}); deleted {} no other model uses",
                detail.summary.name,
                &digest[..16],
                count(deleted, "shard")
            );
            Ok(())
        }
        ModelCommand::Demo { dir, circle, store } => {
            let deployed = crate::demo::try_deploy(client, &dir, store, circle.as_deref()).await?;
            let (digest, verb) = match &deployed {
                crate::demo::Deployed::Submitted(d) => (d, "submitted"),
                crate::demo::Deployed::JobExists(d) => (d, "exists already, left as it is"),
            };
            if json {
                return print_json(&serde_json::json!({
                    "model": crate::demo::NAME, "digest": digest,
                    "job_submitted": matches!(deployed, crate::demo::Deployed::Submitted(_)),
                }));
            }
            println!(
                "demo model {} pushed ({digest}); its job {verb}",
                crate::demo::NAME
            );
            Ok(())
        }
        ModelCommand::Keygen { path } => {
            let key = ModelKey::generate();
            key.write_new(&path).map_err(|e| anyhow!("{e}"))?;
            if json {
                return print_json(&serde_json::json!({"path": path, "key_id": key.id()}));
            }
            println!(
                "wrote model key {} (id {}); keep it safe: without it an encrypted model cannot be read",
                path.display(),
                &key.id()[..16]
            );
            Ok(())
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prints a registration checked to be model `digest`.
fn print_manifest(d: &ModelDetail, digest: &str) {
    let m = &d.manifest.manifest;
    println!("model      {}", m.name);
    println!("digest     {digest}");
    println!("publisher  {}", d.manifest.publisher);
    println!(
        "signature  {}{}",
        d.manifest.scheme(),
        if d.manifest.ml_dsa.is_some() {
            " (both verified)"
        } else {
            ""
        }
    );
    if let Some(circle) = &d.summary.circle {
        println!("circle     {circle}");
    }
    println!(
        "code       {} {}+{} ({} of at most {})",
        m.codec.name,
        m.codec.k,
        m.codec.m,
        count(
            m.files.iter().map(|f| f.chunks.len()).sum::<usize>(),
            "chunk"
        ),
        bytes_text(m.chunk_size)
    );
    println!("policy     {}", m.policy);
    if let Some(enc) = &m.encryption {
        println!("encrypted  {} with key {}", enc.aead, &enc.key_id[..16]);
    }
    println!(
        "size       {} ({} stored)",
        bytes_text(m.size()),
        bytes_text(m.stored_bytes())
    );
    println!("locations  version {}", d.summary.locations_version);
    println!("files:");
    for f in &m.files {
        println!(
            "  {:<40} {:>10}  {}",
            f.path,
            bytes_text(f.size),
            count(f.chunks.len(), "chunk")
        );
    }
    println!("stripes:");
    for (i, (stripe, backends)) in m.stripes.iter().zip(&d.locations.stripes).enumerate() {
        println!(
            "  stripe {i}: {}, {} per shard",
            count(stripe.chunks.len(), "chunk"),
            bytes_text(stripe.shard_len)
        );
        for (j, (digest, backend)) in stripe.shards.iter().zip(backends).enumerate() {
            let kind = if j < m.codec.k { "data" } else { "parity" };
            println!(
                "    {j:>3} {kind:<6} {backend:<16} {}",
                shard_object(digest)
            );
        }
    }
}
