//! Dense projections, `y = x·Wᵀ + b`, with the weight laid out once, at load, for
//! the product that runs them.
//!
//! f32 weights on a CPU with AVX-512F are packed for [`crate::packed`]'s product,
//! which is 1.5-3x faster than `gemm` for the few rows of a decoding step or of one
//! short input to embed, and on par for many rows. Elsewhere the weight is kept
//! transposed, `[in, out]`: checkpoints store it `[out, in]`, and multiplying by its
//! transposed view (what `candle_nn::Linear` does) hands `gemm` a column-major right
//! operand, which it handles 2-10x slower than a row-major one when the left
//! operand has few rows (`benchmarks/serving` has the measurements). Several
//! projections of the same input can be fused into one, output blocks side by side.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};

use crate::packed::{Packed, PackedMatmul};

/// One dense projection.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Weight,
    output: usize,
}

#[derive(Debug, Clone)]
enum Weight {
    /// `[in, out]`, contiguous, and the `[out]` bias.
    Transposed { wt: Tensor, bias: Option<Tensor> },
    /// Packed for the AVX-512 product (f32 on CPU), the bias with it.
    Packed(Arc<Packed>),
}

impl Dense {
    /// From a checkpoint's `[out, in]` weight and optional `[out]` bias.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Dense> {
        Dense::fused(&[(weight, bias)])
    }

    /// Several projections of one input as one: their outputs side by side, in order.
    /// Every part takes the same input width; either all have a bias or none.
    ///
    /// f32 weights on a CPU with AVX-512F are packed for [`crate::packed`]'s
    /// product; others are kept transposed for `gemm`.
    pub fn fused(parts: &[(&Tensor, Option<Tensor>)]) -> Result<Dense> {
        let pack = crate::packed::available();
        Dense::build(parts, pack)
    }

    fn build(parts: &[(&Tensor, Option<Tensor>)], pack: bool) -> Result<Dense> {
        let Some((first, _)) = parts.first() else {
            candle_core::bail!("a dense projection needs at least one weight");
        };
        let width = first.dim(1)?;
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for (weight, bias) in parts {
            let (out, input) = weight.dims2()?;
            if input != width {
                candle_core::bail!(
                    "fused projections take the same input: {input} columns beside {width}"
                );
            }
            weights.push(*weight);
            match bias {
                Some(b) if b.dims1()? == out => biases.push(b.clone()),
                Some(b) => candle_core::bail!("a bias of {} for {out} outputs", b.dims1()?),
                None => {}
            }
        }
        if !biases.is_empty() && biases.len() != parts.len() {
            candle_core::bail!("fused projections either all have a bias or none");
        }
        let weight = Tensor::cat(&weights, 0)?;
        let output = weight.dim(0)?;
        let bias = match biases.len() {
            0 => None,
            _ => Some(Tensor::cat(&biases, 0)?),
        };
        let weight = if pack && weight.device().is_cpu() && weight.dtype() == DType::F32 {
            let values = weight.flatten_all()?.to_vec1::<f32>()?;
            let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
            Weight::Packed(Arc::new(Packed::new(
                &values,
                bias.as_deref(),
                width,
                output,
            )?))
        } else {
            Weight::Transposed {
                wt: weight.t()?.contiguous()?,
                bias,
            }
        };
        Ok(Dense { weight, output })
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.output
    }
}

impl Module for Dense {
    /// `x`: `[.., in]` → `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let input = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / input.max(1);
        let x = x.reshape((rows, input))?;
        let y = match &self.weight {
            Weight::Packed(p) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                x.contiguous()?.apply_op1_no_bwd(&PackedMatmul(p))?
            }
            Weight::Packed(_) => candle_core::bail!(
                "a packed projection takes f32 on the CPU, not {:?} on {:?}",
                x.dtype(),
                x.device()
            ),
            Weight::Transposed { wt, bias } => {
                let y = x.matmul(wt)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.output;
        }
        y.reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_candle_linear_at_every_row_count_and_rank() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (48, 32), &d).unwrap();
        let b = Tensor::randn(0f32, 1., 48, &d).unwrap();
        let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        for pack in [false, crate::packed::available()] {
            let ours = Dense::build(&[(&w, Some(b.clone()))], pack).unwrap();
            assert_eq!(matches!(ours.weight, Weight::Packed(_)), pack);
            for shape in [vec![1, 32], vec![7, 32], vec![3, 5, 32]] {
                let x = Tensor::randn(0f32, 1., shape.as_slice(), &d).unwrap();
                let (a, r) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
                assert_eq!(a.dims(), r.dims());
                assert!(crate::max_abs_diff(&a, &r) < 1e-4, "shape {shape:?}");
            }
            // A strided input.
            let x = Tensor::randn(0f32, 1., (32, 6), &d).unwrap().t().unwrap();
            let (a, r) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
            assert!(crate::max_abs_diff(&a, &r) < 1e-4);
            assert_eq!(ours.out_dim(), 48);
        }
    }

    #[test]
    fn fused_projections_are_their_parts_side_by_side() {
        let d = Device::Cpu;
        let parts: Vec<(Tensor, Tensor)> = [16usize, 8, 8]
            .iter()
            .map(|&out| {
                (
                    Tensor::randn(0f32, 1., (out, 12), &d).unwrap(),
                    Tensor::randn(0f32, 1., out, &d).unwrap(),
                )
            })
            .collect();
        let fused = Dense::fused(
            &parts
                .iter()
                .map(|(w, b)| (w, Some(b.clone())))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1., (5, 12), &d).unwrap();
        let y = fused.forward(&x).unwrap();
        let mut at = 0;
        for (w, b) in &parts {
            let alone = Dense::new(w, Some(b.clone())).unwrap().forward(&x).unwrap();
            let n = w.dim(0).unwrap();
            assert!(crate::max_abs_diff(&y.narrow(1, at, n).unwrap(), &alone) < 1e-5);
            at += n;
        }
        assert_eq!(at, fused.out_dim());
    }

    #[test]
    fn mismatched_parts_are_errors() {
        let d = Device::Cpu;
        let a = Tensor::zeros((4, 3), DType::F32, &d).unwrap();
        let b = Tensor::zeros((4, 5), DType::F32, &d).unwrap();
        assert!(Dense::fused(&[(&a, None), (&b, None)]).is_err());
        let bias = Tensor::zeros(4, DType::F32, &d).unwrap();
        assert!(Dense::fused(&[(&a, Some(bias.clone())), (&a, None)]).is_err());
        assert!(Dense::new(&a, Some(Tensor::zeros(3, DType::F32, &d).unwrap())).is_err());
        assert!(Dense::fused(&[]).is_err());
    }
}
