//! `/v1/completions` and `/v1/chat/completions`: requests checked into generation
//! parameters, submitted to the engine, and answered whole or as server-sent events.

use super::{admit, answer, unix_now, Admission, App, MAX_STOP};
use crate::generate::{FinishReason, GenEvent, GenRequest};
use crate::loader::Runtime;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;
use crate::tokenizer::TextTokenizer;
use crate::ServingError;
use aigrid_api::openai::{
    ChatRequest, CompletionRequest, Content, OneOrMany, Prompt, SamplingFields, Usage,
};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

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

pub(super) async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
        let created = unix_now();
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

pub(super) async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
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
        let messages = chat_messages(&req)?;
        let text = tokenizer.apply_chat_template(&messages, true)?;
        let prompt = tokenizer.encode(&text, false)?;
        if prompt.is_empty() {
            return Err(ServingError::invalid("messages", "the conversation encodes to no tokens"));
        }
        let max = req.max_completion_tokens.or(req.sampling.max_tokens);
        let params = generation_params(&req.sampling, max, usize::MAX, prompt.len(), engine.context())?;
        let rx = submit(&engine, prompt, &params)?;
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = unix_now();
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

/// The messages of a chat request as the chat template takes them.
fn chat_messages(request: &ChatRequest) -> Result<Vec<ChatMessage>, ServingError> {
    const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
    if request.messages.is_empty() {
        return Err(ServingError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    request.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ServingError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].role `{}` is not one of {}",
                        m.role,
                        ROLES.join(", ")
                    ),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ServingError::invalid(
                                    "messages",
                                    format!(
                                        "messages[{i}]: content part `{kind}` is not supported; only text"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}
