//! The packed product's register tiles for AVX2 with FMA: 16 vector registers of 8
//! lanes, so a tile is up to [`MR`] rows × half a panel (16 columns, two vectors):
//! 12 accumulators, the half panel's two vectors of the input and one broadcast row
//! value, with two loads of the weight and six broadcasts for twelve multiply-adds.
//! The halves of a panel go in turn over each input block, which the first half
//! brings into L1 for the second.

use super::{Lanes, Part, KC};
use std::arch::x86_64::*;

/// Rows per register tile.
const MR: usize = 6;

/// One panel for all rows: per input block, per half panel, full tiles of `MR`
/// rows, then the rest.
///
/// # Safety
/// AVX2 and FMA; `x` is `rows × input`; `b` is the panel (`input × 2` vectors of
/// 16); `c` points at the panel's first column of row 0 of a `rows × ldc` output
/// and `cols ≤ 32` columns from there are the panel's to write.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn panel(
    x: &[f32],
    input: usize,
    rows: usize,
    b: &[Lanes],
    bias: &[Lanes],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    let b = b.as_ptr() as *const f32;
    let bias = bias.as_ptr() as *const f32;
    for part in Part::blocks(input) {
        for half in 0..2 {
            let width = cols.saturating_sub(half * 16).min(16);
            if width == 0 {
                break;
            }
            let masks = masks(width);
            // The half panel's columns: 16 of each input's 32, from `half * 16`.
            let (b, bias, c) = (
                b.add(part.k0 * 32 + half * 16),
                bias.add(half * 16),
                c.add(half * 16),
            );
            row_tiles!(tile::<MR | 1 2 3 4 5>(x, input, rows, c, ldc; (b, bias, masks, part)));
        }
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
/// output unless the block is the first; the last adds the bias.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    a: *const f32,
    c: *mut f32,
    ldc: usize,
    b: *const f32,
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
            // The panel's next block into L2 while this one is in use, as the
            // AVX-512 tile does (a cache line holds the half panel's 16 columns).
            _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add((k + KC) * 32) as *const i8);
            let b0 = _mm256_load_ps(b.add(k * 32));
            let b1 = _mm256_load_ps(b.add(k * 32 + 8));
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
