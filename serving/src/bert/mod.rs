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
//! sequence), projections are [`Dense`], laid out for the backend's product, and
//! each projection's bias, activation, residual sum and layer norm are one step of
//! the [`Backend`] (on the CPU one pass of a vectorized kernel,
//! [`crate::kernels::cpu::elementwise`]). So a forward costs its real tokens, and a
//! sentence embeds the same alone or in any batch. On a GPU, where each kernel
//! launch costs more than a short sequence's arithmetic, attention runs over the
//! batch padded to its longest sequence instead (padded keys masked, padded rows
//! dropped; unless that would more than double the rows): a sentence's vector then
//! differs from its vector alone by rounding only.

use candle_core::{DType, Device, IndexOp, Module as _, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::dense::{Dense, Precision};
use crate::error::ServingError;
use crate::kernels::{Activation, AddNorm, Backend};

mod config;
mod layers;
mod pooling;
#[cfg(test)]
mod tests;

use config::*;
use layers::*;
pub use pooling::{Pooling, PoolingMode};

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
    /// Chosen from the device at load; every step of the forward asks it.
    backend: Backend,
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
        let backend = Backend::for_device(&device);
        let embeddings = Embeddings::load(vb.pp("embeddings"), &config, backend)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                Layer::load(vb, &config, precision, backend)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Embedder {
            embeddings,
            layers,
            pooling,
            backend,
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
    /// attention and pooling run per sequence over its own rows (on a GPU,
    /// attention over the batch padded, the padding masked). So the cost is the
    /// batch's real tokens, and a sentence embeds the same alone or in any batch
    /// (on a GPU, up to rounding). Returns one vector per input, in order.
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
        let hidden = self.backend.run(|| self.forward(batch))?;
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

impl crate::model::Encoder for Embedder {
    fn max_tokens(&self) -> usize {
        Embedder::max_tokens(self)
    }

    fn dimensions(&self) -> usize {
        Embedder::dimensions(self)
    }

    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ServingError> {
        Embedder::embed(self, batch)
    }
}
