//! OpenAI wire types: what `/v1/completions`, `/v1/chat/completions` and
//! `/v1/embeddings` take and answer. Fields OpenAI defines and this server does not
//! use are accepted and ignored, as OpenAI-compatible servers do; fields whose value
//! would change the answer in a way not supported here are refused.

use serde::{Deserialize, Serialize};

use crate::tokenizer::ChatMessage;
use crate::ServingError;

/// One string or several.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, Default)]
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
#[derive(Debug, Clone, Copy, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk carrying usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
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
    pub logprobs: Option<serde_json::Value>,
}

/// Message content: a string, or parts of which the text ones are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    /// `system`, `user`, `assistant`, `developer` or `tool`.
    pub role: String,
    /// The content; may be absent on assistant messages.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
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
    pub tools: Option<serde_json::Value>,
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ServingError> {
        const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
        if self.messages.is_empty() {
            return Err(ServingError::invalid(
                "messages",
                "messages must hold at least one message",
            ));
        }
        self.messages
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
}

/// Input of an embedding request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize)]
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
    /// Accepted for compatibility; ignored.
    #[serde(default)]
    pub user: Option<String>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    /// The name clients pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds the server started serving it.
    pub created: u64,
    /// Always `aigrid`.
    pub owned_by: String,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
