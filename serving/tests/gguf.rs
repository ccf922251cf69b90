//! A quantized GGUF Llama served over HTTP gives the greedy tokens of
//! candle-transformers' own quantized Llama run directly, over the same arithmetic:
//! where Q8_0 goes through the packed product (`Dense::q8_packed_on`), ours
//! multiplies f32 activations by the values the blocks hold, so the reference runs
//! those values as F32 matrices; elsewhere both run candle's quantized products.

mod common;

use std::path::Path;
use std::time::Duration;

use aigrid_serving::gguf_export::{write_gguf as write_gguf_file, GgufType};
use aigrid_serving::server::Limits;
use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use aigrid_serving::ModelSource;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use candle_transformers::models::quantized_llama::ModelWeights;
use common::start;
use serde_json::json;

const SPEC: TinyLlama = TinyLlama {
    hidden: 64,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    intermediate: 192,
    max_position: 512,
    vocab: 512,
    seed: 5,
};

/// Converts the tiny model into a GGUF file with Q8_0 matrices, as llama.cpp names
/// and lays them out, and leaves the tokenizer files beside it.
fn write_gguf(dir: &Path) {
    write_gguf_file(dir, &dir.join("model.gguf"), GgufType::Q8_0).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("config.json")).unwrap();
}

/// The file's tensors as F32 holding the values of its blocks.
fn widened(dir: &Path) -> std::path::PathBuf {
    let mut file = std::fs::File::open(dir.join("model.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let values = q.dequantize(&Device::Cpu).unwrap();
        tensors.push((
            name.clone(),
            QTensor::quantize(&values, GgmlDType::F32).unwrap(),
        ));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // Outside the model's directory, which the server serves.
    let path = dir.with_extension("values.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    path
}

fn reference(dir: &Path, prompt: &[u32], max: usize) -> Vec<u32> {
    let cpu = aigrid_serving::kernels::Backend::for_device(&Device::Cpu);
    let path = if aigrid_serving::dense::Dense::q8_packed_on(cpu) {
        widened(dir)
    } else {
        dir.join("model.gguf")
    };
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    common::greedy(prompt, max, &[], |x, pos| model.forward(x, pos).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_model_generates_what_candle_quantized_llama_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gguf");
    write_tiny_llama(&dir, &SPEC).unwrap();
    write_gguf(&dir);
    let server = start(ModelSource::Dir(dir.clone()), "q", Limits::default()).await;
    server.wait_ready(Duration::from_secs(60)).await;
    for prompt in [vec![1u32, 40, 41, 42], vec![7, 300, 12, 99, 5, 6, 200]] {
        let expect = reference(&dir, &prompt, 12);
        let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        // Stop tokens would end ours early; compare the prefix before any.
        let (status, body) = server
            .post(
                "/v1/completions",
                &json!({"model": "q", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let n = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            body["choices"][0]["text"],
            tok.decode(&expect[..n], true).unwrap().as_str(),
            "prompt {prompt:?}"
        );
    }
    assert_eq!(
        server.status().await["bytes_total"],
        std::fs::metadata(dir.join("model.gguf")).unwrap().len()
    );
}

/// The F16 GGUF of a model generates what its safetensors do: the rotary rows are
/// reordered for GGUF's pairs, and the tokenizer and stop tokens come along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_f16_gguf_generates_what_its_safetensors_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("st");
    write_tiny_llama(&dir, &SPEC).unwrap();
    let gguf_dir = tmp.path().join("gguf");
    std::fs::create_dir_all(&gguf_dir).unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(dir.join(name), gguf_dir.join(name)).unwrap();
    }
    write_gguf_file(&dir, &gguf_dir.join("model.gguf"), GgufType::F16).unwrap();
    let st = start(ModelSource::Dir(dir), "m", Limits::default()).await;
    let gguf = start(ModelSource::Dir(gguf_dir), "m", Limits::default()).await;
    st.wait_ready(Duration::from_secs(60)).await;
    gguf.wait_ready(Duration::from_secs(60)).await;
    for prompt in ["The scheduler places", "erasure codes and the harbour"] {
        let body = json!({"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0});
        let (a, from_st) = st.post("/v1/completions", &body).await;
        let (b, from_gguf) = gguf.post("/v1/completions", &body).await;
        assert_eq!((a, b), (200, 200), "{from_st} {from_gguf}");
        assert_eq!(
            from_st["choices"][0]["text"],
            from_gguf["choices"][0]["text"]
        );
        assert_eq!(from_st["usage"], from_gguf["usage"]);
    }
}
