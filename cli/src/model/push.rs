//! `aigrid model push`: a directory cut, coded, stored and registered, with a
//! progress bar on a terminal.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::model::ModelSummary;
use aigrid_store::codec::{Codec, Params};
use aigrid_store::manifest::Registration;
use aigrid_store::placement::{Place, Policy};
use aigrid_store::store::{PushOptions, PushProgress, PushStats};
use anyhow::{anyhow, bail, Context};
use clap::Args;
use reqwest::Method;

use super::registry::{all_details, ModelDetail};
use super::store::{open_store, publisher_key, read_model_key, StoreArgs};
use crate::client::{proposed_or, Answer, Client};
use crate::output::{bytes_text, count, print_json, stderr_is_terminal};

/// `aigrid model push`.
#[derive(Args)]
pub struct PushArgs {
    /// The model directory.
    pub dir: PathBuf,
    /// The name to register it under.
    #[arg(long)]
    pub name: String,
    /// Data shards per stripe (default: the store's, else 4).
    #[arg(long)]
    pub k: Option<usize>,
    /// Parity shards per stripe: shards of a stripe that may be lost (default: the
    /// store's, else 2).
    #[arg(long)]
    pub m: Option<usize>,
    /// Placement rules, e.g. `--policy "country in BE,NL" --policy "max 1 per site"`
    /// (default: the store's).
    #[arg(long)]
    pub policy: Vec<String>,
    /// Largest chunk, in KiB.
    #[arg(long, default_value_t = 4096)]
    pub chunk_kib: u64,
    /// Encrypt chunks at rest under this key file (see `aigrid model keygen`).
    #[arg(long, env = "AIGRID_MODEL_KEY")]
    pub encrypt_key: Option<PathBuf>,
    /// The publisher's ed25519 key that signs the manifest (created on first use;
    /// default: `publisher.key` in the user's aigrid config directory).
    #[arg(long, env = "AIGRID_PUBLISHER_KEY")]
    pub publisher_key: Option<PathBuf>,
    /// Sign the manifest hybrid: ed25519 and ML-DSA-65 (FIPS 204), a post-quantum
    /// scheme; both must verify. Circles may require it.
    #[arg(long)]
    pub hybrid: bool,
    /// The circle the model belongs to: its operators manage it, and its policy may
    /// make the registration a proposal its members approve.
    #[arg(long)]
    pub circle: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// What a push registered, with its counters.
pub struct PushedModel {
    /// The registered model, as the server lists it, or the proposal to register
    /// it when its circle guards registrations.
    pub registered: Answer<ModelSummary>,
    /// What the push cut, stored and skipped.
    pub stats: PushStats,
    /// The publisher key file, when this push created it.
    pub created_key: Option<PathBuf>,
    /// Backends the shards were spread over.
    pub backends: usize,
}

/// Pushes `args.dir` into the store and registers it: the one path behind `aigrid
/// model push` and the demo model `aigrid up` deploys. With `progress`, a progress
/// bar on stderr while it runs.
pub async fn push_dir(
    client: &Client,
    args: &PushArgs,
    progress: bool,
) -> anyhow::Result<PushedModel> {
    let meta = std::fs::metadata(&args.dir)
        .with_context(|| format!("model directory {}", args.dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    if args.name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    if args.chunk_kib == 0 || args.chunk_kib > 64 * 1024 {
        bail!("--chunk-kib must be between 1 and 65536");
    }
    let encrypt = read_model_key(args.encrypt_key.as_deref())?;
    let (store, info) = open_store(client, &args.store).await?;
    let params = Params {
        k: args.k.or((info.k > 0).then_some(info.k)).unwrap_or(4),
        m: args.m.or((info.m > 0).then_some(info.m)).unwrap_or(2),
    };
    let rules = if args.policy.is_empty() {
        info.policy.clone()
    } else {
        args.policy.clone()
    };
    let policy = Policy::parse(&rules).map_err(|e| anyhow!("{e}"))?;
    // The code's own check first, so a bad k or m is reported as such.
    Codec::new(params).map_err(|e| anyhow!("{e}"))?;
    let attributes: Vec<_> = store.backends().iter().map(|b| &b.attributes).collect();
    policy
        .place(&attributes, params.k + params.m, &[], 0)
        .map_err(|e| anyhow!("{e}"))?;
    let (signer, created_key) = publisher_key(args.publisher_key.as_deref())?;
    let known: Vec<Registration> = all_details(client)
        .await?
        .iter()
        .map(ModelDetail::registration)
        .collect();
    let mut opts = PushOptions::new(args.name.clone(), params);
    opts.chunk_size = args.chunk_kib * 1024;
    opts.policy = policy;
    opts.key = encrypt;
    opts.known = known;
    opts.hybrid = args.hybrid;
    // Drawn only on a terminal: a log or a pipe gets no escape codes.
    let ticker = (progress && stderr_is_terminal()).then(|| progress_bar(opts.progress.clone()));
    let pushed = store.push(&args.dir, &opts, &signer).await;
    if let Some((task, bar)) = ticker {
        task.abort();
        bar.finish_and_clear();
    }
    let mut pushed = pushed.map_err(|e| anyhow!("{e}"))?;
    pushed.registration.circle = args.circle.clone();
    let registered = client
        .call_guarded(Method::POST, "/api/v1/models", Some(&pushed.registration))
        .await
        .context("registering the model")?;
    Ok(PushedModel {
        registered,
        stats: pushed.stats,
        created_key,
        backends: store.backends().len(),
    })
}

/// A progress bar fed from a push's counters every 100 ms, and the task feeding it.
fn progress_bar(
    progress: Arc<PushProgress>,
) -> (tokio::task::JoinHandle<()>, indicatif::ProgressBar) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .expect("a valid template"),
    );
    let task = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_length(progress.total_bytes.load(Ordering::Relaxed));
                bar.set_position(progress.bytes_read.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "{}, {} saved by dedup, {} uploaded",
                    count(progress.chunks.load(Ordering::Relaxed), "chunk"),
                    bytes_text(progress.dedup_bytes.load(Ordering::Relaxed)),
                    bytes_text(progress.bytes_uploaded.load(Ordering::Relaxed)),
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    (task, bar)
}

pub(super) async fn push(client: &Client, args: PushArgs, json: bool) -> anyhow::Result<()> {
    let PushedModel {
        registered,
        stats: s,
        created_key,
        backends,
    } = push_dir(client, &args, true).await?;
    let Some(summary) = proposed_or(registered, json)? else {
        return Ok(());
    };
    if json {
        return print_json(&serde_json::json!({
            "model": summary,
            "chunks": s.chunks,
            "dedup_chunks": s.dedup_chunks,
            "dedup_bytes": s.dedup_bytes,
            "bytes_uploaded": s.bytes_uploaded,
            "stripes_written": s.stripes_written,
            "stripes_reused": s.stripes_reused,
        }));
    }
    if let Some(path) = created_key {
        println!("created publisher key {}", path.display());
    }
    println!("pushed {} {}", summary.name, summary.digest);
    println!(
        "  {} in {}, {}; {}+{} over {}; {} uploaded, {} saved by dedup ({}){}",
        bytes_text(summary.size),
        count(summary.files, "file"),
        count(s.chunks, "chunk"),
        summary.k,
        summary.m,
        count(backends, "backend"),
        bytes_text(s.bytes_uploaded),
        bytes_text(s.dedup_bytes),
        count(s.dedup_chunks, "chunk"),
        if summary.encrypted {
            "; encrypted at rest"
        } else {
            ""
        },
    );
    println!("  signed {}", summary.signature);
    Ok(())
}
