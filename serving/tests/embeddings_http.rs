//! `/v1/embeddings` over the real all-MiniLM-L6-v2: the vectors sentence-transformers
//! gives (the committed reference), as floats and as base64, batched across
//! concurrent requests; bad input answered in OpenAI's shape.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aigrid_serving::server::Limits;
use aigrid_serving::ModelSource;
use base64::Engine as _;
use common::{assert_openai_error, cosine, minilm_dir, start};
use serde_json::{json, Value};

fn reference() -> (Vec<String>, Vec<Vec<f32>>) {
    let r: Value = serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let sentences = serde_json::from_value(r["sentences"].clone()).unwrap();
    let embeddings = serde_json::from_value(r["embeddings"].clone()).unwrap();
    (sentences, embeddings)
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "embedding");
            serde_json::from_value(d["embedding"].clone()).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_over_http_match_sentence_transformers() {
    let dir = minilm_dir();
    let server = start(ModelSource::Dir(dir), "all-MiniLM-L6-v2", Limits::default()).await;
    server.wait_ready(Duration::from_secs(120)).await;
    let (sentences, expect) = reference();
    // The default precision: bf16 products where the CPU has AMX, f32 elsewhere.
    let report = server.status().await;
    let default = if aigrid_serving::kernels::cpu::amx::available() {
        "bf16"
    } else {
        "f32"
    };
    assert_eq!(report["precision"], default, "{report}");

    // All at once, as an array.
    let (status, body) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "all-MiniLM-L6-v2", "input": sentences}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "all-MiniLM-L6-v2");
    let got = vectors(&body);
    assert_eq!(got.len(), sentences.len());
    let mut worst = 1.0f32;
    for (g, e) in got.iter().zip(&expect) {
        assert_eq!(g.len(), 384);
        worst = worst.min(cosine(g, e));
    }
    println!("minimum cosine, one request: {worst:.6}");
    assert!(worst >= 0.999, "minimum cosine {worst}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > sentences.len() as u64);
    assert_eq!(
        body["usage"]["prompt_tokens"],
        body["usage"]["total_tokens"]
    );

    // One string per request, all concurrently: dynamic batching gives each its own.
    let server = Arc::new(server);
    let tasks: Vec<_> = sentences
        .iter()
        .cloned()
        .map(|s| {
            let server = server.clone();
            tokio::spawn(async move {
                let (status, body) = server
                    .post("/v1/embeddings", &json!({"model": "all-MiniLM-L6-v2", "input": s, "encoding_format": "base64"}))
                    .await;
                assert_eq!(status, 200, "{body}");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(body["data"][0]["embedding"].as_str().unwrap())
                    .unwrap();
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<f32>>()
            })
        })
        .collect();
    for (task, e) in tasks.into_iter().zip(&expect) {
        let v = task.await.unwrap();
        assert!(cosine(&v, e) >= 0.999);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_get_openai_errors() {
    let dir = minilm_dir();
    let server = start(ModelSource::Dir(dir), "minilm", Limits::default()).await;
    server.wait_ready(Duration::from_secs(120)).await;
    let long = "word ".repeat(400);
    let cases: Vec<(&str, &str, Value, u16)> = vec![
        (
            "empty list",
            "/v1/embeddings",
            json!({"model": "minilm", "input": []}),
            400,
        ),
        (
            "empty string",
            "/v1/embeddings",
            json!({"model": "minilm", "input": ""}),
            400,
        ),
        (
            "a number",
            "/v1/embeddings",
            json!({"model": "minilm", "input": 5}),
            400,
        ),
        (
            "bad format",
            "/v1/embeddings",
            json!({"model": "minilm", "input": "hi", "encoding_format": "hex"}),
            400,
        ),
        (
            "other dimensions",
            "/v1/embeddings",
            json!({"model": "minilm", "input": "hi", "dimensions": 128}),
            400,
        ),
        (
            "too long",
            "/v1/embeddings",
            json!({"model": "minilm", "input": long}),
            400,
        ),
        (
            "unknown model",
            "/v1/embeddings",
            json!({"model": "gpt-4", "input": "hi"}),
            404,
        ),
        (
            "chat on an embedder",
            "/v1/chat/completions",
            json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}),
            400,
        ),
    ];
    for (what, path, body, want) in cases {
        let (status, answer) = server.post(path, &body).await;
        assert_eq!(status, want, "{what}: {answer}");
        assert_openai_error(&answer);
    }
    let (status, body) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "minilm", "input": ["still", "serving"], "dimensions": 384}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(vectors(&body).len(), 2);
}

/// A long input is refused by default, saying how to opt in; with `truncate` (or a
/// server started with auto-truncate) it is embedded by its first tokens: the same
/// vector as the text cut there, special tokens kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_inputs_are_truncated_when_asked() {
    let dir = minilm_dir();
    let server = start(ModelSource::Dir(dir.clone()), "minilm", Limits::default()).await;
    server.wait_ready(Duration::from_secs(120)).await;
    let long = "word ".repeat(600);
    let (status, refused) = server
        .post("/v1/embeddings", &json!({"model": "minilm", "input": long}))
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "context_length_exceeded");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"truncate\": true"),
        "{refused}"
    );
    let (status, cut) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "minilm", "input": long, "truncate": true}),
        )
        .await;
    assert_eq!(status, 200, "{cut}");
    // Cut to what the model takes, [CLS] and [SEP] included: the same vector as the
    // words that fit between them, embedded as they are.
    let took = cut["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert!((128..600).contains(&took), "{took}");
    let fitting = "word ".repeat(took - 2);
    let (status, exact) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "minilm", "input": fitting.trim_end()}),
        )
        .await;
    assert_eq!(status, 200, "{exact}");
    let (a, b) = (&vectors(&cut)[0], &vectors(&exact)[0]);
    assert!(cosine(a, b) > 0.9999, "{}", cosine(a, b));
    // In a list, each input is cut on its own.
    let (status, both) = server
        .post(
            "/v1/embeddings",
            &json!({"model": "minilm", "input": [long.clone(), "short"], "truncate": true}),
        )
        .await;
    assert_eq!(status, 200, "{both}");
    assert_eq!(vectors(&both).len(), 2);

    let auto = start(
        ModelSource::Dir(dir),
        "minilm",
        Limits {
            auto_truncate: true,
            ..Limits::default()
        },
    )
    .await;
    auto.wait_ready(Duration::from_secs(120)).await;
    let (status, body) = auto
        .post("/v1/embeddings", &json!({"model": "minilm", "input": long}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = auto
        .post(
            "/v1/embeddings",
            &json!({"model": "minilm", "input": long, "truncate": false}),
        )
        .await;
    assert_eq!(status, 400, "a request's own `truncate: false` wins");
}
