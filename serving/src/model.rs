//! What the engines ask of a model, whatever its architecture: an [`Encoder`]
//! turns inputs into vectors (the embedding engine's), a [`Decoder`] extends
//! sequences in a KV pool and gives the next token's logits (the generation
//! engine's). The loader builds the model for the file it finds (BERT or
//! Llama-family, on the device chosen at load) and hands the engines these.

use candle_core::Tensor;

use crate::kv_pool::{Chunk, KvPool};
use crate::ServingError;

/// An embedding model: token ids of several inputs in, one vector per input out,
/// each the same whatever else is in its batch.
pub trait Encoder: Send + Sync {
    /// The longest input, in tokens.
    fn max_tokens(&self) -> usize;

    /// The width of the vectors.
    fn dimensions(&self) -> usize;

    /// One vector per input of `batch`, in order.
    fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ServingError>;
}

/// A generative model whose sequences keep their keys and values in a [`KvPool`].
pub trait Decoder: Send + Sync {
    /// The longest sequence, prompt and output, in tokens.
    fn context(&self) -> usize;

    /// Bytes of keys and values one token of a sequence takes in the pool.
    fn kv_bytes_per_token(&self) -> usize;

    /// A pool of `slots` sequences of up to `capacity` tokens each (at most the
    /// context), its memory taken now.
    fn new_pool(&self, slots: usize, capacity: usize) -> Result<KvPool, ServingError>;

    /// Runs one packed batch: each chunk's tokens are appended to its sequence's
    /// slot, and the logits after each chunk's last token come back as
    /// `[chunks, vocab]` rows, in order.
    fn forward(&self, pool: &KvPool, chunks: &mut [Chunk<'_>]) -> Result<Tensor, ServingError>;
}
