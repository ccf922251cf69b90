//! Q8_0 projections (GGUF's 8-bit blocks: 32 signed bytes and one f16 scale per 32
//! inputs of an output row) through the packed product's register tiles.
//!
//! At load the blocks are laid out as the packed f32 weight is, in panels of [`NR`]
//! outputs: each panel's bytes `[input][NR]` (an input's 32 outputs side by side)
//! and its scales `[input / 32][NR]` as f32, 1.125 bytes per weight against the
//! file's 1.0625. A step whose rows fit one register tile (a decoding step of a few
//! sequences) widens each input's bytes in registers as the tile goes (a load,
//! sign extensions, conversions and one multiply by the scales per 16 weights on
//! AVX-512, per 8 on AVX2). With more rows, per panel and input block of [`KC`],
//! the bytes are widened once into an L1-sized f32 buffer and every row tile
//! passes over that buffer as over a packed f32 weight: widening costs the same
//! whatever the step's number of sequences, so at 32 sequences the product runs at
//! the f32 product's speed reading a quarter of its bytes. candle's
//! quantized product instead quantizes each row of activations and takes a dot
//! product per weight row and sequence, so a step of many sequences costs what
//! they cost one at a time.
//!
//! The activations stay f32, the weights are the blocks' exact values (a scale
//! times a byte is exact in f32), and every output sums its products in input
//! order whatever the number of rows, as [`super::Packed`] does: a sequence's
//! logits do not depend on its step's company.

// Unsafe: the kernels' widening and tiles (AVX-512 and AVX2), called only once detection found them.
#![allow(unsafe_code)]

use candle_core::Result;
use rayon::prelude::*;

use super::{
    block_on, pack_bias, panel_product, Job, Kernel, Lanes, Part, RowProduct, Source, KC, NR,
};

/// Inputs per Q8_0 block.
pub const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale, then 32 signed bytes.
pub const BLOCK_BYTES: usize = 2 + BLOCK;

/// A `[in] → [out]` projection's Q8_0 weight (and bias), laid out for the packed
/// product.
pub struct Q8Packed {
    /// `panels × input × NR` bytes: per panel, per input, its outputs' bytes
    /// (zero past `output`).
    quants: Vec<i8>,
    /// `panels × input / 32 × 2` vectors: per panel, per block of inputs, its
    /// outputs' scales (zero past `output`).
    scales: Vec<Lanes>,
    /// `panels × 2` vectors, zero where there is no bias or past `output`.
    bias: Vec<Lanes>,
    input: usize,
    output: usize,
    kernel: Kernel,
}

impl std::fmt::Debug for Q8Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Packed")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("kernel", &self.kernel)
            .finish()
    }
}

impl Q8Packed {
    /// From a `[output, input]` weight as Q8_0 blocks, row by row as GGUF stores
    /// them (`input` a multiple of 32), and an optional `[output]` bias.
    pub fn new(blocks: &[u8], bias: Option<&[f32]>, input: usize, output: usize) -> Result<Self> {
        Q8Packed::with_kernel(blocks, bias, input, output, Kernel::widest_here()?)
    }

    fn with_kernel(
        blocks: &[u8],
        bias: Option<&[f32]>,
        input: usize,
        output: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        kernel.check()?;
        if !input.is_multiple_of(BLOCK) {
            candle_core::bail!("Q8_0 rows of {input} inputs are not whole blocks of {BLOCK}");
        }
        let row_bytes = input / BLOCK * BLOCK_BYTES;
        if blocks.len() != output * row_bytes {
            candle_core::bail!(
                "a {output}x{input} Q8_0 weight of {} bytes (want {})",
                blocks.len(),
                output * row_bytes
            );
        }
        if let Some(b) = bias {
            if b.len() != output {
                candle_core::bail!("a bias of {} for {output} outputs", b.len());
            }
        }
        let panels = output.div_ceil(NR);
        let mut quants = vec![0i8; panels * input * NR];
        let mut scales = vec![Lanes([0.0; 16]); panels * input / BLOCK * 2];
        // Panels in parallel, each from its own (up to) 32 rows of blocks.
        if input > 0 {
            quants
                .par_chunks_mut(input * NR)
                .zip(scales.par_chunks_mut(input / BLOCK * 2))
                .zip(blocks.par_chunks(NR * row_bytes))
                .for_each(|((quants, scales), rows)| {
                    for (lane, row) in rows.chunks_exact(row_bytes).enumerate() {
                        for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                            let d = half::f16::from_le_bytes([block[0], block[1]]);
                            scales[b * 2 + lane / 16].0[lane % 16] = d.to_f32();
                            for (i, &q) in block[2..].iter().enumerate() {
                                quants[(b * BLOCK + i) * NR + lane] = q as i8;
                            }
                        }
                    }
                });
        }
        Ok(Q8Packed {
            quants,
            scales,
            bias: pack_bias(bias, output),
            input,
            output,
            kernel,
        })
    }

    /// `x[rows, input] · Wᵀ + b` → `[rows, output]`, both row-major. Rows that
    /// fit one register tile widen each input once in registers; more rows share
    /// a buffer each panel's input block is widened into, rather than widen it per
    /// tile.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (input, blocks) = (self.input, self.input / BLOCK);
        let panel = |buffer: &mut Vec<Lanes>, job: Job, panel: usize| {
            let in_registers = job.rows <= self.kernel.tile_rows();
            let quants = self.quants[panel * input * NR..].as_ptr();
            let scales = self.scales[panel * blocks * 2..].as_ptr() as *const f32;
            let widened = buffer.as_mut_ptr() as *mut f32;
            for part in Part::blocks(input) {
                // SAFETY: the kernel's instructions are present (checked at
                // construction); the block's bytes and scales lie in the panel's
                // (`k0 + len ≤ input`, and `KC` is whole blocks of 32), and the
                // buffer holds `KC × NR` floats, 64-byte aligned.
                unsafe {
                    let q = quants.add(part.k0 * NR);
                    let s = scales.add(part.k0 / BLOCK * NR);
                    if in_registers {
                        block_on::<true>(
                            self.kernel,
                            Job {
                                b: Source::q8(q, s),
                                part,
                                ..job
                            },
                        );
                    } else {
                        widen_on(self.kernel, q, s, part.len, widened);
                        let b = Source::values(widened);
                        block_on::<false>(self.kernel, Job { b, part, ..job });
                    }
                }
            }
        };
        let buffer = || vec![Lanes([0.0; 16]); KC * 2];
        // SAFETY: a panel's input blocks write its columns of every row, the first
        // starting the sums and the last ending them, and nothing else.
        unsafe { panel_product(x, input, self.output, "a Q8_0", &self.bias, buffer, panel) }
    }

    /// Output width.
    pub fn output(&self) -> usize {
        self.output
    }
}

/// Widens `len` inputs of a panel (whole blocks of 32), `q` at their bytes and
/// `s` at their blocks' scales, into `out` (`len × NR` floats, 64-byte aligned)
/// as `[input][NR]`, with `kernel`'s instructions.
///
/// # Safety
/// The kernel's instructions are present; all three hold what is said above.
unsafe fn widen_on(kernel: Kernel, q: *const i8, s: *const f32, len: usize, out: *mut f32) {
    // SAFETY: the caller's contract.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let b = Source::q8(q, s);
        match kernel {
            Kernel::Avx512 => super::avx512::widen(b, len, out),
            Kernel::Avx2 => super::avx2::widen(b, len, out),
        }
    }
}

impl RowProduct for Q8Packed {
    fn input(&self) -> usize {
        self.input
    }
    fn output(&self) -> usize {
        self.output
    }
    fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        Q8Packed::matmul(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{reference, values};
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// `w` as Q8_0 blocks and as the values those blocks hold.
    fn quantized(w: &[f32], input: usize, output: usize) -> (Vec<u8>, Vec<f32>) {
        let t = Tensor::from_slice(w, (output, input), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let held = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q.data().unwrap().into_owned(), held)
    }

    /// Partial panels and groups of 8, every tile remainder, input blocks that
    /// continue (past 256), parallel sizes, rows past one block of `MB`.
    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 32, 1),
        (1, 64, 33),
        (3, 32, 8),
        (5, 96, 17),
        (6, 288, 31),
        (7, 64, 64),
        (13, 320, 70),
        (25, 288, 40),
        (32, 768, 96),
        (130, 256, 100),
    ];

    fn check(kernel: Kernel) {
        for &(rows, input, output) in &SHAPES {
            let (x, w, b) = (
                values(rows * input, 1),
                values(output * input, 2),
                values(output, 3),
            );
            let (blocks, held) = quantized(&w, input, output);
            for bias in [None, Some(b.as_slice())] {
                let product = Q8Packed::with_kernel(&blocks, bias, input, output, kernel).unwrap();
                let out = product.matmul(&x).unwrap();
                let want = reference(&x, &held, bias, input, output);
                assert_eq!(out.len(), want.len());
                for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{kernel:?} {rows}x{input}→{output} at {i}: {a} vs {e}"
                    );
                }
            }
        }
    }

    /// Any rows of a 32-row product come out bit for bit as they do among all.
    fn check_rows_alone(kernel: Kernel) {
        let (input, output, total) = (288, 200, 32);
        let (blocks, _) = quantized(&values(input * output, 4), input, output);
        let product = Q8Packed::with_kernel(&blocks, None, input, output, kernel).unwrap();
        let x = values(total * input, 5);
        let all = product.matmul(&x).unwrap();
        for rows in [1, 2, 5, 6, 7, 11, 12, 13, 25] {
            for start in [0usize, 3, total - rows] {
                let some = product
                    .matmul(&x[start * input..(start + rows) * input])
                    .unwrap();
                assert_eq!(
                    some,
                    all[start * output..(start + rows) * output],
                    "{kernel:?}: {rows} rows from {start}"
                );
            }
        }
    }

    #[test]
    #[cfg_attr(not(cpu_avx2_fma), ignore = "skipped: this CPU has no AVX2 with FMA")]
    fn q8_blocks_on_the_avx2_tiles_match_a_plain_product_of_their_values() {
        check(Kernel::Avx2);
        check_rows_alone(Kernel::Avx2);
    }

    #[test]
    #[cfg_attr(not(cpu_avx512f), ignore = "skipped: this CPU has no AVX-512F")]
    fn q8_blocks_on_the_avx512_tiles_match_a_plain_product_of_their_values() {
        check(Kernel::Avx512);
        check_rows_alone(Kernel::Avx512);
    }

    #[test]
    fn malformed_q8_weights_are_errors() {
        if !super::super::available() {
            assert!(Q8Packed::new(&[0; 34], None, 32, 1).is_err());
            return;
        }
        // Not whole blocks, too few bytes, a bias of the wrong size.
        assert!(Q8Packed::new(&[0; 34], None, 31, 1).is_err());
        assert!(Q8Packed::new(&[0; 33], None, 32, 1).is_err());
        assert!(Q8Packed::new(&[0; 34], Some(&[0.0; 2]), 32, 1).is_err());
        let p = Q8Packed::new(&[0; 68], None, 32, 2).unwrap();
        assert!(p.matmul(&[0.0; 31]).is_err());
        assert_eq!(p.matmul(&[]).unwrap(), Vec::<f32>::new());
        assert_eq!(p.matmul(&[1.0; 32]).unwrap(), vec![0.0; 2]);
    }
}
