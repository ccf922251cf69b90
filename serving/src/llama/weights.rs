//! A decoder layer's weights as the forward pass takes them: projections dense or
//! quantized, norms, the fused query/key/value and gate/up projections.

use super::*;

/// A projection: dense (safetensors) or quantized (GGUF).
#[derive(Debug, Clone)]
pub(super) enum Proj {
    Dense(Dense),
    /// The output layer tied to the token embeddings, which stay `[vocab, hidden]`
    /// for the lookup rather than be held twice.
    Tied(candle_nn::Linear),
    Quant(candle_transformers::quantized_nn::Linear),
}

impl Module for Proj {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(xs),
            Proj::Tied(l) => l.forward(xs),
            Proj::Quant(l) => l.forward(xs),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum Norm {
    Dense(candle_nn::RmsNorm),
    Quant(candle_transformers::quantized_nn::RmsNorm),
}

impl Module for Norm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Dense(n) => n.forward(xs),
            Norm::Quant(n) => n.forward(xs),
        }
    }
}

/// The query, key and value projections: one fused dense projection (outputs side
/// by side), or three quantized ones.
#[derive(Debug, Clone)]
pub(super) enum Qkv {
    Fused { proj: Dense, q: usize, kv: usize },
    Split(Proj, Proj, Proj),
}

impl Qkv {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        match self {
            Qkv::Fused { proj, q, kv } => {
                let y = proj.forward(x)?;
                Ok((
                    y.narrow(1, 0, *q)?,
                    y.narrow(1, *q, *kv)?,
                    y.narrow(1, q + kv, *kv)?,
                ))
            }
            Qkv::Split(q, k, v) => Ok((q.forward(x)?, k.forward(x)?, v.forward(x)?)),
        }
    }
}

/// The MLP's gate and up projections, fused (dense) or apart (quantized); the
/// result is `silu(gate) * up`.
#[derive(Debug, Clone)]
pub(super) enum GateUp {
    /// The fused projection, and the backend its `silu(gate) * up` runs on.
    Fused(Dense, Backend),
    Split(Proj, Proj),
}

impl Module for GateUp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            GateUp::Fused(proj, backend) => backend.silu_mul(&proj.forward(x)?),
            GateUp::Split(gate, up) => {
                candle_nn::ops::silu(&gate.forward(x)?)?.mul(&up.forward(x)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) input_norm: Norm,
    pub(super) qkv: Qkv,
    pub(super) o: Proj,
    pub(super) post_norm: Norm,
    pub(super) gate_up: GateUp,
    pub(super) down: Proj,
}
