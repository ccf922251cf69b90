//! `aigrid model`: push, list, show, pull, verify, repair and remove models in the
//! dispersed store, and the periodic repair loop a server with a store runs.
//!
//! The store's backends come from `--store FILE` or, by default, from what the server
//! announces at `GET /api/v1/storage`; credentials for S3 backends come from the
//! caller's environment or the file, never from the server.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aigrid_api::model::{ModelSummary, StorageInfo};
use aigrid_store::backend::{Backend, BackendConfig};
use aigrid_store::codec::{Codec, Params};
use aigrid_store::crypto::ModelKey;
use aigrid_store::manifest::{shard_object, Locations, Registration, SignedManifest};
use aigrid_store::placement::{Place, Policy};
use aigrid_store::repair::RepairReport;
use aigrid_store::store::{PushOptions, PushProgress, PushStats, Store};
use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use ed25519_dalek::SigningKey;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::output::{count, stderr_is_terminal};

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
    /// Write a new encryption key file for `push --encrypt-key` (never overwrites).
    Keygen {
        /// Where to write it.
        path: PathBuf,
    },
}

/// Where the store's backends are described.
#[derive(Args, Clone, Default)]
pub struct StoreArgs {
    /// The store's backends as a TOML file (as `aigrid server --store` takes);
    /// default: the backends the server announces.
    #[arg(long = "store", env = "AIGRID_STORE")]
    pub store: Option<PathBuf>,
}

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
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `GET /api/v1/models/{digest}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelDetail {
    /// The listing line.
    pub summary: ModelSummary,
    /// The signed manifest.
    pub manifest: SignedManifest,
    /// Where its shards are.
    pub locations: Locations,
}

impl ModelDetail {
    /// The signed manifest with its shard locations.
    pub fn registration(&self) -> Registration {
        Registration {
            manifest: self.manifest.clone(),
            locations: self.locations.clone(),
        }
    }
}

#[derive(Serialize)]
struct LocationsUpdate<'a> {
    locations: &'a Locations,
    expected_version: u64,
}

/// The backends of a store file or of the server's store.
pub fn store_from(configs: &[BackendConfig]) -> anyhow::Result<Store> {
    if configs.is_empty() {
        bail!("no dispersed store: the server has none configured (start it with --store FILE) and no --store was given");
    }
    let mut backends = Vec::new();
    for config in configs {
        backends.push(Backend::from_config(config).map_err(|e| anyhow!("{e}"))?);
    }
    Ok(Store::new(backends))
}

/// The store described by `--store` or announced by the server.
pub async fn open_store(client: &Client, args: &StoreArgs) -> anyhow::Result<(Store, StorageInfo)> {
    let (info, configs) = match &args.store {
        Some(path) => crate::files::read_store_file(path)?,
        None => {
            let info: StorageInfo = client
                .call::<(), _>(Method::GET, "/api/v1/storage", None)
                .await
                .context("asking the server for its store")?;
            let configs = backend_configs(&info);
            (info, configs)
        }
    };
    Ok((store_from(&configs)?, info))
}

/// Backend configurations from what a server announces (no credentials).
pub fn backend_configs(info: &StorageInfo) -> Vec<BackendConfig> {
    info.backends
        .iter()
        .map(|b| BackendConfig {
            name: b.name.clone(),
            url: b.url.clone(),
            attributes: b.attributes.clone(),
            options: Default::default(),
        })
        .collect()
}

/// The full digest a user means by `text`: itself, or the one registered digest it
/// is a prefix of.
pub async fn resolve(client: &Client, text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_hexdigit()) || text.len() > 64 {
        bail!("`{text}` is not a model digest (64 hex characters, or a prefix of one)");
    }
    let text = text.to_ascii_lowercase();
    if text.len() == 64 {
        return Ok(text);
    }
    if text.len() < 6 {
        bail!("digest prefix `{text}` is too short: give at least 6 characters");
    }
    let all: Vec<ModelSummary> = client
        .call::<(), _>(Method::GET, "/api/v1/models", None)
        .await?;
    let found: Vec<&ModelSummary> = all.iter().filter(|m| m.digest.starts_with(&text)).collect();
    match found.as_slice() {
        [one] => Ok(one.digest.clone()),
        [] => bail!("no registered model's digest starts with `{text}`"),
        _ => bail!(
            "`{text}` matches {} models: give more of the digest",
            found.len()
        ),
    }
}

/// Checks that `registration` is the model `digest` names: signed, consistent, and
/// hashing to that digest. The server (or anyone between) could otherwise answer
/// another model's, or its own, self-signed manifest.
fn check_registration(registration: &Registration, digest: &str) -> anyhow::Result<()> {
    let got = registration.verify().map_err(|e| {
        anyhow!(
            "the server's registration of model {} does not verify: {e}",
            short(digest)
        )
    })?;
    if got != digest {
        bail!(
            "asked the server for model {} but it answered model {}",
            short(digest),
            short(&got)
        );
    }
    Ok(())
}

/// The first 16 characters of a digest, as listings show it.
pub fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

/// The registration of model `digest`, as the server answers it, unchecked.
async fn detail_unchecked(client: &Client, digest: &str) -> anyhow::Result<ModelDetail> {
    client
        .call::<(), _>(Method::GET, &format!("/api/v1/models/{digest}"), None)
        .await
}

/// The registration of model `digest`, checked to be that model.
pub async fn detail(client: &Client, digest: &str) -> anyhow::Result<ModelDetail> {
    let detail = detail_unchecked(client, digest).await?;
    check_registration(&detail.registration(), digest)?;
    Ok(detail)
}

/// Every registered model's registration as the server answers it, with the digest
/// it was listed under; a model removed meanwhile is left out.
async fn all_details_unchecked(client: &Client) -> anyhow::Result<Vec<(String, ModelDetail)>> {
    let all: Vec<ModelSummary> = client
        .call::<(), _>(Method::GET, "/api/v1/models", None)
        .await?;
    let mut out = Vec::new();
    for m in all {
        match detail_unchecked(client, &m.digest).await {
            Ok(d) => out.push((m.digest, d)),
            // Removed meanwhile.
            Err(e) if e.to_string().contains("not_found") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Every registered model that verifies as the digest it is listed under; one that
/// does not is skipped with a one-line warning.
async fn all_details(client: &Client) -> anyhow::Result<Vec<ModelDetail>> {
    let mut out = Vec::new();
    for (digest, d) in all_details_unchecked(client).await? {
        match check_registration(&d.registration(), &digest) {
            Ok(()) => out.push(d),
            Err(e) => eprintln!("warning: {e}; skipping it"),
        }
    }
    Ok(out)
}

/// The publisher key at `path` (or the default place), created on first use; answers
/// where it was created when it was.
fn publisher_key(path: Option<&Path>) -> anyhow::Result<(SigningKey, Option<PathBuf>)> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => dirs::config_dir()
            .ok_or_else(|| anyhow!("no user config directory; pass --publisher-key FILE"))?
            .join("aigrid")
            .join("publisher.key"),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = aigrid_api::auth::unhex::<32>(text.trim()).ok_or_else(|| {
                anyhow!(
                    "{}: not a publisher key (64 hex characters)",
                    path.display()
                )
            })?;
            Ok((SigningKey::from_bytes(&bytes), None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::from_bytes(&rand::random());
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            aigrid_store::crypto::write_new_key_file(&path, &key.to_bytes())
                .with_context(|| format!("creating {}", path.display()))?;
            Ok((key, Some(path)))
        }
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// The owner's key at `path`, for a model encrypted at rest.
pub fn read_model_key(path: Option<&Path>) -> anyhow::Result<Option<ModelKey>> {
    path.map(|p| ModelKey::read(p).map_err(|e| anyhow!("{e}")))
        .transpose()
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Runs `aigrid model …`.
pub async fn model(client: &Client, cmd: ModelCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Push(args) => push(client, args, json).await,
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

/// What a push registered, with its counters.
pub struct PushedModel {
    /// The registered model, as the server lists it.
    pub summary: ModelSummary,
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
    // Drawn only on a terminal: a log or a pipe gets no escape codes.
    let ticker = (progress && stderr_is_terminal()).then(|| progress_bar(opts.progress.clone()));
    let pushed = store.push(&args.dir, &opts, &signer).await;
    if let Some((task, bar)) = ticker {
        task.abort();
        bar.finish_and_clear();
    }
    let pushed = pushed.map_err(|e| anyhow!("{e}"))?;
    let summary: ModelSummary = client
        .call(Method::POST, "/api/v1/models", Some(&pushed.registration))
        .await
        .context("registering the model")?;
    Ok(PushedModel {
        summary,
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

async fn push(client: &Client, args: PushArgs, json: bool) -> anyhow::Result<()> {
    let PushedModel {
        summary,
        stats: s,
        created_key,
        backends,
    } = push_dir(client, &args, true).await?;
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
    Ok(())
}

/// Prints a registration checked to be model `digest`.
fn print_manifest(d: &ModelDetail, digest: &str) {
    let m = &d.manifest.manifest;
    println!("model      {}", m.name);
    println!("digest     {digest}");
    println!("publisher  {}", d.manifest.publisher);
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

/// Repairs one model and registers moved shards.
async fn repair_one(client: &Client, store: &Store, digest: &str) -> anyhow::Result<RepairReport> {
    let detail = detail(client, digest).await?;
    let report = store
        .repair(&detail.registration())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if report.moved_any() {
        let update = LocationsUpdate {
            locations: &report.locations,
            expected_version: detail.summary.locations_version,
        };
        let _: ModelSummary = client
            .call(
                Method::PUT,
                &format!("/api/v1/models/{digest}/locations"),
                Some(&update),
            )
            .await
            .context("registering the repaired shard locations")?;
    }
    Ok(report)
}

/// Scrubs and repairs every registered model every `interval`, through the control
/// API at `base`, until `stop` turns true; with `leader_only`, only in rounds when
/// that server leads, so a cluster repairs each model once.
pub async fn repair_loop(
    base: String,
    store: Arc<Store>,
    leader_only: Option<u64>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match Client::new(&base) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "repair loop cannot start");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if let Some(id) = leader_only {
            let status: Result<aigrid_api::ClusterStatus, _> = client
                .call::<(), _>(Method::GET, "/api/v1/cluster", None)
                .await;
            if !matches!(status, Ok(s) if s.leader == Some(id)) {
                continue;
            }
        }
        let models: Vec<ModelSummary> = match client
            .call::<(), _>(Method::GET, "/api/v1/models", None)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "repair loop: cannot list models");
                continue;
            }
        };
        for model in models {
            match repair_one(&client, &store, &model.digest).await {
                Ok(report) if !report.scrub.healthy() => tracing::info!(
                    model = %model.name,
                    digest = %model.digest,
                    bad = report.scrub.faults.len(),
                    rebuilt = report.rebuilt,
                    moved = report.moved,
                    failed = report.failed,
                    "repaired"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(model = %model.name, error = %e, "repair failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use aigrid_store::codec::CODEC_NAME;
    use aigrid_store::manifest::{
        ChunkRef, CodecInfo, FileEntry, Manifest, Stripe, MANIFEST_FORMAT,
    };

    use super::*;

    fn hex(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    /// A one-file, one-stripe model under `name`, signed by `key`.
    fn registration(name: &str, key: u8) -> Registration {
        let chunk = ChunkRef {
            blake3: aigrid_api::ChunkDigest::of(name.as_bytes()),
            len: 4,
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: name.into(),
            codec: CodecInfo {
                name: CODEC_NAME.into(),
                k: 2,
                m: 1,
            },
            chunk_size: 4,
            policy: Policy::default(),
            encryption: None,
            files: vec![FileEntry {
                path: "config.json".into(),
                size: 4,
                chunks: vec![chunk.clone()],
            }],
            stripes: vec![Stripe {
                chunks: vec![chunk],
                len: 4,
                shard_len: 2,
                shards: (0..3u8).map(|i| hex(&[i])).collect(),
            }],
        };
        Registration {
            manifest: SignedManifest::sign(manifest, &SigningKey::from_bytes(&[key; 32])),
            locations: Locations {
                stripes: vec![(0..3).map(|i| format!("b{i}")).collect()],
            },
        }
    }

    #[test]
    fn a_registration_must_be_the_model_asked_for() {
        let wanted = registration("wanted", 1);
        let digest = wanted.manifest.manifest.digest();
        check_registration(&wanted, &digest).unwrap();
        // Another model, validly self-signed by someone else: refused, in one line.
        let other = registration("other", 2);
        let err = check_registration(&other, &digest).unwrap_err().to_string();
        assert!(err.contains("answered model"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // The model asked for, altered after signing.
        let mut altered = wanted.clone();
        altered.manifest.manifest.name = "renamed".into();
        let err = check_registration(&altered, &digest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not verify"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
