//! Projections in bf16 on Intel AMX, the tile matrix units of Xeon CPUs since
//! Sapphire Rapids.
//!
//! One `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one into 16×16 f32 sums:
//! 8,192 multiply-adds, about 16 times what AVX-512 does in f32 in the same cycles.
//! Products here take f32 in and give f32 out; in between the weight (once, at load)
//! and the input rows (at each product) are rounded to bf16, to nearest even, and
//! every sum is kept in f32. That is the precision of PyTorch's
//! `set_float32_matmul_precision("medium")` and of bf16 inference on GPUs: about three
//! significant digits per product, each output within ~0.4% of the f32 product.
//! [`crate::dense::Precision`] chooses it.
//!
//! The weight is packed once into panels of [`NR`] output columns, each a run of
//! 32-input blocks laid out as AMX wants its right operand (pairs of inputs side by
//! side, `[k/2][column][2]`, two 1 KiB tiles per block). A product converts its input
//! rows to bf16 (zero-padded to whole tiles), then goes over rows in blocks of [`MB`]
//! (which stay in the L2 cache); within a block the panels are split over the CPU
//! threads, and each panel passes over the block's rows 32 at a time, four 16×16
//! accumulator tiles at once (two row tiles by two column tiles).
//!
//! Each output element sums its inputs in the same order whatever rows share the
//! product, so a row's result does not depend on its batch.
//!
//! AMX is used only where the CPU has AMX-TILE and AMX-BF16 and Linux grants the
//! process the tile state ([`available`]).

// Unsafe: AMX instructions (`asm!` and `target_feature` intrinsics), called only once detection found them.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use candle_core::Result;
use rayon::prelude::*;

use crate::kernels::cpu::packed::{
    check_weight, in_row_blocks, pack_bias, rows_of, Dst, Lanes, RowProduct,
};

/// Output columns per panel: two 16-column tiles (the panels of
/// [`crate::kernels::cpu::packed`], whose bias layout this shares).
pub const NR: usize = crate::kernels::cpu::packed::NR;
/// Inputs per block: one tile row of bf16 (64 bytes).
const KB: usize = 32;
/// Rows per block: a block's bf16 inputs (`MB × in`) stay in the L2 cache while
/// every panel passes over them.
pub const MB: usize = 256;
/// Multiply-adds below which a product stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 20;

/// One tile row (64 bytes), aligned to a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// Whether this CPU and OS run AMX bf16 products. Asks Linux for the tile state
/// the first time; the answer is kept.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(super::detect::amx_bf16)
}

/// A `[in] → [out]` projection's weight (and bias), packed in bf16 for AMX.
pub struct AmxPacked {
    /// `panels × blocks × 2` tiles of 16 lines.
    data: Vec<Line>,
    /// `panels × 2` vectors of f32, zero where there is no bias or past `output`.
    bias: Vec<Lanes>,
    input: usize,
    output: usize,
    /// 32-input blocks: `input` rounded up.
    blocks: usize,
}

impl std::fmt::Debug for AmxPacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmxPacked")
            .field("input", &self.input)
            .field("output", &self.output)
            .finish()
    }
}

/// `x` rounded to the nearest bf16, ties to even (NaN stays NaN): the rounding of
/// the AMX product's inputs, as PyTorch's bf16 autocast rounds them.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

crate::kernels::cpu::ops::vectorized! {
    /// Rows of `input` f32 into the first `input` of rows of `width` bf16 (the
    /// rest, the padding, is left as it is).
    fn to_bf16_rows(x: &[f32], out: &mut [u16], input: usize, width: usize) {
        for (x, out) in x.chunks_exact(input).zip(out.chunks_exact_mut(width)) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = bf16(v);
            }
        }
    }
}

impl AmxPacked {
    /// From a row-major `[output, input]` weight (a checkpoint's layout) and an
    /// optional `[output]` bias.
    pub fn new(weight: &[f32], bias: Option<&[f32]>, input: usize, output: usize) -> Result<Self> {
        check_weight(weight, bias, input, output)?;
        let panels = output.div_ceil(NR);
        let blocks = input.div_ceil(KB);
        let panel_lines = blocks * 2 * 16; // `panel_len`
        let mut data = vec![Line([0; 32]); panels * panel_lines];
        // Tile `t` of block `kb` of a panel holds, at line `r`, the inputs
        // `kb·32 + 2r` and `+1` of each of its 16 columns side by side.
        if input > 0 && output > 0 {
            data.par_chunks_mut(panel_lines)
                .zip(weight.par_chunks(NR * input))
                .for_each(|(panel, rows)| {
                    for (col, row) in rows.chunks_exact(input).enumerate() {
                        let (t, c) = (col / 16, col % 16);
                        for (i, &w) in row.iter().enumerate() {
                            let (kb, kk) = (i / KB, i % KB);
                            panel[(kb * 2 + t) * 16 + kk / 2].0[c * 2 + kk % 2] = bf16(w);
                        }
                    }
                });
        }
        Ok(AmxPacked {
            data,
            bias: pack_bias(bias, output),
            input,
            output,
            blocks,
        })
    }

    /// `u16`s of one panel: `blocks` pairs of 16-line tiles.
    fn panel_len(&self) -> usize {
        self.blocks * 2 * 16
    }

    /// `x[rows, input] · Wᵀ + b` → `[rows, output]`, both row-major f32.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        if !available() {
            candle_core::bail!("the AMX product needs a CPU with AMX-BF16");
        }
        let rows = rows_of(x, self.input, self.output, "an AMX")?;
        if rows == 0 || self.output == 0 {
            return Ok(vec![0.0; rows * self.output]);
        }
        // The rows in bf16, padded with zeros to whole tiles: 16 rows, 32 inputs.
        let width = self.blocks * KB;
        let padded_rows = rows.next_multiple_of(16);
        let mut a = vec![0u16; padded_rows * width];
        let per_task = (MB * width).min(a.len());
        a.par_chunks_mut(per_task)
            .zip(x.par_chunks(MB * self.input))
            .for_each(|(a, x)| to_bf16_rows(x, a, self.input, width));
        // SAFETY: `block` writes every element of its rows: each panel all its
        // columns of every row.
        Ok(unsafe {
            in_row_blocks(rows, self.output, MB, |start, n, out| {
                let a = &a[start * width..(start + n.next_multiple_of(16)) * width];
                self.block(a, n, out)
            })
        })
    }

    /// One block of `rows` rows (`a`: their bf16, padded to a multiple of 16 rows),
    /// panels split over the threads.
    fn block(&self, a: &[u16], rows: usize, out: &mut [MaybeUninit<f32>]) {
        let panels = self.output.div_ceil(NR);
        let dst = Dst(out.as_mut_ptr().cast());
        let width = self.blocks * KB;
        let run = |panels: std::ops::Range<usize>| {
            let _tiles = Tiles::configure();
            for panel in panels {
                let cols = (self.output - panel * NR).min(NR);
                let lines = self.panel_len();
                let b = &self.data[panel * lines..(panel + 1) * lines];
                let bias = &self.bias[panel * 2..panel * 2 + 2];
                let mut r = 0;
                while r < rows {
                    let n = (rows - r).min(32);
                    // SAFETY: the tiles are configured (`_tiles`); `a` holds the
                    // padded rows r..r+n rounded up to 16, `width` bf16 each; `b`
                    // is the panel's `blocks` pairs of tiles; the kernel writes only
                    // this panel's `cols` columns of output rows r..r+n, which no
                    // other panel touches.
                    unsafe {
                        kernel(
                            &a[r * width..],
                            width,
                            n,
                            b,
                            self.blocks,
                            bias,
                            dst.at(r * self.output + panel * NR),
                            self.output,
                            cols,
                        )
                    };
                    r += n;
                }
            }
        };
        let work = rows * width * self.output;
        let threads = rayon::current_num_threads();
        let tasks = (work / PARALLEL_MIN).clamp(1, panels.min(threads * 4));
        if tasks == 1 {
            run(0..panels);
        } else {
            (0..tasks)
                .into_par_iter()
                .for_each(|t| run(t * panels / tasks..(t + 1) * panels / tasks));
        }
    }
}

impl RowProduct for AmxPacked {
    fn input(&self) -> usize {
        self.input
    }
    fn output(&self) -> usize {
        self.output
    }
    fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        AmxPacked::matmul(self, x)
    }
}

/// The tile configuration of this thread while it lives: tiles 0-7 all 16 rows
/// of 64 bytes. Dropping it releases the tiles, so the OS need not save them.
struct Tiles;

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl Tiles {
    fn configure() -> Tiles {
        let mut config = [0u8; 64];
        config[0] = 1; // palette 1
        for t in 0..8 {
            config[16 + 2 * t] = 64; // bytes per row
            config[48 + t] = 16; // rows
        }
        let config = TileConfig(config);
        // SAFETY: the CPU has AMX and the process the tile state (`available`,
        // checked by `matmul` before any product); the configuration is valid
        // for palette 1 as `detect` found it.
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{0}]",
                in(reg) config.0.as_ptr(),
                options(nostack, preserves_flags, readonly)
            )
        };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: as in `configure`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// Up to 32 rows × one panel (32 columns): the sums over every input block in
/// accumulator tiles 0-3 (started from the bias), then stored to `c` (`ldc` floats
/// a row), straight when the tile is whole and through a scratch tile when it is
/// not. Tiles 4-5 hold the rows' inputs, 6-7 the weight.
///
/// # Safety
/// Tiles configured ([`Tiles`]); `a` holds `rows.next_multiple_of(16)` rows of
/// `lda` bf16 (`blocks × 32`); `b` the panel's `blocks × 2` tiles; `c` points at the
/// panel's first column of the first row, and `cols` columns of `rows` rows from
/// there, `ldc` apart, are the kernel's to write.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel(
    a: &[u16],
    lda: usize,
    rows: usize,
    b: &[Line],
    blocks: usize,
    bias: &[Lanes],
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::asm;
    let lda_bytes = lda * 2;
    let a = a.as_ptr() as *const u8;
    let b = b.as_ptr() as *const u8;
    let bias = bias.as_ptr() as *const u8;
    let two = rows > 16;
    // SAFETY (whole body): the caller's contract. A row stride of 0 repeats the
    // bias in every row of the accumulators.
    unsafe {
        asm!(
            "tileloadd tmm0, [{b0} + {zero}*1]",
            "tileloadd tmm1, [{b1} + {zero}*1]",
            "tileloadd tmm2, [{b0} + {zero}*1]",
            "tileloadd tmm3, [{b1} + {zero}*1]",
            b0 = in(reg) bias,
            b1 = in(reg) bias.add(64),
            zero = in(reg) 0usize,
            options(nostack, preserves_flags, readonly)
        );
        for kb in 0..blocks {
            let a0 = a.add(kb * 64);
            let b0 = b.add(kb * 2048);
            if two {
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a0.add(16 * lda_bytes),
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(1024),
                    lda = in(reg) lda_bytes,
                    s = in(reg) 64usize,
                    options(nostack, preserves_flags, readonly)
                );
            } else {
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0,
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(1024),
                    lda = in(reg) lda_bytes,
                    s = in(reg) 64usize,
                    options(nostack, preserves_flags, readonly)
                );
            }
        }
        // Store each accumulator tile: whole ones straight into the output.
        let mut scratch = [Lanes([0.0; 16]); 16];
        for (tile, (r0, c0)) in [(0, 0), (0, 16), (16, 0), (16, 16)].into_iter().enumerate() {
            if r0 >= rows || c0 >= cols {
                continue;
            }
            let (n, m) = ((rows - r0).min(16), (cols - c0).min(16));
            let whole = n == 16 && m == 16;
            let (dst, stride) = if whole {
                (c.add(r0 * ldc + c0) as *mut u8, ldc * 4)
            } else {
                (scratch.as_mut_ptr() as *mut u8, 64)
            };
            // The tile register is part of the instruction.
            macro_rules! store {
                ($tmm:literal) => {
                    asm!(
                        concat!("tilestored [{d} + {s}*1], ", $tmm),
                        d = in(reg) dst,
                        s = in(reg) stride,
                        options(nostack, preserves_flags)
                    )
                };
            }
            match tile {
                0 => store!("tmm0"),
                1 => store!("tmm1"),
                2 => store!("tmm2"),
                _ => store!("tmm3"),
            }
            if !whole {
                for (r, line) in scratch.iter().enumerate().take(n) {
                    std::ptr::copy_nonoverlapping(line.0.as_ptr(), c.add((r0 + r) * ldc + c0), m);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::packed::tests::{
        check_mismatched, check_rows_alone, check_shapes, reference, values,
    };

    fn make(w: &[f32], b: Option<&[f32]>, i: usize, o: usize) -> Result<Box<dyn RowProduct>> {
        Ok(Box::new(AmxPacked::new(w, b, i, o)?))
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even one, 1.
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(-2.0), 0xc000);
        assert!(f32::from_bits((bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(bf16(f32::INFINITY), 0x7f80);
        // The largest finite f32 rounds up to infinity.
        assert_eq!(bf16(f32::MAX), 0x7f80);
        assert_eq!(bf16(-0.0), 0x8000);
    }

    #[test]
    fn rounding_matches_the_add_and_shift_formula() {
        // Round to nearest, ties to even, by integer arithmetic: add just under half
        // an ulp of bf16, plus one when the kept part is odd, and drop the low half.
        let formula = |x: f32| {
            let bits = x.to_bits();
            (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
        };
        // Every exponent and sign, low bits that hit each rounding case.
        for high in 0..=0xffffu32 {
            for low in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff] {
                let x = f32::from_bits(high << 16 | low);
                if x.is_nan() {
                    assert!(f32::from_bits((bf16(x) as u32) << 16).is_nan());
                } else {
                    assert_eq!(bf16(x), formula(x), "{x:e} ({:#x})", x.to_bits());
                }
            }
        }
    }

    /// The values rounded to bf16, as the product sees them.
    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|&x| f32::from_bits((bf16(x) as u32) << 16))
            .collect()
    }

    #[test]
    #[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
    fn matches_a_plain_product_of_the_rounded_values_at_every_shape_edge() {
        // Partial input blocks, partial panels, single row tiles, parallel sizes,
        // several row blocks.
        let shapes = [
            (1, 1, 1),
            (1, 7, 33),
            (5, 32, 16),
            (16, 33, 31),
            (17, 64, 64),
            (32, 5, 32),
            (33, 100, 70),
            (300, 384, 96),
            (600, 256, 1152),
        ];
        check_shapes(make, &shapes, rounded);
    }

    #[test]
    #[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
    fn stays_within_bf16_rounding_of_the_f32_product() {
        let (rows, input, output) = (40, 384, 128);
        let (x, w) = (values(rows * input, 7), values(output * input, 8));
        let out = AmxPacked::new(&w, None, input, output)
            .unwrap()
            .matmul(&x)
            .unwrap();
        let want = reference(&x, &w, None, input, output);
        // Each product is off by at most ~2^-8 relative; over 384 of them of
        // magnitude ≤ 1 the sum drifts by far less than 0.5.
        let worst = out
            .iter()
            .zip(&want)
            .map(|(a, e)| (a - e).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.5, "worst {worst}");
        assert!(worst > 0.0, "the product should round to bf16");
    }

    #[test]
    #[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
    fn a_row_comes_out_the_same_whatever_rows_share_the_product() {
        check_rows_alone(make, 300, &[1, 2, 15, 16, 17, 31, 33, 64]);
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        check_mismatched(make, available());
    }
}
