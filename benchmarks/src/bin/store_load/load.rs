//! Part (c): cold loads through throttled links: the verified reader prewarming its
//! cache or reading every tensor, beside a whole-file download from one link.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aigrid_benchmarks::link::{throttled, throttled_store, Link};
use aigrid_benchmarks::measure::{cpus, load_average};

use aigrid_store::cache::ChunkCache;
use aigrid_store::chunk::safetensors_header_len;
use aigrid_store::codec::Params;
use aigrid_store::manifest::Registration;
use aigrid_store::reader::{FetchOptions, FetchStats, Reader, ReaderOptions};
use anyhow::{ensure, Result};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use crate::args::{Args, GIB, MIB};
use crate::model::Model;
use crate::timing::{median_index, remove_dir, timed, wall_range, Timing};

/// One cold load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) timing: Timing,
    /// Bytes reserved on all links.
    pub(crate) link_bytes: u64,
    /// The busiest link's bytes.
    pub(crate) busiest: u64,
    pub(crate) requests: u64,
    /// Mean share of the wall time a link sat idle waiting for a GET, and idle after
    /// its last byte.
    pub(crate) idle: (f64, f64),
    pub(crate) fetch: Option<FetchStats>,
}

impl Load {
    pub(crate) fn from_links(
        timing: Timing,
        links: &[Arc<Link>],
        fetch: Option<FetchStats>,
    ) -> Load {
        let per: Vec<u64> = links.iter().map(|l| l.bytes()).collect();
        let wall = timing.wall.as_secs_f64();
        let (waiting, tail) = links.iter().fold((0.0, 0.0), |(w, t), l| {
            let (waiting, tail) = l.idle(timing.end);
            (w + waiting.as_secs_f64(), t + tail.as_secs_f64())
        });
        let share = |d: f64| d / wall / links.len() as f64;
        Load {
            timing,
            idle: (share(waiting), share(tail)),
            link_bytes: per.iter().sum(),
            busiest: per.iter().copied().max().unwrap_or(0),
            requests: links.iter().map(|l| l.requests()).sum(),
            fetch,
        }
    }
}

/// The baseline: each file, stored whole as one object behind one link, downloaded
/// and BLAKE3-hashed as it streams in.
pub(crate) async fn load_baseline(model: &Model, whole: &Path, rate: f64) -> Result<Load> {
    let (store, link) = throttled(whole, rate)?;
    let (timing, hashes) = timed(async {
        let mut hashes = Vec::new();
        for (rel, _, _) in &model.files {
            let got = store.get(&ObjectPath::from(rel.as_str())).await?;
            let mut stream = got.into_stream();
            let mut hasher = blake3::Hasher::new();
            while let Some(piece) = stream.try_next().await? {
                hasher.update(&piece);
            }
            hashes.push(hasher.finalize());
        }
        Ok(hashes)
    })
    .await?;
    for ((rel, _, want), got) in model.files.iter().zip(&hashes) {
        ensure!(want == got, "baseline: {rel} arrived damaged");
    }
    Ok(Load::from_links(timing, &[link], None))
}

/// Stores every file whole as one object in `whole` (not timed).
pub(crate) async fn store_whole(model: &Model, whole: &Path) -> Result<()> {
    remove_dir(whole)?;
    std::fs::create_dir_all(whole)?;
    let store = LocalFileSystem::new_with_prefix(whole)?;
    for (rel, _, _) in &model.files {
        let bytes = Bytes::from(std::fs::read(model.dir.join(rel))?);
        store
            .put(
                &ObjectPath::from(rel.as_str()),
                PutPayload::from_bytes(bytes),
            )
            .await?;
    }
    Ok(())
}

pub(crate) fn fetch_options(args: &Args) -> FetchOptions {
    let mut fetch = FetchOptions::default();
    if let Some(mib) = args.bytes_in_flight_mib {
        fetch.bytes_in_flight = mib * MIB;
    }
    if let Some(ms) = args.hedge_initial_ms {
        fetch.hedge_initial = Duration::from_millis(ms);
    }
    if let Some(f) = args.hedge_factor {
        fetch.hedge_factor = f;
    }
    fetch
}

/// How ours loads the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Way {
    /// `Reader::prewarm(&[], false)` into an empty cache.
    Prewarm,
    /// `Reader::safetensors`, then `SafetensorsView::tensor` for every tensor,
    /// concurrently within the one task.
    TensorsOneTask,
    /// `Reader::safetensors` for the tensor table, then every tensor's range with
    /// `Reader::read_at` (what `SafetensorsView::tensor` calls) in its own tokio task.
    TensorsTasks,
}

pub(crate) const WAYS: [Way; 3] = [Way::Prewarm, Way::TensorsOneTask, Way::TensorsTasks];

impl Way {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Way::Prewarm => "**ours: `Reader::prewarm(&[], false)`** (every stripe from k of k+m; shards and chunks verified; chunks cached)",
            Way::TensorsOneTask => "ours: `Reader::safetensors`, then every tensor at once in one task (verified, cached)",
            Way::TensorsTasks => "ours: `Reader::safetensors`, then every tensor at once, one tokio task each (verified, cached)",
        }
    }
}

/// Tensors by name.
pub(crate) type Tensors = Vec<(String, Bytes)>;

/// Every tensor of the model's safetensors file, `args.tensor_concurrency` at once.
pub(crate) async fn fetch_tensors(
    args: &Args,
    model: &Model,
    reader: &Arc<Reader>,
    way: Way,
) -> Result<Tensors> {
    let file = model.safetensors.as_str();
    let view = reader.safetensors(file).await?;
    let at_once = match args.tensor_concurrency {
        0 => model.tensors.len().max(1),
        n => n,
    };
    if way == Way::TensorsOneTask {
        let names: Vec<&str> = view.names().collect();
        return Ok(futures_util::stream::iter(names.into_iter().map(|name| {
            let view = &view;
            async move {
                view.tensor(name)
                    .await
                    .map(|bytes| (name.to_owned(), bytes))
            }
        }))
        .buffer_unordered(at_once)
        .try_collect()
        .await?);
    }
    // The view keeps where the data starts to itself; the header says it too.
    let data_start = safetensors_header_len(&reader.read_at(file, 0, 8).await?)?;
    let ranges: Vec<(String, u64, u64)> = view
        .names()
        .map(|name| {
            let [start, end] = view.info(name).expect("listed").data_offsets;
            (name.to_owned(), data_start + start, end - start)
        })
        .collect();
    futures_util::stream::iter(ranges.into_iter().map(|(name, at, len)| {
        let reader = reader.clone();
        let file = file.to_owned();
        async move {
            let task = tokio::spawn(async move { reader.read_at(&file, at, len).await });
            Ok::<_, anyhow::Error>((name, task.await??))
        }
    }))
    .buffer_unordered(at_once)
    .try_collect()
    .await
}

/// Ours: a fresh reader over fresh links and an empty cache in `cache_dir`.
pub(crate) async fn load_ours(
    args: &Args,
    model: &Model,
    registration: &Registration,
    roots: &[PathBuf],
    cache_dir: &Path,
    way: Way,
) -> Result<Load> {
    remove_dir(cache_dir)?;
    let cache = Arc::new(ChunkCache::open(cache_dir, 4 * model.bytes())?);
    let (store, links) = throttled_store(roots, args.link_mib_s * MIB as f64)?;
    let options = ReaderOptions {
        cache: Some(cache.clone()),
        key: None,
        fetch: fetch_options(args),
    };
    let (timing, (reader, tensors)) = timed(async {
        let reader = Arc::new(store.reader(registration, options)?);
        let tensors = match way {
            Way::Prewarm => {
                reader.prewarm(&[], false).await?;
                Vec::new()
            }
            Way::TensorsOneTask | Way::TensorsTasks => {
                fetch_tensors(args, model, &reader, way).await?
            }
        };
        Ok((reader, tensors))
    })
    .await?;
    // Checked after the clock: what was fetched is the model.
    if way == Way::Prewarm {
        let chunks: std::collections::HashSet<&str> = reader
            .manifest()
            .files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.blake3.as_str()))
            .collect();
        ensure!(
            cache.stats().chunks == chunks.len(),
            "prewarm cached {} of {} chunks",
            cache.stats().chunks,
            chunks.len()
        );
    } else {
        ensure!(tensors.len() == model.tensors.len(), "tensors missing");
        for (name, bytes) in &tensors {
            ensure!(
                model.tensors.get(name) == Some(&blake3::hash(bytes)),
                "tensor {name} arrived damaged"
            );
        }
    }
    Ok(Load::from_links(timing, &links, Some(reader.stats())))
}

pub(crate) struct LoadResults {
    /// The 1-minute load average when the part started and ended.
    pub(crate) load: (String, String),
    pub(crate) baseline: Load,
    /// Each way's cold loads, in `WAYS` order.
    pub(crate) ours: Vec<Vec<Load>>,
}

pub(crate) async fn part_load(
    args: &Args,
    model: &Model,
    work: &Path,
    roots: &[PathBuf],
    registration: &Registration,
) -> Result<LoadResults> {
    let load_before = load_average();
    let whole = work.join("whole");
    store_whole(model, &whole).await?;
    let cache_dir = work.join("cache");
    eprintln!("==> cold load, baseline (one link)");
    let baseline = load_baseline(model, &whole, args.link_mib_s * MIB as f64).await?;
    let mut ours = vec![Vec::new(); WAYS.len()];
    for rep in 0..args.load_reps {
        eprintln!(
            "==> cold load, ours, repetition {}/{}",
            rep + 1,
            args.load_reps
        );
        for (way, loads) in WAYS.iter().zip(&mut ours) {
            loads.push(load_ours(args, model, registration, roots, &cache_dir, *way).await?);
        }
    }
    remove_dir(&cache_dir)?;
    remove_dir(&whole)?;
    Ok(LoadResults {
        load: (load_before, load_average()),
        baseline,
        ours,
    })
}

pub(crate) fn print_load(args: &Args, model: &Model, params: Params, r: &LoadResults) {
    let n = params.k + params.m;
    let rate = args.link_mib_s * MIB as f64;
    let bytes = model.bytes() as f64;
    let base = r.baseline.timing.wall.as_secs_f64();
    let fetch = fetch_options(args);
    println!(
        "### (c) Cold load: {:.2} GiB model from {n} backends, each behind its own {:.0} MiB/s link ({:.0} MiB/s aggregate); {}+{}; ours: median of {} cold loads, baseline once; {} CPUs, 1-min load average {} at the start, {} at the end",
        bytes / GIB,
        args.link_mib_s,
        args.link_mib_s * n as f64,
        params.k,
        params.m,
        args.load_reps,
        cpus(),
        r.load.0,
        r.load.1,
    );
    println!();
    println!("| load | over the links, MiB | wall s | wall s, min-max | effective MiB/s (model bytes) | speedup vs baseline | share of aggregate link bandwidth | busiest link busy, % of wall | links idle, % of wall: awaiting a GET / after last byte | GETs | hedged | CPU s |");
    println!("|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let row = |name: &str, loads: &[Load]| {
        let timings: Vec<Timing> = loads.iter().map(|l| l.timing).collect();
        let l = loads[median_index(&timings)];
        let (lo, hi) = wall_range(&timings);
        let wall = l.timing.wall.as_secs_f64();
        println!(
            "| {name} | {:.0} | {wall:.2} | {lo:.2}-{hi:.2} | {:.0} | {:.2}x | {:.0}% | {:.0}% | {:.0}% / {:.0}% | {} | {} | {:.2} |",
            l.link_bytes as f64 / MIB as f64,
            bytes / MIB as f64 / wall,
            base / wall,
            100.0 * l.link_bytes as f64 / (wall * rate * n as f64),
            100.0 * l.busiest as f64 / rate / wall,
            100.0 * l.idle.0,
            100.0 * l.idle.1,
            l.requests,
            l.fetch.map_or("-".to_string(), |f| f.hedged.to_string()),
            l.timing.cpu,
        );
        l
    };
    row(
        "baseline: whole files from 1 backend, BLAKE3 as they stream",
        std::slice::from_ref(&r.baseline),
    );
    let medians: Vec<Load> = WAYS
        .iter()
        .zip(&r.ours)
        .map(|(way, loads)| row(way.describe(), loads))
        .collect();
    println!();
    println!(
        "FetchOptions: bytes_in_flight {} MiB, hedge_initial {} ms, hedge_factor {}, hedge_min {} ms{}. Share of aggregate = bytes over all links / (wall x {n} x {:.0} MiB/s); a GET abandoned half way (hedging) still counts its bytes, so a link still sending abandoned GETs when the load ends shows busy over 100%. The shards are in the page cache (just pushed), so the links are the bottleneck by construction. Each of ours starts with a fresh reader, fresh links and an empty chunk cache, and writes every chunk it fetches to the cache.",
        fetch.bytes_in_flight / MIB,
        fetch.hedge_initial.as_millis(),
        fetch.hedge_factor,
        fetch.hedge_min.as_millis(),
        if args.bytes_in_flight_mib.is_some()
            || args.hedge_initial_ms.is_some()
            || args.hedge_factor.is_some()
        {
            " (tuned on the command line, not the library defaults)"
        } else {
            " (library defaults)"
        },
        args.link_mib_s,
    );
    println!();
    println!("| fetch stats (median run) | shard requests | hedged | bad shards | stripes rebuilt from parity | MiB verified |");
    println!("|:--|--:|--:|--:|--:|--:|");
    for (way, l) in WAYS.iter().zip(&medians) {
        if let Some(f) = l.fetch {
            println!(
                "| {:?} | {} | {} | {} | {} | {:.0} |",
                way,
                f.requests,
                f.hedged,
                f.bad_shards,
                f.reconstructed,
                f.bytes as f64 / MIB as f64,
            );
        }
    }
    println!();
    let ours = medians[0];
    let wall = ours.timing.wall.as_secs_f64();
    let speedup = base / wall;
    let share = ours.link_bytes as f64 / (wall * rate * n as f64);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "Targets (ours, prewarm): >= 4x faster than the baseline: {speedup:.2}x, {}; >= 80% of the aggregate link bandwidth: {:.0}%, {}.",
        verdict(speedup >= 4.0),
        100.0 * share,
        verdict(share >= 0.8),
    );
    println!();
}
