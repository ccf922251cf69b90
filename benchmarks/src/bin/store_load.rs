//! The model store's push pipeline and cold load (`benchmarks/store`, parts b and c),
//! each beside the plain way of moving the same bytes, on one ~1 GiB model written
//! once with random bytes under `$TMPDIR`: `config.json` and `model.safetensors`
//! (64 F32 tensors of 16 MiB by default).
//!
//! - **(b) push**: `Store::push` with the 4+2 code and 4 MiB chunks over 6
//!   local-directory backends (`Backend::local`), so cutting, BLAKE3 of every chunk,
//!   Reed-Solomon encoding, BLAKE3 of every shard and the writes are all inside the
//!   clock; and the same push into 6 `InMemory` stores, which leaves the file system
//!   out. Beside them: `std::fs::copy` of the directory into one other directory,
//!   and a plain copy of the same bytes laid out as 4+2 lays them out (each run of k
//!   chunks to k directories, m of them again to m more: 1.5x the bytes in as many
//!   files as the push writes, no hashing, no coding). Throughput is model bytes over
//!   wall time. The model was just written, so it is read from the page cache, and
//!   every write lands in the page cache: nothing is fsynced on either side.
//! - **(c) cold load**: every backend sits behind its own simulated link of
//!   `--link-mib-s` (100 MiB/s): `link::Throttled` wraps `LocalFileSystem` and queues the
//!   GETs of one backend on its `Link`, however many run at once (object_store's
//!   `ThrottledStore` sleeps per request, so concurrent requests would exceed the
//!   link). Ours is a fresh reader over fresh links with an empty chunk cache:
//!   `Reader::prewarm(&[], false)` fetches every stripe from any k of its k+m shards,
//!   checks every shard and chunk against the signed manifest and writes every chunk
//!   to the cache. Two more rows read every tensor concurrently through
//!   `Reader::safetensors`, all within one task and in one tokio task each. The
//!   baseline downloads each file whole from one backend behind the same kind of
//!   link (the files stored as single objects in a separate directory) and hashes it
//!   with BLAKE3 as it streams in. The shards are in the page cache (just pushed), so
//!   the links are the bottleneck by construction; the table also says how long the
//!   links sat idle, which is time the reader left bandwidth unused.
//!
//! Every load is checked after its clock stops: the baseline's hashes against the
//! files', every tensor's bytes against the generated ones, and the cache against
//! the manifest's chunk count after a prewarm. The machine is shared, so each table
//! says the 1-minute load average around it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_benchmarks::link::{throttled, throttled_store, Link};
use aigrid_benchmarks::measure::{cpus, load_average};

use aigrid_store::backend::Backend;
use aigrid_store::cache::ChunkCache;
use aigrid_store::chunk::safetensors_header_len;
use aigrid_store::codec::Params;
use aigrid_store::manifest::Registration;
use aigrid_store::reader::{FetchOptions, FetchStats, Reader, ReaderOptions};
use aigrid_store::store::{PushOptions, PushStats, Store};
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use clap::Parser;
use ed25519_dalek::SigningKey;
use futures_util::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use rand::{RngCore, SeedableRng};

// The `aigrid` binary, which pushes and reads models in production, allocates with
// mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Parser, Debug)]
#[command(
    name = "store_load",
    about = "Model store push throughput and cold load over throttled backends, beside plain copies and a single-link download"
)]
struct Args {
    /// Parts to run: push (b), load (c).
    #[arg(long, value_delimiter = ',', default_value = "push,load")]
    parts: Vec<String>,
    /// Tensors in model.safetensors.
    #[arg(long, default_value_t = 64)]
    tensors: usize,
    /// Size of each tensor, MiB.
    #[arg(long, default_value_t = 16)]
    tensor_mib: usize,
    /// The erasure code, k+m; there are k+m backends.
    #[arg(long, default_value = "4+2")]
    code: String,
    /// Timed push repetitions (each variant, interleaved); the median is shown.
    #[arg(long, default_value_t = 3)]
    push_reps: usize,
    /// Timed cold loads of each of ours (each with a fresh reader, cache and links);
    /// the baseline runs once (its time is set by its link).
    #[arg(long, default_value_t = 3)]
    load_reps: usize,
    /// Bandwidth of each backend's link, MiB/s.
    #[arg(long, default_value_t = 100.0)]
    link_mib_s: f64,
    /// Override `FetchOptions::bytes_in_flight` (MiB) for ours; the library default
    /// otherwise.
    #[arg(long)]
    bytes_in_flight_mib: Option<u64>,
    /// Override `FetchOptions::hedge_initial` (ms) for ours.
    #[arg(long)]
    hedge_initial_ms: Option<u64>,
    /// Override `FetchOptions::hedge_factor` for ours.
    #[arg(long)]
    hedge_factor: Option<f64>,
    /// Tensors fetched at once in the per-tensor row (0: all at once).
    #[arg(long, default_value_t = 0)]
    tensor_concurrency: usize,
    /// Where the work directory goes (default: $TMPDIR, else /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed of the model's random bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

// ---- the model ------------------------------------------------------------------

/// The model written for the run, with what its bytes should hash to.
struct Model {
    dir: PathBuf,
    /// Relative path, size and BLAKE3 of each file, sorted by path.
    files: Vec<(String, u64, blake3::Hash)>,
    /// The safetensors file.
    safetensors: String,
    /// Tensor names and the BLAKE3 of their bytes.
    tensors: BTreeMap<String, blake3::Hash>,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.1).sum()
    }
}

/// Writes `config.json` and a safetensors file of `tensors` random F32 tensors of
/// `tensor_bytes` each.
fn write_model(dir: &Path, tensors: usize, tensor_bytes: usize, seed: u64) -> Result<Model> {
    std::fs::create_dir_all(dir)?;
    let names: Vec<String> = (0..tensors)
        .map(|i| format!("model.layers.{i:03}.weight"))
        .collect();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    for (i, name) in names.iter().enumerate() {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": [tensor_bytes / 4],
                "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
            }),
        );
    }
    let mut json = serde_json::to_vec(&header)?;
    // The format pads its header with spaces so that the data is 8-byte aligned.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let safetensors = "model.safetensors".to_string();
    let path = dir.join(&safetensors);
    let mut file = std::io::BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(&path).with_context(|| path.display().to_string())?,
    );
    let mut whole = blake3::Hasher::new();
    let prefix = (json.len() as u64).to_le_bytes();
    for part in [&prefix[..], &json] {
        file.write_all(part)?;
        whole.update(part);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; tensor_bytes];
    let mut hashes = BTreeMap::new();
    for name in names {
        rng.fill_bytes(&mut buf);
        file.write_all(&buf)?;
        whole.update(&buf);
        hashes.insert(name, blake3::hash(&buf));
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let size = 8 + json.len() as u64 + (tensors * tensor_bytes) as u64;
    let config = serde_json::to_vec_pretty(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "num_hidden_layers": tensors,
        "torch_dtype": "float32",
    }))?;
    std::fs::write(dir.join("config.json"), &config)?;
    let mut files = vec![
        (
            "config.json".to_string(),
            config.len() as u64,
            blake3::hash(&config),
        ),
        (safetensors.clone(), size, whole.finalize()),
    ];
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Model {
        dir: dir.to_path_buf(),
        files,
        safetensors,
        tensors: hashes,
    })
}

// ---- measuring --------------------------------------------------------------------

/// User plus system CPU seconds this process has used.
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value, and getrusage only writes into the
    // struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is valid and `usage` is a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// One timed run: wall time and the CPU the process used meanwhile.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: Duration,
    cpu: f64,
    /// When the run ended.
    end: Instant,
}

/// Wall time and CPU of `f`.
async fn timed<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<(Timing, T)> {
    let cpu = cpu_seconds();
    let start = Instant::now();
    let out = f.await?;
    let end = Instant::now();
    Ok((
        Timing {
            wall: end - start,
            cpu: cpu_seconds() - cpu,
            end,
        },
        out,
    ))
}

/// The index of the median sample by wall time (the lower one of an even count).
fn median_index(samples: &[Timing]) -> usize {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|i| samples[*i].wall);
    order[(order.len() - 1) / 2]
}

fn wall_range(samples: &[Timing]) -> (f64, f64) {
    let walls = samples.iter().map(|t| t.wall.as_secs_f64());
    (
        walls.clone().fold(f64::INFINITY, f64::min),
        walls.fold(0.0, f64::max),
    )
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

// ---- (b) push -----------------------------------------------------------------------

/// Pushes the model into fresh backend directories `roots`, named `b0`, `b1`, ...
async fn push(
    model: &Model,
    roots: &[PathBuf],
    params: Params,
    key: &SigningKey,
) -> Result<(Timing, PushStats, Registration)> {
    for root in roots {
        remove_dir(root)?;
    }
    let backends = roots
        .iter()
        .enumerate()
        .map(|(i, root)| Backend::local(format!("b{i}"), root))
        .collect::<std::io::Result<Vec<_>>>()?;
    push_to(model, backends, params, key).await
}

/// Pushes the model into as many fresh in-memory stores as `roots`: the pipeline
/// without the file system.
async fn push_in_memory(
    model: &Model,
    roots: &[PathBuf],
    params: Params,
    key: &SigningKey,
) -> Result<Timing> {
    let backends = (0..roots.len())
        .map(|i| Backend::new(format!("b{i}"), BTreeMap::new(), Arc::new(InMemory::new())))
        .collect();
    Ok(push_to(model, backends, params, key).await?.0)
}

async fn push_to(
    model: &Model,
    backends: Vec<Backend>,
    params: Params,
    key: &SigningKey,
) -> Result<(Timing, PushStats, Registration)> {
    let store = Store::new(backends);
    let opts = PushOptions::new("bench-model", params);
    let (timing, pushed) = timed(async { Ok(store.push(&model.dir, &opts, key).await?) }).await?;
    Ok((timing, pushed.stats, pushed.registration))
}

/// `std::fs::copy` of every file into `dest`.
fn copy_dir(model: &Model, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    for (rel, _, _) in &model.files {
        std::fs::copy(model.dir.join(rel), dest.join(rel))?;
    }
    Ok(())
}

/// The model's bytes written the way k+m lays them out, without hashing or coding:
/// each run of k chunks of `chunk` bytes goes as k files to the first k directories
/// and, standing in for parity, its first m chunks again to the other m.
fn copy_striped(model: &Model, dests: &[PathBuf], k: usize, chunk: usize) -> Result<u64> {
    for dest in dests {
        std::fs::create_dir_all(dest)?;
    }
    let mut written = 0u64;
    let mut buf = vec![0u8; k * chunk];
    for (rel, _, _) in &model.files {
        let mut file = std::fs::File::open(model.dir.join(rel))?;
        for stripe in 0.. {
            let n = read_full(&mut file, &mut buf)?;
            if n == 0 {
                break;
            }
            let pieces: Vec<&[u8]> = buf[..n].chunks(chunk).collect();
            for (j, dest) in dests.iter().enumerate() {
                let piece = match (j < k, pieces.get(j)) {
                    (true, Some(piece)) => *piece,
                    (true, None) => continue,
                    (false, _) => pieces[(j - k) % pieces.len()],
                };
                std::fs::write(dest.join(format!("{rel}.{stripe}.{j}")), piece)?;
                written += piece.len() as u64;
            }
        }
    }
    Ok(written)
}

/// Fills `buf` from `file` as far as it goes; answers the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            got => n += got,
        }
    }
    Ok(n)
}

struct PushResults {
    ours: Vec<Timing>,
    memory: Vec<Timing>,
    copy: Vec<Timing>,
    striped: Vec<Timing>,
    stats: PushStats,
    striped_bytes: u64,
    /// The 1-minute load average when the part started and ended.
    load: (String, String),
}

async fn part_push(
    args: &Args,
    model: &Model,
    work: &Path,
    roots: &[PathBuf],
    params: Params,
    key: &SigningKey,
) -> Result<(PushResults, Registration)> {
    let copy_dest = work.join("copy");
    let striped: Vec<PathBuf> = (0..roots.len())
        .map(|i| work.join(format!("striped{i}")))
        .collect();
    let mut out = PushResults {
        ours: Vec::new(),
        memory: Vec::new(),
        copy: Vec::new(),
        striped: Vec::new(),
        stats: PushStats::default(),
        striped_bytes: 0,
        load: (load_average(), String::new()),
    };
    let mut registration = None;
    for rep in 0..args.push_reps {
        eprintln!("==> push, repetition {}/{}", rep + 1, args.push_reps);
        let (timing, stats, reg) = push(model, roots, params, key).await?;
        out.ours.push(timing);
        out.stats = stats;
        registration = Some(reg);

        out.memory
            .push(push_in_memory(model, roots, params, key).await?);

        remove_dir(&copy_dest)?;
        let (timing, ()) = timed(async { copy_dir(model, &copy_dest) }).await?;
        out.copy.push(timing);
        remove_dir(&copy_dest)?;

        for dest in &striped {
            remove_dir(dest)?;
        }
        let (timing, written) = timed(async {
            copy_striped(
                model,
                &striped,
                params.k,
                aigrid_store::chunk::DEFAULT_CHUNK_SIZE as usize,
            )
        })
        .await?;
        out.striped.push(timing);
        out.striped_bytes = written;
        for dest in &striped {
            remove_dir(dest)?;
        }
    }
    out.load.1 = load_average();
    Ok((out, registration.context("no push ran")?))
}

fn print_push(args: &Args, model: &Model, params: Params, r: &PushResults) {
    let bytes = model.bytes() as f64;
    let gbs = |t: &Timing| bytes / t.wall.as_secs_f64() / 1e9;
    let ours = r.ours[median_index(&r.ours)];
    let n = params.k + params.m;
    println!(
        "### (b) Push pipeline: {:.2} GiB model ({} tensors x {} MiB + config.json), {}+{}, 4 MiB chunks, {n} local-directory backends; median of {} repetitions, interleaved; {} CPUs, 1-min load average {} at the start, {} at the end",
        bytes / GIB,
        args.tensors,
        args.tensor_mib,
        params.k,
        params.m,
        args.push_reps,
        cpus(),
        r.load.0,
        r.load.1,
    );
    println!();
    println!("| pipeline | bytes written, GiB | wall s, median | wall s, min-max | **GB/s of model bytes** | CPU s (user+sys) | ours / this GB/s |");
    println!("|:--|--:|--:|--:|--:|--:|--:|");
    let (k, m) = (params.k, params.m);
    let rows: [(String, f64, &[Timing]); 4] = [
        (
            "**ours: `Store::push`** (cut, BLAKE3 chunks, RS encode, BLAKE3 shards, write)".into(),
            r.stats.bytes_uploaded as f64,
            &r.ours,
        ),
        (
            format!("ours, into {n} in-memory stores (`InMemory`: the pipeline without file writes)"),
            r.stats.bytes_uploaded as f64,
            &r.memory,
        ),
        (
            "baseline: `std::fs::copy` to 1 directory".into(),
            bytes,
            &r.copy,
        ),
        (
            format!("baseline: plain copy laid out as {k}+{m} lays it out, {n} directories (no hash, no coding)"),
            r.striped_bytes as f64,
            &r.striped,
        ),
    ];
    for (name, written, samples) in rows {
        let t = samples[median_index(samples)];
        let (lo, hi) = wall_range(samples);
        println!(
            "| {name} | {:.2} | {:.3} | {lo:.3}-{hi:.3} | {:.2} | {:.2} | {:.2} |",
            written / GIB,
            t.wall.as_secs_f64(),
            gbs(&t),
            t.cpu,
            gbs(&ours) / gbs(&t),
        );
    }
    println!();
    println!(
        "Push: {} chunks in {} stripes, {:.2} GiB of shards written. The model was written just before, so it is read from the page cache; every write on both sides lands in the page cache and nothing is fsynced.",
        r.stats.chunks,
        r.stats.stripes_written,
        r.stats.bytes_uploaded as f64 / GIB,
    );
    let v = gbs(&ours);
    println!(
        "Target: push >= 1 GB/s of model bytes: {v:.2} GB/s, {}.",
        if v >= 1.0 { "met" } else { "MISSED" }
    );
    println!();
}

// ---- (c) cold load ------------------------------------------------------------------

/// One cold load.
#[derive(Debug, Clone, Copy)]
struct Load {
    timing: Timing,
    /// Bytes reserved on all links.
    link_bytes: u64,
    /// The busiest link's bytes.
    busiest: u64,
    requests: u64,
    /// Mean share of the wall time a link sat idle waiting for a GET, and idle after
    /// its last byte.
    idle: (f64, f64),
    fetch: Option<FetchStats>,
}

impl Load {
    fn from_links(timing: Timing, links: &[Arc<Link>], fetch: Option<FetchStats>) -> Load {
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
async fn load_baseline(model: &Model, whole: &Path, rate: f64) -> Result<Load> {
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
async fn store_whole(model: &Model, whole: &Path) -> Result<()> {
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

fn fetch_options(args: &Args) -> FetchOptions {
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
enum Way {
    /// `Reader::prewarm(&[], false)` into an empty cache.
    Prewarm,
    /// `Reader::safetensors`, then `SafetensorsView::tensor` for every tensor,
    /// concurrently within the one task.
    TensorsOneTask,
    /// `Reader::safetensors` for the tensor table, then every tensor's range with
    /// `Reader::read_at` (what `SafetensorsView::tensor` calls) in its own tokio task.
    TensorsTasks,
}

const WAYS: [Way; 3] = [Way::Prewarm, Way::TensorsOneTask, Way::TensorsTasks];

impl Way {
    fn describe(self) -> &'static str {
        match self {
            Way::Prewarm => "**ours: `Reader::prewarm(&[], false)`** (every stripe from k of k+m; shards and chunks verified; chunks cached)",
            Way::TensorsOneTask => "ours: `Reader::safetensors`, then every tensor at once in one task (verified, cached)",
            Way::TensorsTasks => "ours: `Reader::safetensors`, then every tensor at once, one tokio task each (verified, cached)",
        }
    }
}

/// Tensors by name.
type Tensors = Vec<(String, Bytes)>;

/// Every tensor of the model's safetensors file, `args.tensor_concurrency` at once.
async fn fetch_tensors(
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
async fn load_ours(
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

struct LoadResults {
    /// The 1-minute load average when the part started and ended.
    load: (String, String),
    baseline: Load,
    /// Each way's cold loads, in `WAYS` order.
    ours: Vec<Vec<Load>>,
}

async fn part_load(
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

fn print_load(args: &Args, model: &Model, params: Params, r: &LoadResults) {
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

// ---- main ---------------------------------------------------------------------------

fn parse_code(code: &str) -> Result<Params> {
    let (k, m) = code
        .split_once('+')
        .with_context(|| format!("--code `{code}`: expected k+m"))?;
    let params = Params {
        k: k.trim().parse()?,
        m: m.trim().parse()?,
    };
    ensure!(
        params.k > 0 && params.m > 0,
        "--code `{code}`: k and m must be positive"
    );
    Ok(params)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let params = parse_code(&args.code)?;
    for part in &args.parts {
        if !matches!(part.as_str(), "push" | "load") {
            bail!("unknown part `{part}` (push, load)");
        }
    }
    ensure!(
        args.push_reps > 0 && args.load_reps > 0 && args.tensors > 0 && args.tensor_mib > 0,
        "--push-reps, --load-reps, --tensors and --tensor-mib must be positive"
    );
    ensure!(args.link_mib_s > 0.0, "--link-mib-s must be positive");
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("aigrid-store-load.")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a work directory in {}", parent.display()))?;
    eprintln!(
        "==> writing the model ({} x {} MiB) under {}",
        args.tensors,
        args.tensor_mib,
        work.path().display()
    );
    let model = write_model(
        &work.path().join("model"),
        args.tensors,
        args.tensor_mib << 20,
        args.seed,
    )?;
    let roots: Vec<PathBuf> = (0..params.k + params.m)
        .map(|i| work.path().join(format!("backend{i}")))
        .collect();
    let key = SigningKey::from_bytes(&rand::random());
    let wants = |p: &str| args.parts.iter().any(|x| x == p);

    let registration = if wants("push") {
        let (results, registration) =
            part_push(&args, &model, work.path(), &roots, params, &key).await?;
        print_push(&args, &model, params, &results);
        registration
    } else {
        eprintln!("==> pushing once (not timed)");
        push(&model, &roots, params, &key).await?.2
    };
    if wants("load") {
        let results = part_load(&args, &model, work.path(), &roots, &registration).await?;
        print_load(&args, &model, params, &results);
    }
    Ok(())
}
