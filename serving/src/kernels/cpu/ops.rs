//! Fused kernels for the models' CPU hot paths.
//!
//! candle runs `silu(gate) * up` as three passes over memory, each a dispatch to its
//! thread pool, and its `exp` is a scalar libm call per element. Here it is one pass,
//! with an `exp` the compiler vectorizes (AVX-512 or AVX2/FMA when the CPU has them,
//! chosen at run time by `vectorized!`), split over the CPU threads only when the
//! tensor is big enough to pay for it. Attention ([`pool_attention`]) runs each
//! token over just its own keys in the KV pool, tokens and heads in parallel.
//! Other devices use candle's ops.

// Unsafe: calls into the AVX-512 and AVX2 variants, made only once detection found the instructions.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Defines `fn $name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA
/// when the CPU has them (its [`isa`](super::isa), detected once), else for the
/// build's baseline.
/// The bodies are plain loops; this is what lets the compiler vectorize them
/// with the widest registers the machine has.
macro_rules! vectorized {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                use $crate::kernels::cpu::{isa, Isa};
                match isa() {
                    // SAFETY: the CPU has AVX-512F, as `isa` found.
                    Isa::Amx | Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: the CPU has AVX2 and FMA, as `isa` found.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Portable => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// Lanes of the partial sums and maxima in the row kernels: one AVX-512
/// register, so the reductions vectorize (floating-point addition is not
/// reordered otherwise).
pub(crate) const LANES: usize = 16;

/// `Σ f(v)` over `values`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    fold_lanes(lanes) + tail
}

/// The sum of the lanes, halving: each step one vector addition of the upper
/// half onto the lower, rather than fifteen scalar additions in a row.
#[inline(always)]
fn fold_lanes(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0]
}

vectorized! {
    /// `x ← softmax(x)` over each row of `width`. Attention rows are short (a
    /// sequence's length), so the exponentials run as one pass over all rows.
    pub(crate) fn softmax_rows(x: &mut [f32], width: usize) {
        for row in x.chunks_exact_mut(width) {
            let mut lanes = [f32::NEG_INFINITY; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for chunk in &mut chunks {
                for (lane, &v) in lanes.iter_mut().zip(chunk) {
                    *lane = lane.max(v);
                }
            }
            let max = chunks
                .remainder()
                .iter()
                .chain(&lanes)
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for v in row.iter_mut() {
                *v -= max;
            }
        }
        for v in x.iter_mut() {
            *v = exp(*v);
        }
        for row in x.chunks_exact_mut(width) {
            let scale = 1.0 / lane_sum(row, |v| v);
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }
}

/// The f32 data of a kernel's operand, checked to be laid out contiguously.
pub(crate) fn f32_data<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} takes f32, not {:?}", storage.dtype());
    };
    match layout.contiguous_offsets() {
        Some((from, to)) => Ok(&data[from..to]),
        None => candle_core::bail!("{op} takes contiguous operands"),
    }
}

/// The f32 data a kernel overwrites, checked to be laid out contiguously.
pub(crate) fn f32_data_mut<'a>(
    op: &str,
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let dtype = storage.dtype();
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} takes f32, not {dtype:?}");
    };
    match layout.contiguous_offsets() {
        Some((from, to)) => Ok(&mut data[from..to]),
        None => candle_core::bail!("{op} takes contiguous operands"),
    }
}

/// Elements below which a kernel stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// The last dimension of a fused gate/up projection's output `[.., 2*width]`, and
/// `width`; an error when the two blocks cannot be of equal width.
pub(crate) fn gate_up_halves(x: &Tensor) -> Result<(usize, usize)> {
    let last = x.rank().saturating_sub(1);
    let both = x.dim(last)?;
    if both % 2 != 0 {
        candle_core::bail!("silu_mul takes a gate and an up block of equal width, not {both}");
    }
    Ok((last, both / 2))
}

/// `silu(gate) * up` of a fused gate/up projection's output `[.., 2*width]` (the
/// gate block first) → `[.., width]`: f32 on the CPU (other tensors go to candle's
/// ops: [`crate::kernels::Backend::silu_mul`]).
pub fn silu_mul(x: &Tensor) -> Result<Tensor> {
    gate_up_halves(x)?;
    x.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(self.name(), storage, layout)?;
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = width;
        }
        let mut out = vec![0f32; x.len() / 2];
        if width > 0 {
            if x.len() < PARALLEL_MIN {
                x.chunks_exact(2 * width)
                    .zip(out.chunks_exact_mut(width))
                    .for_each(|(row, out)| silu_mul_row(row, out));
            } else {
                x.par_chunks_exact(2 * width)
                    .zip(out.par_chunks_exact_mut(width))
                    .for_each(|(row, out)| silu_mul_row(row, out));
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

vectorized! {
    /// `out ← silu(gate) * up` for one row `[gate | up]`.
    fn silu_mul_row(row: &[f32], out: &mut [f32]) {
        let (gate, up) = row.split_at(out.len());
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// `e^x` within 2 ulp for x in [-87.3, 88] (clamped outside: ~1e-38 below, e^88
/// above), branch-free so that loops over it vectorize: Cephes' `expf`, `2^n · e^r`
/// with `|r| ≤ ln2/2` and a degree-6 polynomial for `e^r`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer, which lands in the low bits of the
    // mantissa; no float-to-int conversion (those do not vectorize).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = [
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ]
    .iter()
    .fold(1.987_569_1e-4, |acc: f32, &k| acc * r + k);
    // 2^n: n + 127 in the exponent field.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    (p * r * r + r + 1.0) * two_n
}

/// The keys one query attends to in the KV pool: its sequence's slot, positions
/// `first_key..first_key + keys` (up to its own, no further back than a sliding
/// window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpan {
    /// The sequence's slot in the pool.
    pub slot: usize,
    /// First position attended to.
    pub first_key: usize,
    /// Positions attended to.
    pub keys: usize,
}

/// Attention of each query over its own keys and values, read where they lie in the
/// KV pool: `q` `[queries, heads·hd]` (already scaled), one [`KeySpan`] per query,
/// the pool's `[slots, kv_heads, capacity, hd]` keys and values → `[queries,
/// heads·hd]`.
///
/// Each (query, key/value head) pair is one task over exactly that query's keys: no
/// mask, no padding, no work on keys it does not see, and a query's result does not
/// depend on what else is in the batch (a prompt in one chunk or several, a
/// sequence decoding alone or among others). Tasks run in parallel. CPU f32 only;
/// other devices go through candle's matmuls (see `llama`).
pub fn pool_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: &[KeySpan],
    heads: usize,
) -> Result<Tensor> {
    q.contiguous()?
        .apply_op3_no_bwd(k, v, &PoolAttention { spans, heads })
}

struct PoolAttention<'a> {
    spans: &'a [KeySpan],
    heads: usize,
}

impl CustomOp3 for PoolAttention<'_> {
    fn name(&self) -> &'static str {
        "pool-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_data(self.name(), q, q_l)?,
            f32_data(self.name(), k, k_l)?,
            f32_data(self.name(), v, v_l)?,
        );
        let (slots, kv, cap, hd) = k_l.shape().dims4()?;
        let (n, width) = q_l.shape().dims2()?;
        let heads = self.heads;
        if v_l.shape() != k_l.shape()
            || n != self.spans.len()
            || width != heads * hd
            || kv == 0
            || !heads.is_multiple_of(kv)
        {
            candle_core::bail!(
                "pool-attention of {n} queries of {width} for {} key spans, {heads} heads, over keys {:?} and values {:?}",
                self.spans.len(),
                k_l.dims(),
                v_l.dims()
            );
        }
        if let Some(s) = self
            .spans
            .iter()
            .find(|s| s.slot >= slots || s.keys == 0 || s.first_key + s.keys > cap)
        {
            candle_core::bail!("pool-attention of {s:?} in a pool of {slots} slots of {cap}");
        }
        let rep = heads / kv;
        let mut out = vec![0f32; n * width];
        let run = |(task, out): (usize, &mut [f32])| {
            let (i, g) = (task / kv, task % kv);
            let s = self.spans[i];
            let at = ((s.slot * kv + g) * cap + s.first_key) * hd;
            let span = at..at + s.keys * hd;
            let q = &q[i * width + g * rep * hd..][..rep * hd];
            attend(q, &k[span.clone()], &v[span], out, hd);
        };
        let work = self.spans.iter().map(|s| s.keys).sum::<usize>() * kv * hd;
        if work < PARALLEL_MIN {
            out.chunks_exact_mut(rep * hd).enumerate().for_each(run);
        } else {
            out.par_chunks_exact_mut(rep * hd).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }
}

/// The query heads `q` (`[rep, hd]`) of one key/value head over its `keys` and
/// `values` (`[keys, hd]` each) → `out` (`[rep, hd]`).
fn attend(q: &[f32], keys: &[f32], values: &[f32], out: &mut [f32], hd: usize) {
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(LANES) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked just above.
        return unsafe { avx512::attend(q, keys, values, out, hd) };
    }
    attend_vectorized(q, keys, values, out, hd)
}

/// [`attend`] with AVX-512 registers written out: the compiler splits the
/// lane-wise dot products of the portable version into 4-lane pieces.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{exp_scores, LANES};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512F; `hd` is a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        out: &mut [f32],
        hd: usize,
    ) {
        let mut scores = vec![0f32; keys.len() / hd];
        for (q, out) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            for (score, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                let mut acc = _mm512_setzero_ps();
                for (x, y) in q.chunks_exact(LANES).zip(key.chunks_exact(LANES)) {
                    // SAFETY: both chunks hold 16 floats.
                    let (x, y) =
                        unsafe { (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(y.as_ptr())) };
                    acc = _mm512_fmadd_ps(x, y, acc);
                }
                *score = _mm512_reduce_add_ps(acc);
            }
            let scale = _mm512_set1_ps(exp_scores(&mut scores));
            for (c, out) in out.chunks_exact_mut(LANES).enumerate() {
                let mut acc = _mm512_setzero_ps();
                for (&p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                    // SAFETY: `c * 16 + 16 ≤ hd`, the row's length.
                    let x = unsafe { _mm512_loadu_ps(value.as_ptr().add(c * LANES)) };
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(p), x, acc);
                }
                // SAFETY: `out` holds 16 floats.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(acc, scale)) };
            }
        }
    }
}

vectorized! {
    /// [`attend`] in plain loops.
    fn attend_vectorized(q: &[f32], keys: &[f32], values: &[f32], out: &mut [f32], hd: usize) {
        let mut scores = vec![0f32; keys.len() / hd];
        for (q, out) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            for (score, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                *score = lane_sum_of_products(q, key);
            }
            let scale = exp_scores(&mut scores);
            // Sixteen outputs at a time, summed in registers over every value row.
            let mut lanes = out.chunks_exact_mut(LANES);
            for (c, lanes_out) in (&mut lanes).enumerate() {
                let mut acc = [0f32; LANES];
                for (&p, value) in scores.iter().zip(values.chunks_exact(hd)) {
                    let value: &[f32; LANES] = value[c * LANES..][..LANES].try_into().unwrap();
                    for (a, &x) in acc.iter_mut().zip(value) {
                        *a += p * x;
                    }
                }
                for (o, a) in lanes_out.iter_mut().zip(acc) {
                    *o = a * scale;
                }
            }
            let done = hd - lanes.into_remainder().len();
            for d in done..hd {
                let sum: f32 = scores.iter().zip(values.chunks_exact(hd)).map(|(&p, v)| p * v[d]).sum();
                out[d] = sum * scale;
            }
        }
    }
}

/// `scores ← e^(scores - max)`, the unnormalized softmax; returns `1 / Σ`, the
/// scale that normalizes what the scores weigh.
#[inline(always)]
fn exp_scores(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for score in scores.iter_mut() {
        *score = exp(*score - max);
    }
    1.0 / lane_sum(scores, |s| s)
}

/// `Σ a·b` in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum_of_products(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (mut xs, mut ys) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut xs).zip(&mut ys) {
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for ((lane, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(x, y)| x * y)
        .sum();
    fold_lanes(lanes) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn exp_is_within_a_few_ulp_and_clamped_outside() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.001_3;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 2e-38);
        assert_eq!(exp(1000.0), exp(88.0));
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn silu_mul_matches_candle_small_and_parallel() {
        let d = Device::Cpu;
        for rows in [3usize, 64] {
            let x = (Tensor::randn(0f32, 4., (rows, 2, 700), &d).unwrap() * 1.0)
                .unwrap()
                .reshape((rows, 1400))
                .unwrap();
            let ours = silu_mul(&x).unwrap();
            let reference = (candle_nn::ops::silu(&x.narrow(1, 0, 700).unwrap()).unwrap()
                * x.narrow(1, 700, 700).unwrap())
            .unwrap();
            assert_eq!(ours.dims(), &[rows, 700]);
            let diff = crate::max_abs_diff(&ours, &reference);
            assert!(diff < 1e-4, "rows {rows}: {diff}");
        }
    }

    #[test]
    fn silu_mul_takes_strided_input_and_refuses_odd_widths() {
        let d = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (8, 6), &d).unwrap();
        let strided = x.t().unwrap(); // [6, 8], not contiguous
        assert_eq!(silu_mul(&strided).unwrap().dims(), &[6, 4]);
        assert!(silu_mul(&Tensor::zeros((2, 5), DType::F32, &d).unwrap()).is_err());
    }
    /// Attention of one query per sequence over its slot, through candle's ops.
    fn attention_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        s: KeySpan,
        i: usize,
        heads: usize,
    ) -> Tensor {
        let (_, kv, _, hd) = k.dims4().unwrap();
        let rep = heads / kv;
        let keys = k
            .get(s.slot)
            .unwrap()
            .narrow(1, s.first_key, s.keys)
            .unwrap(); // [kv, keys, hd]
        let values = v
            .get(s.slot)
            .unwrap()
            .narrow(1, s.first_key, s.keys)
            .unwrap();
        let q = q.get(i).unwrap().reshape((kv, rep, hd)).unwrap();
        let scores = q.matmul(&keys.t().unwrap()).unwrap(); // [kv, rep, keys]
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&values.contiguous().unwrap())
            .unwrap()
            .reshape(heads * hd)
            .unwrap()
    }

    #[test]
    fn pool_attention_matches_candle_per_sequence_whatever_the_batch() {
        let d = Device::Cpu;
        // hd 16 (whole vectors) and 12 (a remainder); windows and full lengths.
        for hd in [16usize, 12] {
            let (slots, kv, cap, heads) = (5usize, 2usize, 40usize, 6usize);
            let k = Tensor::randn(0f32, 1., (slots, kv, cap, hd), &d).unwrap();
            let v = Tensor::randn(0f32, 1., (slots, kv, cap, hd), &d).unwrap();
            let seqs = [
                KeySpan {
                    slot: 3,
                    first_key: 0,
                    keys: 17,
                },
                KeySpan {
                    slot: 0,
                    first_key: 0,
                    keys: 1,
                },
                KeySpan {
                    slot: 4,
                    first_key: 9,
                    keys: 31,
                },
            ];
            let q = Tensor::randn(0f32, 1., (seqs.len(), heads * hd), &d).unwrap();
            let out = pool_attention(&q, &k, &v, &seqs, heads).unwrap();
            assert_eq!(out.dims(), &[seqs.len(), heads * hd]);
            for (i, &s) in seqs.iter().enumerate() {
                let want = attention_reference(&q, &k, &v, s, i, heads);
                let got = out.get(i).unwrap();
                assert!(
                    crate::max_abs_diff(&got, &want) < 1e-5,
                    "hd {hd}, sequence {i}"
                );
                // Alone, the same values to the bit.
                let alone =
                    pool_attention(&q.narrow(0, i, 1).unwrap(), &k, &v, &[s], heads).unwrap();
                assert_eq!(
                    alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    got.to_vec1::<f32>().unwrap()
                );
            }
        }
    }

    #[test]
    fn pool_attention_refuses_what_does_not_fit() {
        let d = Device::Cpu;
        let k = Tensor::zeros((2, 1, 8, 16), DType::F32, &d).unwrap();
        let q = Tensor::zeros((1, 32), DType::F32, &d).unwrap();
        let fits = KeySpan {
            slot: 1,
            first_key: 2,
            keys: 6,
        };
        assert!(pool_attention(&q, &k, &k, &[fits], 2).is_ok());
        for bad in [
            KeySpan { slot: 2, ..fits },
            KeySpan { keys: 7, ..fits },
            KeySpan { keys: 0, ..fits },
        ] {
            assert!(pool_attention(&q, &k, &k, &[bad], 2).is_err(), "{bad:?}");
        }
        // Heads that do not match the query width, or a sequence count that does not
        // match the queries.
        assert!(pool_attention(&q, &k, &k, &[fits], 3).is_err());
        assert!(pool_attention(&q, &k, &k, &[fits, fits], 2).is_err());
    }
}
