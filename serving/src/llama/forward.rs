//! One packed batch through the model: embeddings, each layer's attention over the
//! KV pool and MLP, the logits after each chunk's last token.

use super::*;

impl Model {
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
    pub(super) fn batched_attention(
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
    pub(super) fn rotate(
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
