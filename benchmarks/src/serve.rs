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

/// Binds a CPU server for `source` on a free loopback port and starts it: loading
/// begins at once, in the background, as in production.
pub async fn start(source: ModelSource, limits: Limits) -> Result<Running> {
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse()?,
        device: DeviceSpec::Cpu,
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
