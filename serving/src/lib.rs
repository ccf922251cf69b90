//! Model serving: candle runtimes, batching engines and the OpenAI-compatible `/v1` API.
//!
//! | module | owns |
//! |---|---|
//! | [`error`] | the serving error enum: the HTTP status and OpenAI error body (`aigrid_api::openai`) of each |
//! | [`device`] | `cpu` / `cuda:N` device choice |
//! | [`source`] | where a model's files come from: a local directory or the verified store reader |
//! | [`tokenizer`] | tokenizer.json through `tokenizers`, incremental detokenizing, chat templates |
//! | [`dense`] | dense projections, the weight laid out at load for the backend's product (AMX, AVX-512 or AVX2 packed, or the device's matmul) |
//! | [`gguf_export`] | a Hugging Face Llama directory as one GGUF file that llama.cpp and this crate read (Q8_0 or F16, the tokenizer in llama.cpp's keys) |
//! | [`tiny`] | writes tiny real models (random weights, a trained byte-level BPE tokenizer) |
//! | [`llama`] | Llama-family decoder (llama, mistral, qwen2; safetensors or GGUF), batched across sequences: `config`, `weights`, `forward`, `attention` |
//! | [`kv_pool`] | the decoders' keys and values: a slot per running sequence, in one pool per layer |
//! | [`bert`] | BERT-family embeddings with sentence-transformers pooling and normalization: `config`, `pooling`, `layers` |
//! | [`model`] | what the engines ask of a model: [`model::Encoder`] (embeddings), [`model::Decoder`] (generation) |
//! | [`sampling`] | logits to tokens: greedy, temperature, top-p, seeds |
//! | [`generate`] | the continuous-batching generation engine on its own thread |
//! | [`embed`] | the continuous-batching embedding engine on its own thread |
//! | [`config`] | what a server is told at start: listen address, device, precision, names, limits |
//! | [`loader`] | loading a model: phases, verified bytes, warm-up |
//! | [`kernels`] | the [`kernels::Backend`] a model's steps run on, chosen once at load from the device (model code never looks at the device); the CPU's kernels (`kernels::cpu`), picked once at run time for the CPU's instructions: `detect` (what the CPU and OS offer), `amx` (bf16 tile products), `packed` (f32 products with the weight packed once, for AVX-512 or AVX2+FMA), `elementwise` (bias and activation, bias and residual with layer norm, row softmax, in place), `ops` (fused `silu(gate)·up`, attention over the KV pool, row softmax, a vectorized `exp`), each compiled for AVX-512, AVX2+FMA or portable code |
//! | [`server`] | the axum server: the door every `/v1` request passes, `/health`, `/ready`, `/status`, `/metrics`; `generation` (`/v1/completions`, `/v1/chat/completions`) and `embeddings` (`/v1/embeddings`) |
//! | [`metrics`] | Prometheus metrics |
//!
//! `sampling`, `tokenizer` and the models are pure compute; inference runs on
//! dedicated threads fed by bounded channels, never on the async runtime.

pub mod bert;
pub mod config;
pub mod dense;
pub mod device;
pub mod embed;
pub mod error;
pub mod generate;
pub mod gguf_export;
pub mod kernels;
pub mod kv_pool;
pub mod llama;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod server;
pub mod source;
pub mod tiny;
pub mod tokenizer;

pub use device::DeviceSpec;
pub use error::ServingError;
pub use source::ModelSource;

/// The largest element-wise difference of two tensors of one shape, compared in
/// f32 (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    use candle_core::DType;
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
