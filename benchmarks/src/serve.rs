//! The serving benchmarks' two sides: a model server run in-process on
//! `127.0.0.1:0` exactly as `aigrid serve` runs it (`Server::bind`, then `run` on
//! the runtime), and a client that streams a generation and notes when its first
//! token arrived.

use std::time::{Duration, Instant};

use aigrid_serving::server::{Limits, ServeConfig, Server};
use aigrid_serving::{DeviceSpec, ModelSource};
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The name clients give as `model`.
pub const MODEL_NAME: &str = "m";

/// An HTTP client as the benchmarks use it: a pool of keep-alive connections with
/// Nagle off, so a small request is not held back waiting for an ACK.
pub fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()?)
}

/// A model server running on this process's runtime; stopped when dropped.
pub struct Running {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), aigrid_serving::ServingError>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds a server for `source` on `device` on a free loopback port and starts it:
/// loading begins at once, in the background, as in production.
pub async fn start(source: ModelSource, limits: Limits, device: DeviceSpec) -> Result<Running> {
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse()?,
        device,
        precision: None,
        names: vec![MODEL_NAME.to_owned()],
        limits,
    };
    let server = Server::bind(config, source).await?;
    let base = format!("http://{}", server.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        base,
        stop: Some(stop),
        task: Some(task),
    })
}

/// `device` in a table's title: `CPU`, or the GPU's name from `nvidia-smi` with its
/// ordinal.
pub fn device_words(device: DeviceSpec) -> String {
    let DeviceSpec::Cuda(n) = device else {
        return "CPU".to_owned();
    };
    let name = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            "-i",
            &n.to_string(),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|name| !name.is_empty());
    match name {
        Some(name) => format!("{name} (cuda:{n})"),
        None => format!("cuda:{n}"),
    }
}

impl Running {
    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `/ready` every `every` until it answers 200; fails with `/status` when
    /// loading failed or `within` passed.
    pub async fn wait_ready(
        &self,
        client: &reqwest::Client,
        every: Duration,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if client.get(self.url("/ready")).send().await?.status() == 200 {
                return Ok(());
            }
            let status: Value = client.get(self.url("/status")).send().await?.json().await?;
            if status["phase"] == "failed" || Instant::now() > deadline {
                bail!("the server did not become ready: {status}");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Stops the server and waits until it has.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

/// One streamed generation, timed by the client.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// When the request was sent.
    pub sent: Instant,
    /// When the first chunk with text arrived (none if no text came).
    pub first_token: Option<Instant>,
    /// When `[DONE]` arrived.
    pub done: Instant,
    /// Completion tokens, from the final usage chunk.
    pub completion_tokens: u64,
    /// The generated text.
    pub text: String,
}

impl Streamed {
    /// Time to first token.
    pub fn ttft(&self) -> Option<Duration> {
        self.first_token.map(|t| t - self.sent)
    }
}

/// POSTs a streaming completion or chat request (`"stream": true` and
/// `stream_options.include_usage` are set here) and reads its server-sent events as
/// they come.
pub async fn stream(client: &reqwest::Client, url: &str, body: &Value) -> Result<Streamed> {
    let mut body = body.clone();
    body["stream"] = Value::Bool(true);
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    let sent = Instant::now();
    let response = client.post(url).json(&body).send().await?;
    let status = response.status();
    if status != 200 {
        let text = response.text().await.unwrap_or_default();
        bail!("{url} answered {status}: {text}");
    }
    let mut out = Streamed {
        sent,
        first_token: None,
        done: sent,
        completion_tokens: 0,
        text: String::new(),
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut bytes = response.bytes_stream();
    while let Some(piece) = bytes.next().await {
        pending.extend_from_slice(&piece?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = std::str::from_utf8(&line).context("an event that is not UTF-8")?;
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                out.done = Instant::now();
                return Ok(out);
            }
            let chunk: Value = serde_json::from_str(data)
                .with_context(|| format!("an event that is not JSON: {data}"))?;
            if let Some(error) = chunk.get("error") {
                bail!("{url} streamed an error: {error}");
            }
            let choice = &chunk["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .unwrap_or("");
            if !text.is_empty() {
                out.first_token.get_or_insert_with(Instant::now);
                out.text.push_str(text);
            }
            if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                out.completion_tokens = tokens;
            }
        }
    }
    bail!("{url}: the stream ended without [DONE]")
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

/// The prompt of request `i`: its own text, of varying length.
pub fn prompt(i: usize) -> String {
    let topic = |k: usize| TOPICS[(i * 7 + k * 3) % TOPICS.len()];
    let mut prompt = format!("Request {i}: tell me about {} and {}.", topic(0), topic(1));
    for k in 0..i % 4 {
        prompt.push_str(&format!(" Also mention {}.", topic(k + 2)));
    }
    prompt
}

/// One closed-loop run: every request's stream and the wall time of them all.
pub struct Run {
    /// From the first request sent to the last `[DONE]`.
    pub wall: Duration,
    /// Request `i`'s stream, at index `i`.
    pub streams: Vec<Streamed>,
    /// Mean sequences per decode step, when the server reports it.
    pub mean_batch: f64,
}

impl Run {
    /// Completion tokens of every stream.
    pub fn tokens(&self) -> u64 {
        self.streams.iter().map(|s| s.completion_tokens).sum()
    }

    /// Completion tokens over the wall time.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens() as f64 / self.wall.as_secs_f64()
    }

    /// The time to first token of every stream that had text.
    pub fn ttfts(&self) -> Vec<Duration> {
        self.streams.iter().filter_map(Streamed::ttft).collect()
    }

    /// The `p`-th percentile time to first token, in milliseconds.
    pub fn ttft_ms(&self, p: f64) -> f64 {
        crate::measure::percentile(&self.ttfts(), p).as_secs_f64() * 1e3
    }

    /// How many streams produced the same text as `other`'s stream of the same
    /// request.
    pub fn identical(&self, other: &Run) -> usize {
        self.streams
            .iter()
            .zip(&other.streams)
            .filter(|(a, b)| a.text == b.text && a.completion_tokens == b.completion_tokens)
            .count()
    }
}

/// The run of median tokens/s (the lower one of an even count), and the lowest and
/// highest tokens/s of all.
pub fn median_run(mut runs: Vec<Run>) -> (Run, (f64, f64)) {
    let range = runs.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
        (lo.min(r.tokens_per_second()), hi.max(r.tokens_per_second()))
    });
    runs.sort_by(|a, b| a.tokens_per_second().total_cmp(&b.tokens_per_second()));
    (runs.swap_remove((runs.len() - 1) / 2), range)
}

/// `clients` closed-loop clients streaming `requests` requests between them to
/// `url`, request `i`'s body being `body(i)`.
pub async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    requests: usize,
    body: impl Fn(usize) -> Value + Send + Sync + 'static,
) -> Result<Run> {
    let body = std::sync::Arc::new(body);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, next, body) =
                (client.clone(), url.to_owned(), next.clone(), body.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= requests {
                        return Ok::<_, anyhow::Error>(done);
                    }
                    done.push((i, stream(&client, &url, &body(i)).await?));
                }
            })
        })
        .collect();
    let mut streams: Vec<Option<Streamed>> = vec![None; requests];
    for task in tasks {
        for (i, s) in task.await?? {
            streams[i] = Some(s);
        }
    }
    Ok(Run {
        wall: start.elapsed(),
        streams: streams
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .context("a request was not sent")?,
        mean_batch: f64::NAN,
    })
}

/// The shape of the benchmarks' Llama (random weights, the tiny model's tokenizer):
/// by default big enough that decoding one sequence is bound by reading the
/// weights, as it is for real models.
#[derive(clap::Args, Debug, Clone)]
pub struct Shape {
    /// Hidden size of the Llama.
    #[arg(long, default_value_t = 768)]
    pub hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 6)]
    pub kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 2048)]
    pub intermediate: usize,
    /// Target vocabulary size.
    #[arg(long, default_value_t = 512)]
    pub vocab: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A tiny Llama written to a directory, with what the tables say of it.
pub struct Written {
    /// The spec it was written from.
    pub spec: aigrid_serving::tiny::TinyLlama,
    /// Its real vocabulary size (config.json's).
    pub vocab: usize,
}

impl Written {
    /// Parameters of the model.
    pub fn parameters(&self) -> usize {
        let s = &self.spec;
        let head = s.hidden / s.heads;
        let attention = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head;
        let mlp = 3 * s.hidden * s.intermediate;
        s.layers * (attention + mlp + 2 * s.hidden) + 2 * self.vocab * s.hidden + s.hidden
    }

    /// "hidden 768, 6 layers, 12 heads / 6 KV heads, MLP 2048, vocabulary 512: 39.0 M
    /// parameters".
    pub fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "hidden {}, {} layers, {} heads / {} KV heads, MLP {}, vocabulary {}: {:.1} M parameters",
            s.hidden,
            s.layers,
            s.heads,
            s.kv_heads,
            s.intermediate,
            self.vocab,
            self.parameters() as f64 / 1e6
        )
    }
}

impl Shape {
    /// Writes the model to `dir` (Hugging Face layout, F32 safetensors).
    pub fn write(&self, dir: &std::path::Path) -> Result<Written> {
        let spec = aigrid_serving::tiny::TinyLlama {
            hidden: self.hidden,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            intermediate: self.intermediate,
            vocab: self.vocab,
            seed: self.seed,
            ..Default::default()
        };
        aigrid_serving::tiny::write_tiny_llama(dir, &spec)?;
        let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
        let vocab = config["vocab_size"]
            .as_u64()
            .map(|v| v as usize)
            .context("config.json lacks vocab_size")?;
        Ok(Written { spec, vocab })
    }
}

/// The load of a generation benchmark: closed-loop clients sending requests.
#[derive(clap::Args, Debug, Clone)]
pub struct Load {
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests sent at each concurrency (spread over the clients).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Repetitions of every run (interleaved); each row shows the median by tokens/s.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

impl Load {
    /// Fails on a load that measures nothing.
    pub fn check(&self) -> Result<()> {
        anyhow::ensure!(
            !self.concurrency.is_empty() && self.concurrency.iter().all(|c| *c > 0),
            "--concurrency needs positive counts"
        );
        anyhow::ensure!(
            self.requests > 0 && self.max_tokens > 0 && self.reps > 0,
            "--requests, --max-tokens and --reps must be positive"
        );
        Ok(())
    }
}
