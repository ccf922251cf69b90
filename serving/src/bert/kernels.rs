//! The elementwise steps after each projection.
//!
//!
//! Every projection's bias is added by the step after it (the activation, or the
//! residual sum before a layer norm), so each step is one pass over its rows. On the
//! CPU with f32 these are the kernels below: they overwrite the projection's fresh
//! output in place, split over rayon's threads (the pool gemm already runs on), as
//! plain loops the compiler vectorizes. On this hardware such passes are bound by
//! memory, so their number is what counts. candle's own elementwise ops would each
//! take a pass and an allocation, and from 64K elements up they run on candle's
//! separate thread pool, whose workers spin after every op and so take a core from
//! the next matrix product: about a tenth of a forward at batch 32 on two cores.
//! Other devices and dtypes use candle's ops.

use super::*;

/// `activation(x + bias)`, or `x + bias` without one; `x`: `[rows, width]`,
/// overwritten where it can be ([`Backend::overwrites`]), `bias`: `[width]`.
pub(super) fn bias_act(
    backend: Backend,
    x: Tensor,
    bias: &Tensor,
    activation: Option<Activation>,
) -> candle_core::Result<Tensor> {
    let fast = match activation {
        None => Some(BiasAct::Identity),
        Some(Activation::Gelu) => Some(BiasAct::GeluErf),
        Some(_) => None,
    };
    match fast {
        Some(op) if backend.overwrites(&x) => {
            x.inplace_op2(bias, &op)?;
            Ok(x)
        }
        _ => {
            let x = x.broadcast_add(bias)?;
            match activation {
                None => Ok(x),
                Some(Activation::Gelu) => x.gelu_erf(),
                Some(Activation::GeluTanh) => x.gelu(),
                Some(Activation::Relu) => x.relu(),
            }
        }
    }
}

/// The softmax over the last dimension, overwriting `x` where it can
/// ([`Backend::overwrites`]). candle's takes a scalar libm `exp` per element, which
/// was about a quarter of attention's time here.
pub(super) fn softmax(backend: Backend, x: Tensor) -> candle_core::Result<Tensor> {
    if backend.overwrites(&x) {
        x.inplace_op1(&Softmax)?;
        Ok(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x)
    }
}

/// The exact GELU, `0.5·x·(1 + erf(x/√2))`: [`BiasAct::GeluErf`] with no bias
/// on f32 CPU tensors, candle's `gelu_erf` elsewhere.
#[cfg(test)]
pub(super) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    let zeros = Tensor::zeros(x.dim(candle_core::D::Minus1)?, x.dtype(), x.device())?;
    bias_act(
        Backend::for_device(x.device()),
        x.copy()?,
        &zeros,
        Some(Activation::Gelu),
    )
}

/// Elements per rayon task; whole rows of at least this many.
pub(super) const TASK_ELEMENTS: usize = 16 * 1024;

/// The rows of `[rows, width]` data per rayon task.
pub(super) fn task_len(width: usize) -> usize {
    TASK_ELEMENTS.div_ceil(width.max(1)) * width.max(1)
}

/// `x ← x + bias` and `x ← gelu(x + bias)` over rows; see [`bias_act`].
#[derive(Debug, Clone, Copy)]
pub(super) enum BiasAct {
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
/// and beta; see [`AddNorm`].
pub(super) struct AddNormOp(pub(super) f32);

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

/// `x ← softmax(x)` over the last dimension; see [`softmax`]. One sequence's
/// attention scores at a time, so one thread: the sequences run side by side.
pub(super) struct Softmax;

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
pub(super) fn gelu_erf_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(z) to within 7e-8, branch-free so that loops over it vectorize: N. Juffa's
/// single-precision erf, two minimax pieces. Up to |z| = 0.9277 an odd polynomial;
/// beyond, `1 - e^p(|z|)` with the sign of z, through [`exp`] (whose floor of
/// 1e-38 makes erf exactly ±1 far out, so large GELU inputs come out as `x` or
/// `-0`).
#[inline(always)]
pub(super) fn erf(z: f32) -> f32 {
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
