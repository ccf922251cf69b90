//! Embeddings per second (`benchmarks/serving`, part a): all-MiniLM-L6-v2 served by
//! aigrid over HTTP, beside sentence-transformers (PyTorch) encoding the same
//! sentences in-process, both on the CPU or both on the GPU `--device cuda:N` names
//! (a build with `--features cuda`; the baseline's bf16 column is then the model
//! converted to bf16, and the ONNX column, a CPU runtime's, is left out).
//!
//! - **Ours**: an in-process server (`Server::bind` + `run`, `ModelSource::Dir`,
//!   default `Limits`: continuous batching, each forward whatever is queued when the
//!   model is free, up to 2048 tokens packed without padding). Clients POST `/v1/embeddings` over loopback HTTP/1.1 with
//!   `encoding_format: "base64"` (what the official OpenAI Python client asks for by
//!   default). A configuration `BxC` is C closed-loop clients sending B sentences per
//!   request until all sentences are embedded; `1x1` is one client, one sentence at a
//!   time. Tokenizing, JSON and HTTP are inside the clock. The projections run in the
//!   precision the server chooses by default (bf16 on a GPU and on CPUs with AMX, f32
//!   elsewhere);
//!   the library rows show that precision and, when it is bf16, f32 as well.
//! - **Baseline**: `SentenceTransformer(dir, device="cpu").encode(sentences,
//!   batch_size=B)` in one Python process with `torch.set_num_threads(N)`, N our
//!   thread count unless `--torch-threads` says otherwise
//!   (`benchmarks/serving/embed_baseline.py`, run by this binary before ours, so the
//!   two never share the CPUs), in PyTorch's default f32 and again under
//!   `torch.autocast("cpu", dtype=torch.bfloat16)`, and with sentence-transformers'
//!   ONNX backend (`backend="onnx"`: exported by optimum, run by onnxruntime with N
//!   intra-op threads) where the Python has it. It has no HTTP, no JSON and no
//!   tokenizing in another process: it is the library's ceiling, not a server's.
//!
//! Both embed the same `--sentences` (512) generated sentences of 10 to 30 words,
//! every repetition all of them. Rates are sentences over wall time, the median of
//! `--reps` repetitions. After the clock, every configuration's vectors are checked
//! against the 1x1 run's (cosine), and the 1x1 run's first ones against
//! sentence-transformers' (cosine >= 0.999).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_benchmarks::measure::{cpus, load_average, median};
use aigrid_benchmarks::sentences::sentences;
use aigrid_benchmarks::serve::{self, MODEL_NAME};
use aigrid_serving::bert::{Embedder, Pooling};
use aigrid_serving::dense::Precision;
use aigrid_serving::kernels::Backend;
use aigrid_serving::server::Limits;
use aigrid_serving::tokenizer::TextTokenizer;
use aigrid_serving::{DeviceSpec, ModelSource};
use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use candle_core::Device;
use candle_nn::VarBuilder;
use clap::Parser;
use serde::Deserialize;
use serde_json::json;

/// Ours over sentence-transformers on PyTorch, at every configuration.
const TORCH_TARGET: f64 = 2.0;
/// Ours over sentence-transformers' ONNX backend, at every configuration.
const ONNX_TARGET: f64 = 1.5;

// The `aigrid` binary, which serves models in production, allocates with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cosine every vector of ours must reach against sentence-transformers'.
const MIN_COSINE_REFERENCE: f32 = 0.999;
/// Cosine every configuration's vector must reach against the 1x1 run's (padding in
/// a batch changes the arithmetic a little, never the result).
const MIN_COSINE_BATCHED: f32 = 0.9999;

#[derive(Parser, Debug)]
#[command(
    name = "serving_embed",
    about = "all-MiniLM-L6-v2 embeddings per second over aigrid's /v1/embeddings, beside sentence-transformers"
)]
struct Args {
    /// The all-MiniLM-L6-v2 directory (serving/fixtures/fetch.sh puts it at
    /// target/fixtures/all-minilm-l6-v2).
    #[arg(long)]
    model: PathBuf,
    /// A Python with sentence-transformers and torch (make one with
    /// `python3 -m venv V && V/bin/pip install sentence-transformers`).
    #[arg(long, env = "BENCH_PYTHON", default_value = "/tmp/stenv/bin/python")]
    python: PathBuf,
    /// The baseline script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/serving/embed_baseline.py"))]
    baseline_script: PathBuf,
    /// Configurations, each BATCHxCLIENTS: sentences per request x concurrent clients.
    /// The baseline of each is `encode(batch_size=BATCH)`.
    #[arg(long, value_delimiter = ',', default_value = "1x1,1x32,32x1,32x4")]
    configs: Vec<String>,
    /// Sentences embedded by every run.
    #[arg(long, default_value_t = 512)]
    sentences: usize,
    /// Timed repetitions of every configuration (interleaved); the median is shown.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Threads torch may use; by default as many as ours (`RAYON_NUM_THREADS`, or
    /// the cores), so the verdict compares like with like.
    #[arg(long)]
    torch_threads: Option<usize>,
    /// Seed of the sentences.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where ours and the baseline run: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// The CPU threads our products run on: `RAYON_NUM_THREADS` (what `aigrid serve`
/// and `benchmarks/serving/run.sh` set), or the cores.
fn our_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(cpus)
}

/// The threads the baseline's torch runs on.
fn torch_threads(args: &Args) -> usize {
    args.torch_threads.unwrap_or_else(our_threads)
}

/// Sentences per request and concurrent clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Config {
    batch: usize,
    clients: usize,
}

impl Config {
    fn parse(s: &str) -> Result<Config> {
        let (b, c) = s
            .split_once('x')
            .with_context(|| format!("configuration `{s}`: expected BATCHxCLIENTS"))?;
        let config = Config {
            batch: b.trim().parse()?,
            clients: c.trim().parse()?,
        };
        ensure!(
            config.batch > 0 && config.clients > 0,
            "configuration `{s}`: both must be positive"
        );
        Ok(config)
    }

    fn describe(self) -> String {
        let clients = match self.clients {
            1 => "1 client, sequential".to_owned(),
            n => format!("{n} concurrent clients"),
        };
        let per = match self.batch {
            1 => "1 sentence per request".to_owned(),
            n => format!("{n} sentences per request"),
        };
        format!("batch {}: {clients}, {per}", self.batch)
    }
}

// ---- the baseline -----------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Baseline {
    sentence_transformers: String,
    torch: String,
    threads: usize,
    results: Vec<BaselineRun>,
    /// The same under `torch.autocast("cpu", dtype=torch.bfloat16)`, or on a GPU
    /// with the model converted to bf16 ([`Baseline::bf16`] says which).
    #[serde(default)]
    results_bf16: Vec<BaselineRun>,
    /// `autocast` or `weights`.
    #[serde(default)]
    bf16: Option<String>,
    /// The same with sentence-transformers' ONNX backend (onnxruntime on CPU).
    #[serde(default)]
    results_onnx: Vec<BaselineRun>,
    /// onnxruntime's and optimum's versions, when the ONNX backend ran.
    #[serde(default)]
    onnx_versions: std::collections::BTreeMap<String, String>,
    /// Why the ONNX backend did not run, when it did not.
    #[serde(default)]
    onnx_error: Option<String>,
    embeddings: Vec<Vec<f32>>,
}

/// A baseline's sentences per second at one batch size: f32, and under bf16
/// autocast and with the ONNX backend where those ran.
struct Rates {
    f32: f64,
    bf16: Option<f64>,
    onnx: Option<f64>,
}

impl Baseline {
    /// Sentences per second at `batch`.
    fn rates(&self, n: f64, batch: usize) -> Result<Rates> {
        let rate = |runs: &[BaselineRun]| {
            runs.iter()
                .find(|r| r.batch_size == batch)
                .map(|r| n / median(&r.seconds))
        };
        Ok(Rates {
            f32: rate(&self.results).context("the baseline lacks a batch size")?,
            bf16: rate(&self.results_bf16),
            onnx: rate(&self.results_onnx),
        })
    }

    /// The ONNX backend's versions in words, or why it did not run.
    fn onnx_words(&self) -> String {
        match &self.onnx_error {
            Some(e) => format!("ONNX backend not run ({e})"),
            None => format!(
                "ONNX backend: sentence-transformers' `backend=\"onnx\"`, the model exported by optimum {} and run by onnxruntime {} on CPU",
                self.onnx_versions.get("optimum").map_or("?", String::as_str),
                self.onnx_versions
                    .get("onnxruntime")
                    .map_or("?", String::as_str),
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
struct BaselineRun {
    batch_size: usize,
    seconds: Vec<f64>,
}

async fn run_baseline(
    args: &Args,
    sentences_file: &Path,
    batch_sizes: &[usize],
    check: usize,
) -> Result<Baseline> {
    let list: Vec<String> = batch_sizes.iter().map(usize::to_string).collect();
    let output = tokio::process::Command::new(&args.python)
        .arg(&args.baseline_script)
        .arg("--model")
        .arg(&args.model)
        .arg("--sentences")
        .arg(sentences_file)
        .arg("--batch-sizes")
        .arg(list.join(","))
        .arg("--reps")
        .arg(args.reps.to_string())
        .arg("--threads")
        .arg(torch_threads(args).to_string())
        .arg("--check")
        .arg(check.to_string())
        .arg("--device")
        .arg(baseline_device(args.device))
        // onnxruntime runs on the CPU: no column beside a GPU.
        .args(matches!(args.device, DeviceSpec::Cuda(_)).then_some("--no-onnx"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} (make a Python with sentence-transformers: \
                 python3 -m venv V && V/bin/pip install sentence-transformers, then \
                 pass --python V/bin/python or set BENCH_PYTHON)",
                args.python.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "the baseline failed ({}); it needs sentence-transformers and torch in {} \
             (python3 -m venv V && V/bin/pip install sentence-transformers)",
            output.status,
            args.python.display()
        );
    }
    serde_json::from_slice(&output.stdout).context("reading the baseline's JSON")
}

// ---- ours, the library alone --------------------------------------------------------

/// torch's name of `device`.
fn baseline_device(device: DeviceSpec) -> String {
    match device {
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        DeviceSpec::Cpu | DeviceSpec::Auto => "cpu".to_owned(),
    }
}

/// The model as the server's loader builds it, without the server: tokenizer,
/// pooling and `Embedder` over the model directory on `device`, its projections in
/// `precision`.
fn library(dir: &Path, precision: Precision, device: &Device) -> Result<(TextTokenizer, Embedder)> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).with_context(|| dir.join(name).display().to_string())
    };
    let config = read("config.json")?;
    let tokenizer = TextTokenizer::new(
        &read("tokenizer.json")?,
        Some(&read("tokenizer_config.json")?),
        None,
        Some(&config),
    )?;
    let modules = read("modules.json")?;
    let pooling_config = Pooling::config_path(&modules)?
        .map(|path| read(&path))
        .transpose()?;
    let pooling = Pooling::from_files(Some(&modules), pooling_config.as_deref())?;
    let vb = VarBuilder::from_buffered_safetensors(
        read("model.safetensors")?,
        precision.encoder_dtype(Backend::for_device(device)),
        device,
    )?;
    Ok((tokenizer, Embedder::new(vb, &config, pooling, precision)?))
}

/// Seconds to tokenize and embed every sentence `batch` at a time, calling the
/// library directly on this thread.
fn library_run(
    tokenizer: &TextTokenizer,
    embedder: &Embedder,
    sentences: &[String],
    batch: usize,
) -> Result<f64> {
    let start = Instant::now();
    for group in sentences.chunks(batch) {
        let ids = group
            .iter()
            .map(|s| tokenizer.encode(s, true))
            .collect::<Result<Vec<_>, _>>()?;
        embedder.embed(&ids)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

// ---- ours, the server -----------------------------------------------------------------

/// POSTs one embeddings request; the vectors in input order.
async fn embed(client: &reqwest::Client, url: &str, inputs: &[String]) -> Result<Vec<Vec<f32>>> {
    let response = client
        .post(url)
        .json(&json!({"model": MODEL_NAME, "input": inputs, "encoding_format": "base64"}))
        .send()
        .await?;
    let status = response.status();
    if status != 200 {
        bail!("{url} answered {status}: {}", response.text().await?);
    }
    let body: serde_json::Value = response.json().await?;
    let data = body["data"].as_array().context("no data")?;
    ensure!(
        data.len() == inputs.len(),
        "{} vectors for {} inputs",
        data.len(),
        inputs.len()
    );
    data.iter()
        .map(|d| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d["embedding"].as_str().context("no base64 embedding")?)?;
            Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        })
        .collect()
}

/// Embeds every sentence as `config` says; the wall time and the vectors.
async fn run_ours(
    client: &reqwest::Client,
    url: &str,
    sentences: &Arc<Vec<String>>,
    config: Config,
) -> Result<(Duration, Vec<Vec<f32>>)> {
    let requests: Vec<(usize, usize)> = (0..sentences.len())
        .step_by(config.batch)
        .map(|at| (at, (at + config.batch).min(sentences.len())))
        .collect();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..config.clients)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_owned());
            let (sentences, requests, next) = (sentences.clone(), requests.clone(), next.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(from, to)) = requests.get(i) else {
                        return Ok::<_, anyhow::Error>(got);
                    };
                    got.push((from, embed(&client, &url, &sentences[from..to]).await?));
                }
            })
        })
        .collect();
    let mut vectors = vec![Vec::new(); sentences.len()];
    for task in tasks {
        for (from, batch) in task.await?? {
            for (i, v) in batch.into_iter().enumerate() {
                vectors[from + i] = v;
            }
        }
    }
    Ok((start.elapsed(), vectors))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The smallest cosine between corresponding vectors.
fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<f32> {
    ensure!(a.len() == b.len(), "{} vectors beside {}", a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            ensure!(
                x.len() == y.len(),
                "{} dimensions beside {}",
                x.len(),
                y.len()
            );
            Ok(cosine(x, y))
        })
        .try_fold(f32::INFINITY, |m, c| Ok(m.min(c?)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let configs: Vec<Config> = args
        .configs
        .iter()
        .map(|s| Config::parse(s))
        .collect::<Result<_>>()?;
    ensure!(!configs.is_empty(), "--configs is empty");
    ensure!(
        args.device != DeviceSpec::Auto,
        "--device: say cpu or cuda:N"
    );
    ensure!(
        args.reps > 0 && args.sentences > 0,
        "--reps and --sentences must be positive"
    );
    ensure!(
        args.model.join("model.safetensors").is_file(),
        "{} holds no model.safetensors (run serving/fixtures/fetch.sh model)",
        args.model.display()
    );
    // Opened before the baseline's minutes, so a device that cannot be used says so
    // at once.
    let device = args.device.open()?;
    let load_start = load_average();
    let sentences = Arc::new(sentences(args.sentences, args.seed));
    let words: Vec<usize> = sentences.iter().map(|s| s.split(' ').count()).collect();
    let work = tempfile::tempdir()?;
    let sentences_file = work.path().join("sentences.json");
    std::fs::write(&sentences_file, serde_json::to_vec(&*sentences)?)?;

    let mut batch_sizes: Vec<usize> = configs.iter().map(|c| c.batch).collect();
    batch_sizes.sort_unstable();
    batch_sizes.dedup();
    let check = sentences.len().min(16);
    eprintln!(
        "==> baseline: sentence-transformers, batch sizes {batch_sizes:?}, {} repetitions",
        args.reps
    );
    let baseline = run_baseline(&args, &sentences_file, &batch_sizes, check).await?;

    // The server's precision (its default for an embedding model on this device),
    // and f32 beside it when that is another.
    let precision = Precision::resolve_on(None, &device, true)?;
    let mut precisions = vec![precision];
    if precision != Precision::F32 {
        precisions.push(Precision::F32);
    }
    eprintln!("==> ours, the library alone: Embedder::embed in-process, {precisions:?} products");
    let library_walls: Vec<(Precision, usize, Vec<f64>)> = {
        let (dir, sentences, sizes, reps, precisions, device) = (
            args.model.clone(),
            sentences.clone(),
            batch_sizes.clone(),
            args.reps,
            precisions.clone(),
            device.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut walls: Vec<(Precision, usize, Vec<f64>)> = Vec::new();
            for precision in precisions {
                let (tokenizer, embedder) = library(&dir, precision, &device)?;
                // Warm-up, as the baseline's.
                library_run(
                    &tokenizer,
                    &embedder,
                    &sentences[..64.min(sentences.len())],
                    32,
                )?;
                let first = walls.len();
                walls.extend(sizes.iter().map(|b| (precision, *b, Vec::new())));
                for rep in 0..reps {
                    for (_, batch, walls) in &mut walls[first..] {
                        let wall = library_run(&tokenizer, &embedder, &sentences, *batch)?;
                        eprintln!(
                            "    library {precision} batch {batch} rep {}/{reps}: {wall:.3} s",
                            rep + 1
                        );
                        walls.push(wall);
                    }
                }
            }
            Ok::<_, anyhow::Error>(walls)
        })
        .await??
    };

    eprintln!("==> ours: starting the server");
    let server = serve::start(
        ModelSource::Dir(args.model.clone()),
        Limits::default(),
        args.device,
    )
    .await?;
    let client = serve::client()?;
    server
        .wait_ready(&client, Duration::from_millis(20), Duration::from_secs(120))
        .await?;
    let url = server.url("/v1/embeddings");
    // Warm-up: connections, allocations, every batch shape once.
    for config in &configs {
        run_ours(
            &client,
            &url,
            &Arc::new(sentences[..64.min(sentences.len())].to_vec()),
            *config,
        )
        .await?;
    }
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut reference: Option<Vec<Vec<f32>>> = None;
    let mut worst_batched = f32::INFINITY;
    for rep in 0..args.reps {
        for (i, config) in configs.iter().enumerate() {
            let (wall, vectors) = run_ours(&client, &url, &sentences, *config).await?;
            eprintln!(
                "    ours {}x{} rep {}/{}: {:.3} s",
                config.batch,
                config.clients,
                rep + 1,
                args.reps,
                wall.as_secs_f64()
            );
            walls[i].push(wall.as_secs_f64());
            match &reference {
                None => reference = Some(vectors),
                Some(r) => worst_batched = worst_batched.min(min_cosine(r, &vectors)?),
            }
        }
    }
    server.stop().await?;
    let load_end = load_average();

    // Checked after the clocks.
    let reference = reference.context("no run")?;
    let vs_st = min_cosine(&reference[..check], &baseline.embeddings)?;
    ensure!(
        vs_st >= MIN_COSINE_REFERENCE,
        "our vectors differ from sentence-transformers': cosine {vs_st}"
    );
    ensure!(
        worst_batched >= MIN_COSINE_BATCHED || configs.len() == 1 && args.reps == 1,
        "batched vectors differ from one-at-a-time ones: cosine {worst_batched}"
    );

    let n = sentences.len() as f64;
    let gpu = matches!(args.device, DeviceSpec::Cuda(_));
    // The baseline's bf16 column: autocast on the CPU, bf16 weights on a GPU.
    let bf16_words = match baseline.bf16.as_deref() {
        Some("weights") => "bf16 weights",
        _ => "autocast bf16",
    };
    let device_words = serve::device_words(args.device);
    println!(
        "### (a) Embeddings: all-MiniLM-L6-v2 on {device_words}, {} sentences of {}-{} words (mean {:.1}); median of {} repetitions; {} CPUs, 1-min load average {load_start} at the start, {load_end} at the end",
        sentences.len(),
        words.iter().min().unwrap_or(&0),
        words.iter().max().unwrap_or(&0),
        words.iter().sum::<usize>() as f64 / n,
        args.reps,
        cpus(),
    );
    println!();
    println!(
        "| config | ours emb/s | sentence-transformers emb/s | ours / sentence-transformers | sentence-transformers, {bf16_words}, emb/s | ours / {bf16_words} | sentence-transformers, ONNX, emb/s | ours / ONNX |"
    );
    println!("|:--|--:|--:|--:|--:|--:|--:|--:|");
    let cells = |ours: f64, other: Option<f64>| match other {
        Some(b) => format!("{b:.1} | {:.2}x", ours / b),
        None => "- | -".to_owned(),
    };
    let mut ratios = Vec::new();
    for (config, walls) in configs.iter().zip(&walls) {
        let ours = n / median(walls);
        let rates = baseline.rates(n, config.batch)?;
        // Like with like: bf16 products beside bf16 ones, f32 beside f32.
        let like = match precision {
            Precision::Bf16 => rates.bf16,
            Precision::F32 => Some(rates.f32),
        };
        ratios.push((
            config,
            like.map(|like| ours / like),
            rates.onnx.map(|o| ours / o),
        ));
        println!(
            "| {} | {ours:.1} | {:.1} (`encode(batch_size={})`) | {:.2}x | {} | {} |",
            config.describe(),
            rates.f32,
            config.batch,
            ours / rates.f32,
            cells(ours, rates.bf16),
            cells(ours, rates.onnx)
        );
    }
    for (precision, batch, walls) in &library_walls {
        let ours = n / median(walls);
        let rates = baseline.rates(n, *batch)?;
        println!(
            "| ours, the library alone (`Embedder::embed` in-process: no server, no HTTP), {precision} products, batch {batch} | {ours:.1} | {:.1} (`encode(batch_size={batch})`) | {:.2}x | {} | {} |",
            rates.f32,
            ours / rates.f32,
            cells(ours, rates.bf16),
            cells(ours, rates.onnx)
        );
    }
    println!();
    println!(
        "Ours: {precision} products (`--matmul-precision auto`'s choice on this {}), HTTP/1.1 over loopback, `encoding_format: base64`, default limits (each forward whatever is queued when the model is free, up to 2048 tokens packed without padding); tokenizing, JSON and HTTP inside the clock. Baseline: sentence-transformers {} on torch {} ({} threads), in-process, no HTTP: PyTorch's default f32, and the same {}. Vectors: ours vs sentence-transformers min cosine {vs_st:.5} (first {check} sentences); every configuration vs one-at-a-time min cosine {:.5}.",
        if gpu { "GPU" } else { "CPU" },
        baseline.sentence_transformers,
        baseline.torch,
        baseline.threads,
        if baseline.bf16.as_deref() == Some("weights") {
            "with the model's weights converted to bf16 (`model.to(torch.bfloat16)`)"
        } else {
            "under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`"
        },
        if worst_batched.is_finite() { worst_batched } else { 1.0 },
    );
    let (ours_threads, torch_threads) = (our_threads(), torch_threads(&args));
    let baseline_kind = match precision {
        Precision::Bf16 if gpu => "with bf16 weights",
        Precision::Bf16 => "under bf16 autocast",
        Precision::F32 => "in f32",
    };
    let verdicts: Vec<String> = ratios
        .iter()
        .map(|(c, r, _)| match r {
            _ if ours_threads != torch_threads => format!(
                "{}x{} no verdict ({ours_threads} threads beside {torch_threads})",
                c.batch, c.clients
            ),
            Some(r) => format!(
                "{}x{} {r:.2}x {}",
                c.batch,
                c.clients,
                if *r >= TORCH_TARGET { "met" } else { "MISSED" }
            ),
            None => format!(
                "{}x{} no verdict (no baseline {baseline_kind})",
                c.batch, c.clients
            ),
        })
        .collect();
    println!(
        "Target: ours ({precision} products, {ours_threads} threads) >= {TORCH_TARGET}x sentence-transformers {baseline_kind} ({torch_threads} threads): {}.",
        verdicts.join(", ")
    );
    let onnx_verdicts: Vec<String> = ratios
        .iter()
        .filter_map(|(c, _, r)| {
            r.map(|r| {
                let word = if r >= ONNX_TARGET { "met" } else { "MISSED" };
                format!("{}x{} {r:.2}x {word}", c.batch, c.clients)
            })
        })
        .collect();
    if gpu {
        println!("ONNX backend: not run beside a GPU (onnxruntime runs it on the CPU).");
    } else if onnx_verdicts.is_empty() {
        println!("{}.", baseline.onnx_words());
    } else {
        println!(
            "{}. Target: ours >= {ONNX_TARGET}x the ONNX backend: {}.",
            baseline.onnx_words(),
            onnx_verdicts.join(", ")
        );
    }
    println!();
    Ok(())
}
