//! Calling a `/v1` API as clients do and checking its answers: tiny real models to
//! serve, the fixtures `serving/fixtures/fetch.sh` fetches, polling with deadlines,
//! OpenAI-shaped answers (whole and streamed) and their conformance to the served
//! OpenAPI document.

use super::Sign;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use serde_json::{json, Value};

use super::schema::Checker;
use super::{get_json, stderr, stdout};

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where `serving/fixtures/fetch.sh` puts what it fetches.
pub fn fixtures() -> PathBuf {
    match std::env::var_os("AIGRID_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => workspace().join("target").join("fixtures"),
    }
}

/// The fixtures venv's python, made by `fetch.sh` when it is missing or cannot
/// import `openai` (half built); a failing fetch fails the test with its output.
pub fn fixture_python() -> PathBuf {
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
pub fn tiny_model(dir: &Path, name: &str) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_llama(&model, &TinyLlama::default()).unwrap();
    model
}

/// Polls `GET url` every 250 ms until `pick` takes something from its status and
/// body, or fails with what `diagnose` says once `limit` has passed. The limit only
/// keeps a broken run from hanging: how fast a model server gets ready is measured
/// by `benchmarks/src/bin/serving_coldstart.rs`, not asserted here.
pub async fn poll<T>(
    http: &reqwest::Client,
    url: &str,
    limit: Duration,
    what: &str,
    pick: impl Fn(u16, &str) -> Option<T>,
    diagnose: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(resp) = http.get(url).signed().send().await {
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
pub fn ok_json(status: u16, body: &str) -> Option<Value> {
    (200..300)
        .contains(&status)
        .then(|| serde_json::from_str(body).ok())
        .flatten()
}

/// A `pick` for [`poll`] of `/v1/models`: whether it lists `id` (or not, with
/// `listed` false).
pub fn lists(id: &str, listed: bool) -> impl Fn(u16, &str) -> Option<()> + '_ {
    move |status, body| {
        let v = ok_json(status, body)?;
        let has = v["data"]
            .as_array()?
            .iter()
            .any(|m| m["id"].as_str() == Some(id));
        (has == listed).then_some(())
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Posts `body` to `url`, answering the status and the body's text.
pub async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, String) {
    let resp = http.post(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

pub fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The JSON payloads of a server-sent event stream, which must end in `[DONE]`.
pub fn sse_events(body: &str) -> Vec<Value> {
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
pub fn check_usage(v: &Value, max_tokens: u64) -> u64 {
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
pub fn check_finish(reason: &Value, completion_tokens: Option<u64>, max_tokens: u64, v: &Value) {
    let reason = reason
        .as_str()
        .unwrap_or_else(|| panic!("no finish_reason: {v}"));
    assert!(["stop", "length"].contains(&reason), "{v}");
    if let Some(n) = completion_tokens {
        assert_eq!(reason == "length", n == max_tokens, "{v}");
    }
}

pub const MAX_TOKENS: u64 = 8;

/// A chat completion, whole and streamed; a completion, whole and streamed; and an
/// unknown model refused in OpenAI's shape: all from `base` (`http://HOST:PORT`).
pub async fn exercise(http: &reqwest::Client, base: &str, model: &str) {
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
pub async fn answers_as_documented(http: &reqwest::Client, base: &str, model: &str) {
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
pub async fn model_ids(http: &reqwest::Client, base: &str) -> Option<Vec<String>> {
    let v = get_json(http, &format!("{base}/v1/models")).await?;
    Some(
        v["data"]
            .as_array()?
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect(),
    )
}
