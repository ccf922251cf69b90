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
use serde::Deserialize;

use crate::dense::{Dense, Precision};
use crate::kernels::cpu::ops::{pool_attention, KeySpan};
use crate::kernels::Backend;
use crate::ServingError;

mod attention;
mod config;
mod forward;
#[cfg(test)]
mod tests;
mod weights;

pub use crate::kv_pool::{Chunk, KvPool, SeqCache};
use attention::*;
pub use config::{LlamaConfig, RopeScaling, ARCHITECTURES};
use weights::*;

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
    /// Chosen from the device at load.
    backend: Backend,
    /// Attention through [`pool_attention`] (the CPU backend's) rather than
    /// candle's ops.
    pool_kernel: bool,
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
        let backend = Backend::for_device(vb.device());
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
                Dense::fused(backend, &refs, precision)
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
                gate_up: GateUp::Fused(gate_up, backend),
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
        Self::assemble(config, embed, layers, norm_out, lm_head, backend)
    }

    /// Builds the model from a GGUF file's tensors. Float matrices (F16, BF16, F32)
    /// are widened to f32 once and laid out for the backend's product, as
    /// safetensors are, with the query, key and value (and gate and up) projections
    /// fused; Q8_0 ones stay 8-bit and, on a CPU whose widest product is AVX2's,
    /// are fused and go through the packed product ([`Dense::q8_fused`]), so that
    /// a step of many sequences reads each block once. Other quantized matrices
    /// (Q4_K and the like), and Q8_0 elsewhere, run through candle's quantized
    /// products.
    pub fn from_gguf(
        config: LlamaConfig,
        vb: candle_transformers::quantized_var_builder::VarBuilder,
    ) -> Result<Model, ServingError> {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_transformers::quantized_nn as qnn;
        type QVarBuilder = candle_transformers::quantized_var_builder::VarBuilder;
        let c = &config;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let backend = Backend::for_device(vb.device());
        let proj = |vb: QVarBuilder, i: usize, o: usize, bias: bool| -> candle_core::Result<Proj> {
            Ok(Proj::Quant(qnn::linear_b(i, o, bias, vb)?))
        };
        // The projections `parts` fused for the backend's product when every one of
        // them is stored as floats (widened to f32), or every one as Q8_0 blocks
        // where those go through the packed product; `None` otherwise (candle's
        // quantized products then run them one by one).
        let laid_out = |parts: &[(QVarBuilder, usize)],
                        i: usize,
                        bias: bool|
         -> candle_core::Result<Option<Dense>> {
            let mut weights = Vec::with_capacity(parts.len());
            for (vb, o) in parts {
                let weight = vb.get((*o, i), "weight")?;
                let bias = if bias {
                    Some(vb.get(*o, "bias")?.dequantize(vb.device())?)
                } else {
                    None
                };
                weights.push((weight, bias));
            }
            let types: Vec<GgmlDType> = weights.iter().map(|(w, _)| w.dtype()).collect();
            if types.iter().all(|t| *t == GgmlDType::Q8_0) {
                let refs: Vec<(&QTensor, Option<Tensor>)> = weights
                    .iter()
                    .map(|(w, b)| (w.as_ref(), b.clone()))
                    .collect();
                return Dense::q8_fused(backend, &refs);
            }
            if !types
                .iter()
                .all(|t| matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
            {
                return Ok(None);
            }
            let mut loaded = Vec::with_capacity(weights.len());
            for (weight, bias) in weights {
                loaded.push((weight.dequantize(vb.device())?, bias));
            }
            let refs: Vec<(&Tensor, Option<Tensor>)> =
                loaded.iter().map(|(w, b)| (w, b.clone())).collect();
            Dense::fused(backend, &refs, Precision::F32).map(Some)
        };
        let one = |vb: QVarBuilder, i: usize, o: usize, bias: bool| -> candle_core::Result<Proj> {
            match laid_out(&[(vb.clone(), o)], i, bias)? {
                Some(dense) => Ok(Proj::Dense(dense)),
                None => proj(vb, i, o, bias),
            }
        };
        let norm =
            |vb: QVarBuilder| qnn::RmsNorm::new(c.hidden_size, c.rms_norm_eps, vb).map(Norm::Quant);
        let embed = vb
            .pp("token_embd")
            .get((c.vocab_size, c.hidden_size), "weight")?
            .dequantize(vb.device())?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = vb.pp(format!("blk.{i}"));
            let (q, k, v) = (b.pp("attn_q"), b.pp("attn_k"), b.pp("attn_v"));
            let qkv_parts = [
                (q.clone(), h * hd),
                (k.clone(), kv * hd),
                (v.clone(), kv * hd),
            ];
            let qkv = match laid_out(&qkv_parts, c.hidden_size, c.attention_bias)? {
                Some(proj) => Qkv::Fused {
                    proj,
                    q: h * hd,
                    kv: kv * hd,
                },
                None => Qkv::Split(
                    proj(q, c.hidden_size, h * hd, c.attention_bias)?,
                    proj(k, c.hidden_size, kv * hd, c.attention_bias)?,
                    proj(v, c.hidden_size, kv * hd, c.attention_bias)?,
                ),
            };
            let (gate, up) = (b.pp("ffn_gate"), b.pp("ffn_up"));
            let gate_up_parts = [
                (gate.clone(), c.intermediate_size),
                (up.clone(), c.intermediate_size),
            ];
            let gate_up = match laid_out(&gate_up_parts, c.hidden_size, false)? {
                Some(dense) => GateUp::Fused(dense, backend),
                None => GateUp::Split(
                    proj(gate, c.hidden_size, c.intermediate_size, false)?,
                    proj(up, c.hidden_size, c.intermediate_size, false)?,
                ),
            };
            layers.push(Layer {
                input_norm: norm(b.pp("attn_norm"))?,
                qkv,
                o: one(b.pp("attn_output"), h * hd, c.hidden_size, false)?,
                post_norm: norm(b.pp("ffn_norm"))?,
                gate_up,
                down: one(b.pp("ffn_down"), c.intermediate_size, c.hidden_size, false)?,
            });
        }
        let norm_out = norm(vb.pp("output_norm"))?;
        let lm_head = if vb.contains_key("output.weight") {
            one(vb.pp("output"), c.hidden_size, c.vocab_size, false)?
        } else {
            Proj::Tied(candle_nn::Linear::new(embed.clone(), None))
        };
        Self::assemble(config, embed, layers, norm_out, lm_head, backend)
    }

    fn assemble(
        config: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Norm,
        lm_head: Proj,
        backend: Backend,
    ) -> Result<Model, ServingError> {
        // The token embeddings lie on the model's device.
        let device = embed.device().clone();
        let (cos, sin) = rotary_tables(&config, &device)?;
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device,
            backend,
            pool_kernel: backend.pool_attention(),
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
        let shape = [slots, c.num_key_value_heads, capacity, c.head_dim];
        let zeros = || self.backend.zeros_written(&shape, &self.device);
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
}

impl crate::model::Decoder for Model {
    fn context(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.config.kv_bytes_per_token()
    }

    fn new_pool(&self, slots: usize, capacity: usize) -> Result<KvPool, ServingError> {
        Model::new_pool(self, slots, capacity)
    }

    fn forward(&self, pool: &KvPool, chunks: &mut [Chunk<'_>]) -> Result<Tensor, ServingError> {
        Model::forward(self, pool, chunks)
    }
}
