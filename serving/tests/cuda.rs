//! The CUDA build on a GPU: a model served on `cuda:0` answers what the same model
//! answers on the CPU, one request at a time and batched. Built only with
//! `--features cuda` (`serving/fixtures/cuda-cargo.sh test -p aigrid-serving
//! --features cuda --test cuda`); each test skips, saying so, where no CUDA device
//! answers, and fails instead where `AIGRID_TEST_CUDA=1` says one must.

#![cfg(feature = "cuda")]

mod common;

use std::path::Path;
use std::time::Duration;

use aigrid_serving::bert::{Embedder, Pooling};
use aigrid_serving::dense::Precision;
use aigrid_serving::server::Limits;
use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use aigrid_serving::{DeviceSpec, ModelSource};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{cosine, start_on, tiny_model, Running};
use serde_json::json;

const GPU: DeviceSpec = DeviceSpec::Cuda(0);

/// Whether a CUDA device answers; panics where `AIGRID_TEST_CUDA=1` and none does.
fn gpu_here() -> bool {
    match GPU.open() {
        Ok(_) => true,
        Err(e) if std::env::var("AIGRID_TEST_CUDA").as_deref() == Ok("1") => {
            panic!("AIGRID_TEST_CUDA=1, but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

async fn ready(server: Running) -> Running {
    server.wait_ready(Duration::from_secs(120)).await;
    server
}

/// The completion of `prompt`, greedy.
async fn complete(server: &Running, prompt: &str) -> String {
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"model": "m", "prompt": prompt, "max_tokens": 32, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["text"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_on_cuda_answers_what_the_cpu_answers() {
    if !gpu_here() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model(&dir);
    let source = || ModelSource::Dir(dir.clone());
    let cpu = ready(start_on(source(), "m", Limits::default(), DeviceSpec::Cpu, None).await).await;
    let gpu = ready(start_on(source(), "m", Limits::default(), GPU, None).await).await;
    assert_eq!(gpu.status().await["precision"], "f32");

    let prompts: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "request {i}: the scheduler placed {} jobs on node {i}",
                3 * i + 1
            )
        })
        .collect();
    let mut expected = Vec::new();
    for prompt in &prompts {
        expected.push(complete(&cpu, prompt).await);
    }
    // One at a time.
    for (prompt, want) in prompts.iter().zip(&expected) {
        assert_eq!(&complete(&gpu, prompt).await, want, "prompt {prompt:?}");
    }
    // All at once: decode steps of several sequences on the GPU.
    let together = futures_util::future::join_all(prompts.iter().map(|p| complete(&gpu, p))).await;
    assert_eq!(together, expected);
    let batched = gpu
        .metric("aigrid_serve_generation_batch_sequences_sum")
        .await
        / gpu
            .metric("aigrid_serve_generation_batch_sequences_count")
            .await;
    assert!(
        batched > 1.0,
        "no step decoded several sequences: {batched}"
    );

    // A streamed chat ends as on the CPU.
    let events = gpu
        .stream(
            "/v1/chat/completions",
            &json!({"model": "m", "messages": [{"role": "user", "content": prompts[0]}],
                    "max_tokens": 16, "temperature": 0, "stream": true}),
        )
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

/// A BERT with random weights, the tiny Llama's tokenizer and sentence-transformers'
/// mean pooling, written as a model directory.
fn random_bert(dir: &Path) {
    let tokenizer = dir.join("tokenizer-source");
    let spec = TinyLlama::default();
    write_tiny_llama(&tokenizer, &spec).unwrap();
    std::fs::copy(tokenizer.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&tokenizer).unwrap();
    let config = json!({
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": spec.vocab, "hidden_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "intermediate_size": 192, "hidden_act": "gelu",
        "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]);
    std::fs::write(dir.join("modules.json"), modules.to_string()).unwrap();
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        json!({"word_embedding_dimension": 96, "pooling_mode_mean_tokens": true}).to_string(),
    )
    .unwrap();
    // The encoder's tensors, by the names and shapes the loader asks for, then
    // random values in each.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Embedder::new(
        vb,
        config.to_string().as_bytes(),
        Pooling::from_files(None, None).unwrap(),
        Precision::F32,
    )
    .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let mean = if name.ends_with("LayerNorm.weight") {
            1.0
        } else {
            0.0
        };
        let values = Tensor::randn(mean, 0.1f32, var.shape(), &Device::Cpu).unwrap();
        var.set(&values).unwrap();
    }
    varmap.save(dir.join("model.safetensors")).unwrap();
}

/// The embeddings of `inputs`.
async fn embed(server: &Running, inputs: &[String]) -> Vec<Vec<f32>> {
    let (status, body) = server
        .post("/v1/embeddings", &json!({"model": "m", "input": inputs}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| cosine(x, y))
        .fold(f32::INFINITY, f32::min)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_on_cuda_match_the_cpu_in_f32_and_in_bf16() {
    if !gpu_here() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bert");
    std::fs::create_dir_all(&dir).unwrap();
    random_bert(&dir);
    let source = || ModelSource::Dir(dir.clone());
    let limits = Limits::default;
    let f32 = Some(Precision::F32);
    let cpu = ready(start_on(source(), "m", limits(), DeviceSpec::Cpu, f32).await).await;
    let gpu_f32 = ready(start_on(source(), "m", limits(), GPU, f32).await).await;
    // bf16 products are a GPU's default for embedding models.
    let gpu = ready(start_on(source(), "m", limits(), GPU, None).await).await;
    assert_eq!(gpu.status().await["precision"], "bf16");

    let inputs: Vec<String> = (0..12)
        .map(|i| {
            let words: Vec<String> = (0..(2 + i)).map(|w| format!("word{}", w * i)).collect();
            words.join(" ")
        })
        .collect();
    let want = embed(&cpu, &inputs).await;
    let on_f32 = embed(&gpu_f32, &inputs).await;
    let on_bf16 = embed(&gpu, &inputs).await;
    let (f32_cosine, bf16_cosine) = (min_cosine(&want, &on_f32), min_cosine(&want, &on_bf16));
    eprintln!("cosine to the CPU's f32 vectors: f32 {f32_cosine}, bf16 {bf16_cosine}");
    assert!(f32_cosine >= 0.99999, "f32 on the GPU: {f32_cosine}");
    assert!(bf16_cosine >= 0.9999, "bf16 on the GPU: {bf16_cosine}");
    // One at a time, each is what it was in the batch.
    let alone = embed(&gpu, &inputs[5..6]).await;
    assert!(cosine(&alone[0], &on_bf16[5]) >= 0.9999);
}

/// The checks above are no use if the build cannot reach a GPU at all: a CUDA build
/// must at least say why it cannot.
#[test]
fn a_missing_gpu_is_a_clear_error() {
    if let Err(e) = DeviceSpec::Cuda(999).open() {
        assert!(e.to_string().contains("cuda:999"), "{e}");
    } else {
        panic!("cuda:999 opened");
    }
}
