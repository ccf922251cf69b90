//! The elementwise steps after a projection, on the CPU: a bias with an activation,
//! a bias and residual sum with a layer norm, and a row softmax.
//!
//! Every projection's bias is added by the step after it (the activation, or the
//! residual sum before a layer norm), so each step is one pass over its rows. These
//! kernels overwrite the projection's fresh output in place, split over rayon's
//! threads (the pool gemm already runs on), as plain loops the compiler vectorizes
//! (`vectorized!`). On this hardware such passes are bound by memory, so their
//! number is what counts. candle's own elementwise ops would each take a pass and
//! an allocation, and from 64K elements up they run on candle's separate thread
//! pool, whose workers spin after every op and so take a core from the next matrix
//! product: about a tenth of a forward at batch 32 on two cores.
//! [`crate::kernels::Backend`] decides where they run: f32 on the CPU, overwriting
//! a tensor it may; candle's ops elsewhere.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, InplaceOp3, Layout};
use rayon::prelude::*;

use super::ops::{exp, f32_data, f32_data_mut, lane_sum, softmax_rows, vectorized};

/// Elements per rayon task; whole rows of at least this many.
const TASK_ELEMENTS: usize = 16 * 1024;

/// The rows of `[rows, width]` data per rayon task.
fn task_len(width: usize) -> usize {
    TASK_ELEMENTS.div_ceil(width.max(1)) * width.max(1)
}

/// `x ← x + bias` and `x ← gelu(x + bias)` over rows; see [`crate::kernels::Backend::bias_act`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum BiasAct {
    Identity,
    GeluErf,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        match self {
            BiasAct::Identity => "bias-add",
            BiasAct::GeluErf => "bias-gelu-erf",
        }
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<()> {
        let bias = f32_data(self.name(), bias, bias_l)?;
        let width = bias.len();
        if dst_l.dims().last() != Some(&width) {
            candle_core::bail!("{}: a bias of {width} for {:?}", self.name(), dst_l.shape());
        }
        let x = f32_data_mut(self.name(), dst, dst_l)?;
        x.par_chunks_mut(task_len(width)).for_each(|x| match self {
            BiasAct::Identity => bias_add_rows(x, bias),
            BiasAct::GeluErf => bias_gelu_rows(x, bias),
        });
        Ok(())
    }
}

/// `x ← norm(x + bias + residual)` over rows, with the `[3, width]` bias, weight
/// and beta; see [`crate::kernels::Backend::add_norm`].
pub(crate) struct AddNormOp(pub(crate) f32);

impl InplaceOp3 for AddNormOp {
    fn name(&self) -> &'static str {
        "add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        residual: &CpuStorage,
        residual_l: &Layout,
        params: &CpuStorage,
        params_l: &Layout,
    ) -> candle_core::Result<()> {
        let residual = f32_data(self.name(), residual, residual_l)?;
        let params = f32_data(self.name(), params, params_l)?;
        let width = params.len() / 3;
        if dst_l.shape() != residual_l.shape()
            || dst_l.dims().last() != Some(&width)
            || params.len() != 3 * width
        {
            candle_core::bail!(
                "{}: {:?} + {:?} with {:?} parameters",
                self.name(),
                dst_l.shape(),
                residual_l.shape(),
                params_l.shape()
            );
        }
        let (bias, rest) = params.split_at(width);
        let (weight, beta) = rest.split_at(width);
        let x = f32_data_mut(self.name(), dst, dst_l)?;
        let task = task_len(width);
        x.par_chunks_mut(task)
            .zip(residual.par_chunks(task))
            .for_each(|(x, residual)| add_norm_rows(x, residual, bias, weight, beta, self.0));
        Ok(())
    }
}

/// `x ← softmax(x)` over the last dimension; see [`crate::kernels::Backend::softmax`]. One sequence's
/// attention scores at a time, so one thread: the sequences run side by side.
pub(crate) struct Softmax;

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        softmax_rows(f32_data_mut(self.name(), storage, layout)?, width);
        Ok(())
    }
}

vectorized! {
    /// `x ← x + bias`, row by row.
    fn bias_add_rows(x: &mut [f32], bias: &[f32]) {
        for x in x.chunks_exact_mut(bias.len()) {
            for (x, &b) in x.iter_mut().zip(bias) {
                *x += b;
            }
        }
    }
}

vectorized! {
    /// `x ← gelu(x + bias)`, row by row.
    fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for x in x.chunks_exact_mut(bias.len()) {
            for (x, &b) in x.iter_mut().zip(bias) {
                *x = gelu_erf_one(*x + b);
            }
        }
    }
}

vectorized! {
    /// `x ← norm(x + bias + residual)`, row by row: the mean of each row's sum,
    /// then its variance about that mean (a second pass, which stays accurate
    /// when the mean is large), then the affine map.
    fn add_norm_rows(
        x: &mut [f32],
        residual: &[f32],
        bias: &[f32],
        weight: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let width = bias.len();
        for (x, residual) in x.chunks_exact_mut(width).zip(residual.chunks_exact(width)) {
            for ((x, &r), &b) in x.iter_mut().zip(residual).zip(bias) {
                *x += r + b;
            }
            let mean = lane_sum(x, |v| v) / width as f32;
            let var = lane_sum(x, |v| (v - mean) * (v - mean)) / width as f32;
            let scale = 1.0 / (var + eps).sqrt();
            for ((x, &w), &b) in x.iter_mut().zip(weight).zip(beta) {
                *x = (*x - mean) * scale * w + b;
            }
        }
    }
}

/// `0.5·x·(1 + erf(x/√2))` for one element, branch-free.
#[inline(always)]
fn gelu_erf_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(z) to within 7e-8, branch-free so that loops over it vectorize: N. Juffa's
/// single-precision erf, two minimax pieces. Up to |z| = 0.9277 an odd polynomial;
/// beyond, `1 - e^p(|z|)` with the sign of z, through [`exp`] (whose floor of
/// 1e-38 makes erf exactly ±1 far out, so large GELU inputs come out as `x` or
/// `-0`).
#[inline(always)]
fn erf(z: f32) -> f32 {
    let t = z.abs();
    let s = z * z;
    let near = [
        4.991_194_2e-3,
        -2.676_813_5e-2,
        1.128_199_3e-1,
        -3.761_253_4e-1,
        1.283_791_7e-1,
    ]
    .iter()
    .fold(-5.967_617e-4, |r: f32, &k| r * s + k)
        * z
        + z;
    let p = (-1.728_534_7e-5 * t + 3.831_971_3e-4) * s + (-3.883_964_4e-3 * t + 2.425_462_2e-2);
    let p = ((p * t - 1.067_778_8e-1) * t - 6.348_467e-1) * t - 1.287_175_1e-1;
    let far = (1.0 - exp(p * t - t)).copysign(z);
    if t > 0.927_734_4 {
        far
    } else {
        near
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{Activation, AddNorm, Backend};
    use candle_core::{DType, Device, Tensor};

    /// The exact GELU, `0.5·x·(1 + erf(x/√2))`: [`BiasAct::GeluErf`] with no bias
    /// on f32 CPU tensors, candle's `gelu_erf` elsewhere.
    fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
        let zeros = Tensor::zeros(x.dim(candle_core::D::Minus1)?, x.dtype(), x.device())?;
        Backend::for_device(x.device()).bias_act(x.copy()?, &zeros, Some(Activation::Gelu))
    }

    #[test]
    fn the_vectorized_erf_is_within_2e7() {
        let mut worst = (0f64, 0f32);
        for i in -600_000..=600_000 {
            let z = i as f32 * 1e-5;
            let err = (f64::from(erf(z)) - candle_core::cpu::erf::erf_f64(f64::from(z))).abs();
            if err > worst.0 {
                worst = (err, z);
            }
        }
        assert!(worst.0 <= 2e-7, "erf error {} at {}", worst.0, worst.1);
        assert_eq!((erf(10.0), erf(-1e30)), (1.0, -1.0));
    }

    #[test]
    fn the_gelu_kernel_matches_candles_gelu_erf() {
        let mut values: Vec<f32> = (-6000..=6000).map(|i| i as f32 * 1e-3).collect();
        values.extend([
            -1e4, -300.0, -40.0, -10.0, -7.5, -5.0, 5.0, 7.5, 10.0, 40.0, 300.0, 1e4,
        ]);
        values.extend(
            (0..)
                .map(|i: i64| ((i * 7919) % 20_011) as f32 * 1e-3 - 10.0)
                .take(120_000 - values.len()),
        );
        let x = Tensor::from_vec(values, (120, 1000), &Device::Cpu).unwrap();
        let exact = |x: &Tensor| {
            x.to_dtype(DType::F64)
                .unwrap()
                .gelu_erf()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let diff = crate::max_abs_diff(&gelu_erf(&x).unwrap(), &exact(&x));
        assert!(diff <= 1e-5, "max abs diff {diff}");
        // With a bias, and on a strided input.
        let bias = Tensor::randn(0f32, 3., 120, &Device::Cpu).unwrap();
        let xt = x.t().unwrap();
        let ours = Backend::for_device(&Device::Cpu)
            .bias_act(xt.clone(), &bias, Some(Activation::Gelu))
            .unwrap();
        let diff = crate::max_abs_diff(&ours, &exact(&xt.broadcast_add(&bias).unwrap()));
        assert!(diff <= 1e-5, "with a bias: max abs diff {diff}");
        let ours = Backend::for_device(&Device::Cpu)
            .bias_act(xt.clone(), &bias, None)
            .unwrap();
        assert_eq!(
            crate::max_abs_diff(&ours, &xt.broadcast_add(&bias).unwrap()),
            0.0
        );
    }

    #[test]
    fn the_softmax_kernel_matches_candles() {
        let d = Device::Cpu;
        for width in [1, 7, 16, 23, 64, 100] {
            let x = (Tensor::randn(0f32, 5., (3, 11, width), &d).unwrap() - 30.0).unwrap();
            let ours = Backend::for_device(&d).softmax(x.copy().unwrap()).unwrap();
            let reference =
                candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F64).unwrap()).unwrap();
            let diff = crate::max_abs_diff(&ours, &reference);
            assert!(diff < 1e-6, "width {width}: max abs diff {diff}");
        }
        // Far below the maximum, e^x underflows to (nearly) nothing.
        let x = Tensor::new(&[[0f32, -50.0, -90.0, -1e30]], &d).unwrap();
        let p = Backend::for_device(&d)
            .softmax(x.copy().unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (p[0][0] - 1.0).abs() < 1e-6 && p[0][1..].iter().all(|&v| v < 1e-21),
            "{p:?}"
        );
    }

    #[test]
    fn the_add_norm_kernel_matches_candles_layer_norm() {
        let d = Device::Cpu;
        let (rows, width) = (57, 384);
        let x = (Tensor::randn(0f32, 4., (rows, width), &d).unwrap() + 20.0).unwrap();
        let residual = Tensor::randn(0f32, 1., (rows, width), &d).unwrap();
        let bias = Tensor::randn(0f32, 1., width, &d).unwrap();
        let weight = Tensor::randn(1f32, 0.2, width, &d).unwrap();
        let beta = Tensor::randn(0f32, 0.2, width, &d).unwrap();
        let norm = AddNorm::new(bias.clone(), weight.clone(), beta.clone(), 1e-12).unwrap();
        let ours = Backend::for_device(&d)
            .add_norm(x.copy().unwrap(), &residual, &norm)
            .unwrap();
        let sum = (&x + &residual).unwrap().broadcast_add(&bias).unwrap();
        let reference = candle_nn::ops::layer_norm_slow(
            &sum.to_dtype(DType::F64).unwrap(),
            &weight.to_dtype(DType::F64).unwrap(),
            &beta.to_dtype(DType::F64).unwrap(),
            1e-12,
        )
        .unwrap();
        let diff = crate::max_abs_diff(&ours, &reference);
        assert!(diff < 1e-5, "max abs diff {diff}");
    }
}
