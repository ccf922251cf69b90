//! Writes a Llama model directory in Hugging Face's layout (`config.json`, one
//! `model.safetensors`, a byte-level BPE `tokenizer.json`) as one GGUF file that
//! llama.cpp and this crate's loader both read: llama.cpp's tensor names, its
//! metadata keys (shape, rope, the whole tokenizer with its merges and special
//! tokens, the chat template) and its rotary layout.
//!
//! Hugging Face rotates the two halves of each query and key head; GGUF rotates
//! adjacent pairs. The query and key rows are reordered as llama.cpp's converter
//! reorders them, so the GGUF model computes what the safetensors model does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value as Json;

use crate::error::ServingError;

/// How the GGUF file stores its matrices (norms stay F32, as llama.cpp keeps them,
/// and a matrix whose rows do not split into whole blocks stays F16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 8-bit blocks of 32 with one scale each.
    Q8_0,
    /// IEEE half precision.
    F16,
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::F16 => GgmlDType::F16,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::Q8_0 => 7,
            GgufType::F16 => 1,
        }
    }
}

impl std::str::FromStr for GgufType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(GgufType::Q8_0),
            "f16" => Ok(GgufType::F16),
            other => Err(format!("unknown GGUF type `{other}` (q8_0, f16)")),
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GgufType::Q8_0 => "Q8_0",
            GgufType::F16 => "F16",
        })
    }
}

/// Converts the Llama in `dir` to a GGUF file at `out`.
pub fn write_gguf(dir: &Path, out: &Path, kind: GgufType) -> Result<(), ServingError> {
    let bad =
        |what: String| ServingError::model(format!("GGUF export of {}: {what}", dir.display()));
    let config: Json = read_json(&dir.join("config.json"))?;
    let tokenizer: Json = read_json(&dir.join("tokenizer.json"))?;
    let tokenizer_config: Option<Json> = read_json(&dir.join("tokenizer_config.json")).ok();
    let int = |key: &str| -> Result<usize, ServingError> {
        config[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("config.json lacks `{key}`")))
    };
    let hidden = int("hidden_size")?;
    let heads = int("num_attention_heads")?;
    let kv_heads = int("num_key_value_heads").unwrap_or(heads);
    if config["model_type"] != "llama" || heads == 0 || kv_heads == 0 || hidden % heads != 0 {
        return Err(bad("not a Llama with whole heads".into()));
    }

    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut quantized: Vec<(String, QTensor)> = Vec::with_capacity(tensors.len());
    for (name, tensor) in &tensors {
        let gguf_name = tensor_name(name).ok_or_else(|| bad(format!("unknown tensor `{name}`")))?;
        let tensor = if name.ends_with("self_attn.q_proj.weight") {
            interleave_rotary(tensor, heads)?
        } else if name.ends_with("self_attn.k_proj.weight") {
            interleave_rotary(tensor, kv_heads)?
        } else {
            tensor.clone()
        };
        // Rows that do not split into whole blocks stay F16, as llama.cpp's
        // converter keeps them.
        let dtype = match tensor.dims() {
            [_, cols] if cols % kind.ggml().block_size() == 0 => kind.ggml(),
            [_, _] => GgmlDType::F16,
            _ => GgmlDType::F32,
        };
        quantized.push((gguf_name, QTensor::quantize(&tensor, dtype)?));
    }
    quantized.sort_by(|a, b| a.0.cmp(&b.0));

    let vocab = Vocabulary::from_tokenizer_json(&tokenizer).map_err(bad)?;
    let token_id = |key: &str| -> Option<u32> {
        let text = tokenizer_config.as_ref()?.get(key)?;
        let text = text.as_str().or_else(|| text["content"].as_str())?;
        vocab
            .tokens
            .iter()
            .position(|t| t == text)
            .map(|i| i as u32)
    };
    let u32v = |v: usize| Value::U32(v as u32);
    let float = |key: &str, default: f64| config[key].as_f64().unwrap_or(default) as f32;
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String(dir_name(dir))),
        ("general.file_type", Value::U32(kind.file_type())),
        ("general.quantization_version", Value::U32(2)),
        ("llama.vocab_size", u32v(vocab.tokens.len())),
        ("llama.embedding_length", u32v(hidden)),
        ("llama.block_count", u32v(int("num_hidden_layers")?)),
        ("llama.feed_forward_length", u32v(int("intermediate_size")?)),
        (
            "llama.context_length",
            u32v(int("max_position_embeddings")?),
        ),
        ("llama.attention.head_count", u32v(heads)),
        ("llama.attention.head_count_kv", u32v(kv_heads)),
        ("llama.rope.dimension_count", u32v(hidden / heads)),
        (
            "llama.rope.freq_base",
            Value::F32(float("rope_theta", 10_000.0)),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(float("rms_norm_eps", 1e-5)),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens", strings(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vocab.types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&vocab.merges)),
    ];
    if let Some(bos) = token_id("bos_token") {
        metadata.push(("tokenizer.ggml.bos_token_id", Value::U32(bos)));
    }
    if let Some(eos) = token_id("eos_token") {
        metadata.push(("tokenizer.ggml.eos_token_id", Value::U32(eos)));
    }
    if let Some(config) = &tokenizer_config {
        let add_bos = config["add_bos_token"].as_bool().unwrap_or(false);
        metadata.push(("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)));
        if let Some(template) = config["chat_template"].as_str() {
            metadata.push(("tokenizer.chat_template", Value::String(template.into())));
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).map_err(|e| io_error(out, e))?;
    gguf_file::write(&mut file, &md, &ts)?;
    file.sync_all().map_err(|e| io_error(out, e))
}

/// llama.cpp's name for a Hugging Face Llama tensor.
fn tensor_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("model.").unwrap_or(name);
    match name {
        "embed_tokens.weight" => return Some("token_embd.weight".into()),
        "norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

/// Reorders a query or key projection's rows from rotating halves to rotating
/// adjacent pairs: within each head, row `i·d/2 + j` (half `i`, pair `j`) moves to
/// `2j + i`.
fn interleave_rotary(weight: &Tensor, heads: usize) -> Result<Tensor, ServingError> {
    let (rows, cols) = weight.dims2()?;
    let half = rows / heads / 2;
    Ok(weight
        .reshape((heads, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// A byte-level BPE vocabulary as GGUF stores it.
struct Vocabulary {
    /// Token texts by id.
    tokens: Vec<String>,
    /// llama.cpp's token types by id: 1 normal, 3 control (special), 4 user-defined.
    types: Vec<i32>,
    /// Merges as `"left right"`, by rank.
    merges: Vec<String>,
}

impl Vocabulary {
    fn from_tokenizer_json(tokenizer: &Json) -> Result<Self, String> {
        let model = &tokenizer["model"];
        if model["type"] != "BPE" {
            return Err("tokenizer.json is not a BPE model".into());
        }
        let mut by_id: HashMap<u64, (String, i32)> = HashMap::new();
        for (text, id) in model["vocab"]
            .as_object()
            .ok_or("tokenizer.json has no vocab")?
        {
            let id = id.as_u64().ok_or("a vocab id is not a number")?;
            by_id.insert(id, (text.clone(), 1));
        }
        for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) else {
                return Err("an added token lacks its id or content".into());
            };
            let kind = if added["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
            by_id.insert(id, (text.to_owned(), kind));
        }
        let n = by_id.len() as u64;
        let (mut tokens, mut types) = (Vec::with_capacity(n as usize), Vec::new());
        for id in 0..n {
            let (text, kind) = by_id
                .remove(&id)
                .ok_or_else(|| format!("token ids are not contiguous: {id} is missing"))?;
            tokens.push(text);
            types.push(kind);
        }
        let merges = model["merges"]
            .as_array()
            .ok_or("tokenizer.json has no merges")?
            .iter()
            .map(|m| match (m.as_str(), m.as_array()) {
                (Some(s), _) => Ok(s.to_owned()),
                (_, Some(pair)) if pair.len() == 2 => Ok(format!(
                    "{} {}",
                    pair[0].as_str().unwrap_or_default(),
                    pair[1].as_str().unwrap_or_default()
                )),
                _ => Err("a merge is neither \"a b\" nor [a, b]".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Vocabulary {
            tokens,
            types,
            merges,
        })
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn read_json(path: &Path) -> Result<Json, ServingError> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ServingError::model(format!("{}: {e}", path.display())))
}

fn io_error(path: &Path, source: std::io::Error) -> ServingError {
    ServingError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{write_tiny_llama, TinyLlama};

    #[test]
    fn rotary_rows_interleave_per_head() {
        // 2 heads of width 4: rows [h0: a0 a1 b0 b1, h1: c0 c1 d0 d1].
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let got: Vec<f32> = interleave_rotary(&w, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, [0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn the_file_holds_every_tensor_and_the_whole_tokenizer() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tiny");
        write_tiny_llama(&dir, &TinyLlama::default()).unwrap();
        let out = tmp.path().join("tiny.gguf");
        write_gguf(&dir, &out, GgufType::Q8_0).unwrap();
        let mut file = std::fs::File::open(&out).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let md = &content.metadata;
        let tokens = md["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(tokens.len(), tokenizer.get_vocab_size(true));
        let eos = md["tokenizer.ggml.eos_token_id"].to_u32().unwrap();
        assert_eq!(Some(eos), tokenizer.token_to_id("<|im_end|>"));
        let types = md["tokenizer.ggml.token_type"].to_vec().unwrap();
        assert_eq!(types[eos as usize].to_i32().unwrap(), 3);
        assert!(!md["tokenizer.ggml.merges"].to_vec().unwrap().is_empty());
        // 9 tensors per layer, the embedding, the output and its norm.
        assert_eq!(content.tensor_infos.len(), 2 * 9 + 3);
        assert_eq!(
            content.tensor_infos["blk.1.ffn_gate.weight"].ggml_dtype,
            GgmlDType::Q8_0
        );
        // Rows of 176 are not whole blocks of 32.
        assert_eq!(
            content.tensor_infos["blk.1.ffn_down.weight"].ggml_dtype,
            GgmlDType::F16
        );
        assert_eq!(
            content.tensor_infos["output_norm.weight"].ggml_dtype,
            GgmlDType::F32
        );
    }

    #[test]
    fn a_model_that_is_not_a_llama_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tiny");
        write_tiny_llama(&dir, &TinyLlama::default()).unwrap();
        let path = dir.join("config.json");
        let mut config: Json = read_json(&path).unwrap();
        config["model_type"] = "bert".into();
        std::fs::write(&path, config.to_string()).unwrap();
        let err = write_gguf(&dir, &tmp.path().join("x.gguf"), GgufType::F16).unwrap_err();
        assert!(err.to_string().contains("not a Llama"), "{err}");
    }
}
