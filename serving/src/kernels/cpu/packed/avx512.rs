//! The packed product's register tiles for AVX-512F: 32 vector registers of 16
//! lanes, so a tile is up to [`MR`] rows × a whole panel (two vectors): 24
//! accumulators, the panel's two vectors of the input and one broadcast row value.

use super::{Job, Part, Source, KC, MR};
use std::arch::x86_64::*;

/// One input block of a panel for all rows: full tiles of `MR` rows, then the
/// rest.
///
/// # Safety
/// AVX-512F; `job` as [`super::block_on`] says.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn block<const Q8: bool>(job: Job) {
    let (bias, masks) = (job.bias.as_ptr() as *const f32, masks(job.cols));
    row_tiles!(tile::<MR | 1 2 3 4 5 6 7 8 9 10 11; Q8>(job.x, job.input, job.rows, job.c, job.ldc; (job.b, bias, masks, job.part)));
}

/// The lanes of the panel's two vectors its `cols` (1..=32) columns fill.
fn masks(cols: usize) -> (__mmask16, __mmask16) {
    let mask0 = if cols >= 16 {
        0xffff
    } else {
        (1u16 << cols) - 1
    };
    let mask1 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u16 << (cols - 16)) - 1
    } else {
        0
    };
    (mask0, mask1)
}

/// `R` rows × one panel over one input block, continuing the sums in the
/// output unless the block is the first; the last adds the bias. With `Q8`
/// each input's 32 weights are its bytes times their block's scales, widened
/// here (exact in f32, so the sums are those over a widened buffer).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const Q8: bool>(
    a: *const f32,
    c: *mut f32,
    ldc: usize,
    b: Source,
    bias: *const f32,
    (mask0, mask1): (__mmask16, __mmask16),
    part: Part,
) {
    // SAFETY (whole body): the caller's contract on `panel`, which this keeps.
    unsafe {
        let Part {
            k0,
            len,
            lda,
            first,
            last,
        } = part;
        let a = a.add(k0);
        let zero = _mm512_setzero_ps();
        let mut acc = [[zero; 2]; R];
        if !first {
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = c.add(r * ldc);
                acc[0] = _mm512_maskz_loadu_ps(mask0, row);
                acc[1] = _mm512_maskz_loadu_ps(mask1, row.add(16));
            }
        }
        for k in 0..len {
            let (b0, b1) = weights::<Q8>(b, k);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r * lda + k));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
        let (bias0, bias1) = if last {
            (_mm512_load_ps(bias), _mm512_load_ps(bias.add(16)))
        } else {
            (zero, zero)
        };
        for (r, acc) in acc.iter().enumerate() {
            let row = c.add(r * ldc);
            _mm512_mask_storeu_ps(row, mask0, _mm512_add_ps(acc[0], bias0));
            if mask1 != 0 {
                _mm512_mask_storeu_ps(row.add(16), mask1, _mm512_add_ps(acc[1], bias1));
            }
        }
    }
}

/// Input `k`'s 32 weights of a block: loaded, or with `Q8` its bytes times their
/// block's scales (exact in f32); the block ahead is prefetched.
///
/// # Safety
/// AVX-512F; `b` holds input `k` of its block.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn weights<const Q8: bool>(b: Source, k: usize) -> (__m512, __m512) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        // The panel's next block (or the next panel, which follows it in memory)
        // into L2 while this one is in use: the weights stream from memory, and a
        // decoding step has too few rows to hide its latency.
        if Q8 {
            let q = b.quants.add(k * 32);
            _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(KC * 32));
            let s = b.scales.add(k / 32 * 32);
            let bytes = _mm256_loadu_si256(q as *const __m256i);
            let lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes));
            let hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(bytes));
            (
                _mm512_mul_ps(_mm512_cvtepi32_ps(lo), _mm512_load_ps(s)),
                _mm512_mul_ps(_mm512_cvtepi32_ps(hi), _mm512_load_ps(s.add(16))),
            )
        } else {
            let b = b.values;
            let ahead = b.wrapping_add((k + KC) * 32) as *const i8;
            _mm_prefetch::<_MM_HINT_T1>(ahead);
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64));
            (
                _mm512_load_ps(b.add(k * 32)),
                _mm512_load_ps(b.add(k * 32 + 16)),
            )
        }
    }
}

/// Widens `len` inputs of a Q8_0 block (`b`'s bytes and scales) into `out` as
/// f32 `[input][32]`.
///
/// # Safety
/// AVX-512F; `b` holds the `len` inputs, `out` `len × 32` floats, 64-byte aligned.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn widen(b: Source, len: usize, out: *mut f32) {
    for k in 0..len {
        // SAFETY: the caller's contract.
        unsafe {
            let (v0, v1) = weights::<true>(b, k);
            _mm512_store_ps(out.add(k * 32), v0);
            _mm512_store_ps(out.add(k * 32 + 16), v1);
        }
    }
}
