//! The Llama-family decoder (llama, mistral, qwen2), from safetensors or GGUF, written
//! for serving many sequences at once.
//!
//! candle-transformers' models keep one KV cache per model with one position for the
//! whole batch, which cannot mix a sequence in its prefill with others in their
//! decode. Here the keys and values live in a [`KvPool`] of fixed slots (one per
//! running sequence, each holding up to the pool's capacity in tokens), and one
//! [`Model::forward`] takes a packed batch of chunks, one per sequence, each at its own
//! position: the projections and MLP run once over every token of the batch, rotary
//! embeddings use each token's own position, new keys and values are scattered into
//! their slots in one operation per layer, and attention reads the keys and values
//! where they lie in the pool: on the CPU every token of the batch, prompt chunks
//! and decoding sequences alike, goes through one parallel kernel over exactly its
//! own keys ([`pool_attention`]); elsewhere the decoding sequences (one token each)
//! attend together in one batched matmul masked to each length, and prompt chunks
//! attend per sequence. Dense projections are
//! [`Dense`] (packed for the CPU's widest matrix product, or transposed), the
//! query, key and value projections fused into one, and the MLP's gate and up
//! projections too.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

use crate::dense::{Dense, Precision};
use crate::ops::{pool_attention, KeySpan};
use crate::ServingError;

/// The shape of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f32,
    /// Llama 3 rotary frequency scaling, when the model uses it.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence (prompt and completion).
    pub max_position_embeddings: usize,
    /// Whether the output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v projections carry a bias (qwen2).
    pub attention_bias: bool,
    /// Mistral's attention window.
    pub sliding_window: Option<usize>,
    /// Rotary pairs interleaved (GGUF llama) rather than split in halves (Hugging Face).
    pub rope_interleaved: bool,
}

/// Llama 3's rotary frequency scaling (`rope_scaling` with `rope_type: llama3`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// Scaling factor for low frequencies.
    pub factor: f32,
    /// Wavelength bound below which frequencies are scaled fully.
    pub low_freq_factor: f32,
    /// Wavelength bound above which frequencies are kept.
    pub high_freq_factor: f32,
    /// Context the model was trained with.
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_position")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_max_position() -> usize {
    4096
}

/// Architectures this decoder runs, as `model_type` names them.
pub const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

impl LlamaConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(bytes: &[u8]) -> Result<Self, ServingError> {
        let hf: HfConfig = serde_json::from_slice(bytes)
            .map_err(|e| ServingError::model(format!("config.json: {e}")))?;
        let architecture = hf.model_type.unwrap_or_else(|| "llama".into());
        if !ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(ServingError::model(format!(
                "config.json: model_type `{architecture}` is not a text-generation architecture served here (llama, mistral, qwen2)"
            )));
        }
        let rope_scaling = match hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => {
                let kind = value
                    .get("rope_type")
                    .or_else(|| value.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(serde_json::from_value(value).map_err(|e| {
                        ServingError::model(format!("config.json: rope_scaling: {e}"))
                    })?),
                    other => {
                        return Err(ServingError::model(format!(
                            "config.json: rope_scaling type `{other}` is not supported"
                        )))
                    }
                }
            }
        };
        let qwen = architecture == "qwen2";
        let config = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: hf.attention_bias.unwrap_or(qwen),
            sliding_window: match (architecture.as_str(), hf.use_sliding_window) {
                (_, Some(false)) | ("llama", None) | ("qwen2", None) => None,
                _ => hf.sliding_window,
            },
            rope_interleaved: false,
            architecture,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the metadata of a GGUF file (`llama` and `qwen2` architectures).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ServingError> {
        let get = |key: &str| content.metadata.get(key);
        let architecture = get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "llama".into());
        if architecture != "llama" && architecture != "qwen2" {
            return Err(ServingError::model(format!(
                "GGUF architecture `{architecture}` is not served here (llama, qwen2)"
            )));
        }
        let int = |key: &str| -> Result<usize, ServingError> {
            let full = format!("{architecture}.{key}");
            get(&full)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| ServingError::model(format!("GGUF metadata lacks `{full}`")))
        };
        let float = |key: &str, default: f32| -> f32 {
            get(&format!("{architecture}.{key}"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(default)
        };
        let hidden_size = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let vocab_size = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| ServingError::model("GGUF file has no token_embd.weight"))?;
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: int("attention.head_count_kv").unwrap_or(heads),
            head_dim: hidden_size / heads.max(1),
            rms_norm_eps: f64::from(float("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta: float("rope.freq_base", 10_000.0),
            rope_scaling: None,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            rope_interleaved: architecture == "llama",
            architecture,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ServingError> {
        let bad = |what: &str| Err(ServingError::model(format!("model config: {what}")));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad("query heads must be a multiple of key/value heads");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("head width must be positive and even");
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocabulary, width and layers must be positive");
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive");
        }
        Ok(())
    }

    /// Bytes of KV cache one token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 4
    }
}

/// A projection: dense (safetensors) or quantized (GGUF).
#[derive(Debug, Clone)]
enum Proj {
    Dense(Dense),
    /// The output layer tied to the token embeddings, which stay `[vocab, hidden]`
    /// for the lookup rather than be held twice.
    Tied(candle_nn::Linear),
    Quant(candle_transformers::quantized_nn::Linear),
}

impl Module for Proj {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(xs),
            Proj::Tied(l) => l.forward(xs),
            Proj::Quant(l) => l.forward(xs),
        }
    }
}

#[derive(Debug, Clone)]
enum Norm {
    Dense(candle_nn::RmsNorm),
    Quant(candle_transformers::quantized_nn::RmsNorm),
}

impl Module for Norm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Dense(n) => n.forward(xs),
            Norm::Quant(n) => n.forward(xs),
        }
    }
}

/// The query, key and value projections: one fused dense projection (outputs side
/// by side), or three quantized ones.
#[derive(Debug, Clone)]
enum Qkv {
    Fused { proj: Dense, q: usize, kv: usize },
    Split(Proj, Proj, Proj),
}

impl Qkv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        match self {
            Qkv::Fused { proj, q, kv } => {
                let y = proj.forward(x)?;
                Ok((
                    y.narrow(1, 0, *q)?,
                    y.narrow(1, *q, *kv)?,
                    y.narrow(1, q + kv, *kv)?,
                ))
            }
            Qkv::Split(q, k, v) => Ok((q.forward(x)?, k.forward(x)?, v.forward(x)?)),
        }
    }
}

/// The MLP's gate and up projections, fused (dense) or apart (quantized); the
/// result is `silu(gate) * up`.
#[derive(Debug, Clone)]
enum GateUp {
    Fused(Dense),
    Split(Proj, Proj),
}

impl Module for GateUp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            GateUp::Fused(proj) => crate::ops::silu_mul(&proj.forward(x)?),
            GateUp::Split(gate, up) => {
                candle_nn::ops::silu(&gate.forward(x)?)?.mul(&up.forward(x)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Norm,
    qkv: Qkv,
    o: Proj,
    post_norm: Norm,
    gate_up: GateUp,
    down: Proj,
}

/// A loaded decoder. Immutable: many sequences share it, each with its own cache.
#[derive(Debug, Clone)]
pub struct Model {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Proj,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Attention through [`pool_attention`] (the CPU) rather than candle's ops.
    pool_kernel: bool,
}

/// Keys and values of every running sequence: per layer a `[slots, kv_heads,
/// capacity, head_dim]` tensor for keys and one for values. A sequence holds one slot
/// from admission to its end.
#[derive(Debug)]
pub struct KvPool {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    slots: usize,
    capacity: usize,
    free: Vec<usize>,
}

impl KvPool {
    /// A slot for a new sequence, if one is free.
    pub fn acquire(&mut self) -> Option<SeqCache> {
        self.free.pop().map(|slot| SeqCache { slot, len: 0 })
    }

    /// Gives a finished sequence's slot back.
    pub fn release(&mut self, cache: SeqCache) {
        debug_assert!(!self.free.contains(&cache.slot));
        self.free.push(cache.slot);
    }

    /// Slots: sequences that can run at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens one slot holds: the longest sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.slots - self.free.len()
    }
}

/// One sequence's place in the pool: its slot and how many tokens it holds.
#[derive(Debug)]
pub struct SeqCache {
    slot: usize,
    len: usize,
}

impl SeqCache {
    /// Tokens already in the cache (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a batch: the tokens to add, and its cache.
pub struct Chunk<'a> {
    /// Tokens following what the cache holds.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by the call.
    pub cache: &'a mut SeqCache,
}

impl Model {
    /// Builds the model from Hugging Face safetensors tensors, its projections in
    /// `precision`.
    pub fn from_safetensors(
        config: LlamaConfig,
        vb: VarBuilder,
        precision: Precision,
    ) -> Result<Model, ServingError> {
        let c = &config;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // `[out, in]` weight and optional bias of each projection, fused side by side.
        let dense =
            |parts: &[(VarBuilder, usize)], i: usize, bias: bool| -> candle_core::Result<Dense> {
                let mut loaded = Vec::with_capacity(parts.len());
                for (vb, o) in parts {
                    let weight = vb.get((*o, i), "weight")?;
                    let bias = if bias {
                        Some(vb.get(*o, "bias")?)
                    } else {
                        None
                    };
                    loaded.push((weight, bias));
                }
                let refs: Vec<(&Tensor, Option<Tensor>)> =
                    loaded.iter().map(|(w, b)| (w, b.clone())).collect();
                Dense::fused(&refs, precision)
            };
        let norm = |vb: VarBuilder| -> candle_core::Result<Norm> {
            Ok(Norm::Dense(candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb,
            )?))
        };
        let m = vb.pp("model");
        let embed = m
            .pp("embed_tokens")
            .get((c.vocab_size, c.hidden_size), "weight")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let mlp = l.pp("mlp");
            let qkv = dense(
                &[
                    (a.pp("q_proj"), h * hd),
                    (a.pp("k_proj"), kv * hd),
                    (a.pp("v_proj"), kv * hd),
                ],
                c.hidden_size,
                c.attention_bias,
            )?;
            let gate_up = dense(
                &[
                    (mlp.pp("gate_proj"), c.intermediate_size),
                    (mlp.pp("up_proj"), c.intermediate_size),
                ],
                c.hidden_size,
                false,
            )?;
            layers.push(Layer {
                input_norm: norm(l.pp("input_layernorm"))?,
                qkv: Qkv::Fused {
                    proj: qkv,
                    q: h * hd,
                    kv: kv * hd,
                },
                o: Proj::Dense(dense(&[(a.pp("o_proj"), c.hidden_size)], h * hd, false)?),
                post_norm: norm(l.pp("post_attention_layernorm"))?,
                gate_up: GateUp::Fused(gate_up),
                down: Proj::Dense(dense(
                    &[(mlp.pp("down_proj"), c.hidden_size)],
                    c.intermediate_size,
                    false,
                )?),
            });
        }
        let norm_out = norm(m.pp("norm"))?;
        let lm_head = if c.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            Proj::Tied(candle_nn::Linear::new(embed.clone(), None))
        } else {
            Proj::Dense(dense(
                &[(vb.pp("lm_head"), c.vocab_size)],
                c.hidden_size,
                false,
            )?)
        };
        Self::assemble(config, embed, layers, norm_out, lm_head, vb.device())
    }

    /// Builds the model from a GGUF file's tensors.
    pub fn from_gguf(
        config: LlamaConfig,
        vb: candle_transformers::quantized_var_builder::VarBuilder,
    ) -> Result<Model, ServingError> {
        use candle_transformers::quantized_nn as qnn;
        let c = &config;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let proj = |vb: candle_transformers::quantized_var_builder::VarBuilder,
                    i: usize,
                    o: usize,
                    bias: bool|
         -> candle_core::Result<Proj> {
            Ok(Proj::Quant(qnn::linear_b(i, o, bias, vb)?))
        };
        let norm = |vb: candle_transformers::quantized_var_builder::VarBuilder| {
            qnn::RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb).map(Norm::Quant)
        };
        let embed = vb
            .pp("token_embd")
            .get((c.vocab_size, c.hidden_size), "weight")?
            .dequantize(vb.device())?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = vb.pp(format!("blk.{i}"));
            layers.push(Layer {
                input_norm: norm(b.pp("attn_norm"))?,
                qkv: Qkv::Split(
                    proj(b.pp("attn_q"), c.hidden_size, h * hd, c.attention_bias)?,
                    proj(b.pp("attn_k"), c.hidden_size, kv * hd, c.attention_bias)?,
                    proj(b.pp("attn_v"), c.hidden_size, kv * hd, c.attention_bias)?,
                ),
                o: proj(b.pp("attn_output"), h * hd, c.hidden_size, false)?,
                post_norm: norm(b.pp("ffn_norm"))?,
                gate_up: GateUp::Split(
                    proj(b.pp("ffn_gate"), c.hidden_size, c.intermediate_size, false)?,
                    proj(b.pp("ffn_up"), c.hidden_size, c.intermediate_size, false)?,
                ),
                down: proj(b.pp("ffn_down"), c.intermediate_size, c.hidden_size, false)?,
            });
        }
        let norm_out = norm(vb.pp("output_norm"))?;
        let lm_head = if vb.contains_key("output.weight") {
            proj(vb.pp("output"), c.hidden_size, c.vocab_size, false)?
        } else {
            Proj::Tied(candle_nn::Linear::new(embed.clone(), None))
        };
        Self::assemble(config, embed, layers, norm_out, lm_head, vb.device())
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Norm,
        lm_head: Proj,
        device: &Device,
    ) -> Result<Model, ServingError> {
        let (cos, sin) = rotary_tables(&config, device)?;
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            pool_kernel: device.is_cpu(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A pool of `slots` sequences of up to `capacity` tokens each (at most the
    /// context). Its memory is `slots × capacity ×` [`LlamaConfig::kv_bytes_per_token`],
    /// taken here, whole: on the CPU it is written once now, so the OS maps (and
    /// zeroes) its pages at startup rather than in the middle of the first steps
    /// that reach them.
    pub fn new_pool(&self, slots: usize, capacity: usize) -> Result<KvPool, ServingError> {
        let c = &self.config;
        let slots = slots.max(1);
        let capacity = capacity.clamp(1, c.max_position_embeddings);
        let shape = (slots, c.num_key_value_heads, capacity, c.head_dim);
        let zeros = || match &self.device {
            Device::Cpu => {
                let n = slots * c.num_key_value_heads * capacity * c.head_dim;
                let mut values: Vec<f32> = Vec::with_capacity(n);
                // Every page written, by all the threads (mapping a page is most of
                // the cost); not `vec![0.0; n]`, which takes zeroed memory untouched.
                values.spare_capacity_mut()[..n]
                    .par_chunks_mut(1 << 18)
                    .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
                // SAFETY: the `n` elements were all written just above.
                unsafe { values.set_len(n) };
                Tensor::from_vec(values, shape, &self.device)
            }
            _ => Tensor::zeros(shape, DType::F32, &self.device),
        };
        let mut k = Vec::with_capacity(c.num_hidden_layers);
        let mut v = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            k.push(zeros()?);
            v.push(zeros()?);
        }
        Ok(KvPool {
            k,
            v,
            slots,
            capacity,
            free: (0..slots).rev().collect(),
        })
    }

    /// Runs one packed batch: each chunk's tokens are appended to its sequence's
    /// slot, and the logits after each chunk's last token come back as
    /// `[chunks, vocab]` rows, in order. Chunks must be non-empty and stay within the
    /// pool's capacity; one-token chunks at the front attend together in one batch.
    pub fn forward(&self, pool: &KvPool, chunks: &mut [Chunk<'_>]) -> Result<Tensor, ServingError> {
        let c = &self.config;
        if chunks.is_empty() {
            return Err(ServingError::model("an empty batch"));
        }
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let cap = pool.capacity;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut last = Vec::with_capacity(chunks.len());
        // Where each new token's keys go: one row of `[slots*kv*cap, hd]` per head.
        let mut rows = Vec::new();
        for chunk in chunks.iter() {
            let start = chunk.cache.len;
            let end = start + chunk.tokens.len();
            if chunk.tokens.is_empty() || end > cap || chunk.cache.slot >= pool.slots {
                return Err(ServingError::model(format!(
                    "a chunk of {} tokens at position {start} does not fit a sequence of {cap}",
                    chunk.tokens.len()
                )));
            }
            ids.extend_from_slice(chunk.tokens);
            for p in start..end {
                positions.push(p as u32);
                for head in 0..kv {
                    rows.push(((chunk.cache.slot * kv + head) * cap + p) as u32);
                }
            }
            last.push((ids.len() - 1) as u32);
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ServingError::invalid(
                "prompt",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    c.vocab_size
                ),
            ));
        }
        let n = ids.len();
        let dev = &self.device;
        let ids = Tensor::from_vec(ids, n, dev)?;
        let positions = Tensor::from_vec(positions, n, dev)?;
        let rows = Tensor::from_vec(rows, (n * kv, 1), dev)?
            .broadcast_as((n * kv, hd))?
            .contiguous()?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let attention = match self.pool_kernel {
            true => Attention::Pool(key_spans(chunks, c.sliding_window)),
            false => Attention::Batched(Decode::plan(chunks, pool, c.sliding_window, dev)?),
        };

        let mut x = self.embed.index_select(&ids, 0)?; // [n, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let normed = layer.input_norm.forward(&x)?;
            let (q, k, v) = layer.qkv.forward(&normed)?;
            let q = (self.rotate(&q, h, &cos, &sin)? * scale)?; // [h, n, hd]
            let k = self.rotate(&k, kv, &cos, &sin)?; // [kv, n, hd]
                                                      // Keys and values into their slots, every token at once.
            let flat = (pool.slots * kv * cap, hd);
            let k_rows = k.transpose(0, 1)?.contiguous()?.reshape((n * kv, hd))?;
            let v_rows = v.reshape((n * kv, hd))?;
            let k_pool = pool.k[li].reshape(flat)?;
            let v_pool = pool.v[li].reshape(flat)?;
            k_pool.scatter_set(&rows, &k_rows, 0)?;
            v_pool.scatter_set(&rows, &v_rows, 0)?;

            let attn = match &attention {
                Attention::Pool(spans) => {
                    let q = q.transpose(0, 1)?.contiguous()?.reshape((n, h * hd))?;
                    pool_attention(&q, &pool.k[li], &pool.v[li], spans, h)?
                }
                Attention::Batched(decode) => {
                    self.batched_attention(li, &q, pool, chunks, decode)?
                }
            };
            let x1 = (layer.o.forward(&attn)? + residual)?;
            let normed = layer.post_norm.forward(&x1)?;
            x = (layer.down.forward(&layer.gate_up.forward(&normed)?)? + x1)?;
        }
        for chunk in chunks.iter_mut() {
            chunk.cache.len += chunk.tokens.len();
        }
        let last = Tensor::from_vec(last, chunks.len(), dev)?;
        let x = self.norm.forward(&x.index_select(&last, 0)?)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Attention of a batch through candle's ops: the decoding chunks together (see
    /// [`Decode`]), then each prompt chunk over its slot. `q` is `[h, n, hd]`.
    fn batched_attention(
        &self,
        li: usize,
        q: &Tensor,
        pool: &KvPool,
        chunks: &[Chunk<'_>],
        decode: &Decode,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = h / kv;
        let dev = &self.device;
        let mut outs = Vec::with_capacity(chunks.len() - decode.count + 1);
        if decode.count > 0 {
            // Queries placed by slot over the span of the decoding slots, so the
            // keys and values are read where they lie in the pool, not copied out.
            let (b, span) = (decode.count, decode.span);
            let qd = q
                .narrow(1, 0, b)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((b, h * hd))?
                .index_select(&decode.place, 0)?
                .reshape((span, kv, rep, hd))?;
            let kd = pool.k[li]
                .narrow(0, decode.first_slot, span)?
                .narrow(2, 0, decode.keys)?;
            let vd = pool.v[li]
                .narrow(0, decode.first_slot, span)?
                .narrow(2, 0, decode.keys)?;
            let scores = qd.matmul(&kd.t()?)?.broadcast_add(&decode.mask)?; // [span, kv, rep, keys]
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            outs.push(
                probs
                    .matmul(&vd)?
                    .reshape((span, h * hd))?
                    .index_select(&decode.take, 0)?,
            );
        }
        let mut at = decode.count;
        for chunk in chunks[decode.count..].iter() {
            let t = chunk.tokens.len();
            let start = chunk.cache.len;
            let total = start + t;
            let first_key = match c.sliding_window {
                Some(w) if total > w && t == 1 => total - w,
                _ => 0,
            };
            let keys = total - first_key;
            let slot_k = pool.k[li]
                .narrow(0, chunk.cache.slot, 1)?
                .narrow(2, first_key, keys)?;
            let slot_v = pool.v[li]
                .narrow(0, chunk.cache.slot, 1)?
                .narrow(2, first_key, keys)?;
            // Grouped-query attention without copying keys: the `rep` query heads
            // of one key/value head are laid out as one longer query block.
            let qg = q
                .narrow(1, at, t)?
                .contiguous()?
                .reshape((1, kv, rep * t, hd))?;
            at += t;
            let scores = qg.matmul(&slot_k.t()?)?; // [1, kv, rep*t, keys]
            let scores = if t > 1 || first_key > 0 {
                let mask = attention_mask(t, start, first_key, keys, c.sliding_window, dev)?;
                scores
                    .reshape((kv, rep, t, keys))?
                    .broadcast_add(&mask)?
                    .reshape((1, kv, rep * t, keys))?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&slot_v)?; // [1, kv, rep*t, hd]
            outs.push(
                out.reshape((h, t, hd))?
                    .transpose(0, 1)?
                    .reshape((t, h * hd))?,
            );
        }
        Tensor::cat(&outs, 0)
    }

    /// `[n, heads*hd]` projections → `[heads, n, hd]` with each token rotated by its
    /// own position.
    fn rotate(
        &self,
        x: &Tensor,
        heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let x = x
            .reshape((1, n, heads, self.config.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let x = if self.config.rope_interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        x.squeeze(0)
    }
}

/// The keys each token of a batch attends to, in order: its sequence's positions up
/// to its own (no further back than a sliding window).
fn key_spans(chunks: &[Chunk<'_>], window: Option<usize>) -> Vec<KeySpan> {
    let mut spans = Vec::new();
    for chunk in chunks {
        for pos in chunk.cache.len..chunk.cache.len + chunk.tokens.len() {
            let first_key = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            spans.push(KeySpan {
                slot: chunk.cache.slot,
                first_key,
                keys: pos + 1 - first_key,
            });
        }
    }
    spans
}

/// How a batch attends.
enum Attention {
    /// On the CPU: every token over its own keys, where they lie in the pool.
    Pool(Vec<KeySpan>),
    /// Elsewhere: candle's ops.
    Batched(Decode),
}

/// Attention through candle's ops (devices other than the CPU). The leading
/// one-token chunks of a batch attend together, reading their slots in place: the pool's slots `first_slot..first_slot + span` (those of the
/// decoding sequences and any between them), their first `keys` positions, with a
/// mask hiding each slot's positions beyond its sequence (and beyond a sliding
/// window). Slots in the span that no decoding sequence holds compute a row that is
/// thrown away.
struct Decode {
    count: usize,
    first_slot: usize,
    span: usize,
    keys: usize,
    /// For each slot of the span, the decoding chunk whose query goes there.
    place: Tensor,
    /// For each decoding chunk, its slot's row of the span.
    take: Tensor,
    /// `[span, 1, 1, keys]`.
    mask: Tensor,
}

impl Decode {
    fn plan(
        chunks: &[Chunk<'_>],
        pool: &KvPool,
        window: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<Decode> {
        let count = chunks.iter().take_while(|c| c.tokens.len() == 1).count();
        let decoding = &chunks[..count];
        let first_slot = decoding.iter().map(|c| c.cache.slot).min().unwrap_or(0);
        let last_slot = decoding.iter().map(|c| c.cache.slot).max().unwrap_or(0);
        let span = last_slot + 1 - first_slot;
        // Each sequence's length once its token is in.
        let keys = decoding
            .iter()
            .map(|c| c.cache.len + 1)
            .max()
            .unwrap_or(1)
            .min(pool.capacity);
        let mut place = vec![0u32; span];
        let mut take = Vec::with_capacity(count);
        // Slots no decoding sequence holds see every key: finite, and discarded.
        let mut mask = vec![0f32; span * keys];
        for (i, chunk) in decoding.iter().enumerate() {
            let row = chunk.cache.slot - first_slot;
            place[row] = i as u32;
            take.push(row as u32);
            let len = chunk.cache.len + 1;
            let first = window.map_or(0, |w| len.saturating_sub(w));
            for (j, m) in mask[row * keys..(row + 1) * keys].iter_mut().enumerate() {
                if j < first || j >= len {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Decode {
            count,
            first_slot,
            span,
            keys,
            place: Tensor::from_vec(place, span, device)?,
            take: Tensor::from_vec(take, count, device)?,
            mask: Tensor::from_vec(mask, (span, 1, 1, keys), device)?,
        })
    }
}

/// `[t, keys]` additive mask for `t` queries starting at `start`, over keys from
/// `first_key`: a query sees keys up to its own position (and, with a window, no
/// further back than the window).
fn attention_mask(
    t: usize,
    start: usize,
    first_key: usize,
    keys: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut mask = Vec::with_capacity(t * keys);
    for i in 0..t {
        let pos = start + i;
        for j in 0..keys {
            let key = first_key + j;
            let hidden = key > pos || window.is_some_and(|w| pos >= w && key <= pos - w);
            mask.push(if hidden { f32::NEG_INFINITY } else { 0.0 });
        }
    }
    Tensor::from_vec(mask, (t, keys), device)
}

/// Cosine and sine tables `[max_position, head_dim/2]`, Hugging Face's convention.
fn rotary_tables(config: &LlamaConfig, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = config.head_dim;
    let inv: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0 / config.rope_theta.powf(i as f32 / hd as f32))
        .map(|freq| match &config.rope_scaling {
            None => freq,
            Some(s) => {
                let low = s.original_max_position_embeddings as f32 / s.low_freq_factor;
                let high = s.original_max_position_embeddings as f32 / s.high_freq_factor;
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high {
                    freq
                } else if wavelen > low {
                    freq / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f32 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                }
            }
        })
        .collect();
    let half = inv.len();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let max = config.max_position_embeddings;
    let t = Tensor::arange(0u32, max as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max, 1))?;
    let freqs = t.matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_transformers::models::llama as reference;

    use super::*;

    const CONFIG: &str = r#"{"model_type":"llama","vocab_size":97,"hidden_size":32,
        "intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,
        "max_position_embeddings":64,"tie_word_embeddings":false}"#;

    fn weights(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dev = Device::Cpu;
        let mut rand = |shape: (usize, usize)| {
            let data: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-0.2f32..0.2))
                .collect();
            Tensor::from_vec(data, shape, &dev).unwrap()
        };
        let (h, kv, hd) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        let (d, f, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let mut w = HashMap::new();
        w.insert("model.embed_tokens.weight".into(), rand((v, d)));
        w.insert("lm_head.weight".into(), rand((v, d)));
        w.insert(
            "model.norm.weight".into(),
            Tensor::ones(d, DType::F32, &dev).unwrap(),
        );
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for (name, shape) in [
                ("self_attn.q_proj", (h * hd, d)),
                ("self_attn.k_proj", (kv * hd, d)),
                ("self_attn.v_proj", (kv * hd, d)),
                ("self_attn.o_proj", (d, h * hd)),
                ("mlp.gate_proj", (f, d)),
                ("mlp.up_proj", (f, d)),
                ("mlp.down_proj", (d, f)),
            ] {
                w.insert(format!("{p}.{name}.weight"), rand(shape));
            }
            for name in ["input_layernorm", "post_attention_layernorm"] {
                w.insert(
                    format!("{p}.{name}.weight"),
                    (Tensor::ones(d, DType::F32, &dev).unwrap() + 0.1).unwrap(),
                );
            }
        }
        w
    }

    fn models() -> (Model, reference::Llama, reference::Config) {
        let config = LlamaConfig::from_hf_json(CONFIG.as_bytes()).unwrap();
        let w = weights(&config, 11);
        let ours = Model::from_safetensors(
            config,
            VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
            Precision::F32,
        )
        .unwrap();
        let cfg: reference::LlamaConfig = serde_json::from_str(CONFIG).unwrap();
        let cfg = cfg.into_config(false);
        let theirs =
            reference::Llama::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &cfg)
                .unwrap();
        (ours, theirs, cfg)
    }

    #[test]
    fn one_sequence_matches_candle_transformers_llama_step_by_step() {
        // The CPU's pool kernel, and candle's ops (the other devices' path).
        for pool_kernel in [true, false] {
            let (mut ours, theirs, cfg) = models();
            ours.pool_kernel = pool_kernel;
            let mut their_cache =
                reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
            let mut pool = ours.new_pool(2, 64).unwrap();
            let mut cache = pool.acquire().unwrap();
            let prompt = [1u32, 5, 9, 33, 2, 70];
            let x = Tensor::new(&prompt[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mut expect = theirs.forward(&x, 0, &mut their_cache).unwrap();
            let mut got = ours
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens: &prompt,
                        cache: &mut cache,
                    }],
                )
                .unwrap();
            for step in 0..20 {
                assert!(crate::max_abs_diff(&got, &expect) < 1e-4, "step {step}");
                let next =
                    crate::sampling::argmax(&got.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
                let x = Tensor::new(&[next], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                expect = theirs
                    .forward(&x, prompt.len() + step, &mut their_cache)
                    .unwrap();
                got = ours
                    .forward(
                        &pool,
                        &mut [Chunk {
                            tokens: &[next],
                            cache: &mut cache,
                        }],
                    )
                    .unwrap();
            }
            assert_eq!(cache.len(), prompt.len() + 20);
        }
    }

    #[test]
    fn a_sliding_window_attends_the_same_through_both_paths() {
        let json = CONFIG.replace(
            r#""model_type":"llama""#,
            r#""model_type":"mistral","sliding_window":5"#,
        );
        let config = LlamaConfig::from_hf_json(json.as_bytes()).unwrap();
        assert_eq!(config.sliding_window, Some(5));
        let w = weights(&config, 3);
        let load = |pool_kernel: bool| {
            let mut m = Model::from_safetensors(
                config.clone(),
                VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
                Precision::F32,
            )
            .unwrap();
            m.pool_kernel = pool_kernel;
            m
        };
        let (kernel, batched) = (load(true), load(false));
        let prompt: Vec<u32> = (0..12).map(|i| (i * 11 + 2) % 97).collect();
        let mut logits = Vec::new();
        for model in [&kernel, &batched] {
            let mut pool = model.new_pool(2, 64).unwrap();
            let mut cache = pool.acquire().unwrap();
            // The prompt in two chunks, then decoding past the window.
            let mut run = vec![];
            for tokens in [&prompt[..7], &prompt[7..], &[4], &[9], &[1]] {
                let out = model
                    .forward(
                        &pool,
                        &mut [Chunk {
                            tokens,
                            cache: &mut cache,
                        }],
                    )
                    .unwrap();
                run.push(out);
            }
            logits.push(run);
        }
        for (step, (a, b)) in logits[0].iter().zip(&logits[1]).enumerate() {
            assert!(crate::max_abs_diff(a, b) < 1e-5, "step {step}");
        }
        // The window matters: without it the same tokens give other logits.
        let full = {
            let model = Model::from_safetensors(
                LlamaConfig::from_hf_json(CONFIG.as_bytes()).unwrap(),
                VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
                Precision::F32,
            )
            .unwrap();
            let mut pool = model.new_pool(1, 64).unwrap();
            let mut cache = pool.acquire().unwrap();
            model
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens: &prompt,
                        cache: &mut cache,
                    }],
                )
                .unwrap()
        };
        assert!(crate::max_abs_diff(&full, &logits[0][1]) > 1e-3);
    }

    #[test]
    fn bf16_projections_stay_close_to_f32_and_batch_alike() {
        if !crate::amx::available() {
            return crate::skip("this CPU has no AMX-BF16");
        }
        let config = LlamaConfig::from_hf_json(CONFIG.as_bytes()).unwrap();
        let w = weights(&config, 11);
        let load = |precision| {
            Model::from_safetensors(
                config.clone(),
                VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu),
                precision,
            )
            .unwrap()
        };
        let (f32_model, bf16_model) = (load(Precision::F32), load(Precision::Bf16));
        let a: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 97).collect();
        let b: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
        let run = |model: &Model, prompts: &[&[u32]]| {
            let mut pool = model.new_pool(2, 64).unwrap();
            let mut caches: Vec<_> = prompts.iter().map(|_| pool.acquire().unwrap()).collect();
            let mut chunks: Vec<Chunk> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(tokens, cache)| Chunk { tokens, cache })
                .collect();
            model.forward(&pool, &mut chunks).unwrap()
        };
        let (exact, rounded) = (run(&f32_model, &[&a]), run(&bf16_model, &[&a]));
        let diff = crate::max_abs_diff(&exact, &rounded);
        assert!(diff > 0.0 && diff < 0.05, "bf16 logits off by {diff}");
        // A sequence's logits are the same alone or batched with another.
        let both = run(&bf16_model, &[&a, &b]);
        assert!(crate::max_abs_diff(&both.get(0).unwrap(), &rounded.squeeze(0).unwrap()) < 1e-5);
    }

    #[test]
    fn batching_and_chunked_prefill_change_no_logit() {
        // The CPU's pool kernel, and candle's ops (the other devices' path).
        for pool_kernel in [true, false] {
            let (mut ours, _, _) = models();
            ours.pool_kernel = pool_kernel;
            let a: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 97).collect();
            let b: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
            // Alone.
            let mut pool = ours.new_pool(4, 64).unwrap();
            let mut ca = pool.acquire().unwrap();
            let alone_a = ours
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens: &a,
                        cache: &mut ca,
                    }],
                )
                .unwrap();
            let alone_a2 = ours
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens: &[9],
                        cache: &mut ca,
                    }],
                )
                .unwrap();
            let mut cb = pool.acquire().unwrap();
            let alone_b = ours
                .forward(
                    &pool,
                    &mut [Chunk {
                        tokens: &b,
                        cache: &mut cb,
                    }],
                )
                .unwrap();
            // a prefilled in two chunks, the second batched with b's whole prompt, then
            // both decoding together.
            let mut ca = pool.acquire().unwrap();
            let mut cb = pool.acquire().unwrap();
            ours.forward(
                &pool,
                &mut [Chunk {
                    tokens: &a[..5],
                    cache: &mut ca,
                }],
            )
            .unwrap();
            let both = ours
                .forward(
                    &pool,
                    &mut [
                        Chunk {
                            tokens: &a[5..],
                            cache: &mut ca,
                        },
                        Chunk {
                            tokens: &b,
                            cache: &mut cb,
                        },
                    ],
                )
                .unwrap();
            assert!(
                crate::max_abs_diff(&both.get(0).unwrap(), &alone_a.squeeze(0).unwrap()) < 1e-5
            );
            assert!(
                crate::max_abs_diff(&both.get(1).unwrap(), &alone_b.squeeze(0).unwrap()) < 1e-5
            );
            let step = ours
                .forward(
                    &pool,
                    &mut [
                        Chunk {
                            tokens: &[9],
                            cache: &mut ca,
                        },
                        Chunk {
                            tokens: &[1],
                            cache: &mut cb,
                        },
                    ],
                )
                .unwrap();
            assert!(
                crate::max_abs_diff(&step.get(0).unwrap(), &alone_a2.squeeze(0).unwrap()) < 1e-5
            );
        }
    }

    #[test]
    fn configs_are_checked() {
        let bad = CONFIG.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(LlamaConfig::from_hf_json(bad.as_bytes()).is_err());
        let bert = CONFIG.replace("\"llama\"", "\"bert\"");
        let err = LlamaConfig::from_hf_json(bert.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bert"), "{err}");
        let qwen = CONFIG.replace("\"llama\"", "\"qwen2\"");
        assert!(
            LlamaConfig::from_hf_json(qwen.as_bytes())
                .unwrap()
                .attention_bias
        );
        let (ours, _, _) = models();
        let pool = ours.new_pool(1, 64).unwrap();
        let mut cache = SeqCache { slot: 0, len: 0 };
        let err = ours
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &[500],
                    cache: &mut cache,
                }],
            )
            .unwrap_err();
        assert!(err.to_string().contains("vocabulary"));
        let long = vec![1u32; 65];
        assert!(ours
            .forward(
                &pool,
                &mut [Chunk {
                    tokens: &long,
                    cache: &mut cache
                }]
            )
            .is_err());
        assert!(cache.is_empty());
    }
}
