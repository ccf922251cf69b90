//! The packed product's register tiles for AVX2 with FMA: 16 vector registers of 8
//! lanes, so a tile is up to [`MR`] rows × half a panel (16 columns, two vectors):
//! 12 accumulators, the half panel's two vectors of the input and one broadcast row
//! value, with two loads of the weight and six broadcasts for twelve multiply-adds.
//! The halves of a panel go in turn over each input block, which the first half
//! brings into L1 for the second.

use super::{Job, Part, Source, KC};
use std::arch::x86_64::*;

/// Rows per register tile.
pub(super) const MR: usize = 6;

/// One input block of a panel for all rows: per half panel, full tiles of `MR`
/// rows, then the rest.
///
/// # Safety
/// AVX2 and FMA; `job` as [`super::block_on`] says.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block<const Q8: bool>(job: Job) {
    let bias = job.bias.as_ptr() as *const f32;
    for half in 0..2 {
        let width = job.cols.saturating_sub(half * 16).min(16);
        if width == 0 {
            break;
        }
        let masks = masks(width);
        // The half panel's columns: 16 of each input's 32, from `half * 16`.
        let b = job.b.columns(half * 16);
        // SAFETY: within the bias and the panel's columns.
        let (bias, c) = unsafe { (bias.add(half * 16), job.c.add(half * 16)) };
        row_tiles!(tile::<MR | 1 2 3 4 5; Q8>(job.x, job.input, job.rows, c, job.ldc; (b, bias, masks, job.part)));
    }
}

/// The lanes of the two vectors a half panel of `width` (1..=16) columns writes.
#[target_feature(enable = "avx2")]
fn masks(width: usize) -> [__m256i; 2] {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let upto = |n: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
    [upto(width.min(8)), upto(width.saturating_sub(8))]
}

/// `R` rows × one half panel over one input block, continuing the sums in the
/// output unless the block is the first; the last adds the bias. With `Q8` each
/// input's 16 weights are its bytes times their block's scales, widened here
/// (exact in f32, so the sums are those over a widened buffer).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize, const Q8: bool>(
    a: *const f32,
    c: *mut f32,
    ldc: usize,
    b: Source,
    bias: *const f32,
    [mask0, mask1]: [__m256i; 2],
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
        let full = _mm256_movemask_ps(_mm256_castsi256_ps(mask1)) == 0xff;
        let a = a.add(k0);
        let zero = _mm256_setzero_ps();
        let mut acc = [[zero; 2]; R];
        if !first {
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = c.add(r * ldc);
                if full {
                    acc[0] = _mm256_loadu_ps(row);
                    acc[1] = _mm256_loadu_ps(row.add(8));
                } else {
                    acc[0] = _mm256_maskload_ps(row, mask0);
                    acc[1] = _mm256_maskload_ps(row.add(8), mask1);
                }
            }
        }
        for k in 0..len {
            let (b0, b1) = weights::<Q8>(b, k);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * lda + k));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
        let (bias0, bias1) = if last {
            (_mm256_load_ps(bias), _mm256_load_ps(bias.add(8)))
        } else {
            (zero, zero)
        };
        for (r, acc) in acc.iter().enumerate() {
            let row = c.add(r * ldc);
            let (v0, v1) = (_mm256_add_ps(acc[0], bias0), _mm256_add_ps(acc[1], bias1));
            if full {
                _mm256_storeu_ps(row, v0);
                _mm256_storeu_ps(row.add(8), v1);
            } else {
                _mm256_maskstore_ps(row, mask0, v0);
                _mm256_maskstore_ps(row.add(8), mask1, v1);
            }
        }
    }
}

/// Input `k`'s 16 weights of a half panel's block: loaded, or with `Q8` its
/// bytes times their block's scales (exact in f32); the block ahead is prefetched,
/// as the AVX-512 tile does (a cache line holds the half panel's 16 columns).
///
/// # Safety
/// AVX2; `b` holds input `k` of its block, from the half panel's first column.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn weights<const Q8: bool>(b: Source, k: usize) -> (__m256, __m256) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        if Q8 {
            let q = b.quants.add(k * 32);
            _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(KC * 32));
            let s = b.scales.add(k / 32 * 32);
            (scaled(q, s), scaled(q.add(8), s.add(8)))
        } else {
            let b = b.values;
            _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add((k + KC) * 32) as *const i8);
            (
                _mm256_load_ps(b.add(k * 32)),
                _mm256_load_ps(b.add(k * 32 + 8)),
            )
        }
    }
}

/// Widens `len` inputs of a Q8_0 block (`b`'s bytes and scales) into `out` as
/// f32 `[input][32]`, half panel by half panel as the tiles read them.
///
/// # Safety
/// AVX2; `b` holds the `len` inputs, `out` `len × 32` floats, 32-byte aligned.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn widen(b: Source, len: usize, out: *mut f32) {
    for k in 0..len {
        for half in 0..2 {
            // SAFETY: the caller's contract.
            unsafe {
                let (v0, v1) = weights::<true>(b.columns(half * 16), k);
                let out = out.add(k * 32 + half * 16);
                _mm256_store_ps(out, v0);
                _mm256_store_ps(out.add(8), v1);
            }
        }
    }
}

/// 8 bytes at `q` times the 8 scales at `s` (32-byte aligned), as f32.
///
/// # Safety
/// AVX2; both readable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn scaled(q: *const i8, s: *const f32) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        let bytes = _mm_loadl_epi64(q as *const __m128i);
        _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
            _mm256_load_ps(s),
        )
    }
}
