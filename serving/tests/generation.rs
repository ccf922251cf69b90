//! Text generation through the HTTP API against a direct candle forward loop, over a
//! tiny Llama made in the test (random weights, a trained byte-level BPE tokenizer).

// Unsafe: memory-maps a safetensors file the test wrote and does not change while mapped.
#![allow(unsafe_code)]

mod common;

use std::path::Path;
use std::time::Duration;

use aigrid_serving::server::Limits;
use aigrid_serving::ModelSource;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use common::{assert_openai_error, start, tiny_model};
use serde_json::{json, Value};

/// Greedy generation with candle-transformers' own Llama, one token at a time: the
/// token ids after the prompt, stopping at an end token or `max`.
fn reference(dir: &Path, prompt: &[u32], max: usize, eos: &[u32]) -> Vec<u32> {
    let config: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = llama::Llama::load(vb, &config).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
    common::greedy(prompt, max, eos, |x, pos| {
        model.forward(x, pos, &mut cache).unwrap()
    })
}

fn tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

fn eos_ids(dir: &Path) -> Vec<u32> {
    let g: Value =
        serde_json::from_slice(&std::fs::read(dir.join("generation_config.json")).unwrap())
            .unwrap();
    g["eos_token_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

const PROMPTS: &[&str] = &[
    "The scheduler places",
    "Models live in dispersed storage",
    "a",
    "Every node dials out to the servers and pulls its desired state, then reports back what it runs.",
    "héllo wörld 日本語",
    "GPU",
    "Raft replicates the log",
    "Human Chain approvals",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_over_http_equals_a_direct_candle_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let server = start(ModelSource::Dir(dir.clone()), "tiny", Limits::default()).await;
    server.wait_ready(Duration::from_secs(60)).await;
    let tok = tokenizer(&dir);
    let eos = eos_ids(&dir);

    for (i, prompt) in PROMPTS.iter().enumerate() {
        let max = 24 + i * 3;
        let ids = tok.encode(*prompt, true).unwrap().get_ids().to_vec();
        let expect = reference(&dir, &ids, max, &eos);
        let expect_text = tok.decode(&expect, true).unwrap();

        let (status, body) = server
            .post(
                "/v1/completions",
                &json!({"model": "tiny", "prompt": prompt, "max_tokens": max, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["model"], "tiny");
        let choice = &body["choices"][0];
        assert_eq!(choice["text"], expect_text.as_str(), "prompt {prompt:?}");
        assert_eq!(body["usage"]["prompt_tokens"], ids.len());
        assert_eq!(
            body["usage"]["completion_tokens"],
            expect.len(),
            "prompt {prompt:?}"
        );
        assert_eq!(body["usage"]["total_tokens"], ids.len() + expect.len());
        let finish = if expect.len() == max {
            "length"
        } else {
            "stop"
        };
        assert_eq!(choice["finish_reason"], finish);

        // The same request given as token ids.
        let (_, by_ids) = server
            .post(
                "/v1/completions",
                &json!({"model": "tiny", "prompt": ids, "max_tokens": max, "temperature": 0}),
            )
            .await;
        assert_eq!(by_ids["choices"][0]["text"], expect_text.as_str());

        // Streaming yields the same text, chunk by chunk, then [DONE].
        let events = server
            .stream(
                "/v1/completions",
                &json!({"model": "tiny", "prompt": prompt, "max_tokens": max, "temperature": 0,
                        "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, expect_text);
        assert!(chunks.len() > 2, "streamed in one piece: {chunks:?}");
        let usage = chunks.last().unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], expect.len());
        let finishes: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, vec![&json!(finish)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_sequential_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    // A small step budget forces chunked prefill and mixed batches.
    let limits = Limits {
        max_batch_tokens: 40,
        max_running_sequences: 12,
        ..Limits::default()
    };
    let server = start(ModelSource::Dir(dir.clone()), "tiny", limits).await;
    server.wait_ready(Duration::from_secs(60)).await;

    let request = |i: usize| {
        let prompt = format!(
            "{} {}",
            PROMPTS[i % PROMPTS.len()],
            "and then ".repeat(i % 5 * 6)
        );
        let sampled = i.is_multiple_of(3);
        json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8 + (i * 7) % 30,
            "temperature": if sampled { 0.9 } else { 0.0 },
            "top_p": if sampled { 0.9 } else { 1.0 },
            "seed": i as u64,
        })
    };
    // One at a time first.
    let mut sequential = Vec::new();
    for i in 0..32 {
        let (status, body) = server.post("/v1/chat/completions", &request(i)).await;
        assert_eq!(status, 200, "{body}");
        sequential.push(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Then all 32 at once, half of them streamed.
    let server = std::sync::Arc::new(server);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let server = server.clone();
            let mut body = request(i);
            tokio::spawn(async move {
                if i % 2 == 0 {
                    body["stream"] = json!(true);
                    let events = server.stream("/v1/chat/completions", &body).await;
                    events[..events.len() - 1]
                        .iter()
                        .map(|e| serde_json::from_str::<Value>(e).unwrap())
                        .filter_map(|c| {
                            c["choices"][0]["delta"]["content"]
                                .as_str()
                                .map(str::to_owned)
                        })
                        .collect::<String>()
                } else {
                    let (status, body) = server.post("/v1/chat/completions", &body).await;
                    assert_eq!(status, 200, "{body}");
                    body["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                }
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), sequential[i], "request {i}");
    }
    // The batches really held several sequences.
    let batched = server
        .metric("aigrid_serve_generation_batch_sequences_sum")
        .await;
    let steps = server
        .metric("aigrid_serve_generation_batch_sequences_count")
        .await;
    assert!(batched / steps > 1.5, "mean batch {}", batched / steps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let limits = Limits {
        max_body_bytes: 64 << 10,
        ..Limits::default()
    };
    let server = start(ModelSource::Dir(dir.clone()), "tiny", limits).await;
    server.wait_ready(Duration::from_secs(60)).await;
    let chat = "/v1/chat/completions";
    let cases: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        (
            "unknown model",
            chat,
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            Some("model_not_found"),
        ),
        (
            "no model",
            chat,
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            None,
        ),
        (
            "empty messages",
            chat,
            json!({"model": "tiny", "messages": []}),
            400,
            None,
        ),
        (
            "bad role",
            chat,
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            None,
        ),
        (
            "max_tokens 0",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            400,
            None,
        ),
        (
            "max_tokens enormous",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000_000_000u64}),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "messages not a list",
            chat,
            json!({"model": "tiny", "messages": "hi"}),
            400,
            None,
        ),
        (
            "max_tokens a string",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}),
            400,
            None,
        ),
        (
            "temperature 5",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
            400,
            None,
        ),
        (
            "top_p 0",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            400,
            None,
        ),
        (
            "n 2",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}),
            400,
            None,
        ),
        (
            "5 stops",
            chat,
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}),
            400,
            None,
        ),
        (
            "model a number",
            chat,
            json!({"model": 7, "messages": []}),
            400,
            None,
        ),
        (
            "prompt over the context",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "word ".repeat(3000)}),
            400,
            Some("context_length_exceeded"),
        ),
        (
            "empty prompt list",
            "/v1/completions",
            json!({"model": "tiny", "prompt": []}),
            400,
            None,
        ),
        (
            "empty token list",
            "/v1/completions",
            json!({"model": "tiny", "prompt": [[]]}),
            400,
            None,
        ),
        (
            "token out of vocabulary",
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1, 999999]}),
            400,
            None,
        ),
        (
            "embeddings on a generator",
            "/v1/embeddings",
            json!({"model": "tiny", "input": "hi"}),
            400,
            None,
        ),
    ];
    for (what, path, body, want, code) in cases {
        let (status, answer) = server.post(path, &body).await;
        assert_eq!(status, want, "{what}: {answer}");
        assert_openai_error(&answer);
        if let Some(code) = code {
            assert_eq!(answer["error"]["code"], code, "{what}");
        }
    }
    let (status, answer) = server.post_raw(chat, b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert_openai_error(&answer);
    let big = json!({"model": "tiny", "prompt": "x".repeat(100 << 10)});
    let refused = server.send("/v1/completions", &big).await;
    assert_eq!(refused.status().as_u16(), 413);
    // The body is left unread, so the connection is closed, and the client is
    // told: its next request goes on a new one instead of failing on this one.
    assert_eq!(refused.headers()["connection"], "close");
    let answer: serde_json::Value = refused.json().await.unwrap();
    assert_openai_error(&answer);
    // A body larger than what the kernel buffers between the two ends: the client
    // is still writing it when the server answers, and reads the 413, not a reset.
    let huge = json!({"model": "tiny", "prompt": "x".repeat(12 << 20)});
    let refused = server.send("/v1/completions", &huge).await;
    assert_eq!(refused.status().as_u16(), 413);
    assert_openai_error(&refused.json().await.unwrap());
    // Still serving.
    let (status, body) = server
        .post(chat, &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 4);
    // Stop strings end the text before them.
    let (_, free) = server
        .post("/v1/completions", &json!({"model": "tiny", "prompt": "The scheduler", "max_tokens": 40, "temperature": 0}))
        .await;
    let text = free["choices"][0]["text"].as_str().unwrap().to_owned();
    if let Some(stop) = text.get(3..5).filter(|s| !s.trim().is_empty()) {
        let (_, cut) = server
            .post("/v1/completions", &json!({"model": "tiny", "prompt": "The scheduler", "max_tokens": 40, "temperature": 0, "stop": stop}))
            .await;
        let want = &text[..text.find(stop).unwrap()];
        assert_eq!(cut["choices"][0]["text"], want);
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_answers_429_and_a_dropped_client_is_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let limits = Limits {
        max_concurrent_requests: 2,
        ..Limits::default()
    };
    let server = start(ModelSource::Dir(dir.clone()), "tiny", limits).await;
    server.wait_ready(Duration::from_secs(60)).await;
    // Seeded: an unseeded sample may end on a stop token within a few steps and
    // free its place before the request that must find none.
    let long = json!({"model": "tiny", "prompt": "go", "max_tokens": 1000, "stream": true, "temperature": 0.8, "seed": 11});
    let mut held = Vec::new();
    for _ in 0..2 {
        let r = server.send("/v1/completions", &long).await;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    let (status, body) = server
        .post("/v1/completions", &json!({"model": "tiny", "prompt": "hi"}))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_openai_error(&body);
    // Dropping the streams frees their places: the engine cancels them.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = server
            .post(
                "/v1/completions",
                &json!({"model": "tiny", "prompt": "hi", "max_tokens": 2}),
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "places were not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let generated = server.metric("aigrid_serve_generated_tokens_total").await;
    assert!(
        generated < 1500.0,
        "cancelled streams ran on: {generated} tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_budget_bounds_sequences_and_makes_the_rest_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let config = aigrid_serving::llama::LlamaConfig::from_hf_json(
        &std::fs::read(dir.join("config.json")).unwrap(),
    )
    .unwrap();
    // Room for two whole contexts (1024 tokens each) and a little: two slots.
    let limits = Limits {
        kv_cache_bytes: 2100 * config.kv_bytes_per_token(),
        ..Limits::default()
    };
    let server = start(ModelSource::Dir(dir.clone()), "tiny", limits).await;
    server.wait_ready(Duration::from_secs(60)).await;
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "hello", "max_tokens": 1100}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    // Eight requests: at most two run at once, the others wait for a slot, and all
    // finish with their own answer.
    let request =
        json!({"model": "tiny", "prompt": "hello there", "max_tokens": 36, "temperature": 0});
    let (_, alone) = server.post("/v1/completions", &request).await;
    let server = std::sync::Arc::new(server);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (server, request) = (server.clone(), request.clone());
            tokio::spawn(async move { server.post("/v1/completions", &request).await })
        })
        .collect();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["text"], alone["choices"][0]["text"]);
    }
    let most = server
        .metric("aigrid_serve_generation_batch_sequences_bucket{le=\"2\"}")
        .await;
    let steps = server
        .metric("aigrid_serve_generation_batch_sequences_count")
        .await;
    assert_eq!(most, steps, "a step ran more than two sequences");
}
