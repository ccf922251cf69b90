//! OpenAI wire types: what `/v1/models`, `/v1/completions`, `/v1/chat/completions`
//! and `/v1/embeddings` take and answer, and OpenAI's error envelope, which both the
//! model servers and the scheduler's `/v1` gateway send. Fields OpenAI defines and
//! aigrid does not use are accepted and ignored, as OpenAI-compatible servers do;
//! the model server refuses those whose value would change the answer in a way it
//! does not support.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One string or several.
#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A prompt: text, texts, token ids or lists of token ids.
#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// Parameters shared by completions and chat completions.
#[derive(Debug, Clone, Deserialize, Default, ToSchema)]
pub struct SamplingFields {
    /// Most tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus probability, (0, 1].
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Choices per prompt; only 1.
    #[serde(default)]
    pub n: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Up to 4 stop strings.
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    /// Seed for sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Accepted for compatibility; only 0 is supported.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Accepted for compatibility; only 0 is supported.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Accepted for compatibility; ignored.
    #[serde(default)]
    pub user: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Deserialize, Default, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk carrying usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The model's name or digest.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling and limits.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Put the prompt before the completion.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Log-probabilities are not produced here.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
}

/// Message content: a string, or parts of which the text ones are used.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RequestMessage {
    /// `system`, `user`, `assistant`, `developer` or `tool`.
    pub role: String,
    /// The content; may be absent on assistant messages.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatRequest {
    /// The model's name or digest.
    pub model: String,
    /// The conversation.
    pub messages: Vec<RequestMessage>,
    /// Sampling and limits.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Log-probabilities are not produced here.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Tools are not supported.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<serde_json::Value>,
}

/// Input of an embedding request.
#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One input as token ids.
    Tokens(Vec<u32>),
    /// Several inputs as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// The model's name or digest.
    pub model: String,
    /// What to embed.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Must equal the model's dimensions when given.
    #[serde(default)]
    pub dimensions: Option<i64>,
    /// Embed an input longer than the model takes by its first tokens (the model's
    /// special tokens kept), instead of refusing it; the server's `--auto-truncate`
    /// when absent (off by default), as text-embeddings-inference has it.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// Accepted for compatibility; ignored.
    #[serde(default)]
    pub user: Option<String>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, ToSchema)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (absent for embeddings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<usize>,
    /// Their sum.
    pub total_tokens: usize,
}

/// One model in `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ModelCard {
    /// The name clients pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds the server started serving it.
    pub created: u64,
    /// Always `aigrid`.
    pub owned_by: String,
    /// The model's digest, where the answering server knows it (the gateway does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// Why generation stopped: `stop` (end of sequence or a stop string) or `length`
/// (`max_tokens`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

impl FinishReason {
    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One choice of a [`Completion`] (or of a streamed chunk of one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CompletionChoice {
    /// Which prompt (and which of its `n`) it answers.
    pub index: usize,
    /// The text generated (in a chunk: the text since the last chunk).
    pub text: String,
    /// Why it stopped; `null` in a chunk while it goes on.
    pub finish_reason: Option<FinishReason>,
    /// Always `null`: log probabilities are not returned.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
}

/// `POST /v1/completions`' answer, or (with `stream`) one server-sent event of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Completion {
    /// The request's id, the same in every chunk.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model, as the request named it.
    pub model: String,
    /// One per prompt.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (in a stream: only in the last chunk, when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A chat message the model wrote (or, in a chunk, the part of it since the last
/// chunk: `role` only in the first).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChatMessage {
    /// Always `assistant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a [`ChatCompletion`]: `message` in a whole answer, `delta` in a
/// streamed chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChatChoice {
    /// Always 0: one choice per request.
    pub index: usize,
    /// The answer (a whole answer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatMessage>,
    /// The part of the answer since the last chunk (a streamed chunk only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatMessage>,
    /// Why it stopped; `null` in a chunk while it goes on.
    pub finish_reason: Option<FinishReason>,
    /// Always `null`: log probabilities are not returned.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
}

/// `POST /v1/chat/completions`' answer, or (with `stream`) one server-sent event
/// of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChatCompletion {
    /// The request's id, the same in every chunk.
    pub id: String,
    /// `chat.completion`, or `chat.completion.chunk` in a stream.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model, as the request named it.
    pub model: String,
    /// Always `null`.
    pub system_fingerprint: Option<String>,
    /// The answer (empty in a stream's usage chunk).
    pub choices: Vec<ChatChoice>,
    /// Token counts (in a stream: only in the last chunk, when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One vector: floats, or their little-endian f32 bytes in base64 when the request
/// asked for `encoding_format: "base64"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: "float"` (the default).
    Float(Vec<f32>),
    /// `encoding_format: "base64"`.
    Base64(String),
}

/// One input's embedding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    /// The input it embeds.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingVector,
}

/// `POST /v1/embeddings`' answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct EmbeddingList {
    /// Always `list`.
    pub object: String,
    /// One per input, in order.
    pub data: Vec<Embedding>,
    /// The model, as the server names it.
    pub model: String,
    /// Token counts (`completion_tokens` absent).
    pub usage: Usage,
}

/// OpenAI's error `type`. Which one an error has follows from its HTTP status
/// ([`OpenAiErrorType::for_status`]), so servers that answer in OpenAI's shape agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenAiErrorType {
    /// The request is wrong (4xx other than 429).
    InvalidRequest,
    /// Too many requests (429).
    RateLimit,
    /// The server failed or cannot answer now (5xx).
    Server,
}

impl OpenAiErrorType {
    /// The type OpenAI gives errors of HTTP status `status`.
    pub fn for_status(status: u16) -> OpenAiErrorType {
        match status {
            429 => OpenAiErrorType::RateLimit,
            500.. => OpenAiErrorType::Server,
            _ => OpenAiErrorType::InvalidRequest,
        }
    }

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            OpenAiErrorType::InvalidRequest => "invalid_request_error",
            OpenAiErrorType::RateLimit => "rate_limit_error",
            OpenAiErrorType::Server => "server_error",
        }
    }
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// What went wrong.
    pub error: OpenAiError,
}

/// The inside of an [`OpenAiErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OpenAiError {
    /// A sentence saying what is wrong.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`
    /// ([`OpenAiErrorType`]). A string, so a client reads types added later.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A stable code clients can match on (`model_not_found`, `model_not_ready`),
    /// where there is one.
    pub code: Option<String>,
}

impl OpenAiErrorBody {
    /// The body of an error of type `kind` (from the HTTP status:
    /// [`OpenAiErrorType::for_status`]) saying `message`, with its stable `code`.
    pub fn new(
        kind: OpenAiErrorType,
        message: impl Into<String>,
        code: Option<&str>,
    ) -> OpenAiErrorBody {
        OpenAiErrorBody {
            error: OpenAiError {
                message: message.into(),
                kind: kind.as_str().to_owned(),
                param: None,
                code: code.map(str::to_owned),
            },
        }
    }

    /// The same body naming the request field at fault.
    pub fn with_param(mut self, param: Option<impl Into<String>>) -> OpenAiErrorBody {
        self.error.param = param.map(Into::into);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_envelope_has_openais_shape() {
        let body = OpenAiErrorBody::new(
            OpenAiErrorType::for_status(404),
            "the model `x` does not exist",
            Some("model_not_found"),
        )
        .with_param(Some("model"));
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"error": {
                "message": "the model `x` does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }})
        );
        let none = OpenAiErrorBody::new(OpenAiErrorType::Server, "failed", None)
            .with_param(None::<String>);
        let json = serde_json::to_value(&none).unwrap();
        assert_eq!(json["error"]["param"], serde_json::Value::Null);
        assert_eq!(json["error"]["code"], serde_json::Value::Null);
        assert_eq!(json["error"]["type"], "server_error");
    }

    #[test]
    fn the_type_follows_the_status() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (404, "invalid_request_error"),
            (405, "invalid_request_error"),
            (413, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "server_error"),
            (503, "server_error"),
            (504, "server_error"),
        ] {
            assert_eq!(
                OpenAiErrorType::for_status(status).as_str(),
                kind,
                "{status}"
            );
        }
    }

    #[test]
    fn requests_parse_as_clients_send_them() {
        let chat: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "there"}]},
                {"role": "assistant"},
            ],
            "max_tokens": 5,
            "stream": true,
            "stop": "\n",
        }))
        .unwrap();
        assert_eq!(chat.sampling.max_tokens, Some(5));
        assert_eq!(chat.sampling.stop, Some(OneOrMany::One("\n".into())));
        assert!(chat.messages[2].content.is_none());
        let completion: CompletionRequest =
            serde_json::from_value(serde_json::json!({"model": "m", "prompt": [[1, 2], [3]]}))
                .unwrap();
        assert_eq!(
            completion.prompt,
            Prompt::TokenLists(vec![vec![1, 2], vec![3]])
        );
        let embedding: EmbeddingRequest =
            serde_json::from_value(serde_json::json!({"model": "m", "input": ["a", "b"]})).unwrap();
        assert_eq!(
            embedding.input,
            EmbeddingInput::Texts(vec!["a".into(), "b".into()])
        );
    }
}
