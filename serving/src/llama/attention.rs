//! Attention's bookkeeping: which keys each token reads, the decoding sequences'
//! batched attention and its mask, and the rotary tables.

use super::*;

/// The keys each token of a batch attends to, in order: its sequence's positions up
/// to its own (no further back than a sliding window).
pub(super) fn key_spans(chunks: &[Chunk<'_>], window: Option<usize>) -> Vec<KeySpan> {
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
pub(super) enum Attention {
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
pub(super) struct Decode {
    pub(super) count: usize,
    pub(super) first_slot: usize,
    pub(super) span: usize,
    pub(super) keys: usize,
    /// For each slot of the span, the decoding chunk whose query goes there.
    pub(super) place: Tensor,
    /// For each decoding chunk, its slot's row of the span.
    pub(super) take: Tensor,
    /// `[span, 1, 1, keys]`.
    pub(super) mask: Tensor,
}

impl Decode {
    pub(super) fn plan(
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
pub(super) fn attention_mask(
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
pub(super) fn rotary_tables(
    config: &LlamaConfig,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
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
