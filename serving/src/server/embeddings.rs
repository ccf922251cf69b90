//! `/v1/embeddings`: inputs tokenized, embedded by the engine, answered as floats
//! or base64.

use super::{admit, answer, App};
use crate::loader::Runtime;
use crate::tokenizer::TextTokenizer;
use crate::ServingError;
use aigrid_api::openai::{EmbeddingInput, EmbeddingRequest};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};
use std::sync::Arc;

pub(super) async fn embeddings(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
        let truncate = req.truncate.unwrap_or(app.limits.auto_truncate);
        let cut = truncate.then_some(max_tokens);
        let mut inputs: Vec<Vec<u32>> = match &req.input {
            EmbeddingInput::Text(t) => vec![encode_input(&tokenizer, t, cut)?],
            EmbeddingInput::Texts(ts) => ts
                .iter()
                .map(|t| encode_input(&tokenizer, t, cut))
                .collect::<Result<_, _>>()?,
            EmbeddingInput::Tokens(ids) => vec![ids.clone()],
            EmbeddingInput::TokenLists(lists) => lists.clone(),
        };
        if truncate {
            // Token ids are the caller's own: cut as given.
            inputs.iter_mut().for_each(|ids| ids.truncate(max_tokens));
        }
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
                "input {i} has {} tokens; this model takes at most {max_tokens} (send \
                 \"truncate\": true to embed its first {max_tokens}, or serve with \
                 --auto-truncate)",
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

/// The ids of one text input, cut to `cut` tokens (special tokens kept) when given.
fn encode_input(
    tokenizer: &TextTokenizer,
    text: &str,
    cut: Option<usize>,
) -> Result<Vec<u32>, ServingError> {
    if text.is_empty() {
        return Err(ServingError::invalid(
            "input",
            "input strings must not be empty",
        ));
    }
    match cut {
        Some(max) => tokenizer.encode_truncated(text, max),
        None => tokenizer.encode(text, true),
    }
}
