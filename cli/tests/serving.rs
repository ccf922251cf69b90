//! Serving end to end: `aigrid serve` on a model directory and on a pushed model read
//! from the dispersed store, and `aigrid up`'s demo model behind the `/v1` gateway,
//! called with reqwest and with the PyPI `openai` client.
//!
//! The models are tiny real Llamas with random weights written by
//! `aigrid_serving::tiny`: their words are gibberish, their shapes are OpenAI's.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use common::schema::Checker;
use common::*;
use serde_json::{json, Value};

/// The demo model `aigrid up` deploys, and its job.
const DEMO: &str = "tiny-llama";

/// The workspace's root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where `serving/fixtures/fetch.sh` puts what it fetches.
fn fixtures() -> PathBuf {
    match std::env::var_os("AIGRID_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => workspace().join("target").join("fixtures"),
    }
}

/// The fixtures venv's python, made by `fetch.sh` when it is missing or cannot
/// import `openai` (half built); a failing fetch fails the test with its output.
fn fixture_python() -> PathBuf {
    let python = fixtures().join("pyenv").join("bin").join("python");
    let has_openai = || {
        Command::new(&python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_openai() {
        return python;
    }
    let script = workspace()
        .join("serving")
        .join("fixtures")
        .join("fetch.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(workspace())
        .env("AIGRID_FIXTURES", fixtures())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        script.display(),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    assert!(
        has_openai(),
        "{} succeeded but {} cannot import openai",
        script.display(),
        python.display()
    );
    python
}

/// A tiny Llama written into `dir/name`.
fn tiny_model(dir: &Path, name: &str) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_llama(&model, &TinyLlama::default()).unwrap();
    model
}

/// Polls `GET url` every 250 ms until `pick` takes something from its status and
/// body, or fails with what `diagnose` says once `limit` has passed. The limit only
/// keeps a broken run from hanging: how fast a model server gets ready is measured
/// by `benchmarks/src/bin/serving_coldstart.rs`, not asserted here.
async fn poll<T>(
    http: &reqwest::Client,
    url: &str,
    limit: Duration,
    what: &str,
    pick: impl Fn(u16, &str) -> Option<T>,
    diagnose: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(resp) = http.get(url).send().await {
            let status = resp.status().as_u16();
            if let Ok(body) = resp.text().await {
                if let Some(v) = pick(status, &body) {
                    return v;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {what} after {limit:?}\n{}",
            diagnose()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `body` as JSON when `status` is a success.
fn ok_json(status: u16, body: &str) -> Option<Value> {
    (200..300)
        .contains(&status)
        .then(|| serde_json::from_str(body).ok())
        .flatten()
}

/// A `pick` for [`poll`] of `/v1/models`: whether it lists `id` (or not, with
/// `listed` false).
fn lists(id: &str, listed: bool) -> impl Fn(u16, &str) -> Option<()> + '_ {
    move |status, body| {
        let v = ok_json(status, body)?;
        let has = v["data"]
            .as_array()?
            .iter()
            .any(|m| m["id"].as_str() == Some(id));
        (has == listed).then_some(())
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Posts `body` to `url`, answering the status and the body's text.
async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, String) {
    let resp = http.post(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The JSON payloads of a server-sent event stream, which must end in `[DONE]`.
fn sse_events(body: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            return events;
        }
        events.push(parse(data));
    }
    panic!("the stream did not end in [DONE]: {body}");
}

/// Checks OpenAI's `usage` object; answers the completion tokens.
fn check_usage(v: &Value, max_tokens: u64) -> u64 {
    let usage = &v["usage"];
    let prompt = usage["prompt_tokens"]
        .as_u64()
        .expect("usage.prompt_tokens");
    let completion = usage["completion_tokens"]
        .as_u64()
        .expect("usage.completion_tokens");
    assert!(prompt > 0, "{v}");
    assert!(completion <= max_tokens, "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(prompt + completion),
        "{v}"
    );
    completion
}

/// A finish reason, `length` exactly when all the tokens asked for were made.
fn check_finish(reason: &Value, completion_tokens: Option<u64>, max_tokens: u64, v: &Value) {
    let reason = reason
        .as_str()
        .unwrap_or_else(|| panic!("no finish_reason: {v}"));
    assert!(["stop", "length"].contains(&reason), "{v}");
    if let Some(n) = completion_tokens {
        assert_eq!(reason == "length", n == max_tokens, "{v}");
    }
}

const MAX_TOKENS: u64 = 8;

/// A chat completion, whole and streamed; a completion, whole and streamed; and an
/// unknown model refused in OpenAI's shape: all from `base` (`http://HOST:PORT`).
async fn exercise(http: &reqwest::Client, base: &str, model: &str) {
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"}
    ]);
    let url = format!("{base}/v1/chat/completions");
    let body = json!({"model": model, "messages": messages, "max_tokens": MAX_TOKENS});
    let (status, text) = post(http, &url, &body).await;
    assert_eq!(status, 200, "{text}");
    let v = parse(&text);
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(
        v["id"].is_string() && v["created"].is_u64() && v["model"].is_string(),
        "{v}"
    );
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1, "{v}");
    assert_eq!(choices[0]["index"], 0, "{v}");
    assert_eq!(choices[0]["message"]["role"], "assistant", "{v}");
    assert!(choices[0]["message"]["content"].is_string(), "{v}");
    let n = check_usage(&v, MAX_TOKENS);
    check_finish(&choices[0]["finish_reason"], Some(n), MAX_TOKENS, &v);

    // Streamed: chunks of deltas, the last choice with its finish reason, then [DONE].
    let body =
        json!({"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "stream": true});
    let resp = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let events = sse_events(&resp.text().await.unwrap());
    assert!(!events.is_empty());
    let mut finish = None;
    for e in &events {
        assert_eq!(e["object"], "chat.completion.chunk", "{e}");
        assert!(e["id"].is_string(), "{e}");
        if let Some(choice) = e["choices"].as_array().and_then(|c| c.first()) {
            assert!(choice["delta"].is_object(), "{e}");
            if !choice["finish_reason"].is_null() {
                finish = Some((choice["finish_reason"].clone(), e.clone()));
            }
        }
    }
    let (reason, last) = finish.expect("a chunk with a finish_reason");
    check_finish(&reason, None, MAX_TOKENS, &last);

    // Completions, whole and streamed.
    let url = format!("{base}/v1/completions");
    let body = json!({"model": model, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS});
    let (status, text) = post(http, &url, &body).await;
    assert_eq!(status, 200, "{text}");
    let v = parse(&text);
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    let n = check_usage(&v, MAX_TOKENS);
    check_finish(&v["choices"][0]["finish_reason"], Some(n), MAX_TOKENS, &v);
    let body = json!({"model": model, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "stream": true});
    let resp = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    assert!(
        events
            .iter()
            .filter_map(|e| e["choices"].as_array().and_then(|c| c.first()))
            .any(|c| c["finish_reason"].is_string()),
        "{events:?}"
    );

    // A model nobody serves: 404 in OpenAI's error shape.
    let url = format!("{base}/v1/chat/completions");
    let body = json!({"model": "no-such-model", "messages": messages});
    let (status, text) = post(http, &url, &body).await;
    assert_eq!(status, 404, "{text}");
    let v = parse(&text);
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
}

/// A replica's answers through the gateway, whole and streamed, and the gateway's
/// own model listing, validate against the OpenAPI document `base` serves.
async fn answers_as_documented(http: &reqwest::Client, base: &str, model: &str) {
    let doc = get_json(http, &format!("{base}/api/v1/openapi.json"))
        .await
        .expect("the OpenAPI document is served");
    let mut checker = Checker::new(doc);
    let messages = json!([{"role": "user", "content": "hello"}]);
    let calls = [
        ("GET", "/v1/models".to_owned(), "/v1/models", None),
        (
            "GET",
            format!("/v1/models/{model}"),
            "/v1/models/{model}",
            None,
        ),
        (
            "POST",
            "/v1/chat/completions".to_owned(),
            "/v1/chat/completions",
            Some(json!({"model": model, "messages": messages, "max_tokens": 4})),
        ),
        (
            "POST",
            "/v1/chat/completions".to_owned(),
            "/v1/chat/completions",
            Some(
                json!({"model": model, "messages": messages, "max_tokens": 4, "stream": true,
                        "stream_options": {"include_usage": true}}),
            ),
        ),
        (
            "POST",
            "/v1/completions".to_owned(),
            "/v1/completions",
            Some(json!({"model": model, "prompt": ["a", "b"], "max_tokens": 4})),
        ),
        (
            "POST",
            "/v1/completions".to_owned(),
            "/v1/completions",
            Some(json!({"model": model, "prompt": "a", "max_tokens": 4, "stream": true})),
        ),
    ];
    for (method, target, path, body) in calls {
        let mut req = http.request(method.parse().unwrap(), format!("{base}{target}"));
        if let Some(body) = &body {
            req = req.json(body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(
            status,
            200,
            "{method} {target}: {}",
            String::from_utf8_lossy(&bytes)
        );
        if let Err(e) = checker.check(method, path, status, &content_type, &bytes) {
            panic!("{method} {target} {body:?}: {e}");
        }
    }
}

/// The `id`s `GET {base}/v1/models` lists, when it answers.
async fn model_ids(http: &reqwest::Client, base: &str) -> Option<Vec<String>> {
    let v = get_json(http, &format!("{base}/v1/models")).await?;
    Some(
        v["data"]
            .as_array()?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// `path` opened for appending, made when missing.
fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// A child process, killed when dropped, its stderr in `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// SIGTERM; it must exit cleanly within `limit`.
    fn terminate(mut self, limit: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit {status}: {}", self.log_tail());
                return;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `aigrid serve`.
struct ServeProc {
    proc: Proc,
    /// `http://HOST:PORT`, from the line it printed.
    base: String,
}

impl ServeProc {
    /// Starts `aigrid serve ARGS --listen 127.0.0.1:0` and reads where it serves.
    fn start(args: &[&str], log: PathBuf) -> ServeProc {
        let all = [
            &["serve"],
            args,
            &["--listen", "127.0.0.1:0", "--device", "cpu"],
        ]
        .concat();
        let mut child = spawn_piped(&all, &log);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "no `serving ... on http://...` line: {line:?}\n{}",
                    tail(&log, 20)
                )
            })
            .to_owned();
        assert!(line.starts_with("serving "), "{line}");
        assert!(line.trim_end().ends_with("(device cpu)"), "{line}");
        ServeProc {
            proc: Proc { child, log },
            base,
        }
    }

    async fn wait_ready(&self, http: &reqwest::Client) {
        poll(
            http,
            &format!("{}/ready", self.base),
            Duration::from_secs(120),
            "a ready model server",
            |status, _| (status == 200).then_some(()),
            || self.proc.log_tail(),
        )
        .await;
    }

    fn terminate(self) {
        self.proc.terminate(Duration::from_secs(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_a_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "tiny");
    let http = client();

    // Bad input first: one line, non-zero exit.
    let missing = dir.path().join("no-such-model");
    let out = aigrid(&["serve", "--model", missing.to_str().unwrap()]);
    assert_one_line_failure(&out, "no such directory");
    let file = model.join("config.json");
    let out = aigrid(&["serve", "--model", file.to_str().unwrap()]);
    assert_one_line_failure(&out, "not a directory");
    let serve_with = |flag: &str, value: &str| {
        aigrid(&["serve", "--model", model.to_str().unwrap(), flag, value])
    };
    let out = serve_with("--max-body-bytes", "0");
    assert_one_line_failure(&out, "--max-body-bytes");
    let out = serve_with("--matmul-precision", "fp8");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fp8") && err.contains("f32 or bf16"), "{err}");
    if !aigrid_serving::kernels::cpu::amx::available() {
        let out = serve_with("--matmul-precision", "bf16");
        assert_one_line_failure(&out, "AMX");
    }

    let server = ServeProc::start(
        &["--model", model.to_str().unwrap()],
        dir.path().join("serve.log"),
    );
    // Alive at once, ready once loaded and warmed.
    let health = http
        .get(format!("{}/health", server.base))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
    server.wait_ready(&http).await;
    // Named after its directory.
    assert_eq!(model_ids(&http, &server.base).await.unwrap(), ["tiny"]);
    exercise(&http, &server.base, "tiny").await;
    server.terminate();
}

/// `aigrid up` without the demo model, with `--data-dir` under `root`.
struct UpProc {
    proc: Proc,
    base: String,
    /// Its banner, up to `Press Ctrl-C`.
    banner: String,
    /// Kept open: `up` writes nothing more, and must not see a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl UpProc {
    /// Starts it on `port`, or on a free one.
    fn start(root: &Path, port: Option<u16>, extra: &[&str]) -> UpProc {
        let port = port.unwrap_or_else(|| free_ports(1)[0]);
        let listen = format!("127.0.0.1:{port}");
        let log = root.join("up.log");
        let mut child = Command::new(aigrid_bin())
            .args(["up", "--listen", &listen, "--data-dir"])
            .arg(root.join("data"))
            .args(extra)
            .env("AIGRID_LOG", "info")
            .env_remove("AIGRID_STORE")
            .stdout(Stdio::piped())
            .stderr(append(&log))
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // An `up` that never finishes its banner is killed after a while, which
        // ends the read below.
        let printed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let (printed, pid) = (printed.clone(), child.id().to_string());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !printed.load(std::sync::atomic::Ordering::SeqCst) {
                    if Instant::now() >= deadline {
                        let _ = Command::new("kill").args(["-KILL", &pid]).status();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let mut banner = String::new();
        while !banner.contains("Press Ctrl-C") {
            if stdout.read_line(&mut banner).unwrap() == 0 {
                let _ = child.kill();
                panic!("up stopped: {banner}\n{}", tail(&log, 20));
            }
        }
        printed.store(true, std::sync::atomic::Ordering::SeqCst);
        watchdog.join().unwrap();
        UpProc {
            proc: Proc { child, log },
            base: format!("http://{listen}"),
            banner,
            _stdout: stdout,
        }
    }

    fn log_tail(&self) -> String {
        self.proc.log_tail()
    }

    /// Waits until `/v1/models` on this up's gateway lists `model` (with `listed`
    /// false: until it no longer does), within `limit`; `job` serves it.
    async fn wait_listed(
        &self,
        http: &reqwest::Client,
        (model, job): (&str, &str),
        listed: bool,
        limit: Duration,
    ) {
        let what = if listed {
            format!("{model} in /v1/models")
        } else {
            format!("{model} gone from /v1/models")
        };
        poll(
            http,
            &format!("{}/v1/models", self.base),
            limit,
            &what,
            lists(model, listed),
            || self.report(job),
        )
        .await;
    }

    /// Waits for the demo model's job and checks that it serves `digest` with the
    /// `model-server` driver.
    async fn demo_job(&self, http: &reqwest::Client, digest: &str) {
        let job = poll(
            http,
            &format!("{}/api/v1/jobs/{DEMO}", self.base),
            Duration::from_secs(60),
            "the demo job",
            ok_json,
            || self.report(DEMO),
        )
        .await;
        let task = &job["spec"]["groups"][0]["task"];
        assert_eq!(task["driver"], "model-server", "{job}");
        assert_eq!(task["model"], digest, "{job}");
    }

    /// Removes the demo model's job and waits until the gateway no longer lists it.
    async fn remove_demo(&self, http: &reqwest::Client) {
        assert_success(&aigrid(&["job", "rm", DEMO, "--server", &self.base]));
        self.wait_listed(http, (DEMO, DEMO), false, Duration::from_secs(30))
            .await;
    }

    /// What the control plane says about `job`, and the end of this up's log.
    fn report(&self, job: &str) -> String {
        format!(
            "{}\n--- up ---\n{}",
            job_report(&self.base, job),
            self.log_tail()
        )
    }

    fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn terminate(self) {
        self.proc.terminate(Duration::from_secs(30));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_a_pushed_model_from_the_store() {
    let root = tempfile::tempdir().unwrap();
    let up = UpProc::start(root.path(), None, &["--no-demo-model"]);
    assert!(!up.banner.contains(DEMO), "{}", up.banner);
    let http = client();
    wait_leader(
        &http,
        std::slice::from_ref(&up.base),
        Duration::from_secs(20),
    )
    .await;
    let key = root.path().join("publisher.key");
    let model = tiny_model(root.path(), "model");
    let digest = push(&up.base, &key, &model, "pushed-llama");

    // Refused in one line: a digest nobody registered, and something that is
    // neither a directory nor a digest.
    let unknown = "0".repeat(64);
    let out = aigrid_as_publisher(&up.base, &key, &["serve", "--model", &unknown]);
    assert_one_line_failure(&out, "");
    let out = aigrid_as_publisher(&up.base, &key, &["serve", "--model", "not/a/model"]);
    assert_one_line_failure(&out, "not a model digest");

    // Served by a digest prefix, under the name it was pushed with and its digest;
    // its chunks land in the cache as they are verified.
    let cache = root.path().join("cache");
    let server = ServeProc::start(
        &[
            "--model",
            &digest[..12],
            "--server",
            &up.base,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-gib",
            "1",
        ],
        root.path().join("serve.log"),
    );
    server.wait_ready(&http).await;
    let ids = model_ids(&http, &server.base).await.unwrap();
    assert_eq!(
        ids.first().map(String::as_str),
        Some("pushed-llama"),
        "{ids:?}"
    );
    exercise(&http, &server.base, "pushed-llama").await;
    let body = json!({"model": digest, "prompt": "hi", "max_tokens": 2});
    let (status, text) = post(&http, &format!("{}/v1/completions", server.base), &body).await;
    assert_eq!(status, 200, "by digest: {text}");
    let cached = std::fs::read_dir(cache.join("chunks")).unwrap().count();
    assert!(cached > 0, "nothing cached in {}", cache.display());
    server.terminate();
    up.terminate();
}

/// Pushes the model in `dir` as `name`, signed with `key`; answers its digest.
fn push(server: &str, key: &Path, dir: &Path, name: &str) -> String {
    let dir = dir.to_str().unwrap();
    let args = ["model", "push", dir, "--name", name, "--json"];
    let pushed = json_output(&aigrid_as_publisher(server, key, &args));
    pushed["model"]["digest"].as_str().unwrap().to_owned()
}

/// Submits a `model-server` job for `digest` named `name`.
fn submit_model_job(server: &str, root: &Path, name: &str, digest: &str, cpu_millis: u64) {
    let spec = json!({
        "name": name,
        "kind": "service",
        "groups": [{
            "name": "server",
            "count": 1,
            "resources": {"cpu_millis": cpu_millis, "memory_mib": 1024},
            "task": {"driver": "model-server", "model": digest},
        }],
    });
    let file = root.join(format!("{name}.json"));
    std::fs::write(&file, spec.to_string()).unwrap();
    let out = aigrid(&["job", "submit", file.to_str().unwrap(), "--server", server]);
    assert_success(&out);
}

/// What the control plane says about a job, for failure messages.
fn job_report(server: &str, job: &str) -> String {
    let out = aigrid(&["job", "status", job, "--server", server]);
    let mut report = format!("{}{}", stdout(&out), stderr(&out));
    let status = aigrid(&["job", "status", job, "--server", server, "--json"]);
    if let Ok(v) = serde_json::from_slice::<Value>(&status.stdout) {
        for alloc in v["allocations"].as_array().into_iter().flatten() {
            if let Some(id) = alloc["id"].as_str() {
                for stream in [&[][..], &["--stderr"][..]] {
                    let mut args = vec!["alloc", "logs", id, "--server", server];
                    args.extend_from_slice(stream);
                    let logs = aigrid(&args);
                    let text = stdout(&logs);
                    let lines: Vec<&str> = text.lines().collect();
                    report.push_str(&format!(
                        "\n--- alloc {id} {stream:?} ---\n{}",
                        lines[lines.len().saturating_sub(20)..].join("\n")
                    ));
                }
            }
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_its_demo_model_through_the_gateway_and_the_openai_client() {
    let root = tempfile::tempdir().unwrap();
    let up = UpProc::start(root.path(), None, &[]);
    let base = up.base.clone();
    // Whatever the test leaves running goes with it: the supervisors (under its data
    // dir) and the model servers (told this up's address, by flag or variable).
    let _reapers = up_reapers(root.path(), &base, &base);
    let curl = format!("try          curl -s {base}/v1/chat/completions");
    assert!(up.banner.contains(&curl), "{}", up.banner);
    assert!(up.banner.contains("random"), "{}", up.banner);
    let http = client();

    // The demo model is pushed and its job submitted in the background.
    let digest = poll(
        &http,
        &format!("{base}/api/v1/models?name={DEMO}"),
        Duration::from_secs(120),
        "tiny-llama registered",
        |status, body| {
            let v = ok_json(status, body)?;
            v[0]["digest"].as_str().map(str::to_owned)
        },
        || up.report(DEMO),
    )
    .await;
    up.demo_job(&http, &digest).await;

    // Through the gateway on the up's own port, once a replica is ready.
    up.wait_listed(&http, (DEMO, DEMO), true, Duration::from_secs(180))
        .await;
    exercise(&http, &base, DEMO).await;
    answers_as_documented(&http, &base, DEMO).await;

    // The PyPI openai client against the same gateway; embeddings too when the
    // fixtures hold a BERT model.
    let python = fixture_python();
    let mut script_args = vec![format!("{base}/v1"), DEMO.to_owned()];
    let minilm = fixtures().join("all-minilm-l6-v2");
    if minilm.is_dir() {
        let key = root.path().join("publisher.key");
        let digest = push(&base, &key, &minilm, "all-minilm-l6-v2");
        submit_model_job(&base, root.path(), "minilm", &digest, 500);
        up.wait_listed(
            &http,
            ("all-minilm-l6-v2", "minilm"),
            true,
            Duration::from_secs(240),
        )
        .await;
        script_args.push("all-minilm-l6-v2".to_owned());
    } else {
        eprintln!(
            "{} is missing: embeddings through the openai client not tried",
            minilm.display()
        );
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new(&python)
        .arg(script)
        .args(&script_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("openai client: ok"),
        "{}",
        stdout(&out)
    );

    // Stop the model servers before the up: supervised work outlives its agent.
    if minilm.is_dir() {
        assert_success(&aigrid(&["job", "rm", "minilm", "--server", &base]));
    }
    up.remove_demo(&http).await;
    let port = up.port();
    up.terminate();

    // A second start on the same data dir writes nothing new: the model directory
    // is kept, the push finds every chunk stored and registers the same digest,
    // and the job (removed above) comes back for it.
    let demo_dir = root.path().join("data").join("demo-model").join(DEMO);
    let written = std::fs::metadata(demo_dir.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    let up = UpProc::start(root.path(), Some(port), &[]);
    up.demo_job(&http, &digest).await;
    let registered = get_json(&http, &format!("{base}/api/v1/models?name={DEMO}"))
        .await
        .unwrap();
    assert_eq!(registered.as_array().unwrap().len(), 1, "{registered}");
    let modified = std::fs::metadata(demo_dir.join("config.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(written, modified, "the demo model was written again");
    up.wait_listed(&http, (DEMO, DEMO), true, Duration::from_secs(180))
        .await;
    up.remove_demo(&http).await;
    up.terminate();
}
