//! Cold start, from deploy to the first streamed token (`benchmarks/serving`, part c):
//! a model served straight from the dispersed store beside downloading it whole
//! first and serving the directory.
//!
//! The model is a tiny Llama written by `aigrid_serving::tiny`, large enough for the
//! transfer to matter: by default hidden 1024, 4 layers, 16 heads (8 KV heads), MLP
//! 2816, vocabulary 512, about 48 M parameters, 193 MB of F32 weights. It is pushed
//! once (not timed) with 4+2 and 4 MiB chunks to 6 local directories; every read
//! then goes through a `link::Throttled` store, each backend behind its own link of
//! `--link-mib-s` (50 MiB/s) that concurrent GETs share.
//!
//! - **Ours**: `ModelSource::Store` over a fresh reader on fresh links with an empty
//!   chunk cache (the cache, as `aigrid serve` has one): the loader fetches tensors
//!   through the verified lazy reader, several at a time, building each as it lands.
//! - **Baseline, pull first**: `Store::pull` over the same 6 links into an empty
//!   directory (every chunk verified, files fsynced and renamed into place, as
//!   `aigrid model pull` does), then `ModelSource::Dir`.
//! - **Baseline, one link**: every file downloaded whole from one backend behind one
//!   such link (the files stored there as single objects) and written to an empty
//!   directory (not fsynced), then `ModelSource::Dir`: a plain bucket download.
//!
//! The clock starts before the fetch (baselines) or `Server::bind` (ours) and stops
//! when the first chunk with text of a streamed completion arrives; `/ready` is
//! polled every 5 ms meanwhile. The shards and files were just written, so they are
//! in the page cache and the links are the bottleneck by construction; each start
//! begins with a `sync`, so no write-back left from the setup or the start before
//! competes with it. Each path
//! runs `--reps` times, interleaved, every time from scratch; the median is shown.

// Unsafe: `sync(2)` before dropping the page cache, to measure a cold start.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_benchmarks::link::{throttled, throttled_store, Link};
use aigrid_benchmarks::measure::{cpus, load_average, median};
use aigrid_benchmarks::serve::{self, MODEL_NAME};
use aigrid_serving::server::Limits;
use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use aigrid_serving::{DeviceSpec, ModelSource};
use aigrid_store::backend::Backend;
use aigrid_store::cache::ChunkCache;
use aigrid_store::codec::Params;
use aigrid_store::manifest::Registration;
use aigrid_store::reader::{Reader, ReaderOptions};
use aigrid_store::store::{PushOptions, Store};
use anyhow::{ensure, Context, Result};
use clap::Parser;
use ed25519_dalek::SigningKey;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use serde_json::{json, Value};

// The `aigrid` binary, which serves models in production, allocates with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIB: f64 = (1u64 << 20) as f64;

/// The erasure code: 4 data and 2 parity shards per stripe, on 6 backends.
const CODE: Params = Params { k: 4, m: 2 };

#[derive(Parser, Debug)]
#[command(
    name = "serving_coldstart",
    about = "Seconds from deploy to first token: serving from the dispersed store beside downloading the model first"
)]
struct Args {
    /// Bandwidth of each backend's link, MiB/s.
    #[arg(long, default_value_t = 50.0)]
    link_mib_s: f64,
    /// Cold starts of each path (interleaved); the median is shown.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Hidden size of the tiny Llama.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 2816)]
    intermediate: usize,
    /// Where the work directory goes (default: $TMPDIR, else /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// How a cold start gets the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Store,
    PullFirst,
    OneLink,
}

const ROUTES: [Route; 3] = [Route::Store, Route::PullFirst, Route::OneLink];

impl Route {
    fn describe(self, params: Params) -> String {
        let n = params.k + params.m;
        match self {
            Route::Store => format!(
                "**ours: `ModelSource::Store`**, {}+{} over {n} links, empty chunk cache",
                params.k, params.m
            ),
            Route::PullFirst => {
                format!("baseline: `Store::pull` over the same {n} links, then `ModelSource::Dir`")
            }
            Route::OneLink => {
                "baseline: whole files from 1 backend over 1 link, then `ModelSource::Dir`".into()
            }
        }
    }
}

/// One cold start.
#[derive(Debug, Clone, Copy)]
struct Start {
    /// Deploy to first token.
    total: Duration,
    /// The download before the server started (baselines).
    fetch: Duration,
    /// The server's own config + weights + warm-up phases, from `/status`.
    load: f64,
    /// Bytes over all links.
    link_bytes: u64,
    /// GETs over all links.
    gets: u64,
    /// Shard requests the reader hedged (ours only).
    hedged: Option<u64>,
}

/// The work directory: the model, the pushed backends, the whole-file backend.
struct Fixture {
    work: PathBuf,
    model: PathBuf,
    roots: Vec<PathBuf>,
    whole: PathBuf,
    registration: Registration,
    rate: f64,
}

fn model_files(dir: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    files.sort();
    Ok(files)
}

/// Downloads every file from the one-link backend into `dest`.
async fn download_whole(fixture: &Fixture, dest: &Path) -> Result<Arc<Link>> {
    let (store, link) = throttled(&fixture.whole, fixture.rate)?;
    std::fs::create_dir_all(dest)?;
    for name in model_files(&fixture.model)? {
        let mut out =
            std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(dest.join(&name))?);
        let mut stream = store
            .get(&ObjectPath::from(name.as_str()))
            .await?
            .into_stream();
        while let Some(piece) = stream.try_next().await? {
            out.write_all(&piece)?;
        }
        out.flush()?;
    }
    Ok(link)
}

/// Starts a server on `source`, waits until it is ready and streams one completion;
/// answers when its first text arrived, and the server's load seconds.
async fn first_token(source: ModelSource) -> Result<(Instant, f64)> {
    let client = serve::client()?;
    let server = serve::start(source, Limits::default(), DeviceSpec::Cpu).await?;
    server
        .wait_ready(&client, Duration::from_millis(5), Duration::from_secs(600))
        .await?;
    let streamed = serve::stream(
        &client,
        &server.url("/v1/completions"),
        &json!({"model": MODEL_NAME, "prompt": "Models live in", "max_tokens": 8, "temperature": 0}),
    )
    .await?;
    let first = streamed
        .first_token
        .context("the completion streamed no text")?;
    let status: Value = client
        .get(server.url("/status"))
        .send()
        .await?
        .json()
        .await?;
    let load: f64 = ["config", "weights", "warm_up"]
        .iter()
        .filter_map(|p| status["phase_seconds"][p].as_f64())
        .sum();
    server.stop().await?;
    Ok((first, load))
}

async fn cold_start(fixture: &Fixture, path: Route) -> Result<Start> {
    // Where this start deploys to and caches in; removed when it ends.
    let scratch = tempfile::tempdir_in(&fixture.work)?;
    let dest = scratch.path().join("deployed");
    let cache_dir = scratch.path().join("cache");
    // Nothing left for the kernel to write back from the setup or the previous start
    // competes with this one.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let start = Instant::now();
    let mut kept: Option<Arc<Reader>> = None;
    let (source, links, fetch) = match path {
        Route::Store => {
            let (store, links) = throttled_store(&fixture.roots, fixture.rate)?;
            let cache = ChunkCache::open(&cache_dir, 4 << 30)?;
            let reader = Arc::new(store.reader(
                &fixture.registration,
                ReaderOptions {
                    cache: Some(Arc::new(cache)),
                    ..ReaderOptions::default()
                },
            )?);
            kept = Some(reader.clone());
            (ModelSource::Store(reader), links, Duration::ZERO)
        }
        Route::PullFirst => {
            let (store, links) = throttled_store(&fixture.roots, fixture.rate)?;
            store.pull(&fixture.registration, &dest, None).await?;
            (ModelSource::Dir(dest.clone()), links, start.elapsed())
        }
        Route::OneLink => {
            let link = download_whole(fixture, &dest).await?;
            (ModelSource::Dir(dest.clone()), vec![link], start.elapsed())
        }
    };
    let (first, load) = first_token(source).await?;
    Ok(Start {
        total: first - start,
        fetch,
        load,
        link_bytes: links.iter().map(|l| l.bytes()).sum(),
        gets: links.iter().map(|l| l.requests()).sum(),
        hedged: kept.map(|r| r.stats().hedged),
    })
}

/// Writes the model, pushes it to k+m directories and stores its files whole in one
/// more (none of it timed).
async fn fixture(args: &Args, params: Params, work: &Path) -> Result<(Fixture, TinyLlama)> {
    let spec = TinyLlama {
        hidden: args.hidden,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        intermediate: args.intermediate,
        ..TinyLlama::default()
    };
    let model = work.join("model");
    let started = Instant::now();
    write_tiny_llama(&model, &spec)?;
    eprintln!("    written in {:.1} s", started.elapsed().as_secs_f64());
    let roots: Vec<PathBuf> = (0..params.k + params.m)
        .map(|i| work.join(format!("backend{i}")))
        .collect();
    let backends = roots
        .iter()
        .enumerate()
        .map(|(i, root)| Backend::local(format!("b{i}"), root))
        .collect::<std::io::Result<Vec<_>>>()?;
    let pushed = Store::new(backends)
        .push(
            &model,
            &PushOptions::new("coldstart", params),
            &SigningKey::from_bytes(&rand::random()),
        )
        .await?;
    let whole = work.join("whole");
    std::fs::create_dir_all(&whole)?;
    for name in model_files(&model)? {
        std::fs::copy(model.join(&name), whole.join(&name))?;
    }
    Ok((
        Fixture {
            work: work.to_path_buf(),
            model,
            roots,
            whole,
            registration: pushed.registration,
            rate: args.link_mib_s * MIB,
        },
        spec,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let params = CODE;
    ensure!(args.reps > 0, "--reps must be positive");
    ensure!(args.link_mib_s > 0.0, "--link-mib-s must be positive");
    let load_start = load_average();
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("aigrid-serving-coldstart.")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a work directory in {}", parent.display()))?;
    eprintln!(
        "==> writing and pushing the model under {}",
        work.path().display()
    );
    let (fixture, spec) = fixture(&args, params, work.path()).await?;
    let weights = std::fs::metadata(fixture.model.join("model.safetensors"))?.len();
    let total: u64 = model_files(&fixture.model)?
        .iter()
        .map(|f| std::fs::metadata(fixture.model.join(f)).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;

    let mut starts: BTreeMap<usize, Vec<Start>> = BTreeMap::new();
    for rep in 0..args.reps {
        for (i, path) in ROUTES.iter().enumerate() {
            let s = cold_start(&fixture, *path).await?;
            eprintln!(
                "    rep {}/{} {:?}: first token after {:.2} s (fetch {:.2} s, load {:.2} s, {:.1} MiB in {} GETs, hedged {:?})",
                rep + 1,
                args.reps,
                path,
                s.total.as_secs_f64(),
                s.fetch.as_secs_f64(),
                s.load,
                s.link_bytes as f64 / MIB,
                s.gets,
                s.hedged,
            );
            starts.entry(i).or_default().push(s);
        }
    }
    let load_end = load_average();

    let n = params.k + params.m;
    println!(
        "### (c) Cold start to first token: tiny Llama (hidden {}, {} layers, {} heads / {} KV heads, MLP {}), {:.1} MB of weights, {:.1} MB in all files; {n} backends, each behind its own {:.0} MiB/s link; median of {} cold starts per path, interleaved; {} CPUs, 1-min load average {load_start} at the start, {load_end} at the end",
        spec.hidden,
        spec.layers,
        spec.heads,
        spec.kv_heads,
        spec.intermediate,
        weights as f64 / 1e6,
        total as f64 / 1e6,
        args.link_mib_s,
        args.reps,
        cpus(),
    );
    println!();
    println!("| path | seconds to first token | min-max | of which download before start, s | server load (config + weights + warm-up), s | MiB fetched over the links | GETs (hedged) |");
    println!("|:--|--:|--:|--:|--:|--:|--:|");
    let mut medians = Vec::new();
    for (i, path) in ROUTES.iter().enumerate() {
        let runs = &starts[&i];
        let totals: Vec<f64> = runs.iter().map(|s| s.total.as_secs_f64()).collect();
        let pick = runs
            .iter()
            .find(|s| s.total.as_secs_f64() == median(&totals))
            .copied()
            .context("no run")?;
        let (lo, hi) = totals
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(l, h), t| (l.min(*t), h.max(*t)));
        let fetch = match path {
            Route::Store => "- (streamed into the load)".to_owned(),
            _ => format!("{:.2}", pick.fetch.as_secs_f64()),
        };
        println!(
            "| {} | {:.2} | {lo:.2}-{hi:.2} | {fetch} | {:.2} | {:.1} | {}{} |",
            path.describe(params),
            pick.total.as_secs_f64(),
            pick.load,
            pick.link_bytes as f64 / MIB,
            pick.gets,
            pick.hedged.map_or(String::new(), |h| format!(" ({h})")),
        );
        medians.push(pick.total.as_secs_f64());
    }
    println!();
    println!(
        "Ours fetches each tensor through the verified lazy reader (8 at a time) and builds it while the others are in flight, so fetching and loading overlap; the pull verifies every chunk too and fsyncs the files before serving; the one-link download neither verifies nor fsyncs. The shards and files are in the page cache, so the links are the bottleneck by construction. Speedup of ours: {:.2}x over pull-first, {:.2}x over one link.",
        medians[1] / medians[0],
        medians[2] / medians[0],
    );
    println!();
    Ok(())
}
