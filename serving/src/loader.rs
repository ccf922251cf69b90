//! Loading a model: configuration and tokenizer, then weights, then a warm-up
//! forward, with the phase and the bytes loaded visible at `/status` while it runs.
//!
//! From the store, tensors are fetched through the verified lazy reader several at a
//! time while the ones already verified are turned into tensors, so fetching,
//! verification and tensor construction overlap. The model is ready only after every
//! weight byte it uses was verified against the signed manifest and a warm-up forward
//! ran; a single bad byte fails the load, and the server never becomes ready.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use futures_util::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use serde::Serialize;

use crate::bert::{Embedder, Pooling};
use crate::config::Limits;
use crate::dense::Precision;
use crate::embed::{EmbedOptions, EmbeddingEngine};
use crate::generate::{EngineOptions, GenerationEngine};
use crate::llama::{Chunk, LlamaConfig, Model};
use crate::metrics::Metrics;
use crate::tokenizer::TextTokenizer;
use crate::{ModelSource, ServingError};

/// Where loading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Starting,
    /// Reading configuration and tokenizer files.
    Config,
    /// Fetching, verifying and building the weights.
    Weights,
    /// Running a first forward.
    WarmUp,
    /// Answering requests.
    Ready,
    /// Loading failed; the server will not become ready.
    Failed,
}

/// What kind of model is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Text generation (completions, chat).
    Generation,
    /// Embeddings.
    Embedding,
}

/// Loading progress, shared with `/status`.
#[derive(Debug, Default)]
pub struct LoadStatus {
    state: Mutex<StatusState>,
    bytes_loaded: AtomicU64,
}

#[derive(Debug, Clone)]
struct StatusState {
    phase: Phase,
    kind: Option<ModelKind>,
    precision: Option<Precision>,
    bytes_total: u64,
    phase_started: Instant,
    durations: Vec<(Phase, f64)>,
    error: Option<String>,
}

impl Default for StatusState {
    fn default() -> Self {
        StatusState {
            phase: Phase::Starting,
            kind: None,
            precision: None,
            bytes_total: 0,
            phase_started: Instant::now(),
            durations: Vec::new(),
            error: None,
        }
    }
}

/// `/status` as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The phase.
    pub phase: Phase,
    /// The kind, once known.
    pub kind: Option<ModelKind>,
    /// The arithmetic of the projections (`f32` or `bf16`), once chosen.
    pub precision: Option<String>,
    /// Bytes of the files loaded so far (verified, when from the store).
    pub bytes_loaded: u64,
    /// Bytes of the files to load.
    pub bytes_total: u64,
    /// Seconds each finished phase took.
    pub phase_seconds: HashMap<String, f64>,
    /// Why loading failed.
    pub error: Option<String>,
}

impl LoadStatus {
    /// The phase now.
    pub fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    /// A snapshot for `/status`.
    pub fn report(&self) -> StatusReport {
        let s = self.state.lock().clone();
        StatusReport {
            phase: s.phase,
            kind: s.kind,
            precision: s.precision.map(|p| p.to_string()),
            bytes_loaded: self.bytes_loaded.load(Ordering::Relaxed),
            bytes_total: s.bytes_total,
            phase_seconds: s
                .durations
                .iter()
                .map(|(p, secs)| (phase_name(*p).to_owned(), *secs))
                .collect(),
            error: s.error,
        }
    }

    fn enter(&self, phase: Phase, metrics: &Metrics) {
        let mut s = self.state.lock();
        let took = s.phase_started.elapsed();
        if s.phase != Phase::Starting {
            let done = s.phase;
            s.durations.push((done, took.as_secs_f64()));
            metrics
                .loader_phase_seconds
                .with_label_values(&[phase_name(done)])
                .set(took.as_millis() as i64);
        }
        s.phase = phase;
        s.phase_started = Instant::now();
    }

    /// Records a failure; the phase stays `failed`.
    pub fn fail(&self, error: &ServingError) {
        let mut s = self.state.lock();
        s.phase = Phase::Failed;
        s.error = Some(error.to_string());
    }

    fn add_bytes(&self, n: u64, source: &ModelSource, metrics: &Metrics) {
        self.bytes_loaded.fetch_add(n, Ordering::Relaxed);
        let label = match source {
            ModelSource::Dir(_) => "directory",
            ModelSource::Store(_) => "store",
        };
        metrics.loader_bytes.with_label_values(&[label]).inc_by(n);
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Config => "config",
        Phase::Weights => "weights",
        Phase::WarmUp => "warm_up",
        Phase::Ready => "ready",
        Phase::Failed => "failed",
    }
}

/// A loaded model with its engine.
#[derive(Clone)]
pub enum Runtime {
    /// Text generation.
    Generation {
        /// The engine.
        engine: GenerationEngine,
        /// The tokenizer.
        tokenizer: TextTokenizer,
    },
    /// Embeddings.
    Embedding {
        /// The engine.
        engine: EmbeddingEngine,
        /// The tokenizer.
        tokenizer: TextTokenizer,
        /// Longest input in tokens.
        max_tokens: usize,
        /// Vector length.
        dimensions: usize,
    },
}

/// Tensors fetched at once from the store.
const PARALLEL_TENSORS: usize = 8;

/// Loads `source` onto `device` and starts its engine. `precision` is the
/// projections' arithmetic asked for (`None`: [`Precision::resolve`]'s default).
pub async fn load(
    source: &ModelSource,
    device: &Device,
    precision: Option<Precision>,
    limits: &Limits,
    metrics: &Metrics,
    status: &LoadStatus,
) -> Result<Runtime, ServingError> {
    status.enter(Phase::Config, metrics);
    let files = source.files()?;
    let gguf: Vec<&(String, u64)> = files.iter().filter(|(p, _)| p.ends_with(".gguf")).collect();
    let safetensors: Vec<&(String, u64)> = files
        .iter()
        .filter(|(p, _)| p.ends_with(".safetensors") && !p.contains('/'))
        .collect();
    let config = source.read_optional(&files, "config.json").await?;
    let modules = source.read_optional(&files, "modules.json").await?;
    let tokenizer_json = source
        .read_optional(&files, "tokenizer.json")
        .await?
        .ok_or_else(|| {
            ServingError::model(
                "the model has no tokenizer.json (a GGUF model needs one beside it)",
            )
        })?;
    let tokenizer_config = source
        .read_optional(&files, "tokenizer_config.json")
        .await?;
    let generation_config = source
        .read_optional(&files, "generation_config.json")
        .await?;
    let tokenizer = TextTokenizer::new(
        &tokenizer_json,
        tokenizer_config.as_deref(),
        generation_config.as_deref(),
        config.as_deref(),
    )?;
    let embedding = modules.is_some()
        || config.as_deref().is_some_and(|c| {
            serde_json::from_slice::<serde_json::Value>(c)
                .ok()
                .and_then(|v| {
                    v.get("model_type")
                        .and_then(|t| t.as_str())
                        .map(str::to_owned)
                })
                .is_some_and(|t| t == "bert")
        });
    let kind = if embedding {
        ModelKind::Embedding
    } else {
        ModelKind::Generation
    };
    let weights: Vec<&(String, u64)> = match (kind, gguf.first()) {
        (ModelKind::Generation, Some(g)) if gguf.len() == 1 => vec![g],
        (ModelKind::Generation, Some(_)) => {
            return Err(ServingError::model(
                "the model directory holds several .gguf files; keep one",
            ))
        }
        _ if safetensors.is_empty() => {
            return Err(ServingError::model(
                "the model has no .safetensors weights at its top level",
            ))
        }
        _ => safetensors,
    };
    let backend = crate::kernels::Backend::for_device(device);
    let precision = Precision::resolve_on(precision, device, kind == ModelKind::Embedding)?;
    {
        let mut s = status.state.lock();
        s.kind = Some(kind);
        s.precision = Some(precision);
        s.bytes_total = weights.iter().map(|(_, size)| size).sum();
    }

    status.enter(Phase::Weights, metrics);
    let runtime = match kind {
        ModelKind::Generation if weights[0].0.ends_with(".gguf") => {
            let bytes = source.read(&weights[0].0).await?;
            status.add_bytes(bytes.len() as u64, source, metrics);
            let dev = device.clone();
            let model = blocking(move || {
                let mut cursor = std::io::Cursor::new(&bytes[..]);
                let content = candle_core::quantized::gguf_file::Content::read(&mut cursor)
                    .map_err(|e| ServingError::model(format!("GGUF: {e}")))?;
                let config = LlamaConfig::from_gguf(&content)?;
                let vb = candle_transformers::quantized_var_builder::VarBuilder::from_gguf_buffer(
                    &bytes, &dev,
                )?;
                Model::from_gguf(config, vb)
            })
            .await?;
            start_generation(model, tokenizer, limits, metrics, status).await?
        }
        ModelKind::Generation => {
            let config_bytes =
                config.ok_or_else(|| ServingError::model("the model has no config.json"))?;
            let config = LlamaConfig::from_hf_json(&config_bytes)?;
            let tensors = load_tensors(source, &weights, device, metrics, status).await?;
            let dev = device.clone();
            let model = blocking(move || {
                Model::from_safetensors(
                    config,
                    VarBuilder::from_tensors(tensors, DType::F32, &dev),
                    precision,
                )
            })
            .await?;
            start_generation(model, tokenizer, limits, metrics, status).await?
        }
        ModelKind::Embedding => {
            let config_bytes =
                config.ok_or_else(|| ServingError::model("the model has no config.json"))?;
            let pooling_config = match modules.as_deref().map(Pooling::config_path).transpose()? {
                Some(Some(path)) => source.read_optional(&files, &path).await?,
                _ => None,
            };
            let pooling = Pooling::from_files(modules.as_deref(), pooling_config.as_deref())?;
            let st_max = source
                .read_optional(&files, "sentence_bert_config.json")
                .await?
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
                .map(|m| m as usize);
            let tensors = load_tensors(source, &weights, device, metrics, status).await?;
            let dev = device.clone();
            let dtype = precision.encoder_dtype(backend);
            let embedder = blocking(move || {
                Embedder::new(
                    VarBuilder::from_tensors(tensors, dtype, &dev),
                    &config_bytes,
                    pooling,
                    precision,
                )
            })
            .await?;
            let max_tokens = st_max
                .map_or(embedder.max_tokens(), |m| m.min(embedder.max_tokens()))
                .max(2);
            status.enter(Phase::WarmUp, metrics);
            let embedder = Arc::new(embedder);
            let warm = embedder.clone();
            let probe = tokenizer.encode("warm up", true)?;
            blocking(move || warm.embed(&[probe]).map(|_| ())).await?;
            let dimensions = embedder.dimensions();
            Runtime::Embedding {
                engine: EmbeddingEngine::start(
                    embedder,
                    EmbedOptions {
                        max_batch_tokens: limits.max_batch_tokens,
                        max_delay: std::time::Duration::from_millis(limits.embed_max_delay_ms),
                        max_waiting: limits.max_concurrent_requests,
                    },
                    metrics.clone(),
                ),
                tokenizer,
                max_tokens,
                dimensions,
            }
        }
    };
    status.enter(Phase::Ready, metrics);
    Ok(runtime)
}

async fn start_generation(
    model: Model,
    tokenizer: TextTokenizer,
    limits: &Limits,
    metrics: &Metrics,
    status: &LoadStatus,
) -> Result<Runtime, ServingError> {
    status.enter(Phase::WarmUp, metrics);
    let model = Arc::new(model);
    let warm = model.clone();
    let mut probe = tokenizer.encode("Hello", true)?;
    probe.truncate(
        model
            .config()
            .max_position_embeddings
            .saturating_sub(1)
            .max(1),
    );
    if probe.is_empty() {
        probe.push(0);
    }
    blocking(move || {
        let mut pool = warm.new_pool(1, probe.len() + 1)?;
        let mut cache = pool.acquire().expect("a new pool has a free slot");
        warm.forward(
            &pool,
            &mut [Chunk {
                tokens: &probe,
                cache: &mut cache,
            }],
        )?;
        pool.release(cache);
        Ok(())
    })
    .await?;
    let engine = GenerationEngine::start(
        model,
        tokenizer.clone(),
        EngineOptions {
            max_batch_tokens: limits.max_batch_tokens,
            max_running_sequences: limits.max_running_sequences,
            max_waiting: limits.max_concurrent_requests,
            kv_cache_bytes: limits.kv_cache_bytes,
        },
        metrics.clone(),
    )?;
    Ok(Runtime::Generation { engine, tokenizer })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServingError> + Send + 'static,
) -> Result<T, ServingError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServingError::model(format!("a loading task failed: {e}")))?
}

/// Every tensor of the safetensors files, in their stored dtypes.
async fn load_tensors(
    source: &ModelSource,
    files: &[&(String, u64)],
    device: &Device,
    metrics: &Metrics,
    status: &LoadStatus,
) -> Result<HashMap<String, Tensor>, ServingError> {
    let mut all = HashMap::new();
    for (file, size) in files {
        match source {
            ModelSource::Dir(_) => {
                let bytes = source.read(file).await?;
                status.add_bytes(bytes.len() as u64, source, metrics);
                let dev = device.clone();
                let file = file.clone();
                let tensors = blocking(move || {
                    let st = safetensors::SafeTensors::deserialize(&bytes)
                        .map_err(|e| ServingError::model(format!("{file}: {e}")))?;
                    st.tensors()
                        .into_iter()
                        .map(|(name, view)| {
                            let t = tensor(
                                &file,
                                &name,
                                view.dtype(),
                                view.shape(),
                                view.data(),
                                &dev,
                            )?;
                            Ok((name, t))
                        })
                        .collect::<Result<Vec<_>, ServingError>>()
                })
                .await?;
                all.extend(tensors);
            }
            ModelSource::Store(reader) => {
                let view = reader.safetensors(file).await?;
                let names: Vec<String> = view.names().map(str::to_owned).collect();
                let view = &view;
                let tensors: Vec<(String, Tensor)> = futures_util::stream::iter(names)
                    .map(|name| async move {
                        let info = view.info(&name).expect("listed names exist").clone();
                        let bytes: Bytes = view.tensor(&name).await?;
                        status.add_bytes(bytes.len() as u64, source, metrics);
                        let dtype = dtype_named(file, &name, &info.dtype)?;
                        let t = tensor(file, &name, dtype, &info.shape, &bytes, device)?;
                        Ok::<_, ServingError>((name, t))
                    })
                    .buffer_unordered(PARALLEL_TENSORS)
                    .try_collect()
                    .await?;
                // The header was read and verified when the view opened.
                let data: u64 = tensors
                    .iter()
                    .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
                    .sum();
                status.add_bytes(size.saturating_sub(data), source, metrics);
                all.extend(tensors);
            }
        }
    }
    Ok(all)
}

/// A safetensors header's dtype name (`F32`, `BF16`, ...), as the `safetensors`
/// crate reads it.
fn dtype_named(file: &str, name: &str, dtype: &str) -> Result<safetensors::Dtype, ServingError> {
    serde_json::from_value(serde_json::Value::String(dtype.to_ascii_uppercase())).map_err(|_| {
        ServingError::model(format!(
            "{file}: tensor `{name}` has dtype {dtype}, which is not supported"
        ))
    })
}

/// One tensor from its safetensors dtype, shape and little-endian bytes.
fn tensor(
    file: &str,
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    data: &[u8],
    device: &Device,
) -> Result<Tensor, ServingError> {
    use safetensors::Dtype;
    let dtype = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::U32 => DType::U32,
        Dtype::U8 => DType::U8,
        other => {
            return Err(ServingError::model(format!(
                "{file}: tensor `{name}` has dtype {other:?}, which is not supported"
            )))
        }
    };
    let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
    if data.len() != want {
        return Err(ServingError::model(format!(
            "{file}: tensor `{name}` has {} bytes, its shape {shape:?} needs {want}",
            data.len()
        )));
    }
    Ok(Tensor::from_raw_buffer(data, dtype, shape, device)?)
}
