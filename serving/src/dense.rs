//! Dense projections, `y = x·Wᵀ + b`, with the weight kept transposed.
//!
//! Checkpoints store a projection's weight as `[out, in]`; multiplying by its
//! transposed view (what `candle_nn::Linear` does) hands `gemm` a column-major right
//! operand, which it handles 2-10x slower than a row-major one when the left operand
//! has few rows: a decoding step's sequences, or one short input to embed
//! (`benchmarks/serving` has the measurements). So the weight is transposed once at
//! load into `[in, out]` and every forward multiplies by it directly. Several
//! projections of the same input can be fused into one, output blocks side by side.

use candle_core::{Module, Result, Tensor};

/// One dense projection.
#[derive(Debug, Clone)]
pub struct Dense {
    /// `[in, out]`, contiguous.
    wt: Tensor,
    /// `[out]`.
    bias: Option<Tensor>,
}

impl Dense {
    /// From a checkpoint's `[out, in]` weight and optional `[out]` bias.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Dense> {
        Dense::fused(&[(weight, bias)])
    }

    /// Several projections of one input as one: their outputs side by side, in order.
    /// Every part takes the same input width; either all have a bias or none.
    pub fn fused(parts: &[(&Tensor, Option<Tensor>)]) -> Result<Dense> {
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
            weights.push(weight.t()?);
            match bias {
                Some(b) if b.dims1()? == out => biases.push(b.clone()),
                Some(b) => candle_core::bail!("a bias of {} for {out} outputs", b.dims1()?),
                None => {}
            }
        }
        if !biases.is_empty() && biases.len() != parts.len() {
            candle_core::bail!("fused projections either all have a bias or none");
        }
        let wt = Tensor::cat(&weights, 1)?.contiguous()?;
        let bias = match biases.len() {
            0 => None,
            _ => Some(Tensor::cat(&biases, 0)?),
        };
        Ok(Dense { wt, bias })
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.wt.dims()[1]
    }
}

impl Module for Dense {
    /// `x`: `[.., in]` → `[.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let input = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / input.max(1);
        let y = x.reshape((rows, input))?.matmul(&self.wt)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.out_dim();
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
        let ours = Dense::new(&w, Some(b.clone())).unwrap();
        let reference = candle_nn::Linear::new(w, Some(b));
        for shape in [vec![1, 32], vec![7, 32], vec![3, 5, 32]] {
            let x = Tensor::randn(0f32, 1., shape.as_slice(), &d).unwrap();
            let (a, r) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
            assert_eq!(a.dims(), r.dims());
            assert!(crate::max_abs_diff(&a, &r) < 1e-4, "shape {shape:?}");
        }
        assert_eq!(ours.out_dim(), 48);
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
