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

use std::time::Duration;

use aigrid_benchmarks::measure::{cpus, load_average};
use aigrid_benchmarks::serve::{self, median_run, Run, Running, MODEL_NAME};
use aigrid_serving::server::Limits;
use aigrid_serving::{DeviceSpec, ModelSource};
use anyhow::{Context, Result};
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
    #[command(flatten)]
    load: serve::Load,
    #[command(flatten)]
    shape: serve::Shape,
    /// Where both servers run the model: cpu or cuda:N (a build with `--features
    /// cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

/// The chat request of request `i`.
fn request(i: usize, max_tokens: usize) -> Value {
    json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": serve::prompt(i)}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// One concurrency's line of the table: the median runs and the tokens/s ranges.
struct Row {
    clients: usize,
    ours: Run,
    base: Run,
    ours_range: (f64, f64),
    base_range: (f64, f64),
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
    let max_tokens = args.load.max_tokens;
    let mut run = serve::closed_loop(client, &url, clients, args.load.requests, move |i| {
        request(i, max_tokens)
    })
    .await?;
    let (sum1, count1) = batch_histogram(client, server).await?;
    run.mean_batch = (sum1 - sum0) / (count1 - count0).max(1.0);
    Ok(run)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    args.load.check()?;
    let load_start = load_average();
    let work = tempfile::tempdir()?;
    let dir = work.path().join("tiny");
    let model = args.shape.write(&dir)?;
    let weights = std::fs::metadata(dir.join("model.safetensors"))?.len();

    let client = serve::client()?;
    let batched = serve::start(
        ModelSource::Dir(dir.clone()),
        Limits::default(),
        args.device,
    )
    .await?;
    let serial = serve::start(
        ModelSource::Dir(dir.clone()),
        Limits {
            max_running_sequences: 1,
            ..Limits::default()
        },
        args.device,
    )
    .await?;
    for server in [&batched, &serial] {
        server
            .wait_ready(&client, Duration::from_millis(20), Duration::from_secs(120))
            .await?;
        // Warm-up: connections and first allocations.
        let url = server.url("/v1/chat/completions");
        for i in 0..4 {
            serve::stream(
                &client,
                &url,
                &request(args.load.requests + i, args.load.max_tokens),
            )
            .await?;
        }
    }

    // Every repetition runs every concurrency on both servers, interleaved; each
    // row then shows the run of median tokens/s.
    let mut runs: Vec<(Vec<Run>, Vec<Run>)> = args
        .load
        .concurrency
        .iter()
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    for rep in 0..args.load.reps {
        for (&clients, (ours, base)) in args.load.concurrency.iter().zip(&mut runs) {
            for (server, name, runs) in [
                (&batched, "batched", &mut *ours),
                (&serial, "one at a time", &mut *base),
            ] {
                let r = run(&client, server, clients, &args).await?;
                eprintln!(
                    "    rep {}/{} {clients} clients, {name}: {:.0} tokens/s in {:.2} s",
                    rep + 1,
                    args.load.reps,
                    r.tokens_per_second(),
                    r.wall.as_secs_f64()
                );
                runs.push(r);
            }
        }
    }
    let rows: Vec<Row> = args
        .load
        .concurrency
        .iter()
        .zip(runs)
        .map(|(&clients, (ours, base))| {
            let ((ours, ours_range), (base, base_range)) = (median_run(ours), median_run(base));
            Row {
                clients,
                ours,
                base,
                ours_range,
                base_range,
            }
        })
        .collect();
    batched.stop().await?;
    serial.stop().await?;
    let load_end = load_average();

    println!(
        "### (b) Generation: Llama with random weights ({}, {:.1} MB F32) on {}; {} chat requests per concurrency, max_tokens {}, temperature 0, streamed; median of {} runs, interleaved; {} CPUs, 1-min load average {load_start} at the start, {load_end} at the end",
        model.describe(),
        weights as f64 / 1e6,
        serve::device_words(args.device),
        args.load.requests,
        args.load.max_tokens,
        args.load.reps,
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
        let identical = ours.identical(base);
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
