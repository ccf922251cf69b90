//! BERT-family sentence embeddings (all-MiniLM-L6-v2 and similar) with
//! sentence-transformers pooling and normalization.
//!
//! A sentence-transformers model is the BERT encoder followed by modules listed in
//! `modules.json`: a Pooling module that turns per-token vectors into one vector
//! (its `config.json` says how) and often a Normalize module. [`Pooling`] reads
//! those files; [`Embedder`] runs the encoder and pools.
//!
//! The encoder is written here on candle's ops rather than taken from
//! candle-transformers, for speed on the CPU: a batch is packed, not padded (the
//! rows of every sequence's tokens stacked into one matrix, attention per
//! sequence), projections keep their weights transposed ([`Dense`]), and each
//! projection's bias, activation, residual sum and layer norm run as one pass of a
//! vectorized kernel. So a forward costs its real tokens, and a sentence embeds the
//! same alone or in any batch.

use candle_core::{
    CpuStorage, DType, Device, IndexOp, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Module as _,
    Tensor,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;

use crate::dense::{Dense, Precision};
use crate::error::ServingError;
use crate::ops::{exp, f32_data, f32_data_mut, lane_sum, softmax_rows, vectorized};

/// How per-token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The mean over the real tokens.
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
    /// The element-wise maximum over the real tokens.
    Max,
}

/// A sentence-transformers pooling: the mode and whether vectors are scaled to
/// unit length (which makes the dot product equal the cosine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// How tokens are pooled.
    pub mode: PoolingMode,
    /// Whether the pooled vector is L2-normalized.
    pub normalize: bool,
}

/// One entry of sentence-transformers' `modules.json`.
#[derive(Debug, Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// sentence-transformers' Pooling `config.json`; modes it has that are not
/// supported here must be off.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PoolingConfig {
    pooling_mode_cls_token: bool,
    pooling_mode_mean_tokens: bool,
    pooling_mode_max_tokens: bool,
    pooling_mode_mean_sqrt_len_tokens: bool,
    pooling_mode_weightedmean_tokens: bool,
    pooling_mode_lasttoken: bool,
}

fn modules(modules_json: &[u8]) -> Result<Vec<Module>, ServingError> {
    serde_json::from_slice(modules_json)
        .map_err(|e| ServingError::model(format!("modules.json: {e}")))
}

/// Whether a module's `type` (e.g. `sentence_transformers.models.Pooling`) names
/// the class `class`.
fn is_class(module: &Module, class: &str) -> bool {
    module.kind.rsplit('.').next() == Some(class)
}

impl Pooling {
    /// From sentence-transformers files: `modules.json` (a
    /// `sentence_transformers.models.Normalize` module means normalize; the
    /// Pooling module's `path` holds its config) and that pooling config.json.
    /// With no modules.json: mean pooling, normalized. With no pooling config:
    /// mean pooling, sentence-transformers' default.
    pub fn from_files(
        modules_json: Option<&[u8]>,
        pooling_config: Option<&[u8]>,
    ) -> Result<Self, ServingError> {
        let normalize = match modules_json {
            None => true,
            Some(bytes) => modules(bytes)?.iter().any(|m| is_class(m, "Normalize")),
        };
        let mode = match pooling_config {
            None => PoolingMode::Mean,
            Some(bytes) => pooling_mode(bytes)?,
        };
        Ok(Pooling { mode, normalize })
    }

    /// The pooling config path modules.json names (e.g. `1_Pooling/config.json`),
    /// if any.
    pub fn config_path(modules_json: &[u8]) -> Result<Option<String>, ServingError> {
        Ok(modules(modules_json)?
            .iter()
            .find(|m| is_class(m, "Pooling"))
            .map(|m| {
                let dir = m.path.trim_matches('/');
                if dir.is_empty() {
                    "config.json".to_owned()
                } else {
                    format!("{dir}/config.json")
                }
            }))
    }
}

fn pooling_mode(bytes: &[u8]) -> Result<PoolingMode, ServingError> {
    let config: PoolingConfig = serde_json::from_slice(bytes)
        .map_err(|e| ServingError::model(format!("pooling config.json: {e}")))?;
    if config.pooling_mode_mean_sqrt_len_tokens
        || config.pooling_mode_weightedmean_tokens
        || config.pooling_mode_lasttoken
    {
        return Err(ServingError::model(
            "pooling config.json: only mean, cls and max pooling are supported",
        ));
    }
    match (
        config.pooling_mode_mean_tokens,
        config.pooling_mode_cls_token,
        config.pooling_mode_max_tokens,
    ) {
        (true, false, false) => Ok(PoolingMode::Mean),
        (false, true, false) => Ok(PoolingMode::Cls),
        (false, false, true) => Ok(PoolingMode::Max),
        (false, false, false) => Err(ServingError::model(
            "pooling config.json: no pooling mode is on",
        )),
        _ => Err(ServingError::model(
            "pooling config.json: concatenated pooling modes are not supported",
        )),
    }
}

/// The fields of a BERT config.json this module reads, with BERT's defaults for
/// the ones that are often left out.
#[derive(Debug, Deserialize)]
struct BertConfigFile {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_max_position")]
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_position() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// The activation between the two feed-forward projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// The exact GELU, `x·Φ(x)` ("gelu").
    Gelu,
    /// GELU's tanh approximation ("gelu_new", "gelu_pytorch_tanh", "gelu_fast").
    GeluTanh,
    Relu,
}

/// The encoder's shape, checked.
#[derive(Debug, Clone)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    activation: Activation,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
    model_type: Option<String>,
}

impl BertConfigFile {
    fn to_config(&self) -> Result<Config, ServingError> {
        let activation = match self.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(ServingError::model(format!(
                    "config.json: unsupported hidden_act {other:?}"
                )))
            }
        };
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(ServingError::model(format!(
                    "config.json: unsupported position_embedding_type {other:?}"
                )))
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ServingError::model(format!(
                "config.json: hidden_size {} does not split into {} attention heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.type_vocab_size == 0 {
            return Err(ServingError::model(
                "config.json: type_vocab_size is 0; token type 0 needs an embedding",
            ));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            activation,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            layer_norm_eps: self.layer_norm_eps,
            model_type: self.model_type.clone(),
        })
    }
}

/// A layer norm over the last dimension (`weight`/`bias`, or the older
/// `gamma`/`beta`) of a sum: the output of the projection before it, that
/// projection's bias, and the residual.
#[derive(Debug)]
struct AddNorm {
    /// The preceding projection's bias (zeros for the embeddings).
    bias: Tensor,
    weight: Tensor,
    beta: Tensor,
    /// `[3, width]`: `bias`, `weight` and `beta` stacked, as the CPU kernel takes them.
    packed: Tensor,
    eps: f32,
}

impl AddNorm {
    /// The norm in `vb`, after a projection with bias `bias` (or none).
    fn load(
        vb: VarBuilder,
        size: usize,
        eps: f64,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Self> {
        let norm = candle_nn::layer_norm(size, eps, vb)?;
        let weight = norm.weight().clone();
        let zeros = || Tensor::zeros(size, weight.dtype(), weight.device());
        let beta = norm.bias().cloned().map_or_else(zeros, Ok)?;
        let bias = bias.map_or_else(zeros, Ok)?;
        let packed = Tensor::stack(&[&bias, &weight, &beta], 0)?;
        Ok(AddNorm {
            bias,
            weight,
            beta,
            packed,
            eps: eps as f32,
        })
    }

    /// `norm(x + bias + residual)`, both `[rows, width]`; `x` is overwritten
    /// where it can be (see [`owned`]).
    fn forward(&self, x: Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if owned(&x) {
            x.inplace_op3(&residual.contiguous()?, &self.packed, &AddNormOp(self.eps))?;
            Ok(x)
        } else {
            let sum = (x + residual)?.broadcast_add(&self.bias)?;
            candle_nn::ops::layer_norm(&sum, &self.weight, &self.beta, self.eps)
        }
    }
}

/// The projection in `vb`: `weight` `[out, in]` and `bias` `[out]` (zeros if
/// there is none).
fn dense_parts(
    vb: VarBuilder,
    input: usize,
    output: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let linear = candle_nn::linear(input, output, vb)?;
    let bias = match linear.bias() {
        Some(b) => b.clone(),
        None => Tensor::zeros(output, linear.weight().dtype(), linear.weight().device())?,
    };
    Ok((linear.weight().clone(), bias))
}

/// The projection in `vb` without its bias, and the bias: the bias is added by
/// the elementwise step that follows, fused with it.
fn dense(
    vb: VarBuilder,
    input: usize,
    output: usize,
    precision: Precision,
) -> candle_core::Result<(Dense, Tensor)> {
    let (weight, bias) = dense_parts(vb, input, output)?;
    Ok((Dense::new(&weight, None, precision)?, bias))
}

/// Token, position and token-type embeddings, summed and normalized.
#[derive(Debug)]
struct Embeddings {
    /// `[vocab, hidden]`.
    words: Tensor,
    /// `[max_position, hidden]`: position embeddings with the token-type-0
    /// embedding already added, since every token here is type 0.
    positions: Tensor,
    norm: AddNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        let words = candle_nn::embedding(config.vocab_size, hidden, vb.pp("word_embeddings"))?;
        let positions = candle_nn::embedding(
            config.max_position_embeddings,
            hidden,
            vb.pp("position_embeddings"),
        )?;
        let types = candle_nn::embedding(
            config.type_vocab_size,
            hidden,
            vb.pp("token_type_embeddings"),
        )?;
        let positions = positions
            .embeddings()
            .broadcast_add(&types.embeddings().narrow(0, 0, 1)?)?;
        Ok(Embeddings {
            words: words.embeddings().clone(),
            positions,
            norm: AddNorm::load(vb.pp("LayerNorm"), hidden, config.layer_norm_eps, None)?,
        })
    }

    /// `ids` and `positions`: `[tokens]` → `[tokens, hidden]`.
    fn forward(&self, ids: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        self.norm.forward(
            self.words.index_select(ids, 0)?,
            &self.positions.index_select(positions, 0)?,
        )
    }
}

/// One encoder layer: self-attention and the feed-forward block, each with a
/// residual connection and a post layer norm.
#[derive(Debug)]
struct Layer {
    /// Query, key and value side by side; the query part is pre-scaled by
    /// `1/√head_dim`, the attention scores' scale.
    qkv: Dense,
    qkv_bias: Tensor,
    attention_out: Dense,
    attention_norm: AddNorm,
    intermediate: Dense,
    intermediate_bias: Tensor,
    activation: Activation,
    output: Dense,
    output_norm: AddNorm,
    heads: usize,
    head_dim: usize,
}

impl Layer {
    fn load(vb: VarBuilder, config: &Config, precision: Precision) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        let head_dim = hidden / heads;
        let eps = config.layer_norm_eps;
        let attention = vb.pp("attention");
        let own = attention.pp("self");
        let (query, query_bias) = dense_parts(own.pp("query"), hidden, hidden)?;
        let (key, key_bias) = dense_parts(own.pp("key"), hidden, hidden)?;
        let (value, value_bias) = dense_parts(own.pp("value"), hidden, hidden)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let qkv = Dense::fused(
            &[(&(query * scale)?, None), (&key, None), (&value, None)],
            precision,
        )?;
        let qkv_bias = Tensor::cat(&[&(query_bias * scale)?, &key_bias, &value_bias], 0)?;
        let out = attention.pp("output");
        let (attention_out, attention_out_bias) =
            dense(out.pp("dense"), hidden, hidden, precision)?;
        let (intermediate, intermediate_bias) = dense(
            vb.pp("intermediate").pp("dense"),
            hidden,
            config.intermediate_size,
            precision,
        )?;
        let (output, output_bias) = dense(
            vb.pp("output").pp("dense"),
            config.intermediate_size,
            hidden,
            precision,
        )?;
        Ok(Layer {
            qkv,
            qkv_bias,
            attention_out,
            attention_norm: AddNorm::load(
                out.pp("LayerNorm"),
                hidden,
                eps,
                Some(attention_out_bias),
            )?,
            intermediate,
            intermediate_bias,
            activation: config.activation,
            output,
            output_norm: AddNorm::load(
                vb.pp("output").pp("LayerNorm"),
                hidden,
                eps,
                Some(output_bias),
            )?,
            heads,
            head_dim,
        })
    }

    /// `x`: the packed `[tokens, hidden]` rows of sequences of `lens` tokens.
    fn forward(&self, x: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
        let qkv = bias_act(self.qkv.forward(x)?, &self.qkv_bias, None)?;
        let context = self.attention(&qkv, lens)?;
        let x = self
            .attention_norm
            .forward(self.attention_out.forward(&context)?, x)?;
        let h = bias_act(
            self.intermediate.forward(&x)?,
            &self.intermediate_bias,
            Some(self.activation),
        )?;
        self.output_norm.forward(self.output.forward(&h)?, &x)
    }

    /// Each sequence attends to its own rows only, so no mask is needed.
    /// `qkv`: `[tokens, 3·hidden]` → `[tokens, hidden]`.
    fn attention(&self, qkv: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
        let tokens = qkv.dim(0)?;
        let (heads, head_dim) = (self.heads, self.head_dim);
        let qkv = qkv.reshape((tokens, 3, heads, head_dim))?;
        let cpu = qkv.device().is_cpu();
        // [len, heads, head_dim] of the sequence of `len` tokens from row `start`.
        let sequence = |(&start, &len): (&usize, &usize)| -> candle_core::Result<Tensor> {
            let rows = qkv.narrow(0, start, len)?;
            // [heads, len, head_dim]. The CPU matmul takes the strided views as
            // they are; other devices want them laid out.
            let part = |i: usize| -> candle_core::Result<Tensor> {
                let t = rows.i((.., i))?.transpose(0, 1)?;
                if cpu {
                    Ok(t)
                } else {
                    t.contiguous()
                }
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let probs = softmax(q.matmul(&k.t()?)?)?;
            probs.matmul(&v)?.transpose(0, 1)
        };
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |next, &len| {
                let start = *next;
                *next += len;
                Some(start)
            })
            .collect();
        // On the CPU each sequence's attention is a few small ops; running the
        // sequences side by side keeps the threads busy instead of waking them
        // for every small op.
        let contexts = if cpu {
            starts
                .par_iter()
                .zip(lens.par_iter())
                .map(sequence)
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            starts
                .iter()
                .zip(lens)
                .map(sequence)
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        Tensor::cat(&contexts, 0)?.reshape((tokens, heads * head_dim))
    }
}

// ---- elementwise steps -----------------------------------------------------------------
//
// Every projection's bias is added by the step after it (the activation, or the
// residual sum before a layer norm), so each step is one pass over its rows. On the
// CPU with f32 these are the kernels below: they overwrite the projection's fresh
// output in place, split over rayon's threads (the pool gemm already runs on), as
// plain loops the compiler vectorizes. On this hardware such passes are bound by
// memory, so their number is what counts. candle's own elementwise ops would each
// take a pass and an allocation, and from 64K elements up they run on candle's
// separate thread pool, whose workers spin after every op and so take a core from
// the next matrix product: about a tenth of a forward at batch 32 on two cores.
// Other devices and dtypes use candle's ops.

/// Whether the fused CPU kernels may overwrite `x`: an f32 CPU tensor, laid out
/// contiguously from the start of its storage. Callers pass only the fresh
/// output of the step before (a matrix product, a lookup), whose storage nothing
/// else holds.
fn owned(x: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.layout().contiguous_offsets() == Some((0, x.elem_count()))
}

/// `activation(x + bias)`, or `x + bias` without one; `x`: `[rows, width]`,
/// overwritten where it can be (see [`owned`]), `bias`: `[width]`.
fn bias_act(
    x: Tensor,
    bias: &Tensor,
    activation: Option<Activation>,
) -> candle_core::Result<Tensor> {
    let fast = match activation {
        None => Some(BiasAct::Identity),
        Some(Activation::Gelu) => Some(BiasAct::GeluErf),
        Some(_) => None,
    };
    match fast {
        Some(op) if owned(&x) => {
            x.inplace_op2(bias, &op)?;
            Ok(x)
        }
        _ => {
            let x = x.broadcast_add(bias)?;
            match activation {
                None => Ok(x),
                Some(Activation::Gelu) => x.gelu_erf(),
                Some(Activation::GeluTanh) => x.gelu(),
                Some(Activation::Relu) => x.relu(),
            }
        }
    }
}

/// The softmax over the last dimension, overwriting `x` where it can (see
/// [`owned`]). candle's takes a scalar libm `exp` per element, which was about a
/// quarter of attention's time here.
fn softmax(x: Tensor) -> candle_core::Result<Tensor> {
    if owned(&x) {
        x.inplace_op1(&Softmax)?;
        Ok(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x)
    }
}

/// The exact GELU, `0.5·x·(1 + erf(x/√2))`: [`BiasAct::GeluErf`] with no bias
/// on f32 CPU tensors, candle's `gelu_erf` elsewhere.
#[cfg(test)]
fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    let zeros = Tensor::zeros(x.dim(candle_core::D::Minus1)?, x.dtype(), x.device())?;
    bias_act(x.copy()?, &zeros, Some(Activation::Gelu))
}

/// Elements per rayon task; whole rows of at least this many.
const TASK_ELEMENTS: usize = 16 * 1024;

/// The rows of `[rows, width]` data per rayon task.
fn task_len(width: usize) -> usize {
    TASK_ELEMENTS.div_ceil(width.max(1)) * width.max(1)
}

/// `x ← x + bias` and `x ← gelu(x + bias)` over rows; see [`bias_act`].
#[derive(Debug, Clone, Copy)]
enum BiasAct {
    Identity,
    GeluErf,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        match self {
            BiasAct::Identity => "bias-add",
            BiasAct::GeluErf => "bias-gelu-erf",
        }
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<()> {
        let bias = f32_data(self.name(), bias, bias_l)?;
        let width = bias.len();
        if dst_l.dims().last() != Some(&width) {
            candle_core::bail!("{}: a bias of {width} for {:?}", self.name(), dst_l.shape());
        }
        let x = f32_data_mut(self.name(), dst, dst_l)?;
        x.par_chunks_mut(task_len(width)).for_each(|x| match self {
            BiasAct::Identity => bias_add_rows(x, bias),
            BiasAct::GeluErf => bias_gelu_rows(x, bias),
        });
        Ok(())
    }
}

/// `x ← norm(x + bias + residual)` over rows, with the `[3, width]` bias, weight
/// and beta; see [`AddNorm`].
struct AddNormOp(f32);

impl InplaceOp3 for AddNormOp {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        residual: &CpuStorage,
        residual_l: &Layout,
        params: &CpuStorage,
        params_l: &Layout,
    ) -> candle_core::Result<()> {
        let residual = f32_data(self.name(), residual, residual_l)?;
        let params = f32_data(self.name(), params, params_l)?;
        let width = params.len() / 3;
        if dst_l.shape() != residual_l.shape()
            || dst_l.dims().last() != Some(&width)
            || params.len() != 3 * width
        {
            candle_core::bail!(
                "{}: {:?} + {:?} with {:?} parameters",
                self.name(),
                dst_l.shape(),
                residual_l.shape(),
                params_l.shape()
            );
        }
        let (bias, rest) = params.split_at(width);
        let (weight, beta) = rest.split_at(width);
        let x = f32_data_mut(self.name(), dst, dst_l)?;
        let task = task_len(width);
        x.par_chunks_mut(task)
            .zip(residual.par_chunks(task))
            .for_each(|(x, residual)| add_norm_rows(x, residual, bias, weight, beta, self.0));
        Ok(())
    }
}

/// `x ← softmax(x)` over the last dimension; see [`softmax`]. One sequence's
/// attention scores at a time, so one thread: the sequences run side by side.
struct Softmax;

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        softmax_rows(f32_data_mut(self.name(), storage, layout)?, width);
        Ok(())
    }
}

vectorized! {
    /// `x ← x + bias`, row by row.
    fn bias_add_rows(x: &mut [f32], bias: &[f32]) {
        for x in x.chunks_exact_mut(bias.len()) {
            for (x, &b) in x.iter_mut().zip(bias) {
                *x += b;
            }
        }
    }
}

vectorized! {
    /// `x ← gelu(x + bias)`, row by row.
    fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for x in x.chunks_exact_mut(bias.len()) {
            for (x, &b) in x.iter_mut().zip(bias) {
                *x = gelu_erf_one(*x + b);
            }
        }
    }
}

vectorized! {
    /// `x ← norm(x + bias + residual)`, row by row: the mean of each row's sum,
    /// then its variance about that mean (a second pass, which stays accurate
    /// when the mean is large), then the affine map.
    fn add_norm_rows(
        x: &mut [f32],
        residual: &[f32],
        bias: &[f32],
        weight: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let width = bias.len();
        for (x, residual) in x.chunks_exact_mut(width).zip(residual.chunks_exact(width)) {
            for ((x, &r), &b) in x.iter_mut().zip(residual).zip(bias) {
                *x += r + b;
            }
            let mean = lane_sum(x, |v| v) / width as f32;
            let var = lane_sum(x, |v| (v - mean) * (v - mean)) / width as f32;
            let scale = 1.0 / (var + eps).sqrt();
            for ((x, &w), &b) in x.iter_mut().zip(weight).zip(beta) {
                *x = (*x - mean) * scale * w + b;
            }
        }
    }
}

/// `0.5·x·(1 + erf(x/√2))` for one element, branch-free.
#[inline(always)]
fn gelu_erf_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(z) to within 7e-8, branch-free so that loops over it vectorize: N. Juffa's
/// single-precision erf, two minimax pieces. Up to |z| = 0.9277 an odd polynomial;
/// beyond, `1 - e^p(|z|)` with the sign of z, through [`exp`] (whose floor of
/// 1e-38 makes erf exactly ±1 far out, so large GELU inputs come out as `x` or
/// `-0`).
#[inline(always)]
fn erf(z: f32) -> f32 {
    let t = z.abs();
    let s = z * z;
    let near = [
        4.991_194_2e-3,
        -2.676_813_5e-2,
        1.128_199_3e-1,
        -3.761_253_4e-1,
        1.283_791_7e-1,
    ]
    .iter()
    .fold(-5.967_617e-4, |r: f32, &k| r * s + k)
        * z
        + z;
    let p = (-1.728_534_7e-5 * t + 3.831_971_3e-4) * s + (-3.883_964_4e-3 * t + 2.425_462_2e-2);
    let p = ((p * t - 1.067_778_8e-1) * t - 6.348_467e-1) * t - 1.287_175_1e-1;
    let far = (1.0 - exp(p * t - t)).copysign(z);
    if t > 0.927_734_4 {
        far
    } else {
        near
    }
}

/// How the checkpoint names the encoder: with or without a `bert.` prefix (or
/// the `model_type`'s, as some BERT-family checkpoints do).
fn encoder_root<'a>(vb: VarBuilder<'a>, model_type: Option<&str>) -> VarBuilder<'a> {
    const WORDS: &str = "embeddings.word_embeddings.weight";
    if vb.contains_tensor(WORDS) {
        return vb;
    }
    for prefix in std::iter::once("bert").chain(model_type) {
        if vb.contains_tensor(&format!("{prefix}.{WORDS}")) {
            return vb.pp(prefix);
        }
    }
    vb
}

/// A BERT encoder with its pooling: token ids in, one vector per input out.
pub struct Embedder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooling: Pooling,
    device: Device,
    vocab_size: usize,
    hidden_size: usize,
    max_position: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("pooling", &self.pooling)
            .field("device", &self.device)
            .field("layers", &self.layers.len())
            .field("dimensions", &self.hidden_size)
            .field("max_tokens", &self.max_position)
            .finish()
    }
}

impl Embedder {
    /// Loads the encoder from `vb` (tensor names with or without the `bert.`
    /// prefix) and `config_json`, the model's config.json, its projections in
    /// `precision`.
    pub fn new(
        vb: VarBuilder,
        config_json: &[u8],
        pooling: Pooling,
        precision: Precision,
    ) -> Result<Self, ServingError> {
        let file: BertConfigFile = serde_json::from_slice(config_json)
            .map_err(|e| ServingError::model(format!("config.json: {e}")))?;
        let config = file.to_config()?;
        let vb = encoder_root(vb, config.model_type.as_deref());
        let device = vb.device().clone();
        let embeddings = Embeddings::load(vb.pp("embeddings"), &config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("encoder.layer.{i}")), &config, precision))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Embedder {
            embeddings,
            layers,
            pooling,
            device,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            max_position: config.max_position_embeddings,
        })
    }

    /// The longest input in tokens (`max_position_embeddings`).
    pub fn max_tokens(&self) -> usize {
        self.max_position
    }

    /// The length of the vectors (`hidden_size`).
    pub fn dimensions(&self) -> usize {
        self.hidden_size
    }

    /// Where the model's tensors live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds a batch of token-id sequences of any lengths in one forward pass.
    ///
    /// The sequences are packed, not padded: their tokens are the rows of one
    /// matrix that every projection, norm and activation runs over at once, and
    /// attention and pooling run per sequence over its own rows. So the cost is
    /// the batch's real tokens, and a sentence embeds the same alone or in any
    /// batch. Returns one vector per input, in order.
    pub fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ServingError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for (i, ids) in batch.iter().enumerate() {
            if ids.is_empty() {
                return Err(ServingError::invalid(
                    "input",
                    format!("input {i} has no tokens"),
                ));
            }
            if ids.len() > self.max_position {
                return Err(ServingError::ContextLength(format!(
                    "input {i} has {} tokens; this model takes at most {}",
                    ids.len(),
                    self.max_position
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(ServingError::invalid(
                    "input",
                    format!(
                        "input {i} has token id {bad}; the vocabulary has {} ids",
                        self.vocab_size
                    ),
                ));
            }
        }
        // On the CPU the whole forward runs on one of rayon's threads: the kernels'
        // and gemm's parallel loops then start from inside the pool, where
        // splitting work costs a queue push, rather than from outside it, where
        // every small step would wait for a sleeping thread to wake.
        let hidden = if self.device.is_cpu() {
            rayon::scope(|_| self.forward(batch))?
        } else {
            self.forward(batch)?
        };
        let lens = batch.iter().map(Vec::len);
        Ok(pool(&hidden, self.hidden_size, lens, self.pooling))
    }

    /// The encoder's output rows, packed: `[Σ lengths × hidden]`, row-major.
    fn forward(&self, batch: &[Vec<u32>]) -> candle_core::Result<Vec<f32>> {
        let total: usize = batch.iter().map(Vec::len).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for seq in batch {
            ids.extend_from_slice(seq);
            positions.extend(0..seq.len() as u32);
        }
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
        let mut x = self.embeddings.forward(&ids, &positions)?;
        for layer in &self.layers {
            x = layer.forward(&x, &lens)?;
        }
        x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    }
}

/// One vector per sequence from the packed rows `hidden` (`dims` wide) of
/// sequences of `lens` tokens, pooled and, if asked, scaled to unit length.
fn pool(
    hidden: &[f32],
    dims: usize,
    lens: impl Iterator<Item = usize>,
    pooling: Pooling,
) -> Vec<Vec<f32>> {
    let mut start = 0;
    lens.map(|len| {
        let seq = &hidden[start * dims..(start + len) * dims];
        start += len;
        let rows = seq.chunks_exact(dims);
        let mut v = match pooling.mode {
            PoolingMode::Cls => seq[..dims].to_vec(),
            PoolingMode::Mean => {
                let mut sum = vec![0f32; dims];
                for row in rows {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
                sum.iter_mut().for_each(|s| *s /= len as f32);
                sum
            }
            PoolingMode::Max => {
                let mut max = vec![f32::NEG_INFINITY; dims];
                for row in rows {
                    max.iter_mut().zip(row).for_each(|(m, &x)| *m = m.max(x));
                }
                max
            }
        };
        if pooling.normalize {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    const CONFIG: &str = r#"{
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    }"#;

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    fn pooling_config(mode: &str) -> String {
        format!(
            r#"{{"word_embedding_dimension": 384, "pooling_mode_cls_token": {},
                "pooling_mode_mean_tokens": {}, "pooling_mode_max_tokens": {},
                "pooling_mode_mean_sqrt_len_tokens": false}}"#,
            mode == "cls",
            mode == "mean",
            mode == "max"
        )
    }

    /// A randomly initialized BERT and its tensors by name.
    fn random_bert(pooling: Pooling, precision: Precision) -> (Embedder, HashMap<String, Tensor>) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let embedder = Embedder::new(vb, CONFIG.as_bytes(), pooling, precision).unwrap();
        let tensors = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        (embedder, tensors)
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    #[test]
    fn pooling_from_sentence_transformers_files() {
        for (mode, want) in [
            ("mean", PoolingMode::Mean),
            ("cls", PoolingMode::Cls),
            ("max", PoolingMode::Max),
        ] {
            let config = pooling_config(mode);
            let pooling =
                Pooling::from_files(Some(MODULES.as_bytes()), Some(config.as_bytes())).unwrap();
            assert_eq!(
                pooling,
                Pooling {
                    mode: want,
                    normalize: true
                }
            );
        }
        let no_normalize = r#"[{"idx": 1, "name": "1", "path": "1_Pooling/",
            "type": "sentence_transformers.models.Pooling"}]"#;
        let config = pooling_config("cls");
        let pooling =
            Pooling::from_files(Some(no_normalize.as_bytes()), Some(config.as_bytes())).unwrap();
        assert!(!pooling.normalize);
        assert_eq!(
            Pooling::config_path(no_normalize.as_bytes())
                .unwrap()
                .as_deref(),
            Some("1_Pooling/config.json")
        );
        assert_eq!(
            Pooling::config_path(MODULES.as_bytes()).unwrap().as_deref(),
            Some("1_Pooling/config.json")
        );
        assert_eq!(Pooling::config_path(b"[]").unwrap(), None);
        assert_eq!(
            Pooling::from_files(None, None).unwrap(),
            Pooling {
                mode: PoolingMode::Mean,
                normalize: true
            }
        );
        let weighted = br#"{"pooling_mode_weightedmean_tokens": true}"#;
        assert!(Pooling::from_files(None, Some(weighted)).is_err());
        let two = br#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#;
        assert!(Pooling::from_files(None, Some(two)).is_err());
    }

    #[test]
    fn padding_does_not_change_embeddings() {
        let mut precisions = vec![Precision::F32];
        if crate::amx::available() {
            precisions.push(Precision::Bf16);
        } else {
            crate::skip("this CPU has no AMX-BF16: f32 products only");
        }
        for (mode, precision) in [PoolingMode::Mean, PoolingMode::Cls, PoolingMode::Max]
            .into_iter()
            .flat_map(|m| precisions.iter().map(move |&p| (m, p)))
        {
            let pooling = Pooling {
                mode,
                normalize: true,
            };
            let (embedder, _) = random_bert(pooling, precision);
            let short = vec![2, 17, 33, 3];
            let long: Vec<u32> = (0..60).map(|i| 1 + (i * 7) % 99).collect();
            let alone = embedder.embed(std::slice::from_ref(&short)).unwrap();
            let batch = embedder
                .embed(&[long.clone(), short.clone(), long])
                .unwrap();
            assert_eq!(batch.len(), 3);
            assert_eq!(batch[1].len(), embedder.dimensions());
            let cos = cosine(&alone[0], &batch[1]);
            assert!(cos > 0.9999, "{mode:?} {precision}: cosine {cos}");
            let norm: f32 = batch[1].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{mode:?}: norm {norm}");
            assert!(cosine(&batch[0], &batch[1]) < 0.9999);
        }
    }

    #[test]
    fn bf16_products_keep_embeddings_close_to_f32() {
        if !crate::amx::available() {
            return crate::skip("this CPU has no AMX-BF16");
        }
        let pooling = Pooling {
            mode: PoolingMode::Mean,
            normalize: true,
        };
        let (f32_embedder, tensors) = random_bert(pooling, Precision::F32);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let bf16 = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::Bf16).unwrap();
        let inputs: Vec<Vec<u32>> = (1..6)
            .map(|n| (0..n * 9).map(|i| 1 + (i * 13 + n) % 99).collect())
            .collect();
        let (a, b) = (
            f32_embedder.embed(&inputs).unwrap(),
            bf16.embed(&inputs).unwrap(),
        );
        for (a, b) in a.iter().zip(&b) {
            let cos = cosine(a, b);
            assert!(cos > 0.999 && cos < 1.0 - 1e-9, "cosine {cos}");
        }
    }

    #[test]
    fn loads_with_the_bert_prefix() {
        let pooling = Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
        };
        let (plain, tensors) = random_bert(pooling, Precision::F32);
        let prefixed = tensors
            .into_iter()
            .map(|(name, t)| (format!("bert.{name}"), t))
            .collect();
        let vb = VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu);
        let prefixed = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::F32).unwrap();
        let input = vec![vec![5, 6, 7]];
        let (a, b) = (
            plain.embed(&input).unwrap(),
            prefixed.embed(&input).unwrap(),
        );
        assert!(cosine(&a[0], &b[0]) > 0.99999);
        assert_eq!(prefixed.max_tokens(), 64);
        assert_eq!(prefixed.dimensions(), 32);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let pooling = Pooling {
            mode: PoolingMode::Mean,
            normalize: true,
        };
        let (embedder, _) = random_bert(pooling, Precision::F32);
        assert!(embedder.embed(&[]).unwrap().is_empty());
        assert!(matches!(
            embedder.embed(&[vec![]]),
            Err(ServingError::InvalidRequest { .. })
        ));
        assert!(matches!(
            embedder.embed(&[vec![1; 65]]),
            Err(ServingError::ContextLength(_))
        ));
        assert!(matches!(
            embedder.embed(&[vec![100]]),
            Err(ServingError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn a_packed_batch_embeds_each_input_as_alone() {
        for mode in [PoolingMode::Mean, PoolingMode::Cls, PoolingMode::Max] {
            let pooling = Pooling {
                mode,
                normalize: mode != PoolingMode::Max,
            };
            let (embedder, _) = random_bert(pooling, Precision::F32);
            let inputs: Vec<Vec<u32>> = [1usize, 9, 2, 64, 17, 5]
                .iter()
                .enumerate()
                .map(|(s, &len)| {
                    (0..len)
                        .map(|i| 1 + ((i * 13 + s * 5) % 99) as u32)
                        .collect()
                })
                .collect();
            let batch = embedder.embed(&inputs).unwrap();
            assert_eq!(batch.len(), inputs.len());
            for (input, packed) in inputs.iter().zip(&batch) {
                let alone = embedder.embed(std::slice::from_ref(input)).unwrap();
                let cos = cosine(&alone[0], packed);
                assert!(
                    cos >= 0.99999,
                    "{mode:?}, {} tokens: cosine {cos}",
                    input.len()
                );
            }
        }
    }

    #[test]
    fn the_vectorized_erf_is_within_2e7() {
        let mut worst = (0f64, 0f32);
        for i in -600_000..=600_000 {
            let z = i as f32 * 1e-5;
            let err = (f64::from(erf(z)) - candle_core::cpu::erf::erf_f64(f64::from(z))).abs();
            if err > worst.0 {
                worst = (err, z);
            }
        }
        assert!(worst.0 <= 2e-7, "erf error {} at {}", worst.0, worst.1);
        assert_eq!((erf(10.0), erf(-1e30)), (1.0, -1.0));
    }

    #[test]
    fn the_gelu_kernel_matches_candles_gelu_erf() {
        let mut values: Vec<f32> = (-6000..=6000).map(|i| i as f32 * 1e-3).collect();
        values.extend([
            -1e4, -300.0, -40.0, -10.0, -7.5, -5.0, 5.0, 7.5, 10.0, 40.0, 300.0, 1e4,
        ]);
        values.extend(
            (0..)
                .map(|i: i64| ((i * 7919) % 20_011) as f32 * 1e-3 - 10.0)
                .take(120_000 - values.len()),
        );
        let x = Tensor::from_vec(values, (120, 1000), &Device::Cpu).unwrap();
        let exact = |x: &Tensor| {
            x.to_dtype(DType::F64)
                .unwrap()
                .gelu_erf()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let diff = crate::max_abs_diff(&gelu_erf(&x).unwrap(), &exact(&x));
        assert!(diff <= 1e-5, "max abs diff {diff}");
        // With a bias, and on a strided input.
        let bias = Tensor::randn(0f32, 3., 120, &Device::Cpu).unwrap();
        let xt = x.t().unwrap();
        let ours = bias_act(xt.clone(), &bias, Some(Activation::Gelu)).unwrap();
        let diff = crate::max_abs_diff(&ours, &exact(&xt.broadcast_add(&bias).unwrap()));
        assert!(diff <= 1e-5, "with a bias: max abs diff {diff}");
        let ours = bias_act(xt.clone(), &bias, None).unwrap();
        assert_eq!(
            crate::max_abs_diff(&ours, &xt.broadcast_add(&bias).unwrap()),
            0.0
        );
    }

    #[test]
    fn the_softmax_kernel_matches_candles() {
        let d = Device::Cpu;
        for width in [1, 7, 16, 23, 64, 100] {
            let x = (Tensor::randn(0f32, 5., (3, 11, width), &d).unwrap() - 30.0).unwrap();
            let ours = softmax(x.copy().unwrap()).unwrap();
            let reference =
                candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F64).unwrap()).unwrap();
            let diff = crate::max_abs_diff(&ours, &reference);
            assert!(diff < 1e-6, "width {width}: max abs diff {diff}");
        }
        // Far below the maximum, e^x underflows to (nearly) nothing.
        let x = Tensor::new(&[[0f32, -50.0, -90.0, -1e30]], &d).unwrap();
        let p = softmax(x.copy().unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (p[0][0] - 1.0).abs() < 1e-6 && p[0][1..].iter().all(|&v| v < 1e-21),
            "{p:?}"
        );
    }

    #[test]
    fn the_add_norm_kernel_matches_candles_layer_norm() {
        let d = Device::Cpu;
        let (rows, width) = (57, 384);
        let x = (Tensor::randn(0f32, 4., (rows, width), &d).unwrap() + 20.0).unwrap();
        let residual = Tensor::randn(0f32, 1., (rows, width), &d).unwrap();
        let bias = Tensor::randn(0f32, 1., width, &d).unwrap();
        let weight = Tensor::randn(1f32, 0.2, width, &d).unwrap();
        let beta = Tensor::randn(0f32, 0.2, width, &d).unwrap();
        let norm = AddNorm {
            packed: Tensor::stack(&[&bias, &weight, &beta], 0).unwrap(),
            bias: bias.clone(),
            weight: weight.clone(),
            beta: beta.clone(),
            eps: 1e-12,
        };
        let ours = norm.forward(x.copy().unwrap(), &residual).unwrap();
        let sum = (&x + &residual).unwrap().broadcast_add(&bias).unwrap();
        let reference = candle_nn::ops::layer_norm_slow(
            &sum.to_dtype(DType::F64).unwrap(),
            &weight.to_dtype(DType::F64).unwrap(),
            &beta.to_dtype(DType::F64).unwrap(),
            1e-12,
        )
        .unwrap();
        let diff = crate::max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }

    #[test]
    fn candles_ops_match_the_fused_kernels() {
        // f16 takes candle's ops (as other devices do); f32 the CPU kernels.
        let pooling = Pooling {
            mode: PoolingMode::Mean,
            normalize: true,
        };
        let (fused, tensors) = random_bert(pooling, Precision::F32);
        let vb = VarBuilder::from_tensors(tensors, DType::F16, &Device::Cpu);
        let plain = Embedder::new(vb, CONFIG.as_bytes(), pooling, Precision::F32).unwrap();
        let inputs = vec![
            vec![2, 17, 33, 3],
            (0..40).map(|i| 1 + (i * 11) % 99).collect(),
        ];
        let (a, b) = (fused.embed(&inputs).unwrap(), plain.embed(&inputs).unwrap());
        for (a, b) in a.iter().zip(&b) {
            assert!(cosine(a, b) > 0.999, "cosine {}", cosine(a, b));
        }
    }

    #[test]
    fn embedder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Embedder>();
        check::<crate::tokenizer::TextTokenizer>();
        fn send<T: Send>() {}
        send::<crate::tokenizer::IncrementalDecoder>();
    }
}
