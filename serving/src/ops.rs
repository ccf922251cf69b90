//! Fused element-wise kernels for the models' CPU hot paths.
//!
//! candle runs `silu(gate) * up` as three passes over memory, each a dispatch to its
//! thread pool, and its `exp` is a scalar libm call per element. Here it is one pass,
//! with an `exp` the compiler vectorizes (AVX2/FMA when the CPU has them, chosen at
//! run time), split over the CPU threads only when the tensor is big enough to pay
//! for it. Other devices use candle's ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements below which a kernel stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// `silu(gate) * up` of a fused gate/up projection's output `[.., 2*width]` (the
/// gate block first) → `[.., width]`.
pub fn silu_mul(x: &Tensor) -> Result<Tensor> {
    let last = x.rank().saturating_sub(1);
    let both = x.dim(last)?;
    if both % 2 != 0 {
        candle_core::bail!("silu_mul takes a gate and an up block of equal width, not {both}");
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&SiluMul);
    }
    let width = both / 2;
    candle_nn::ops::silu(&x.narrow(last, 0, width)?)? * x.narrow(last, width, width)?
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("silu-mul takes f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("silu-mul takes a contiguous tensor");
        };
        let x = &data[start..end];
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

fn silu_mul_row(row: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { silu_mul_row_avx2(row, out) };
    }
    silu_mul_row_portable(row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_row_avx2(row: &[f32], out: &mut [f32]) {
    silu_mul_row_portable(row, out)
}

#[inline(always)]
fn silu_mul_row_portable(row: &[f32], out: &mut [f32]) {
    let (gate, up) = row.split_at(out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
}
