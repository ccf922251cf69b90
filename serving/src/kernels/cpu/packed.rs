//! Projections with the f32 weight packed once for a matrix product on AVX-512 or
//! AVX2+FMA.
//!
//! A decoding step multiplies a few rows (one per running sequence) by every weight
//! of the model, and `gemm` reaches a third to a half of the CPU's peak there: it
//! packs the weight again on every call and its tiles are sized for many rows. Here
//! the weight is packed once, at load, into panels of [`NR`] output columns
//! (`[panel][in][NR]`, 64-byte aligned). The product goes over rows in blocks of
//! [`MB`]; within a block the panels are split over the CPU threads, and each panel
//! is streamed once, in input blocks of [`KC`] (prefetched one block ahead, since
//! the weights come from memory), through register tiles: on AVX-512 ([`avx512`])
//! up to [`MR`] rows × `NR` columns, on AVX2 ([`avx2`]) up to 6 rows × half a
//! panel, each half in turn. Q8_0 weights ([`Q8Packed`]) go through the same
//! tiles, widened from bytes as they go.
//!
//! Every output element sums its products in input order whatever the number of
//! rows (each row has its own accumulators, and the input blocks add up in order),
//! so a sequence's logits do not depend on which other sequences share its step.
//!
//! Used on CPUs with AVX-512F or AVX2+FMA for f32 weights; others keep `gemm`
//! ([`crate::dense::Dense`] chooses).

// Unsafe: AVX-512 and AVX2 intrinsics (`target_feature`), called only once detection found them.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::{isa, Isa};

/// A panel's register tiles over all its rows: full tiles of `$mr` rows, then one
/// tile of the rest (`$rest`: every count below `$mr`). Each call is
/// `$tile::<R, $q8>(first input row, first output row, ldc, $args…)`; used inside
/// an `unsafe fn` whose contract covers `rows × input` inputs at `x` and `rows`
/// output rows of stride `ldc` at `c`.
macro_rules! row_tiles {
    (@call $tile:ident::<$n:tt, $q8:tt>($a:ident, $c:ident, $ldc:ident; ($($arg:expr),*))) => {
        $tile::<$n, $q8>($a, $c, $ldc, $($arg),*)
    };
    ($tile:ident::<$mr:ident | $($rest:literal)*; $q8:tt>($x:expr, $input:expr, $rows:expr, $c:expr, $ldc:expr; $args:tt)) => {{
        let (x, input, rows, c, ldc): (&[f32], usize, usize, *mut f32, usize) =
            ($x, $input, $rows, $c, $ldc);
        let mut r = 0;
        while r + $mr <= rows {
            // SAFETY: rows r..r+MR exist; the caller's contract for the rest.
            unsafe {
                let (a, c) = (x.as_ptr().add(r * input), c.add(r * ldc));
                row_tiles!(@call $tile::<$mr, $q8>(a, c, ldc; $args))
            };
            r += $mr;
        }
        // SAFETY: r ≤ rows, so both stay within (or one past) their buffers.
        let (a, c) = unsafe { (x.as_ptr().add(r * input), c.add(r * ldc)) };
        // SAFETY: the remaining `rows - r` rows, as above.
        unsafe {
            match rows - r {
                $($rest => row_tiles!(@call $tile::<$rest, $q8>(a, c, ldc; $args)),)*
                _ => {}
            }
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod q8;

pub use q8::Q8Packed;

/// Output columns per panel: two 16-lane vectors.
pub const NR: usize = 32;
/// Rows per AVX-512 register tile: `MR × 2` accumulators, 24 of the 32 vector
/// registers.
pub const MR: usize = 12;
/// Inputs per block: a panel's block is `KC × NR` floats (32 KiB), which stays in
/// the L1 cache while every row tile passes over it.
pub const KC: usize = 256;
/// Rows per block: a block's inputs (`MB × in` floats) stay in the L2 cache while
/// every panel passes over them.
pub const MB: usize = 128;
/// Multiply-adds below which a product stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 17;

/// 16 lanes, aligned to a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Lanes(pub(crate) [f32; 16]);

/// Checks a row-major `[output, input]` weight and an optional `[output]` bias.
pub(crate) fn check_weight(
    weight: &[f32],
    bias: Option<&[f32]>,
    input: usize,
    output: usize,
) -> Result<()> {
    if weight.len() != input * output {
        candle_core::bail!("a {output}x{input} weight of {} values", weight.len());
    }
    if let Some(b) = bias {
        if b.len() != output {
            candle_core::bail!("a bias of {} for {output} outputs", b.len());
        }
    }
    Ok(())
}

/// The bias in 2 vectors per panel of [`NR`] outputs, zero past `output` (and
/// everywhere without one).
pub(crate) fn pack_bias(bias: Option<&[f32]>, output: usize) -> Vec<Lanes> {
    let mut packed = vec![Lanes([0.0; 16]); output.div_ceil(NR) * 2];
    for (o, &v) in bias.unwrap_or_default().iter().enumerate() {
        packed[o / 16].0[o % 16] = v;
    }
    packed
}

/// The rows of `x` for an `input → output` product named `what`.
pub(crate) fn rows_of(x: &[f32], input: usize, output: usize, what: &str) -> Result<usize> {
    let rows = x.len() / input.max(1);
    if x.len() != rows * input || input == 0 {
        candle_core::bail!("{what} {input}→{output} product of {} inputs", x.len());
    }
    Ok(rows)
}

/// A `[in] → [out]` projection's weight (and bias), packed.
pub struct Packed {
    /// `panels × input × 2` vectors.
    data: Vec<Lanes>,
    /// `panels × 2` vectors, zero where there is no bias or past `output`.
    bias: Vec<Lanes>,
    input: usize,
    output: usize,
    kernel: Kernel,
}

/// The register tiles a [`Packed`] product runs: the same packed weight serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
}

impl Kernel {
    /// The widest this CPU runs.
    fn widest() -> Option<Kernel> {
        match isa() {
            Isa::Amx | Isa::Avx512 => Some(Kernel::Avx512),
            Isa::Avx2 => Some(Kernel::Avx2),
            Isa::Portable => None,
        }
    }

    /// Rows of one register tile.
    fn tile_rows(self) -> usize {
        match self {
            Kernel::Avx512 => MR,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::MR,
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => MR,
        }
    }

    /// Whether this CPU runs it.
    fn runs_here(self) -> bool {
        match self {
            Kernel::Avx512 => super::detect::avx512f(),
            Kernel::Avx2 => super::detect::avx2_fma(),
        }
    }

    /// The widest this CPU runs, or why there is none.
    fn widest_here() -> Result<Kernel> {
        match Kernel::widest() {
            Some(kernel) => Ok(kernel),
            None => candle_core::bail!("the packed product needs AVX-512F or AVX2 with FMA"),
        }
    }

    /// An error unless this CPU runs it.
    fn check(self) -> Result<()> {
        if !self.runs_here() {
            candle_core::bail!("this CPU has no {self:?} for the packed product");
        }
        Ok(())
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("kernel", &self.kernel)
            .finish()
    }
}

/// Whether this CPU runs the packed product (AVX-512F, or AVX2 with FMA).
pub fn available() -> bool {
    Kernel::widest().is_some()
}

impl Packed {
    /// From a row-major `[output, input]` weight (a checkpoint's layout) and an
    /// optional `[output]` bias.
    pub fn new(weight: &[f32], bias: Option<&[f32]>, input: usize, output: usize) -> Result<Self> {
        Packed::with_kernel(weight, bias, input, output, Kernel::widest_here()?)
    }

    fn with_kernel(
        weight: &[f32],
        bias: Option<&[f32]>,
        input: usize,
        output: usize,
        kernel: Kernel,
    ) -> Result<Self> {
        check_weight(weight, bias, input, output)?;
        kernel.check()?;
        let panels = output.div_ceil(NR);
        let zero = Lanes([0.0; 16]);
        let mut data = vec![zero; panels * input * 2];
        // Panels in parallel: each is its own `input × 2` vectors, from its own
        // (up to) 32 rows of the weight.
        if input > 0 {
            data.par_chunks_mut(input * 2)
                .zip(weight.par_chunks(NR * input))
                .for_each(|(panel, rows)| {
                    for (lane, row) in rows.chunks_exact(input).enumerate() {
                        for (i, &w) in row.iter().enumerate() {
                            panel[i * 2 + lane / 16].0[lane % 16] = w;
                        }
                    }
                });
        }
        Ok(Packed {
            data,
            bias: pack_bias(bias, output),
            input,
            output,
            kernel,
        })
    }

    /// `x[rows, input] · Wᵀ + b` → `[rows, output]`, both row-major.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let input = self.input;
        let panel = |(): &mut (), job: Job, panel: usize| {
            let data = self.data[panel * input * 2..].as_ptr() as *const f32;
            for part in Part::blocks(input) {
                // SAFETY: the kernel's instructions are present (checked when the
                // weight was packed); the block's `len × NR` values start `k0 × NR`
                // into the panel's `input × NR`.
                unsafe {
                    let b = Source::values(data.add(part.k0 * NR));
                    block_on::<false>(self.kernel, Job { b, part, ..job });
                }
            }
        };
        // SAFETY: a panel's input blocks write its columns of every row, the first
        // starting the sums and the last ending them, and nothing else.
        unsafe { panel_product(x, input, self.output, "a packed", &self.bias, || (), panel) }
    }
}

/// One input block of one panel for a block of rows: what a kernel's `block` takes.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    /// The rows' inputs, `rows × input`.
    x: &'a [f32],
    input: usize,
    rows: usize,
    /// The block's weights.
    b: Source,
    /// The panel's two bias vectors.
    bias: &'a [Lanes],
    /// The panel's first column of the first row of the output.
    c: *mut f32,
    /// The output's row stride.
    ldc: usize,
    /// The panel's columns (1..=[`NR`]).
    cols: usize,
    part: Part,
}

/// `x[rows, input]` → `[rows, output]` (row-major) by panels of [`NR`] outputs:
/// rows in blocks of [`MB`], each block's inputs staying in L2 while every panel
/// passes over them, and within a block the panels split over the threads (above
/// [`PARALLEL_MIN`] multiply-adds), each thread with its own `init()`.
/// `panel(state, job, p)` writes panel `p` for the block's rows: `job` names them,
/// the panel's bias and output, with its weights and input block left to fill.
///
/// # Safety
/// `panel` writes every one of the panel's `job.cols` columns of each of the
/// `job.rows` rows at `job.c` (stride `job.ldc`), and nothing else.
unsafe fn panel_product<T>(
    x: &[f32],
    input: usize,
    output: usize,
    what: &str,
    bias: &[Lanes],
    init: impl Fn() -> T + Sync + Send,
    panel: impl Fn(&mut T, Job, usize) + Sync + Send,
) -> Result<Vec<f32>> {
    let rows = rows_of(x, input, output, what)?;
    let panels = output.div_ceil(NR);
    let block = |start: usize, rows: usize, out: &mut [MaybeUninit<f32>]| {
        let x = &x[start * input..(start + rows) * input];
        let dst = Dst(out.as_mut_ptr().cast());
        let run = |state: &mut T, p: usize| {
            let job = Job {
                x,
                input,
                rows,
                b: Source::values(std::ptr::null()),
                bias: &bias[p * 2..p * 2 + 2],
                c: dst.at(p * NR),
                ldc: output,
                cols: (output - p * NR).min(NR),
                part: Part::whole(input),
            };
            panel(state, job, p)
        };
        let work = rows * input * output;
        if work < PARALLEL_MIN || rayon::current_num_threads() == 1 {
            let mut state = init();
            (0..panels).for_each(|p| run(&mut state, p));
        } else {
            let per_panel = rows * input * NR;
            let min_len = PARALLEL_MIN.div_ceil(per_panel).max(1);
            (0..panels)
                .into_par_iter()
                .with_min_len(min_len)
                .for_each_init(&init, run);
        }
    };
    // SAFETY: every panel writes all its columns of the block's rows (the
    // caller's contract), and the panels cover the outputs.
    Ok(unsafe { in_row_blocks(rows, output, MB, block) })
}

/// Runs one input block of one panel on `kernel`'s register tiles, the weights
/// read from `job.b` (f32 values, or Q8_0 bytes and scales with `Q8`).
///
/// # Safety
/// The kernel's instructions are present; `job.x` holds `rows × input` values,
/// `job.b` the block's `part.len` inputs of the panel, and `job.c` (stride
/// `ldc`) the panel's `cols` columns of `rows` output rows, the panel's alone.
unsafe fn block_on<const Q8: bool>(kernel: Kernel, job: Job) {
    // SAFETY: the caller's contract.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match kernel {
            Kernel::Avx512 => avx512::block::<Q8>(job),
            Kernel::Avx2 => avx2::block::<Q8>(job),
        }
    }
}

/// A `rows × output` row-major result, not zeroed first: `block(start, n, out)`
/// writes rows `start..start + n` (`out`, `n × output`), blocks of at most `mb`.
///
/// # Safety
/// `block` writes every element of the `out` it is given.
pub(crate) unsafe fn in_row_blocks(
    rows: usize,
    output: usize,
    mb: usize,
    mut block: impl FnMut(usize, usize, &mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * output);
    let uninit = &mut out.spare_capacity_mut()[..rows * output];
    let mut start = 0;
    while start < rows {
        let n = (rows - start).min(mb);
        block(start, n, &mut uninit[start * output..(start + n) * output]);
        start += n;
    }
    // SAFETY: every row block was written whole (the caller's contract).
    unsafe { out.set_len(rows * output) };
    out
}

/// The output, written by panels in parallel at disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct Dst(pub(crate) *mut f32);
// SAFETY: each panel writes only its own columns (see `panel_product` and
// `AmxPacked::matmul`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Which inputs a register tile's pass covers: a panel goes over its inputs in
/// blocks of [`KC`], each of which stays in L1 while every row tile passes over it.
#[derive(Clone, Copy)]
struct Part {
    /// First input of the block.
    k0: usize,
    /// Inputs in the block.
    len: usize,
    /// Row stride of the input rows.
    lda: usize,
    /// The block starts the sums (otherwise they continue from the output).
    first: bool,
    /// The block ends them: add the bias.
    last: bool,
}

impl Part {
    /// All `input` inputs as one block.
    fn whole(input: usize) -> Part {
        Part {
            k0: 0,
            len: input,
            lda: input,
            first: true,
            last: true,
        }
    }

    /// The blocks of `input` inputs, in order.
    fn blocks(input: usize) -> impl Iterator<Item = Part> {
        (0..input).step_by(KC).map(move |k0| {
            let k1 = (k0 + KC).min(input);
            Part {
                k0,
                len: k1 - k0,
                lda: input,
                first: k0 == 0,
                last: k1 == input,
            }
        })
    }
}

/// Where a register tile reads a panel's block of weights: f32 values laid out
/// `[input][NR]` (a [`Packed`] panel, or a Q8_0 panel widened into a buffer), or a
/// Q8_0 panel's bytes (`[input][NR]`) and its blocks' scales (`[input / 32][NR]`),
/// widened in registers as the tile goes (tiles with `Q8 = true`).
#[derive(Clone, Copy)]
pub(crate) struct Source {
    /// The block's first input's values (`Q8 = false`).
    values: *const f32,
    /// The block's first input's bytes (`Q8 = true`).
    quants: *const i8,
    /// The scales of the block's first 32 inputs (`Q8 = true`); the block starts
    /// a Q8_0 block.
    scales: *const f32,
}

impl Source {
    /// f32 values at `values`, 64-byte aligned.
    pub(crate) fn values(values: *const f32) -> Source {
        Source {
            values,
            quants: std::ptr::null(),
            scales: std::ptr::null(),
        }
    }

    /// Q8_0 bytes at `quants` and their scales at `scales`, 64-byte aligned.
    pub(crate) fn q8(quants: *const i8, scales: *const f32) -> Source {
        Source {
            values: std::ptr::null(),
            quants,
            scales,
        }
    }

    /// The same weights from column `from` of each input's [`NR`].
    fn columns(self, from: usize) -> Source {
        Source {
            values: self.values.wrapping_add(from),
            quants: self.quants.wrapping_add(from),
            scales: self.scales.wrapping_add(from),
        }
    }
}

/// A weight laid out once for a CPU product of f32 rows: `x[rows, input] · Wᵀ + b`.
pub(crate) trait RowProduct: Sync {
    /// Input width.
    fn input(&self) -> usize;
    /// Output width.
    fn output(&self) -> usize;
    /// `x[rows, input]` → `[rows, output]`, both row-major.
    fn matmul(&self, x: &[f32]) -> Result<Vec<f32>>;
}

impl RowProduct for Packed {
    fn input(&self) -> usize {
        self.input
    }
    fn output(&self) -> usize {
        self.output
    }
    fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        Packed::matmul(self, x)
    }
}

/// `x · Wᵀ + b` as a candle op on a contiguous `[rows, input]` f32 tensor.
pub(crate) struct PackedMatmul<'a>(pub(crate) &'a dyn RowProduct);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("packed-matmul takes f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-matmul takes a contiguous tensor");
        };
        let (rows, input) = layout.shape().dims2()?;
        if input != self.0.input() {
            candle_core::bail!(
                "packed-matmul of {input} columns by a {}-input weight",
                self.0.input()
            );
        }
        let out = self.0.matmul(&data[start..end])?;
        Ok((CpuStorage::F32(out), Shape::from((rows, self.0.output()))))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `x · Wᵀ + b` summed in f64.
    pub(crate) fn reference(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        input: usize,
        output: usize,
    ) -> Vec<f32> {
        let rows = x.len() / input;
        let mut out = vec![0f32; rows * output];
        for r in 0..rows {
            for o in 0..output {
                let dot: f64 = (0..input)
                    .map(|i| x[r * input + i] as f64 * w[o * input + i] as f64)
                    .sum();
                out[r * output + o] = dot as f32 + bias.map_or(0.0, |b| b[o]);
            }
        }
        out
    }

    /// `n` values in [-1, 1] from `seed`.
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Lays out a `[output, input]` weight and optional bias for a product.
    pub(crate) type Make = fn(&[f32], Option<&[f32]>, usize, usize) -> Result<Box<dyn RowProduct>>;

    /// At each `(rows, input, output)`, with and without a bias, the product equals
    /// the f64 reference over the values as the product sees them (`seen`).
    pub(crate) fn check_shapes(
        make: Make,
        shapes: &[(usize, usize, usize)],
        seen: fn(&[f32]) -> Vec<f32>,
    ) {
        for &(rows, input, output) in shapes {
            let (x, w, b) = (
                values(rows * input, 1),
                values(output * input, 2),
                values(output, 3),
            );
            for bias in [None, Some(b.as_slice())] {
                let product = make(&w, bias, input, output).unwrap();
                let out = product.matmul(&x).unwrap();
                assert_eq!(out.len(), rows * output);
                let want = reference(&seen(&x), &seen(&w), bias, input, output);
                for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{rows}x{input}→{output} at {i}: {a} vs {e}"
                    );
                }
            }
        }
    }

    /// Any `counts` rows of a `total`-row product come out bit for bit as they do
    /// among all of them.
    pub(crate) fn check_rows_alone(make: Make, total: usize, counts: &[usize]) {
        let (input, output) = (301, 200);
        let w = values(input * output, 4);
        let product = make(&w, None, input, output).unwrap();
        let x = values(total * input, 5);
        let all = product.matmul(&x).unwrap();
        for &rows in counts {
            for start in [0usize, 3, total - rows] {
                let some = product
                    .matmul(&x[start * input..(start + rows) * input])
                    .unwrap();
                assert_eq!(
                    some,
                    all[start * output..(start + rows) * output],
                    "{rows} rows from {start}"
                );
            }
        }
    }

    /// Weights, biases and inputs of the wrong sizes are errors; no rows, no output.
    pub(crate) fn check_mismatched(make: Make, runs: bool) {
        assert!(make(&[0.0; 6], None, 4, 2).is_err());
        assert!(make(&[0.0; 8], Some(&[0.0; 3]), 4, 2).is_err());
        if runs {
            let p = make(&[0.0; 8], None, 4, 2).unwrap();
            assert!(p.matmul(&[0.0; 5]).is_err());
            assert_eq!(p.matmul(&[]).unwrap(), Vec::<f32>::new());
        }
    }

    fn make(w: &[f32], b: Option<&[f32]>, i: usize, o: usize) -> Result<Box<dyn RowProduct>> {
        Ok(Box::new(Packed::with_kernel(w, b, i, o, Kernel::Avx512)?))
    }

    fn make_avx2(w: &[f32], b: Option<&[f32]>, i: usize, o: usize) -> Result<Box<dyn RowProduct>> {
        Ok(Box::new(Packed::with_kernel(w, b, i, o, Kernel::Avx2)?))
    }

    /// Odd and even inputs, partial panels and half panels, every remainder of
    /// either kernel's tiles, input blocks that continue, parallel sizes.
    const SHAPES: [(usize, usize, usize); 14] = [
        (1, 1, 1),
        (1, 7, 33),
        (3, 10, 8),
        (4, 3, 9),
        (5, 8, 16),
        (6, 9, 31),
        (2, 300, 17),
        (7, 64, 64),
        (11, 270, 24),
        (12, 5, 32),
        (13, 33, 70),
        (25, 300, 40),
        (32, 768, 96),
        (40, 256, 512),
    ];

    #[test]
    #[cfg_attr(not(cpu_avx512f), ignore = "skipped: this CPU has no AVX-512F")]
    fn matches_a_plain_product_at_every_shape_edge() {
        check_shapes(make, &SHAPES, <[f32]>::to_vec);
    }

    #[test]
    #[cfg_attr(not(cpu_avx512f), ignore = "skipped: this CPU has no AVX-512F")]
    fn a_row_comes_out_the_same_whatever_rows_share_the_product() {
        check_rows_alone(make, 32, &[1, 2, 5, 11, 12, 13, 25]);
    }

    #[test]
    #[cfg_attr(not(cpu_avx2_fma), ignore = "skipped: this CPU has no AVX2 with FMA")]
    fn the_avx2_tiles_match_a_plain_product_at_every_shape_edge() {
        check_shapes(make_avx2, &SHAPES, <[f32]>::to_vec);
    }

    #[test]
    #[cfg_attr(not(cpu_avx2_fma), ignore = "skipped: this CPU has no AVX2 with FMA")]
    fn with_the_avx2_tiles_a_row_comes_out_the_same_whatever_rows_share_the_product() {
        check_rows_alone(make_avx2, 32, &[1, 2, 5, 6, 7, 11, 12, 13, 25]);
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        check_mismatched(make, super::super::detect::avx512f());
        check_mismatched(make_avx2, super::super::detect::avx2_fma());
    }

    #[test]
    fn the_widest_kernel_the_cpu_has_is_chosen() {
        let want = match isa() {
            Isa::Amx | Isa::Avx512 => Some(Kernel::Avx512),
            Isa::Avx2 => Some(Kernel::Avx2),
            Isa::Portable => None,
        };
        assert_eq!(Kernel::widest(), want);
        let packed = Packed::new(&[1.0; 8], None, 4, 2);
        assert_eq!(packed.map(|p| p.kernel).ok(), want);
    }
}
