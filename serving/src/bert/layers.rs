//! The encoder's parts: embeddings, encoder layers (attention over each packed
//! sequence's own rows, the feed-forward block) and the add-and-norm steps.

use super::*;

/// The layer norm in `vb` (`weight`/`bias`, or the older `gamma`/`beta`) over the
/// sum of a projection's output, its bias `bias` (or none) and the residual.
pub(super) fn add_norm(
    vb: VarBuilder,
    size: usize,
    eps: f64,
    bias: Option<Tensor>,
) -> candle_core::Result<AddNorm> {
    let norm = candle_nn::layer_norm(size, eps, vb)?;
    let weight = norm.weight().clone();
    let zeros = || Tensor::zeros(size, weight.dtype(), weight.device());
    let beta = norm.bias().cloned().map_or_else(zeros, Ok)?;
    let bias = bias.map_or_else(zeros, Ok)?;
    AddNorm::new(bias, weight, beta, eps as f32)
}

/// The projection in `vb`: `weight` `[out, in]` and `bias` `[out]` (zeros if
/// there is none).
pub(super) fn dense_parts(
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
pub(super) fn dense(
    vb: VarBuilder,
    input: usize,
    output: usize,
    precision: Precision,
    backend: Backend,
) -> candle_core::Result<(Dense, Tensor)> {
    let (weight, bias) = dense_parts(vb, input, output)?;
    Ok((Dense::new(backend, &weight, None, precision)?, bias))
}

/// Token, position and token-type embeddings, summed and normalized.
#[derive(Debug)]
pub(super) struct Embeddings {
    /// `[vocab, hidden]`.
    pub(super) words: Tensor,
    /// `[max_position, hidden]`: position embeddings with the token-type-0
    /// embedding already added, since every token here is type 0.
    pub(super) positions: Tensor,
    pub(super) norm: AddNorm,
    pub(super) backend: Backend,
}

impl Embeddings {
    pub(super) fn load(
        vb: VarBuilder,
        config: &Config,
        backend: Backend,
    ) -> candle_core::Result<Self> {
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
            norm: add_norm(vb.pp("LayerNorm"), hidden, config.layer_norm_eps, None)?,
            backend,
        })
    }

    /// `ids` and `positions`: `[tokens]` → `[tokens, hidden]`.
    pub(super) fn forward(&self, ids: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        self.backend.add_norm(
            self.words.index_select(ids, 0)?,
            &self.positions.index_select(positions, 0)?,
            &self.norm,
        )
    }
}

/// One encoder layer: self-attention and the feed-forward block, each with a
/// residual connection and a post layer norm.
#[derive(Debug)]
pub(super) struct Layer {
    /// Query, key and value side by side; the query part is pre-scaled by
    /// `1/√head_dim`, the attention scores' scale.
    pub(super) qkv: Dense,
    pub(super) qkv_bias: Tensor,
    pub(super) attention_out: Dense,
    pub(super) attention_norm: AddNorm,
    pub(super) intermediate: Dense,
    pub(super) intermediate_bias: Tensor,
    pub(super) activation: Activation,
    pub(super) output: Dense,
    pub(super) output_norm: AddNorm,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    pub(super) backend: Backend,
}

impl Layer {
    pub(super) fn load(
        vb: VarBuilder,
        config: &Config,
        precision: Precision,
        backend: Backend,
    ) -> candle_core::Result<Self> {
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
            backend,
            &[(&(query * scale)?, None), (&key, None), (&value, None)],
            precision,
        )?;
        let qkv_bias = Tensor::cat(&[&(query_bias * scale)?, &key_bias, &value_bias], 0)?;
        let out = attention.pp("output");
        let (attention_out, attention_out_bias) =
            dense(out.pp("dense"), hidden, hidden, precision, backend)?;
        let (intermediate, intermediate_bias) = dense(
            vb.pp("intermediate").pp("dense"),
            hidden,
            config.intermediate_size,
            precision,
            backend,
        )?;
        let (output, output_bias) = dense(
            vb.pp("output").pp("dense"),
            config.intermediate_size,
            hidden,
            precision,
            backend,
        )?;
        Ok(Layer {
            qkv,
            qkv_bias,
            attention_out,
            attention_norm: add_norm(out.pp("LayerNorm"), hidden, eps, Some(attention_out_bias))?,
            intermediate,
            intermediate_bias,
            activation: config.activation,
            output,
            output_norm: add_norm(
                vb.pp("output").pp("LayerNorm"),
                hidden,
                eps,
                Some(output_bias),
            )?,
            heads,
            head_dim,
            backend,
        })
    }

    /// `x`: the packed `[tokens, hidden]` rows of sequences of `lens` tokens.
    pub(super) fn forward(&self, x: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
        let b = self.backend;
        let qkv = b.bias_act(self.qkv.forward(x)?, &self.qkv_bias, None)?;
        let context = self.attention(&qkv, lens)?;
        let x = b.add_norm(
            self.attention_out.forward(&context)?,
            x,
            &self.attention_norm,
        )?;
        let h = b.bias_act(
            self.intermediate.forward(&x)?,
            &self.intermediate_bias,
            Some(self.activation),
        )?;
        b.add_norm(self.output.forward(&h)?, &x, &self.output_norm)
    }

    /// Each sequence attends to its own rows only. `qkv`: `[tokens, 3·hidden]` →
    /// `[tokens, hidden]`. On the CPU one sequence at a time, side by side on the
    /// threads ([`Layer::attention_each`]); on a GPU all at once, padded
    /// ([`Layer::attention_padded`]), unless padding would more than double the
    /// rows: the scores grow with the rows times the longest input, and one long
    /// input among many short ones would fill the GPU's memory with padding.
    pub(super) fn attention(&self, qkv: &Tensor, lens: &[usize]) -> candle_core::Result<Tensor> {
        let longest = lens.iter().copied().max().unwrap_or(0);
        let tokens: usize = lens.iter().sum();
        if self.backend.batched_attention() && lens.len() > 1 && lens.len() * longest <= 2 * tokens
        {
            self.attention_padded(qkv, lens)
        } else {
            self.attention_each(qkv, lens)
        }
    }

    /// One sequence at a time, each over its own rows, so no mask is needed.
    pub(super) fn attention_each(
        &self,
        qkv: &Tensor,
        lens: &[usize],
    ) -> candle_core::Result<Tensor> {
        let tokens = qkv.dim(0)?;
        let (heads, head_dim) = (self.heads, self.head_dim);
        let qkv = qkv.reshape((tokens, 3, heads, head_dim))?;
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |next, &len| {
                let start = *next;
                *next += len;
                Some(start)
            })
            .collect();
        // [len, heads, head_dim] of sequence `i`, of `lens[i]` tokens from row
        // `starts[i]`.
        let contexts = self.backend.each(lens.len(), |i| {
            let rows = qkv.narrow(0, starts[i], lens[i])?;
            // [heads, len, head_dim].
            let part = |p: usize| -> candle_core::Result<Tensor> {
                self.backend.operand(rows.i((.., p))?.transpose(0, 1)?)
            };
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let probs = self.backend.softmax(q.matmul(&k.t()?)?)?;
            probs.matmul(&v)?.transpose(0, 1)
        })?;
        Tensor::cat(&contexts, 0)?.reshape((tokens, heads * head_dim))
    }

    /// Every sequence at once, padded to the longest: a dozen kernels a layer
    /// whatever the batch, where [`Layer::attention_each`] launches a dozen per
    /// sequence. Padded keys are masked out of the softmax and padded rows dropped.
    pub(super) fn attention_padded(
        &self,
        qkv: &Tensor,
        lens: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (heads, head_dim) = (self.heads, self.head_dim);
        let (n, longest) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
        let tokens: usize = lens.iter().sum();
        // Row `b·longest + t` of the padded batch: packed row `start_b + t` (row 0
        // past the sequence's end, masked); and back, each packed row's padded row.
        let mut gather = Vec::with_capacity(n * longest);
        let mut mask = Vec::with_capacity(n * longest);
        let mut scatter = Vec::with_capacity(tokens);
        let mut start = 0;
        for (b, &len) in lens.iter().enumerate() {
            for t in 0..longest {
                let inside = t < len;
                gather.push(if inside { (start + t) as u32 } else { 0 });
                // exp(-1e9 - max) is 0 in f32: the key takes no weight.
                mask.push(if inside { 0f32 } else { -1e9 });
                if inside {
                    scatter.push((b * longest + t) as u32);
                }
            }
            start += len;
        }
        let device = qkv.device();
        let gather = Tensor::from_vec(gather, n * longest, device)?;
        let mask = Tensor::from_vec(mask, (n, 1, 1, longest), device)?.to_dtype(qkv.dtype())?;
        let scatter = Tensor::from_vec(scatter, tokens, device)?;
        let padded = qkv
            .index_select(&gather, 0)?
            .reshape((n, longest, 3, heads, head_dim))?;
        // [n, heads, longest, head_dim].
        let part = |p: usize| padded.i((.., .., p))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
        let context = self.backend.softmax(scores)?.matmul(&v)?;
        context
            .transpose(1, 2)?
            .reshape((n * longest, heads * head_dim))?
            .index_select(&scatter, 0)
    }
}
