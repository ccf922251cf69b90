//! The model server: the OpenAI-compatible `/v1/*` routes, `/health` (alive, also
//! while loading), `/ready` (the model verified and warmed up), `/status` (loading
//! phase and bytes) and `/metrics`.
//!
//! Every `/v1` request passes one door: a permit from a semaphore (429 when none is
//! left), a body read under the size limit (413), JSON parsed into the request type
//! (400 naming what is wrong), the model name checked (404) and the model ready
//! (503). Errors use OpenAI's shape.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::dense::Precision;
use crate::generate::{FinishReason, GenEvent, GenRequest};
use crate::loader::{self, LoadStatus, Phase, Runtime};
use crate::metrics::Metrics;
use crate::openai::{
    ChatRequest, CompletionRequest, EmbeddingInput, EmbeddingRequest, ModelCard, OneOrMany, Prompt,
    SamplingFields, Usage,
};
use crate::sampling::SamplingParams;
use crate::tokenizer::TextTokenizer;
use crate::{DeviceSpec, ModelSource, ServingError};

/// Limits that answer 413/429/400 instead of queueing without bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Requests in flight at once (429 beyond).
    pub max_concurrent_requests: usize,
    /// Tokens one generation step may process, prefill and decode together; also the
    /// tokens of one embedding forward (inputs are packed, not padded).
    pub max_batch_tokens: usize,
    /// Sequences decoded together.
    pub max_running_sequences: usize,
    /// Longest an embedding request waits for others to batch with, in milliseconds.
    /// 0 (the default) waits for none: a batch is whatever is queued when the model
    /// is free, and requests that arrive during a forward make up the next one.
    pub embed_max_delay_ms: u64,
    /// Bytes of KV cache for the running sequences, cut into slots of one whole
    /// context each (at most `max_running_sequences`; one slot of the whole budget
    /// when that is less than a context). Requests wait for a free slot; one longer
    /// than a slot is refused with 400.
    pub kv_cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 2 << 20,
            max_concurrent_requests: 256,
            max_batch_tokens: 2048,
            max_running_sequences: 64,
            embed_max_delay_ms: 0,
            kv_cache_bytes: 4 << 30,
        }
    }
}

/// How to serve a model.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// The projections' arithmetic; `None` chooses ([`Precision::resolve`]): bf16
    /// for embedding models on CPUs with AMX, f32 otherwise.
    pub precision: Option<Precision>,
    /// Names clients may give as `model`, besides the model's digest (or directory).
    /// The first is the name `/v1/models` shows.
    pub names: Vec<String>,
    /// Limits.
    pub limits: Limits,
}

/// Most stop strings a request may give, as OpenAI allows.
const MAX_STOP: usize = 4;

struct App {
    source: ModelSource,
    names: Vec<String>,
    shown: String,
    created: u64,
    device: String,
    limits: Limits,
    status: LoadStatus,
    runtime: OnceLock<Runtime>,
    permits: Arc<Semaphore>,
    metrics: Metrics,
}

/// A bound model server. Loading starts when it runs; `/health` answers at once.
pub struct Server {
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    source: ModelSource,
}

impl Server {
    /// Binds the listen address.
    pub async fn bind(config: ServeConfig, source: ModelSource) -> Result<Server, ServingError> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServingError::Io {
                path: config.listen.to_string(),
                source,
            })?;
        Ok(Server {
            listener,
            config,
            source,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Loads the model in the background and serves until `shutdown` resolves. A
    /// failed load is logged and shown at `/status`; the server stays up, never ready.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServingError> {
        let Server {
            listener,
            config,
            source,
        } = self;
        let mut names = config.names.clone();
        names.push(source.id());
        let device = config.device.open()?;
        let app = Arc::new(App {
            source: source.clone(),
            shown: names[0].clone(),
            names,
            created: crate::openai::unix_now(),
            device: match &device {
                candle_core::Device::Cpu => "cpu".into(),
                other => format!("{other:?}"),
            },
            limits: config.limits.clone(),
            status: LoadStatus::default(),
            runtime: OnceLock::new(),
            permits: Arc::new(Semaphore::new(config.limits.max_concurrent_requests.max(1))),
            metrics: Metrics::new(),
        });
        let loading = app.clone();
        let precision = config.precision;
        tokio::spawn(async move {
            let started = Instant::now();
            match loader::load(
                &source,
                &device,
                precision,
                &loading.limits,
                &loading.metrics,
                &loading.status,
            )
            .await
            {
                Ok(runtime) => {
                    let _ = loading.runtime.set(runtime);
                    loading.metrics.ready.set(1);
                    tracing::info!(model = %source.id(), secs = started.elapsed().as_secs_f64(), "model ready");
                }
                Err(e) => {
                    tracing::error!(model = %source.id(), error = %e, "loading the model failed; it will not become ready");
                    loading.status.fail(&e);
                }
            }
        });
        axum::serve(listener, router(app))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServingError::Io {
                path: "listener".into(),
                source,
            })
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|uri: axum::http::Uri| async move {
            let mut body = ServingError::invalid(None, format!("no route {}", uri.path())).body();
            body.error.code = Some("not_found".into());
            (StatusCode::NOT_FOUND, Json(body))
        })
        .with_state(app)
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let phase = app.status.phase();
    let code = if phase == Phase::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({"ready": phase == Phase::Ready, "phase": phase})),
    )
        .into_response()
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let mut report = serde_json::to_value(app.status.report()).expect("status serializes");
    report["model"] = json!(app.names.last());
    report["names"] = json!(app.names);
    report["device"] = json!(app.device);
    if let ModelSource::Store(reader) = &app.source {
        let f = reader.stats();
        report["store"] = json!({
            "shard_requests": f.requests,
            "hedged_requests": f.hedged,
            "bad_shards": f.bad_shards,
            "bytes_fetched_verified": f.bytes,
            "stripes_reconstructed": f.reconstructed,
            "cache_hits": f.cache_hits,
        });
    }
    Json(report).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<ModelCard> = if app.runtime.get().is_some() {
        vec![ModelCard {
            id: app.shown.clone(),
            object: "model".into(),
            created: app.created,
            owned_by: "aigrid".into(),
        }]
    } else {
        Vec::new()
    };
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A request admitted through the door: it holds a concurrency permit until dropped.
struct Admission {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
    route: &'static str,
    started: Instant,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .request_duration
            .with_label_values(&[self.route])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The door every `/v1` POST passes.
async fn admit<T: DeserializeOwned>(
    app: &Arc<App>,
    route: &'static str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(T, Admission, Runtime), ServingError> {
    let permit = app.permits.clone().try_acquire_owned().map_err(|_| {
        ServingError::Overloaded(format!(
            "more than {} requests at once; retry later",
            app.limits.max_concurrent_requests
        ))
    })?;
    app.metrics.in_flight.inc();
    let admission = Admission {
        _permit: permit,
        metrics: app.metrics.clone(),
        route,
        started: Instant::now(),
    };
    let limit = app.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ServingError::TooLarge { limit });
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ServingError::TooLarge { limit })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ServingError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ServingError::invalid(
            None,
            "the body must be a JSON object",
        ));
    }
    match value.get("model") {
        Some(Value::String(model)) => {
            if !app.names.iter().any(|n| n == model) {
                return Err(ServingError::ModelNotFound(model.clone()));
            }
        }
        Some(_) => return Err(ServingError::invalid("model", "model must be a string")),
        None => return Err(ServingError::invalid("model", "model is required")),
    }
    let request: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ServingError::InvalidRequest {
            message: format!("{path}: {}", e.inner()),
            param: Some(path),
        }
    })?;
    let runtime = app.runtime.get().cloned().ok_or_else(|| {
        ServingError::NotReady(match app.status.phase() {
            Phase::Failed => "the model failed to load; see /status".to_string(),
            phase => format!(
                "the model is loading ({}); retry when /ready answers 200",
                serde_json::to_value(phase)
                    .expect("phase serializes")
                    .as_str()
                    .unwrap_or("loading")
            ),
        })
    })?;
    Ok((request, admission, runtime))
}

fn count(app: &App, route: &str, status: StatusCode) {
    app.metrics
        .requests
        .with_label_values(&[route, status.as_str()])
        .inc();
}

/// Answers `result`, counting it.
fn answer(app: &App, route: &str, result: Result<Response, ServingError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    count(app, route, response.status());
    response
}

/// Sampling and limits of a generation request, checked.
struct Generation {
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn generation_params(
    fields: &SamplingFields,
    max_tokens: Option<i64>,
    default_max: usize,
    prompt_len: usize,
    context: usize,
) -> Result<Generation, ServingError> {
    if prompt_len >= context {
        return Err(ServingError::ContextLength(format!(
            "this model's maximum context length is {context} tokens; the prompt has {prompt_len}"
        )));
    }
    let max_tokens = match max_tokens {
        None => default_max.min(context - prompt_len),
        Some(n) if n < 1 => {
            return Err(ServingError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ))
        }
        Some(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if prompt_len.saturating_add(n) > context {
                return Err(ServingError::ContextLength(format!(
                    "this model's maximum context length is {context} tokens; the prompt has {prompt_len} and max_tokens asks for {n} more"
                )));
            }
            n
        }
    };
    let temperature = fields.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ServingError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ServingError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    if let Some(n) = fields.n {
        if n != 1 {
            return Err(ServingError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    for (name, value) in [
        ("presence_penalty", fields.presence_penalty),
        ("frequency_penalty", fields.frequency_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ServingError::invalid(
                name,
                format!("{name} is not supported; leave it 0"),
            ));
        }
    }
    let stop = fields
        .stop
        .clone()
        .map(OneOrMany::into_vec)
        .unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ServingError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
        ));
    }
    Ok(Generation {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: fields.seed.map(|s| s as u64),
        },
        stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        stream: fields.stream.unwrap_or(false),
        include_usage: fields.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn generation_runtime(
    runtime: Runtime,
    route: &str,
) -> Result<(crate::generate::GenerationEngine, TextTokenizer), ServingError> {
    match runtime {
        Runtime::Generation { engine, tokenizer } => Ok((engine, tokenizer)),
        Runtime::Embedding { .. } => Err(ServingError::invalid(
            "model",
            format!("this model computes embeddings; it does not serve {route}"),
        )),
    }
}

/// Submits one sequence; its events arrive on the returned receiver.
fn submit(
    engine: &crate::generate::GenerationEngine,
    prompt: Vec<u32>,
    params: &Generation,
) -> Result<mpsc::UnboundedReceiver<GenEvent>, ServingError> {
    let (tx, rx) = mpsc::unbounded_channel();
    engine.submit(GenRequest {
        prompt,
        max_tokens: params.max_tokens,
        sampling: params.sampling,
        stop: params.stop.clone(),
        events: tx,
        arrived: Instant::now(),
    })?;
    Ok(rx)
}

/// Waits for a whole sequence: its text, why it ended and its usage.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
) -> Result<(String, FinishReason, Usage), ServingError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            GenEvent::Text(t) => text.push_str(&t),
            GenEvent::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => return Ok((text, reason, usage(prompt_tokens, completion_tokens))),
            GenEvent::Failed(e) => return Err(ServingError::model(e)),
        }
    }
    Err(ServingError::model("the generation engine stopped"))
}

fn usage(prompt: usize, completion: usize) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: Some(completion),
        total_tokens: prompt + completion,
    }
}

fn sum(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens + b.prompt_tokens,
        completion_tokens: Some(
            a.completion_tokens.unwrap_or(0) + b.completion_tokens.unwrap_or(0),
        ),
        total_tokens: a.total_tokens + b.total_tokens,
    }
}

/// One choice's stream of events, tagged with its index.
type Tagged = stream::BoxStream<'static, (usize, GenEvent)>;

fn tagged(index: usize, rx: mpsc::UnboundedReceiver<GenEvent>) -> Tagged {
    tokio_stream_from(rx).map(move |e| (index, e)).boxed()
}

fn tokio_stream_from(
    rx: mpsc::UnboundedReceiver<GenEvent>,
) -> impl Stream<Item = GenEvent> + Send + 'static {
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
}

/// Server-sent events from the choices' events: `chunk(index, text, finish)` makes
/// each JSON chunk; usage goes last when asked; then `[DONE]`.
fn sse(
    choices: Vec<mpsc::UnboundedReceiver<GenEvent>>,
    admission: Admission,
    include_usage: bool,
    first: Vec<Value>,
    chunk: impl Fn(usize, Option<&str>, Option<FinishReason>) -> Value + Send + Sync + 'static,
    usage_chunk: impl Fn(Usage) -> Value + Send + Sync + 'static,
) -> Response {
    let chunk = Arc::new(chunk);
    let usage_chunk = Arc::new(usage_chunk);
    let merged = stream::select_all(choices.into_iter().enumerate().map(|(i, rx)| tagged(i, rx)));
    struct St<S> {
        merged: S,
        total: Usage,
        done: bool,
        _admission: Admission,
    }
    let state = St {
        merged,
        total: Usage::default(),
        done: false,
        _admission: admission,
    };
    let head = stream::iter(
        first
            .into_iter()
            .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string()))),
    );
    let body = stream::unfold(state, move |mut st| {
        let chunk = chunk.clone();
        let usage_chunk = usage_chunk.clone();
        let out = async move {
            if st.done {
                return None;
            }
            loop {
                match st.merged.next().await {
                    Some((i, GenEvent::Text(t))) => {
                        if t.is_empty() {
                            continue;
                        }
                        return Some((vec![chunk(i, Some(&t), None)], st));
                    }
                    Some((
                        i,
                        GenEvent::Done {
                            reason,
                            prompt_tokens,
                            completion_tokens,
                        },
                    )) => {
                        st.total = sum(st.total, usage(prompt_tokens, completion_tokens));
                        return Some((vec![chunk(i, None, Some(reason))], st));
                    }
                    Some((_, GenEvent::Failed(e))) => {
                        st.done = true;
                        let err = ServingError::model(e).body();
                        return Some((
                            vec![serde_json::to_value(err).expect("errors serialize")],
                            st,
                        ));
                    }
                    None => {
                        st.done = true;
                        let mut last = Vec::new();
                        if include_usage {
                            last.push(usage_chunk(st.total));
                        }
                        return Some((last, st));
                    }
                }
            }
        };
        out
    })
    .flat_map(|values| {
        stream::iter(
            values
                .into_iter()
                .map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string()))),
        )
    });
    let done = stream::iter([Ok::<_, Infallible>(Event::default().data("[DONE]"))]);
    Sse::new(head.chain(body).chain(done))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let route = "completions";
    let result = async {
        let (req, admission, runtime) = admit::<CompletionRequest>(&app, route, &headers, body).await?;
        let (engine, tokenizer) = generation_runtime(runtime, "/v1/completions")?;
        if req.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ServingError::invalid("logprobs", "logprobs are not supported"));
        }
        let vocab = tokenizer.vocab_size();
        let prompts: Vec<(Vec<u32>, String)> = match &req.prompt {
            Prompt::Text(t) => vec![(tokenizer.encode(t, true)?, t.clone())],
            Prompt::Texts(ts) => ts
                .iter()
                .map(|t| Ok((tokenizer.encode(t, true)?, t.clone())))
                .collect::<Result<_, ServingError>>()?,
            Prompt::Tokens(ids) => vec![(ids.clone(), tokenizer.decode(ids).unwrap_or_default())],
            Prompt::TokenLists(lists) => lists
                .iter()
                .map(|ids| (ids.clone(), tokenizer.decode(ids).unwrap_or_default()))
                .collect(),
        };
        if prompts.is_empty() || prompts.iter().any(|(ids, _)| ids.is_empty()) {
            return Err(ServingError::invalid("prompt", "prompt must not be empty"));
        }
        if let Some(bad) = prompts.iter().flat_map(|(ids, _)| ids).find(|&&t| t as usize >= vocab) {
            return Err(ServingError::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let longest = prompts.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let params = generation_params(&req.sampling, req.sampling.max_tokens, 16, longest, engine.context())?;
        let echo = req.echo.unwrap_or(false);
        let receivers = prompts
            .iter()
            .map(|(ids, _)| submit(&engine, ids.clone(), &params))
            .collect::<Result<Vec<_>, _>>()?;
        let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
        let created = crate::openai::unix_now();
        let model = app.shown.clone();
        if params.stream {
            let echoes: Vec<Value> = if echo {
                prompts
                    .iter()
                    .enumerate()
                    .map(|(i, (_, text))| completion_chunk(&id, created, &model, i, Some(text), None))
                    .collect()
            } else {
                Vec::new()
            };
            let (id2, model2) = (id.clone(), model.clone());
            return Ok(sse(
                receivers,
                admission,
                params.include_usage,
                echoes,
                move |i, text, finish| completion_chunk(&id, created, &model, i, text, finish),
                move |u| json!({"id": id2, "object": "text_completion", "created": created, "model": model2, "choices": [], "usage": u}),
            ));
        }
        let mut choices = Vec::new();
        let mut total = Usage::default();
        for (i, rx) in receivers.into_iter().enumerate() {
            let (text, reason, u) = collect(rx).await?;
            total = sum(total, u);
            let text = if echo { format!("{}{text}", prompts[i].1) } else { text };
            choices.push(json!({"index": i, "text": text, "finish_reason": reason.as_str(), "logprobs": null}));
        }
        drop(admission);
        Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": total,
        }))
        .into_response())
    }
    .await;
    answer(&app, route, result)
}

fn completion_chunk(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
    text: Option<&str>,
    finish: Option<FinishReason>,
) -> Value {
    json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text.unwrap_or(""), "finish_reason": finish.map(FinishReason::as_str), "logprobs": null}],
    })
}

fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish: Option<FinishReason>,
) -> Value {
    json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish.map(FinishReason::as_str), "logprobs": null}],
    })
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let route = "chat_completions";
    let result = async {
        let (req, admission, runtime) = admit::<ChatRequest>(&app, route, &headers, body).await?;
        let (engine, tokenizer) = generation_runtime(runtime, "/v1/chat/completions")?;
        if req.logprobs == Some(true) {
            return Err(ServingError::invalid("logprobs", "logprobs are not supported"));
        }
        if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ServingError::invalid("tools", "tools are not supported"));
        }
        let messages = req.chat_messages()?;
        let text = tokenizer.apply_chat_template(&messages, true)?;
        let prompt = tokenizer.encode(&text, false)?;
        if prompt.is_empty() {
            return Err(ServingError::invalid("messages", "the conversation encodes to no tokens"));
        }
        let max = req.max_completion_tokens.or(req.sampling.max_tokens);
        let params = generation_params(&req.sampling, max, usize::MAX, prompt.len(), engine.context())?;
        let rx = submit(&engine, prompt, &params)?;
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = crate::openai::unix_now();
        let model = app.shown.clone();
        if params.stream {
            let first = vec![chat_chunk(&id, created, &model, json!({"role": "assistant", "content": ""}), None)];
            let (id2, model2) = (id.clone(), model.clone());
            return Ok(sse(
                vec![rx],
                admission,
                params.include_usage,
                first,
                move |_, text, finish| {
                    let delta = match text {
                        Some(t) => json!({"content": t}),
                        None => json!({}),
                    };
                    chat_chunk(&id, created, &model, delta, finish)
                },
                move |u| json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2, "choices": [], "usage": u}),
            ));
        }
        let (text, reason, usage) = collect(rx).await?;
        drop(admission);
        Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason.as_str(), "logprobs": null}],
            "usage": usage,
        }))
        .into_response())
    }
    .await;
    answer(&app, route, result)
}

async fn embeddings(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let route = "embeddings";
    let result = async {
        let (req, admission, runtime) =
            admit::<EmbeddingRequest>(&app, route, &headers, body).await?;
        let Runtime::Embedding {
            engine,
            tokenizer,
            max_tokens,
            dimensions,
        } = runtime
        else {
            return Err(ServingError::invalid(
                "model",
                "this model generates text; it does not serve /v1/embeddings",
            ));
        };
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ServingError::invalid(
                    "encoding_format",
                    format!("encoding_format must be float or base64, got `{other}`"),
                ))
            }
        };
        if let Some(d) = req.dimensions {
            if d != dimensions as i64 {
                return Err(ServingError::invalid(
                    "dimensions",
                    format!(
                        "this model's embeddings have {dimensions} dimensions; it cannot give {d}"
                    ),
                ));
            }
        }
        let inputs: Vec<Vec<u32>> = match &req.input {
            EmbeddingInput::Text(t) => vec![encode_input(&tokenizer, t)?],
            EmbeddingInput::Texts(ts) => ts
                .iter()
                .map(|t| encode_input(&tokenizer, t))
                .collect::<Result<_, _>>()?,
            EmbeddingInput::Tokens(ids) => vec![ids.clone()],
            EmbeddingInput::TokenLists(lists) => lists.clone(),
        };
        if inputs.is_empty() || inputs.iter().any(Vec::is_empty) {
            return Err(ServingError::invalid("input", "input must not be empty"));
        }
        let vocab = tokenizer.vocab_size();
        if let Some(bad) = inputs.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ServingError::invalid(
                "input",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        if let Some((i, long)) = inputs
            .iter()
            .enumerate()
            .find(|(_, ids)| ids.len() > max_tokens)
        {
            return Err(ServingError::ContextLength(format!(
                "input {i} has {} tokens; this model takes at most {max_tokens}",
                long.len()
            )));
        }
        let tokens: usize = inputs.iter().map(Vec::len).sum();
        app.metrics.tokens_in.inc_by(tokens as u64);
        let (tx, rx) = tokio::sync::oneshot::channel();
        engine.submit(crate::embed::EmbedRequest { inputs, reply: tx })?;
        let vectors = rx
            .await
            .map_err(|_| ServingError::model("the embedding engine stopped"))??;
        drop(admission);
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(Json(json!({
            "object": "list", "data": data, "model": app.shown,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
    .await;
    answer(&app, route, result)
}

fn encode_input(tokenizer: &TextTokenizer, text: &str) -> Result<Vec<u32>, ServingError> {
    if text.is_empty() {
        return Err(ServingError::invalid(
            "input",
            "input strings must not be empty",
        ));
    }
    tokenizer.encode(text, true)
}
