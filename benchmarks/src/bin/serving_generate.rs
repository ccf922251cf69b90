//! Generation throughput and time to first token under concurrency (`benchmarks/serving`,
//! part b): aigrid's continuous-batching server beside the same server made to decode
//! one sequence at a time.
//!
//! The model is a Llama written by `aigrid_serving::tiny` (random weights, a trained
//! byte-level BPE tokenizer), big enough that decoding one sequence is bound by
//! reading the weights, as it is for real models: by default hidden 768, 6 layers,
//! 12 heads (6 KV heads), MLP 2048, vocabulary 512 (about 39 M parameters, 157 MB of
//! F32). A smaller model is dispatch-bound and says little about batching.
//!
//! - **Ours**: `Limits::default()`: up to 64 sequences decoded together, 2048 tokens
//!   per step, prefill chunked into the decode steps.
//! - **Baseline**: the same code and model with `max_running_sequences: 1`: requests
//!   queue and are generated one after another, which is what a server without
//!   batching does.
//!
//! Both servers run in this process (one at a time: the idle one holds no CPU). For
//! each concurrency C, C closed-loop clients send `--requests` (64) chat completions
//! between them, each with its own prompt, `max_tokens` 128, temperature 0, streamed,
//! so the client notes when the first text chunk arrives (TTFT, which includes any
//! queueing in the server). Tokens/s is the completion tokens the server reported
//! (`stream_options.include_usage`), summed, over the wall time from the first
//! request to the last `[DONE]`. Every concurrency runs `--reps` (3) times on each
//! server, interleaved, and each row shows the run of median tokens/s. Temperature 0
//! makes both servers produce the same tokens for the same request; the table says
//! how many of the outputs were identical.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_benchmarks::measure::{cpus, load_average, percentile};
use aigrid_benchmarks::serve::{self, Running, Streamed, MODEL_NAME};
use aigrid_serving::server::Limits;
use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use aigrid_serving::ModelSource;
use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

// The `aigrid` binary, which serves models in production, allocates with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "serving_generate",
    about = "Llama generation tokens/s and TTFT at several concurrencies, batched vs one sequence at a time"
)]
struct Args {
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Requests sent at each concurrency (spread over the clients).
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Hidden size of the Llama.
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 6)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 6)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 2048)]
    intermediate: usize,
    /// Target vocabulary size.
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Repetitions of every run (interleaved); each row shows the median by tokens/s.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

const TOPICS: &[&str] = &[
    "the scheduler",
    "GPU memory",
    "the model store",
    "erasure codes",
    "a Raft leader",
    "the weather in Brussels",
    "continuous batching",
    "a cold start",
    "the night train",
    "embeddings",
    "a broken disk",
    "the harbour",
    "apple pie",
    "the city library",
];

/// The chat request of request `i`: its own prompt, of varying length.
fn request(i: usize, max_tokens: usize) -> Value {
    let topic = |k: usize| TOPICS[(i * 7 + k * 3) % TOPICS.len()];
    let mut prompt = format!("Request {i}: tell me about {} and {}.", topic(0), topic(1));
    for k in 0..i % 4 {
        prompt.push_str(&format!(" Also mention {}.", topic(k + 2)));
    }
    json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// One run: `clients` closed-loop clients sending `requests` requests between them.
struct Run {
    wall: Duration,
    /// Request `i`'s stream, at index `i`.
    streams: Vec<Streamed>,
    /// Mean sequences per decode step, from the server's metrics.
    mean_batch: f64,
}

impl Run {
    fn tokens(&self) -> u64 {
        self.streams.iter().map(|s| s.completion_tokens).sum()
    }

    fn tokens_per_second(&self) -> f64 {
        self.tokens() as f64 / self.wall.as_secs_f64()
    }

    fn ttfts(&self) -> Vec<Duration> {
        self.streams.iter().filter_map(Streamed::ttft).collect()
    }

    fn ttft_ms(&self, p: f64) -> f64 {
        percentile(&self.ttfts(), p).as_secs_f64() * 1e3
    }
}

/// One concurrency's line of the table: the median runs and the tokens/s ranges.
struct Row {
    clients: usize,
    ours: Run,
    base: Run,
    ours_range: (f64, f64),
    base_range: (f64, f64),
}

/// The run of median tokens/s (the lower one of an even count).
fn median_run(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.tokens_per_second().total_cmp(&b.tokens_per_second()));
    runs.swap_remove((runs.len() - 1) / 2)
}

/// The lowest and highest tokens/s of `runs`.
fn range(runs: &[Run]) -> (f64, f64) {
    runs.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
        (lo.min(r.tokens_per_second()), hi.max(r.tokens_per_second()))
    })
}

/// The sum and count of the server's sequences-per-step histogram.
async fn batch_histogram(client: &reqwest::Client, server: &Running) -> Result<(f64, f64)> {
    let text = client
        .get(server.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let value = |name: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .with_context(|| format!("/metrics lacks {name}"))?
            .parse()
            .with_context(|| format!("/metrics: {name} is not a number"))
    };
    Ok((
        value("aigrid_serve_generation_batch_sequences_sum")?,
        value("aigrid_serve_generation_batch_sequences_count")?,
    ))
}

async fn run(
    client: &reqwest::Client,
    server: &Running,
    clients: usize,
    args: &Args,
) -> Result<Run> {
    let url = server.url("/v1/chat/completions");
    let (sum0, count0) = batch_histogram(client, server).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.clone(), next.clone());
            let (requests, max_tokens) = (args.requests, args.max_tokens);
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return Ok::<_, anyhow::Error>(done);
                    }
                    done.push((
                        i,
                        serve::stream(&client, &url, &request(i, max_tokens)).await?,
                    ));
                }
            })
        })
        .collect();
    let mut streams: Vec<Option<Streamed>> = vec![None; args.requests];
    for task in tasks {
        for (i, s) in task.await?? {
            streams[i] = Some(s);
        }
    }
    let wall = start.elapsed();
    let (sum1, count1) = batch_histogram(client, server).await?;
    Ok(Run {
        wall,
        streams: streams
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .context("a request was not sent")?,
        mean_batch: (sum1 - sum0) / (count1 - count0).max(1.0),
    })
}

fn parameters(spec: &TinyLlama, vocab: usize) -> usize {
    let head = spec.hidden / spec.heads;
    let attention = 2 * spec.hidden * spec.hidden + 2 * spec.hidden * spec.kv_heads * head;
    let mlp = 3 * spec.hidden * spec.intermediate;
    spec.layers * (attention + mlp + 2 * spec.hidden) + 2 * vocab * spec.hidden + spec.hidden
}

fn model_vocab(dir: &Path) -> Result<usize> {
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    config["vocab_size"]
        .as_u64()
        .map(|v| v as usize)
        .context("config.json lacks vocab_size")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|c| *c > 0),
        "--concurrency needs positive counts"
    );
    ensure!(
        args.requests > 0 && args.max_tokens > 0 && args.reps > 0,
        "--requests, --max-tokens and --reps must be positive"
    );
    let load_start = load_average();
    let spec = TinyLlama {
        hidden: args.hidden,
        layers: args.layers,
        heads: args.heads,
        kv_heads: args.kv_heads,
        intermediate: args.intermediate,
        vocab: args.vocab,
        seed: args.seed,
        ..TinyLlama::default()
    };
    let work = tempfile::tempdir()?;
    let dir = work.path().join("tiny");
    write_tiny_llama(&dir, &spec)?;
    let vocab = model_vocab(&dir)?;
    let weights = std::fs::metadata(dir.join("model.safetensors"))?.len();

    let client = serve::client()?;
    let batched = serve::start(ModelSource::Dir(dir.clone()), Limits::default()).await?;
    let serial = serve::start(
        ModelSource::Dir(dir.clone()),
        Limits {
            max_running_sequences: 1,
            ..Limits::default()
        },
    )
    .await?;
    for server in [&batched, &serial] {
        server
            .wait_ready(&client, Duration::from_millis(20), Duration::from_secs(120))
            .await?;
        // Warm-up: connections and first allocations.
        let url = server.url("/v1/chat/completions");
        for i in 0..4 {
            serve::stream(&client, &url, &request(args.requests + i, args.max_tokens)).await?;
        }
    }

    // Every repetition runs every concurrency on both servers, interleaved; each
    // row then shows the run of median tokens/s.
    let mut runs: Vec<(Vec<Run>, Vec<Run>)> = args
        .concurrency
        .iter()
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    for rep in 0..args.reps {
        for (&clients, (ours, base)) in args.concurrency.iter().zip(&mut runs) {
            for (server, name, runs) in [
                (&batched, "batched", &mut *ours),
                (&serial, "one at a time", &mut *base),
            ] {
                let r = run(&client, server, clients, &args).await?;
                eprintln!(
                    "    rep {}/{} {clients} clients, {name}: {:.0} tokens/s in {:.2} s",
                    rep + 1,
                    args.reps,
                    r.tokens_per_second(),
                    r.wall.as_secs_f64()
                );
                runs.push(r);
            }
        }
    }
    let rows: Vec<Row> = args
        .concurrency
        .iter()
        .zip(runs)
        .map(|(&clients, (ours, base))| Row {
            clients,
            ours_range: range(&ours),
            base_range: range(&base),
            ours: median_run(ours),
            base: median_run(base),
        })
        .collect();
    batched.stop().await?;
    serial.stop().await?;
    let load_end = load_average();

    println!(
        "### (b) Generation: Llama with random weights (hidden {}, {} layers, {} heads / {} KV heads, MLP {}, vocabulary {vocab}: {:.1} M parameters, {:.1} MB F32) on CPU; {} chat requests per concurrency, max_tokens {}, temperature 0, streamed; median of {} runs, interleaved; {} CPUs, 1-min load average {load_start} at the start, {load_end} at the end",
        spec.hidden,
        spec.layers,
        spec.heads,
        spec.kv_heads,
        spec.intermediate,
        parameters(&spec, vocab) as f64 / 1e6,
        weights as f64 / 1e6,
        args.requests,
        args.max_tokens,
        args.reps,
        cpus(),
    );
    println!();
    println!("| clients | ours tokens/s (min-max) | ours TTFT p50 ms | ours TTFT p99 ms | ours mean batch | one-at-a-time tokens/s (min-max) | one-at-a-time TTFT p50 ms | one-at-a-time TTFT p99 ms | tokens/s ours / one-at-a-time | identical outputs |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for Row {
        clients,
        ours,
        base,
        ours_range,
        base_range,
    } in &rows
    {
        let identical = ours
            .streams
            .iter()
            .zip(&base.streams)
            .filter(|(a, b)| a.text == b.text && a.completion_tokens == b.completion_tokens)
            .count();
        println!(
            "| {clients} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.1} | {:.1} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.1} | {:.2}x | {identical}/{} |",
            ours.tokens_per_second(),
            ours_range.0,
            ours_range.1,
            ours.ttft_ms(50.0),
            ours.ttft_ms(99.0),
            ours.mean_batch,
            base.tokens_per_second(),
            base_range.0,
            base_range.1,
            base.ttft_ms(50.0),
            base.ttft_ms(99.0),
            ours.tokens_per_second() / base.tokens_per_second(),
            ours.streams.len(),
        );
    }
    println!();
    let (tokens, requests): (u64, usize) = rows
        .iter()
        .map(|r| (r.ours.tokens(), r.ours.streams.len()))
        .fold((0, 0), |(t, r), (a, b)| (t + a, r + b));
    let no_text: usize = rows
        .iter()
        .map(|r| 2 * r.ours.streams.len() - r.ours.ttfts().len() - r.base.ttfts().len())
        .sum();
    println!(
        "Ours: default limits (up to 64 sequences per step, 2048 tokens per step). One-at-a-time: the same server with `max_running_sequences: 1`. Both in one process with their clients, over loopback HTTP/1.1; TTFT is from sending the request to the first chunk with text, queueing included. Mean {:.1} completion tokens per request (some stop at an end token before max_tokens); {no_text} streams had no text chunk and count in tokens/s only. Mean batch: sequences per decode step, from the server's metrics.",
        tokens as f64 / requests as f64,
    );
    if let Some(row) = rows.iter().max_by_key(|r| r.clients) {
        let clients = row.clients;
        let ratio = row.ours.tokens_per_second() / row.base.tokens_per_second();
        println!(
            "Target: >= 6x the one-at-a-time tokens/s at {clients} clients: {ratio:.2}x, {}.",
            if ratio >= 6.0 { "met" } else { "MISSED" }
        );
    }
    println!();
    Ok(())
}
