//! A quantized GGUF Llama served over HTTP gives the greedy tokens of
//! candle-transformers' own quantized Llama run directly.

mod common;

use std::path::Path;
use std::time::Duration;

use aigrid_serving::server::Limits;
use aigrid_serving::tiny::{write_tiny_llama, TinyLlama};
use aigrid_serving::ModelSource;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
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

/// Converts the tiny model's safetensors into a GGUF file with Q8_0 matrices, named
/// as llama.cpp names them.
fn write_gguf(dir: &Path) {
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let rename = |name: &str| -> String {
        let name = name.strip_prefix("model.").unwrap_or(name);
        let name = name
            .replace("embed_tokens", "token_embd")
            .replace("lm_head", "output")
            .replace("layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        if name == "norm.weight" {
            "output_norm.weight".into()
        } else {
            name
        }
    };
    let mut q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(name, t): (&String, &Tensor)| {
            let dtype = if t.rank() == 2 {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F32
            };
            (rename(name), QTensor::quantize(t, dtype).unwrap())
        })
        .collect();
    q.sort_by(|a, b| a.0.cmp(&b.0));
    let u32v = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.embedding_length", u32v(SPEC.hidden)),
        ("llama.block_count", u32v(SPEC.layers)),
        ("llama.attention.head_count", u32v(SPEC.heads)),
        ("llama.attention.head_count_kv", u32v(SPEC.kv_heads)),
        ("llama.feed_forward_length", u32v(SPEC.intermediate)),
        ("llama.context_length", u32v(SPEC.max_position)),
        ("llama.rope.dimension_count", u32v(SPEC.hidden / SPEC.heads)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-5),
        ),
        ("llama.rope.freq_base", gguf_file::Value::F32(10_000.0)),
    ];
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(dir.join("model.gguf")).unwrap();
    gguf_file::write(&mut file, &md, &ts).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("config.json")).unwrap();
}

fn reference(dir: &Path, prompt: &[u32], max: usize) -> Vec<u32> {
    let mut file = std::fs::File::open(dir.join("model.gguf")).unwrap();
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
