//! The backend a model's steps run on, chosen once, when the model loads, from the
//! device it loads onto ([`Backend::for_device`]); the model code asks the backend
//! and never looks at the device itself.
//!
//! On the CPU the backend runs this crate's kernels ([`cpu`], for the instructions
//! [`cpu::isa`] found) where an operand is one they take (f32, laid out in one
//! piece), and candle's CPU ops otherwise. On other devices (CUDA, in builds with
//! the `cuda` feature) every step is candle's ops.

// Unsafe: one `set_len` over a buffer written in parallel just before (first-touch zeroing).
#![allow(unsafe_code)]

pub mod cpu;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use cpu::elementwise::{AddNormOp, BiasAct, Softmax};

/// The activation after a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The exact GELU, `x·Φ(x)` ("gelu").
    Gelu,
    /// GELU's tanh approximation ("gelu_new", "gelu_pytorch_tanh", "gelu_fast").
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

/// A layer norm over the last dimension of a sum: a projection's output, that
/// projection's bias, and the residual ([`Backend::add_norm`]).
#[derive(Debug, Clone)]
pub struct AddNorm {
    /// The preceding projection's bias (zeros where it has none).
    bias: Tensor,
    weight: Tensor,
    beta: Tensor,
    /// `[3, width]`: `bias`, `weight` and `beta` stacked, as the CPU kernel takes them.
    packed: Tensor,
    eps: f32,
}

impl AddNorm {
    /// From the `[width]` bias of the projection before, the norm's `[width]`
    /// weight and beta, and its epsilon.
    pub fn new(bias: Tensor, weight: Tensor, beta: Tensor, eps: f32) -> Result<AddNorm> {
        let packed = Tensor::stack(&[&bias, &weight, &beta], 0)?;
        Ok(AddNorm {
            bias,
            weight,
            beta,
            packed,
            eps,
        })
    }
}

/// Where a model's steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// This crate's CPU kernels, for the instructions found.
    Cpu(cpu::Isa),
    /// candle's ops on the model's device.
    Candle,
}

impl Backend {
    /// The backend of a model on `device`: the one place the device decides.
    pub fn for_device(device: &Device) -> Backend {
        if device.is_cpu() {
            Backend::Cpu(cpu::isa())
        } else {
            Backend::Candle
        }
    }

    /// Whether the CPU kernels may overwrite `x` in place: f32 on the CPU backend,
    /// laid out contiguously from the start of its storage. Callers pass only the
    /// fresh output of the step before (a matrix product, a lookup), whose storage
    /// nothing else holds.
    pub fn overwrites(self, x: &Tensor) -> bool {
        matches!(self, Backend::Cpu(_))
            && x.dtype() == DType::F32
            && x.layout().contiguous_offsets() == Some((0, x.elem_count()))
    }

    /// Whether an encoder's attention runs over its batch padded to the longest
    /// sequence in one batched product (off the CPU, where every kernel launch
    /// costs microseconds whatever its size), rather than one sequence at a time.
    pub fn batched_attention(self) -> bool {
        matches!(self, Backend::Candle)
    }

    /// Whether attention reads a decoder's KV pool through the CPU kernel
    /// ([`cpu::ops::pool_attention`]) rather than candle's batched matmuls.
    pub fn pool_attention(self) -> bool {
        matches!(self, Backend::Cpu(_))
    }

    /// `silu(gate) * up` of a fused gate/up projection's output `[.., 2*width]`
    /// (the gate block first) → `[.., width]`.
    pub fn silu_mul(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Backend::Cpu(_) if x.dtype() == DType::F32 => cpu::ops::silu_mul(x),
            _ => {
                let (last, width) = cpu::ops::gate_up_halves(x)?;
                candle_nn::ops::silu(&x.narrow(last, 0, width)?)? * x.narrow(last, width, width)?
            }
        }
    }

    /// `activation(x + bias)`, or `x + bias` without one; `x`: `[rows, width]`,
    /// overwritten where it can be ([`Backend::overwrites`]), `bias`: `[width]`.
    pub fn bias_act(
        self,
        x: Tensor,
        bias: &Tensor,
        activation: Option<Activation>,
    ) -> Result<Tensor> {
        let fused = match activation {
            None => Some(BiasAct::Identity),
            Some(Activation::Gelu) => Some(BiasAct::GeluErf),
            Some(_) => None,
        };
        match fused {
            Some(op) if self.overwrites(&x) => {
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

    /// `norm(x + bias + residual)`, both `[rows, width]`; `x` is overwritten
    /// where it can be ([`Backend::overwrites`]).
    pub fn add_norm(self, x: Tensor, residual: &Tensor, norm: &AddNorm) -> Result<Tensor> {
        if self.overwrites(&x) {
            x.inplace_op3(&residual.contiguous()?, &norm.packed, &AddNormOp(norm.eps))?;
            Ok(x)
        } else {
            let sum = (x + residual)?.broadcast_add(&norm.bias)?;
            candle_nn::ops::layer_norm(&sum, &norm.weight, &norm.beta, norm.eps)
        }
    }

    /// The softmax over the last dimension, overwriting `x` where it can
    /// ([`Backend::overwrites`]). candle's CPU softmax takes a scalar libm `exp` per
    /// element, which was about a quarter of attention's time here.
    pub fn softmax(self, x: Tensor) -> Result<Tensor> {
        if self.overwrites(&x) {
            x.inplace_op1(&Softmax)?;
            Ok(x)
        } else {
            candle_nn::ops::softmax_last_dim(&x)
        }
    }

    /// Runs a forward pass. On the CPU it runs on one of rayon's threads: the
    /// kernels' and gemm's parallel loops then start from inside the pool, where
    /// splitting work costs a queue push, rather than from outside it, where every
    /// small step would wait for a sleeping thread to wake.
    pub fn run<T: Send>(self, forward: impl FnOnce() -> T + Send) -> T {
        match self {
            Backend::Cpu(_) => rayon::scope(|_| forward()),
            Backend::Candle => forward(),
        }
    }

    /// `step(i)` for each `i` of `0..n`, in order. On the CPU side by side on
    /// rayon's threads (each a few small ops: running them together keeps the
    /// threads busy instead of waking them for every small op); elsewhere one after
    /// another, the device running each.
    pub fn each<T: Send>(
        self,
        n: usize,
        step: impl Fn(usize) -> Result<T> + Sync + Send,
    ) -> Result<Vec<T>> {
        match self {
            Backend::Cpu(_) => (0..n).into_par_iter().map(step).collect(),
            Backend::Candle => (0..n).map(step).collect(),
        }
    }

    /// A strided view as a matrix product's operand: as it is on the CPU, whose
    /// matmul takes strided views; laid out elsewhere.
    pub fn operand(self, t: Tensor) -> Result<Tensor> {
        match self {
            Backend::Cpu(_) => Ok(t),
            Backend::Candle => t.contiguous(),
        }
    }

    /// An f32 tensor of zeros with every page written now: on the CPU by all the
    /// threads (the OS maps, and zeroes, its pages here rather than in the middle
    /// of the first steps that reach them; mapping a page is most of the cost).
    pub fn zeros_written(self, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            Backend::Cpu(_) => {
                let n = shape.iter().product();
                let mut values: Vec<f32> = Vec::with_capacity(n);
                // Not `vec![0.0; n]`, which takes zeroed memory untouched.
                values.spare_capacity_mut()[..n]
                    .par_chunks_mut(1 << 18)
                    .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
                // SAFETY: the `n` elements were all written just above.
                unsafe { values.set_len(n) };
                Tensor::from_vec(values, shape, device)
            }
            Backend::Candle => Tensor::zeros(shape, DType::F32, device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_agree() {
        let d = Device::Cpu;
        let cpu = Backend::for_device(&d);
        assert!(matches!(cpu, Backend::Cpu(_)));
        let x = Tensor::randn(0f32, 1., (5, 2 * 70), &d).unwrap();
        let diff = crate::max_abs_diff(
            &cpu.silu_mul(&x).unwrap(),
            &Backend::Candle.silu_mul(&x).unwrap(),
        );
        assert!(diff < 1e-5, "{diff}");
        assert!(Backend::Candle
            .silu_mul(&x.narrow(1, 0, 3).unwrap())
            .is_err());
        let squares = |i: usize| Ok(i * i);
        assert_eq!(
            cpu.each(5, squares).unwrap(),
            Backend::Candle.each(5, squares).unwrap()
        );
        let zeros = cpu.zeros_written(&[3, 4], &d).unwrap();
        assert_eq!(zeros.dims(), &[3, 4]);
        assert_eq!(zeros.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert!(cpu.overwrites(&x) && !Backend::Candle.overwrites(&x));
        assert!(!cpu.overwrites(&x.t().unwrap()));
    }
}
