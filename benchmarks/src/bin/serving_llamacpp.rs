//! Generation beside llama.cpp (`benchmarks/serving`, part d): aigrid's server and
//! llama.cpp's OpenAI server (`llama_cpp.server` of llama-cpp-python, built from its
//! source package by `run.sh`) serving the same GGUF file.
//!
//! The model is the Llama of part (b) (`aigrid_serving::tiny`, random weights, by
//! default 39 M parameters), written once as safetensors and converted by
//! `aigrid_serving::gguf_export` into one GGUF file per type (Q8_0 and F16): llama.cpp
//! reads the tokenizer from the file, ours reads the `tokenizer.json` beside it.
//!
//! Both get the same requests: `/v1/completions` with part (b)'s prompts as text
//! (each server tokenizes it, BOS first, as the model's tokenizer says), `max_tokens` 128,
//! temperature 0 (greedy), streamed; llama.cpp is also told `repeat_penalty` 1 (its
//! server's default is 1.1, which would change the tokens). For each concurrency C,
//! C closed-loop clients send `--requests` between them, each server in turn
//! (the idle one holds no CPU), `--reps` times interleaved, and each row shows the
//! run of median tokens/s. Both use `--threads` threads (default: every CPU).
//!
//! llama.cpp's server does not report usage while streaming, so each request's
//! completion tokens are taken from the same request sent unstreamed before the runs
//! (greedy decoding gives the same tokens every time; the streamed text is checked
//! against it). TTFT is from sending the request to the first chunk with text.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aigrid_benchmarks::measure::{cpus, load_average};
use aigrid_benchmarks::serve::{self, median_run, Run, MODEL_NAME};
use aigrid_serving::gguf_export::{write_gguf, GgufType};
use aigrid_serving::server::Limits;
use aigrid_serving::{DeviceSpec, ModelSource};
use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

// The `aigrid` binary, which serves models in production, allocates with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "serving_llamacpp",
    about = "Generation tokens/s and TTFT of aigrid and llama.cpp's server on the same GGUF file"
)]
struct Args {
    /// A Python with llama-cpp-python[server] installed.
    #[arg(long)]
    python: PathBuf,
    /// GGUF types, one table each.
    #[arg(long, value_delimiter = ',', default_value = "q8_0,f16")]
    types: Vec<GgufType>,
    #[command(flatten)]
    load: serve::Load,
    /// Threads llama.cpp computes with (default: every CPU; ours uses
    /// `RAYON_NUM_THREADS`, which `run.sh` sets to the same).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the model files here and keep them (default: a temporary directory).
    #[arg(long)]
    keep: Option<PathBuf>,
    #[command(flatten)]
    shape: serve::Shape,
}

/// llama.cpp's server in a child process, its output in a log; killed when dropped.
struct Peer {
    base: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Peer {
    async fn start(python: &Path, model: &Path, threads: usize) -> Result<Peer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let threads = threads.to_string();
        let log = model.with_extension("log");
        let child = tokio::process::Command::new(python)
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(model)
            .args(["--model_alias", MODEL_NAME, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--n_threads", &threads, "--n_threads_batch", &threads])
            // By default a new request interrupts the one being generated.
            .args(["--n_ctx", "2048", "--interrupt_requests", "false"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} -m llama_cpp.server", python.display()))?;
        Ok(Peer {
            base: format!("http://127.0.0.1:{port}"),
            child,
            log,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn wait_ready(&mut self, client: &reqwest::Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("llama_cpp.server exited ({status}):\n{}", tail.join("\n"));
            }
            if let Ok(r) = client.get(self.url("/v1/models")).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "llama_cpp.server was not up in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The completion request of request `i`, as each server is sent it.
fn request(prompts: &[String], i: usize, max_tokens: usize, peer: bool) -> Value {
    let mut body = json!({
        "model": MODEL_NAME,
        "prompt": prompts[i],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if peer {
        body["repeat_penalty"] = json!(1.0);
    }
    body
}

/// Each request's completion tokens and text, sent unstreamed.
async fn unstreamed(
    client: &reqwest::Client,
    url: &str,
    prompts: &[String],
    max_tokens: usize,
    peer: bool,
) -> Result<Vec<(u64, String)>> {
    let mut out = Vec::with_capacity(prompts.len());
    for i in 0..prompts.len() {
        let response = client
            .post(url)
            .json(&request(prompts, i, max_tokens, peer))
            .send()
            .await?;
        ensure!(
            response.status() == 200,
            "{url} answered {}",
            response.status()
        );
        let body: Value = response.json().await?;
        let tokens = body["usage"]["completion_tokens"]
            .as_u64()
            .with_context(|| format!("{url}: no usage in {body}"))?;
        let text = body["choices"][0]["text"].as_str().unwrap_or("").to_owned();
        out.push((tokens, text));
    }
    Ok(out)
}

struct Row {
    clients: usize,
    ours: (Run, (f64, f64)),
    peer: (Run, (f64, f64)),
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    args.load.check()?;
    // Ours computes on rayon's pool, which `run.sh` sizes as `aigrid serve` does.
    let threads = args.threads.unwrap_or_else(cpus);
    let load_start = load_average();
    let temp = tempfile::tempdir()?;
    let work = args.keep.clone().unwrap_or_else(|| temp.path().to_owned());
    let source = work.join("tiny");
    let model = args.shape.write(&source)?;
    let prompts: Vec<String> = (0..args.load.requests + 4).map(serve::prompt).collect();
    let client = serve::client()?;

    for &kind in &args.types {
        let dir = work.join(kind.to_string());
        std::fs::create_dir_all(&dir)?;
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            std::fs::copy(source.join(name), dir.join(name))?;
        }
        let gguf = dir.join("model.gguf");
        write_gguf(&source, &gguf, kind)?;
        let size = std::fs::metadata(&gguf)?.len();

        let ours = serve::start(
            ModelSource::Dir(dir.clone()),
            Limits::default(),
            DeviceSpec::Cpu,
        )
        .await?;
        ours.wait_ready(&client, Duration::from_millis(20), Duration::from_secs(120))
            .await?;
        let mut peer = Peer::start(&args.python, &gguf, threads).await?;
        peer.wait_ready(&client).await?;
        let ours_url = ours.url("/v1/completions");
        let peer_url = peer.url("/v1/completions");
        // Warm-up (connections, first allocations), then each request's tokens.
        for i in args.load.requests..args.load.requests + 4 {
            for (url, is_peer) in [(&ours_url, false), (&peer_url, true)] {
                serve::stream(
                    &client,
                    url,
                    &request(&prompts, i, args.load.max_tokens, is_peer),
                )
                .await?;
            }
        }
        let measured = &prompts[..args.load.requests];
        let peer_counts =
            unstreamed(&client, &peer_url, measured, args.load.max_tokens, true).await?;

        let mut runs: Vec<(Vec<Run>, Vec<Run>)> = args
            .load
            .concurrency
            .iter()
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        let mut unsteady = 0;
        for rep in 0..args.load.reps {
            for (&clients, (ours_runs, peer_runs)) in args.load.concurrency.iter().zip(&mut runs) {
                for (url, is_peer) in [(&ours_url, false), (&peer_url, true)] {
                    let (p, max) = (measured.to_vec(), args.load.max_tokens);
                    let mut run = serve::closed_loop(&client, url, clients, p.len(), move |i| {
                        request(&p, i, max, is_peer)
                    })
                    .await?;
                    let name = if is_peer { "llama.cpp" } else { "aigrid" };
                    if is_peer {
                        for (stream, (tokens, text)) in run.streams.iter_mut().zip(&peer_counts) {
                            // Streamed, it drops a character split across
                            // tokens that the whole text keeps: compared
                            // without the characters beyond ASCII.
                            let ascii = |s: &str| s.replace(|c: char| !c.is_ascii(), "");
                            unsteady += usize::from(ascii(&stream.text) != ascii(text));
                            stream.completion_tokens = *tokens;
                        }
                    }
                    eprintln!(
                        "    {kind} rep {}/{} {clients} clients, {name}: {:.0} tokens/s in {:.2} s",
                        rep + 1,
                        args.load.reps,
                        run.tokens_per_second(),
                        run.wall.as_secs_f64()
                    );
                    if is_peer {
                        peer_runs.push(run);
                    } else {
                        ours_runs.push(run);
                    }
                }
            }
        }
        drop(peer);
        ours.stop().await?;
        let rows: Vec<Row> = args
            .load
            .concurrency
            .iter()
            .zip(runs)
            .map(|(&clients, (o, p))| Row {
                clients,
                ours: median_run(o),
                peer: median_run(p),
            })
            .collect();
        print_table(&args, kind, size, &model, &rows, unsteady, &load_start);
    }
    Ok(())
}

fn print_table(
    args: &Args,
    kind: GgufType,
    size: u64,
    model: &serve::Written,
    rows: &[Row],
    unsteady: usize,
    load_start: &str,
) {
    println!(
        "### (d) Generation beside llama.cpp: one {kind} GGUF file ({:.1} MB; Llama with random weights, {}) on CPU, {} threads each; {} completion requests per concurrency, max_tokens {}, temperature 0, streamed; median of {} runs, interleaved; {} CPUs, 1-min load average {load_start} at the start, {} at the end",
        size as f64 / 1e6,
        model.describe(),
        args.threads.unwrap_or_else(cpus),
        args.load.requests,
        args.load.max_tokens,
        args.load.reps,
        cpus(),
        load_average(),
    );
    println!();
    println!("| clients | aigrid tokens/s (min-max) | aigrid TTFT p50 ms | aigrid TTFT p99 ms | llama.cpp tokens/s (min-max) | llama.cpp TTFT p50 ms | llama.cpp TTFT p99 ms | tokens/s aigrid / llama.cpp | identical outputs | same first 16 characters |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for Row {
        clients,
        ours: (ours, ours_range),
        peer: (peer, peer_range),
    } in rows
    {
        // llama.cpp's server drops the bytes of an incomplete character where ours
        // sends U+FFFD; the texts are compared without them.
        let plain = |s: &str| s.replace('\u{FFFD}', "");
        let pairs: Vec<(String, String)> = ours
            .streams
            .iter()
            .zip(&peer.streams)
            .map(|(a, b)| (plain(&a.text), plain(&b.text)))
            .collect();
        let same = pairs.iter().filter(|(a, b)| a == b).count();
        let start = pairs
            .iter()
            .filter(|(a, b)| a.chars().take(16).eq(b.chars().take(16)))
            .count();
        println!(
            "| {clients} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.1} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.1} | {:.2}x | {same}/{n} | {start}/{n} |",
            ours.tokens_per_second(),
            ours_range.0,
            ours_range.1,
            ours.ttft_ms(50.0),
            ours.ttft_ms(99.0),
            peer.tokens_per_second(),
            peer_range.0,
            peer_range.1,
            peer.ttft_ms(50.0),
            peer.ttft_ms(99.0),
            ours.tokens_per_second() / peer.tokens_per_second(),
            n = ours.streams.len(),
        );
    }
    println!();
    let cpu = aigrid_serving::kernels::Backend::for_device(&candle_core::Device::Cpu);
    let q8 = if aigrid_serving::dense::Dense::q8_packed_on(cpu) {
        "not here (its Q8_0 weights, widened to f32, multiply f32 activations: this CPU's widest instructions are AVX2)"
    } else {
        "too here (candle's quantized products)"
    };
    println!("aigrid: `Limits::default()` (up to 64 sequences per step), in this process with its clients; llama.cpp: `python -m llama_cpp.server`, one sequence at a time, in its own process; both over loopback HTTP/1.1. llama.cpp's completion tokens are those of the same request unstreamed; {unsteady} of its streamed outputs differed from their unstreamed text beyond characters split across tokens (which streaming drops). Identical outputs: requests whose text was the same from both servers; the two sum in their own orders, and for Q8_0 llama.cpp quantizes the activations to 8 bits, which aigrid does {q8}, so with random weights (near ties between tokens) greedy paths part after a few tokens, Q8_0 sooner than F16.");
    let first = rows.iter().min_by_key(|r| r.clients);
    let last = rows.iter().max_by_key(|r| r.clients);
    if let (Some(first), Some(last)) = (first, last) {
        let ratio = |r: &Row| r.ours.0.tokens_per_second() / r.peer.0.tokens_per_second();
        let ttft = last.ours.0.ttft_ms(99.0) <= last.peer.0.ttft_ms(99.0);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "Targets: >= 1x llama.cpp at {} client(s): {:.2}x, {}; >= 2x at {} clients: {:.2}x, {}; TTFT p99 no worse at {} clients: {}.",
            first.clients,
            ratio(first),
            verdict(ratio(first) >= 1.0),
            last.clients,
            ratio(last),
            verdict(ratio(last) >= 2.0),
            last.clients,
            verdict(ttft),
        );
    }
    println!();
}
