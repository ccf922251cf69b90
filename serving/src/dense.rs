//! Dense projections, `y = x·Wᵀ + b`, with the weight laid out once, at load, for
//! the product that runs them.
//!
//! With [`Precision::Bf16`] on a CPU with AMX, weights are packed in bf16 for
//! [`crate::kernels::cpu::amx`]'s tile product, several times the f32 products' speed at a
//! precision of about three significant digits per product. On candle's backend (a
//! GPU) they are kept transposed in bf16 for cuBLAS's tensor-core products: an
//! encoder's activations are bf16 there too ([`Precision::encoder_dtype`]), and a
//! decoder's f32 input is rounded to bf16 and the output back. f32 weights on a CPU
//! with AVX-512F or AVX2+FMA are packed for [`crate::kernels::cpu::packed`]'s
//! product, which is 1.5-3x faster than `gemm` for the few rows of a decoding step
//! or of one short input to embed, and on par for many rows. Elsewhere the weight is kept
//! transposed, `[in, out]`: checkpoints store it `[out, in]`, and multiplying by its
//! transposed view (what `candle_nn::Linear` does) hands `gemm` a column-major right
//! operand, which it handles 2-10x slower than a row-major one when the left
//! operand has few rows (`benchmarks/serving` has the measurements). Several
//! projections of the same input can be fused into one, output blocks side by side.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Module, Result, Tensor};

use crate::error::ServingError;
use crate::kernels::cpu::amx::AmxPacked;
use crate::kernels::cpu::packed::{Packed, PackedMatmul, Q8Packed};
use crate::kernels::cpu::Isa;
use crate::kernels::Backend;

/// The arithmetic of a model's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 products: the checkpoint's f32 values, f32 sums.
    #[default]
    F32,
    /// Weights and inputs rounded to bf16, sums in f32 (PyTorch's
    /// `set_float32_matmul_precision("medium")`): on the CPU's AMX tiles, so only on
    /// CPUs with AMX-BF16 ([`Isa::Amx`]), or on a GPU's tensor cores (candle's
    /// backend, where an encoder runs wholly in bf16: [`Precision::encoder_dtype`]).
    Bf16,
}

impl Precision {
    /// The precision asked for (`None`: the default), checked against the backend:
    /// by default bf16 where the model is an embedding model and the backend has
    /// bf16 products (a CPU with AMX, or a GPU: embeddings keep a cosine of 0.999 or
    /// more to their f32 values), f32 otherwise, so generation's greedy outputs stay
    /// those of the f32 model.
    pub fn resolve(
        asked: Option<Precision>,
        backend: Backend,
        embedding: bool,
    ) -> std::result::Result<Precision, ServingError> {
        let bf16 = Precision::bf16_on(backend);
        match asked {
            None if embedding && bf16 => Ok(Precision::Bf16),
            None => Ok(Precision::F32),
            Some(Precision::Bf16) if !bf16 => Err(ServingError::model(
                "bf16 matrix products need a GPU or a CPU with AMX-BF16 (Xeon since \
                 Sapphire Rapids); use --matmul-precision f32",
            )),
            Some(p) => Ok(p),
        }
    }

    /// [`Precision::resolve`] for a model on `device`: on a GPU without candle's bf16
    /// kernels (compute capability below 8.0, [`crate::device::has_bf16_kernels`])
    /// bf16 is neither the default nor allowed.
    pub fn resolve_on(
        asked: Option<Precision>,
        device: &candle_core::Device,
        embedding: bool,
    ) -> std::result::Result<Precision, ServingError> {
        if crate::device::has_bf16_kernels(device) {
            return Precision::resolve(asked, Backend::for_device(device), embedding);
        }
        match asked {
            Some(Precision::Bf16) => Err(ServingError::model(
                "bf16 needs a GPU of compute capability 8.0 or more (Ampere on); \
                 use --matmul-precision f32",
            )),
            _ => Ok(Precision::F32),
        }
    }

    /// Whether `backend` runs bf16 products: a CPU's AMX tiles, or candle's products
    /// on the model's device (cuBLAS on a GPU).
    pub fn bf16_on(backend: Backend) -> bool {
        matches!(backend, Backend::Cpu(Isa::Amx) | Backend::Candle)
    }

    /// The type an encoder's tensors load in, and its activations run in: bf16 for
    /// [`Precision::Bf16`] on candle's backend (a GPU), where the whole model then
    /// runs in bf16 as a bf16 checkpoint does (candle's norm and softmax kernels
    /// sum in f32), with no rounding of each product's input and output, which
    /// cost a GPU more launches than the bf16 products saved; f32 otherwise (on the
    /// CPU, bf16 is the AMX products' alone).
    pub fn encoder_dtype(self, backend: Backend) -> DType {
        match (self, backend) {
            (Precision::Bf16, Backend::Candle) => DType::BF16,
            _ => DType::F32,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision {other:?}: f32 or bf16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// How [`Dense::build`] lays out the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[in, out]`, in this type, for the device's matmul.
    Transposed(DType),
    Packed,
    Amx,
}

/// One dense projection.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Weight,
    output: usize,
}

#[derive(Debug, Clone)]
enum Weight {
    /// `[in, out]`, contiguous, in the products' type (the input is rounded to it
    /// and the output back), and the `[out]` bias.
    Transposed { wt: Tensor, bias: Option<Tensor> },
    /// Packed for the AVX-512 or AVX2 product (f32 on CPU), the bias with it.
    Packed(Arc<Packed>),
    /// Packed in bf16 for the AMX product (CPU), the bias with it.
    Amx(Arc<AmxPacked>),
    /// Q8_0 blocks for the packed product (CPU), the bias with it.
    Q8(Arc<Q8Packed>),
}

impl Dense {
    /// From a checkpoint's `[out, in]` weight and optional `[out]` bias, for the
    /// product of `backend`.
    pub fn new(
        backend: Backend,
        weight: &Tensor,
        bias: Option<Tensor>,
        precision: Precision,
    ) -> Result<Dense> {
        Dense::fused(backend, &[(weight, bias)], precision)
    }

    /// Several projections of one input as one: their outputs side by side, in order.
    /// Every part takes the same input width; either all have a bias or none.
    ///
    /// On the CPU backend, weights in [`Precision::Bf16`] are packed for
    /// [`crate::kernels::cpu::amx`]'s product (an error where the CPU has no AMX);
    /// f32 weights on a CPU with AVX-512F or AVX2+FMA for
    /// [`crate::kernels::cpu::packed`]'s; others are kept transposed for the
    /// device's matmul (`gemm` on the CPU, cuBLAS on a GPU), in bf16 for
    /// [`Precision::Bf16`] on candle's backend.
    pub fn fused(
        backend: Backend,
        parts: &[(&Tensor, Option<Tensor>)],
        precision: Precision,
    ) -> Result<Dense> {
        let f32_weights = parts.iter().all(|(w, _)| w.dtype() == DType::F32);
        let layout = match (precision, backend) {
            (Precision::Bf16, Backend::Cpu(Isa::Amx)) => Layout::Amx,
            (Precision::Bf16, Backend::Candle) => Layout::Transposed(DType::BF16),
            (Precision::Bf16, Backend::Cpu(_)) => {
                candle_core::bail!("bf16 projections need a GPU or a CPU with AMX-BF16")
            }
            (Precision::F32, Backend::Cpu(isa)) if isa >= Isa::Avx2 && f32_weights => {
                Layout::Packed
            }
            // The checkpoint's own type (a model loaded in f16 keeps f16 products).
            (Precision::F32, _) => {
                Layout::Transposed(parts.first().map_or(DType::F32, |(w, _)| w.dtype()))
            }
        };
        Dense::build(parts, layout)
    }

    /// Whether Q8_0 projections on `backend` go through the packed product
    /// ([`Dense::q8_fused`]): on CPUs whose widest product is AVX2's. There candle's
    /// quantized product costs the same per sequence however many share a step
    /// (139-146 tokens/s at 1, 8 and 32 clients on a 2-core EPYC with AVX2,
    /// `benchmarks/README.md`), where the packed product reads each block once per
    /// step for all of them. On AVX-512 CPUs candle's product batched as well as the
    /// packed one in the same benchmark (423 / 769 / 1019 tokens/s at 1 / 8 / 32
    /// clients against 418 / 791 / 916), and keeps them.
    pub fn q8_packed_on(backend: Backend) -> bool {
        matches!(backend, Backend::Cpu(Isa::Avx2))
    }

    /// Several Q8_0 projections of one input as one, for the packed product: `None`
    /// where [`Dense::q8_packed_on`] says the backend keeps candle's quantized
    /// product, or a part is not Q8_0.
    pub fn q8_fused(
        backend: Backend,
        parts: &[(&QTensor, Option<Tensor>)],
    ) -> Result<Option<Dense>> {
        if !Dense::q8_packed_on(backend)
            || parts.is_empty()
            || parts.iter().any(|(w, _)| w.dtype() != GgmlDType::Q8_0)
        {
            return Ok(None);
        }
        Dense::q8(parts).map(Some)
    }

    /// Q8_0 projections fused for the packed product, on its widest kernel here.
    fn q8(parts: &[(&QTensor, Option<Tensor>)]) -> Result<Dense> {
        let mut blocks = Vec::new();
        let mut biases = Vec::new();
        let mut width = None;
        let mut output = 0;
        for (weight, bias) in parts {
            if weight.dtype() != GgmlDType::Q8_0 {
                candle_core::bail!("a {:?} weight among Q8_0 ones", weight.dtype());
            }
            let (out, input) = weight.shape().dims2()?;
            if *width.get_or_insert(input) != input {
                candle_core::bail!("fused projections take the same input: {input} columns");
            }
            // Rows of blocks one after another: the parts' rows, in order.
            blocks.extend_from_slice(&weight.data()?);
            if let Some(b) = bias {
                biases.extend(b.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            output += out;
        }
        let bias = match biases.len() {
            0 => None,
            n if n == output => Some(biases.as_slice()),
            _ => candle_core::bail!("fused projections either all have a bias or none"),
        };
        let input = width.unwrap_or(0);
        let packed = Q8Packed::new(&blocks, bias, input, output)?;
        Ok(Dense {
            weight: Weight::Q8(Arc::new(packed)),
            output,
        })
    }

    fn build(parts: &[(&Tensor, Option<Tensor>)], layout: Layout) -> Result<Dense> {
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
        // The weight and bias as f32 values on the host, for packing.
        let values =
            |weight: &Tensor, bias: Option<Tensor>| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
                let w = weight
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let b = bias
                    .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                    .transpose()?;
                Ok((w, b))
            };
        let weight = match layout {
            Layout::Amx => {
                let (w, b) = values(&weight, bias)?;
                Weight::Amx(Arc::new(AmxPacked::new(&w, b.as_deref(), width, output)?))
            }
            Layout::Packed => {
                let (w, b) = values(&weight, bias)?;
                Weight::Packed(Arc::new(Packed::new(&w, b.as_deref(), width, output)?))
            }
            Layout::Transposed(dtype) => Weight::Transposed {
                wt: weight.to_dtype(dtype)?.t()?.contiguous()?,
                bias,
            },
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
        // The layout was chosen for the backend at load: packed weights only on the
        // CPU, whose products take f32 (and say so otherwise).
        let y = match &self.weight {
            Weight::Packed(p) => x
                .contiguous()?
                .apply_op1_no_bwd(&PackedMatmul(p.as_ref()))?,
            Weight::Amx(p) => x
                .contiguous()?
                .apply_op1_no_bwd(&PackedMatmul(p.as_ref()))?,
            Weight::Q8(p) => x
                .contiguous()?
                .apply_op1_no_bwd(&PackedMatmul(p.as_ref()))?,
            Weight::Transposed { wt, bias } => {
                let y = if x.dtype() == wt.dtype() {
                    x.matmul(wt)?
                } else {
                    x.to_dtype(wt.dtype())?.matmul(wt)?.to_dtype(x.dtype())?
                };
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

    /// A projection laid out as `layout` equals candle's `Linear` at every row
    /// count and rank, and on a strided input.
    fn matches_candle_linear_at_every_row_count_and_rank(layout: Layout) {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (48, 32), &d).unwrap();
        let b = Tensor::randn(0f32, 1., 48, &d).unwrap();
        let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let ours = Dense::build(&[(&w, Some(b.clone()))], layout).unwrap();
        let (kind, tolerance) = match &ours.weight {
            Weight::Transposed { wt, .. } if wt.dtype() == DType::BF16 => {
                (Layout::Transposed(DType::BF16), 0.15)
            }
            Weight::Transposed { .. } => (Layout::Transposed(DType::F32), 1e-4),
            Weight::Packed(_) => (Layout::Packed, 1e-4),
            // bf16 products of 32 N(0, 1) pairs: within a few hundredths.
            Weight::Amx(_) => (Layout::Amx, 0.15),
            Weight::Q8(_) => panic!("f32 weights laid out as Q8_0 blocks"),
        };
        assert_eq!(kind, layout);
        for shape in [vec![1, 32], vec![7, 32], vec![3, 5, 32]] {
            let x = Tensor::randn(0f32, 1., shape.as_slice(), &d).unwrap();
            let (a, r) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
            assert_eq!(a.dims(), r.dims());
            let diff = crate::max_abs_diff(&a, &r);
            assert!(diff < tolerance, "{layout:?} shape {shape:?}: {diff}");
        }
        // A strided input.
        let x = Tensor::randn(0f32, 1., (32, 6), &d).unwrap().t().unwrap();
        let (a, r) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
        assert!(crate::max_abs_diff(&a, &r) < tolerance, "{layout:?}");
        assert_eq!(ours.out_dim(), 48);
    }

    /// Q8_0 projections fused for the packed product compute what the values their
    /// blocks hold compute; other types, and backends that keep candle's quantized
    /// product, are left to it.
    #[test]
    fn fused_q8_projections_compute_their_blocks_values() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let d = Device::Cpu;
        let backend = Backend::for_device(&d);
        let (w1, w2) = (
            Tensor::randn(0f32, 1., (40, 64), &d).unwrap(),
            Tensor::randn(0f32, 1., (24, 64), &d).unwrap(),
        );
        let (b1, b2) = (
            Tensor::randn(0f32, 1., 40, &d).unwrap(),
            Tensor::randn(0f32, 1., 24, &d).unwrap(),
        );
        let (q1, q2) = (
            QTensor::quantize(&w1, GgmlDType::Q8_0).unwrap(),
            QTensor::quantize(&w2, GgmlDType::Q8_0).unwrap(),
        );
        let parts = [(&q1, Some(b1.clone())), (&q2, Some(b2.clone()))];
        assert!(Dense::q8_fused(Backend::Candle, &parts).unwrap().is_none());
        let f32_blocks = QTensor::quantize(&w1, GgmlDType::F32).unwrap();
        assert!(Dense::q8_fused(backend, &[(&f32_blocks, None)])
            .unwrap()
            .is_none());
        assert_eq!(
            Dense::q8_fused(backend, &parts).unwrap().is_some(),
            Dense::q8_packed_on(backend)
        );
        assert_eq!(
            Dense::q8_packed_on(backend),
            crate::kernels::cpu::isa() == Isa::Avx2
        );
        if !crate::kernels::cpu::packed::available() {
            return;
        }
        assert!(Dense::q8(&[(&q1, Some(b1.clone())), (&q2, None)]).is_err());
        assert!(Dense::q8(&[(&q1, None), (&f32_blocks, None)]).is_err());
        let ours = Dense::q8(&parts).unwrap();
        let held =
            Tensor::cat(&[q1.dequantize(&d).unwrap(), q2.dequantize(&d).unwrap()], 0).unwrap();
        let bias = Tensor::cat(&[b1, b2], 0).unwrap();
        let reference = candle_nn::Linear::new(held, Some(bias));
        assert_eq!(ours.out_dim(), 64);
        for shape in [vec![1, 64], vec![9, 64], vec![2, 3, 64]] {
            let x = Tensor::randn(0f32, 1., shape.as_slice(), &d).unwrap();
            let (a, r) = (ours.forward(&x).unwrap(), reference.forward(&x).unwrap());
            assert_eq!(a.dims(), r.dims());
            let diff = crate::max_abs_diff(&a, &r);
            assert!(diff < 1e-3, "shape {shape:?}: {diff}");
        }
    }

    #[test]
    fn the_transposed_layout_matches_candle_linear() {
        matches_candle_linear_at_every_row_count_and_rank(Layout::Transposed(DType::F32));
    }

    /// On candle's backend, bf16 products: the weight kept in bf16, the input rounded
    /// to it and the output back to f32.
    #[test]
    fn the_bf16_transposed_layout_matches_candle_linear() {
        matches_candle_linear_at_every_row_count_and_rank(Layout::Transposed(DType::BF16));
    }

    #[test]
    #[cfg_attr(not(cpu_avx2_fma), ignore = "skipped: this CPU has no AVX2 with FMA")]
    fn the_packed_layout_matches_candle_linear() {
        matches_candle_linear_at_every_row_count_and_rank(Layout::Packed);
    }

    #[test]
    #[cfg_attr(not(cpu_amx_bf16), ignore = "skipped: this CPU has no AMX-BF16")]
    fn the_bf16_layout_matches_candle_linear() {
        matches_candle_linear_at_every_row_count_and_rank(Layout::Amx);
    }

    #[test]
    fn bf16_needs_amx_or_a_gpu_and_is_the_default_only_for_embeddings_there() {
        let d = Device::Cpu;
        let w = Tensor::zeros((4, 3), DType::F32, &d).unwrap();
        let amx = crate::kernels::cpu::amx::available();
        let cpu = Backend::for_device(&d);
        assert_eq!(Dense::new(cpu, &w, None, Precision::Bf16).is_ok(), amx);
        let embedding_default = Precision::resolve(None, cpu, true).unwrap();
        assert_eq!(embedding_default == Precision::Bf16, amx);
        assert_eq!(
            Precision::resolve(None, cpu, false).unwrap(),
            Precision::F32
        );
        assert_eq!(
            Precision::resolve(Some(Precision::Bf16), cpu, false).is_ok(),
            amx
        );
        assert_eq!(
            Precision::resolve(Some(Precision::F32), cpu, true).unwrap(),
            Precision::F32
        );
        // Off the CPU (candle's ops: a GPU's), bf16 products are the embeddings'
        // default and may be asked for generation.
        let candle = Backend::Candle;
        assert_eq!(
            Precision::resolve(None, candle, true).unwrap(),
            Precision::Bf16
        );
        assert_eq!(
            Precision::resolve(None, candle, false).unwrap(),
            Precision::F32
        );
        assert_eq!(
            Precision::resolve(Some(Precision::Bf16), candle, false).unwrap(),
            Precision::Bf16
        );
        assert!(Dense::new(candle, &w, None, Precision::Bf16).is_ok());
        // An encoder runs wholly in bf16 on a GPU, in f32 (AMX products alone) on
        // the CPU.
        assert_eq!(Precision::Bf16.encoder_dtype(candle), DType::BF16);
        assert_eq!(Precision::F32.encoder_dtype(candle), DType::F32);
        assert_eq!(Precision::Bf16.encoder_dtype(cpu), DType::F32);
        // On the CPU the device adds nothing to the backend's rules.
        for asked in [None, Some(Precision::F32), Some(Precision::Bf16)] {
            for embedding in [false, true] {
                assert_eq!(
                    Precision::resolve_on(asked, &d, embedding).ok(),
                    Precision::resolve(asked, cpu, embedding).ok()
                );
            }
        }
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!(
            Precision::F32.to_string().parse::<Precision>().unwrap(),
            Precision::F32
        );
        assert!("fp8".parse::<Precision>().is_err());
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
        let cpu = Backend::for_device(&d);
        let fused = Dense::fused(
            cpu,
            &parts
                .iter()
                .map(|(w, b)| (w, Some(b.clone())))
                .collect::<Vec<_>>(),
            Precision::F32,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1., (5, 12), &d).unwrap();
        let y = fused.forward(&x).unwrap();
        let mut at = 0;
        for (w, b) in &parts {
            let alone = Dense::new(cpu, w, Some(b.clone()), Precision::F32)
                .unwrap()
                .forward(&x)
                .unwrap();
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
        let f32 = Precision::F32;
        let cpu = Backend::for_device(&d);
        assert!(Dense::fused(cpu, &[(&a, None), (&b, None)], f32).is_err());
        let bias = Tensor::zeros(4, DType::F32, &d).unwrap();
        assert!(Dense::fused(cpu, &[(&a, Some(bias.clone())), (&a, None)], f32).is_err());
        let short_bias = Tensor::zeros(3, DType::F32, &d).unwrap();
        assert!(Dense::new(cpu, &a, Some(short_bias), f32).is_err());
        assert!(Dense::fused(cpu, &[], f32).is_err());
    }
}
