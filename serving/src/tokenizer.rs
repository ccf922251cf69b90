//! Text to token ids and back, streaming detokenization, and chat templates.
//!
//! A [`TextTokenizer`] is built from a model's `tokenizer.json` plus the optional
//! `tokenizer_config.json`, `generation_config.json` and `config.json`, because the
//! facts a server needs are spread over all four: the end-of-sequence ids (any of
//! them ends a generation), the special token strings and the chat template.
//!
//! The tokenizer's own padding and truncation are switched off: batching code pads
//! by itself (all-MiniLM-L6-v2's tokenizer.json would otherwise pad every input to
//! 128 tokens), and silently truncating a prompt would hide a context-length error.

use std::fmt;
use std::sync::Arc;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::ServingError;

/// One message of a chat conversation, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

/// The name chat templates are registered under in the template environment.
const TEMPLATE_NAME: &str = "chat";

/// A model's tokenizer with what the server needs around it; cheap to clone.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
    /// `None`: the model has no chat template; `Some(Err)`: it has one that does
    /// not compile, kept so every chat request says why.
    template: Option<Result<Environment<'static>, String>>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_ids", &self.inner.eos_ids)
            .field("has_chat_template", &self.has_chat_template())
            .finish()
    }
}

impl TextTokenizer {
    /// tokenizer.json bytes, plus optional tokenizer_config.json,
    /// generation_config.json and config.json bytes.
    pub fn new(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        generation_config: Option<&[u8]>,
        config_json: Option<&[u8]>,
    ) -> Result<Self, ServingError> {
        let mut tokenizer = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| ServingError::model(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ServingError::model(format!("tokenizer.json: {e}")))?;

        let tokenizer_config = parse_json("tokenizer_config.json", tokenizer_config)?;
        let generation_config = parse_json("generation_config.json", generation_config)?;
        let config_json = parse_json("config.json", config_json)?;

        let bos_token = special_token(&tokenizer_config, "bos_token").unwrap_or_default();
        let eos_token = special_token(&tokenizer_config, "eos_token").unwrap_or_default();

        let mut eos_ids = Vec::new();
        for config in [&generation_config, &config_json] {
            push_ids(&mut eos_ids, config.get("eos_token_id"));
        }
        if let Some(id) = tokenizer.token_to_id(&eos_token) {
            push_unique(&mut eos_ids, id);
        }

        let template = chat_template(&tokenizer_config)?.map(compile_template);
        if let Some(Err(e)) = &template {
            tracing::warn!("the chat template does not compile: {e}");
        }

        Ok(TextTokenizer {
            inner: Arc::new(Inner {
                tokenizer,
                eos_ids,
                bos_token,
                eos_token,
                template,
            }),
        })
    }

    /// The ids of `text`, with the tokenizer's special tokens (BOS, CLS/SEP) when
    /// `add_special_tokens` is true.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ServingError> {
        let encoding = self
            .inner
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| ServingError::model(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ids of `text` with the model's special tokens, its own tokens cut at the
    /// end so that all together are at most `max`.
    pub fn encode_truncated(&self, text: &str, max: usize) -> Result<Vec<u32>, ServingError> {
        use tokenizers::PostProcessor as _;
        let tokenizer = &self.inner.tokenizer;
        let error = |e: tokenizers::Error| ServingError::model(format!("tokenizing: {e}"));
        let mut encoding = tokenizer.encode_fast(text, false).map_err(error)?;
        let added = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        let room = max.saturating_sub(added).max(1);
        if encoding.len() > room {
            encoding.truncate(room, 0, tokenizers::TruncationDirection::Right);
        }
        let encoding = tokenizer
            .post_process(encoding, None, true)
            .map_err(error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ServingError> {
        self.inner
            .tokenizer
            .decode(ids, true)
            .map_err(|e| ServingError::model(format!("detokenizing: {e}")))
    }

    /// The number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    /// Every id that ends a generation: generation_config.json's and config.json's
    /// `eos_token_id` (one id or a list) and tokenizer_config.json's `eos_token`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    /// Whether tokenizer_config.json carries a chat template that compiles.
    pub fn has_chat_template(&self) -> bool {
        matches!(self.inner.template, Some(Ok(_)))
    }

    /// Renders tokenizer_config.json's chat template for `messages`.
    ///
    /// The template sees `messages`, `add_generation_prompt`, `bos_token` and
    /// `eos_token`, a `raise_exception` function, Python string methods and
    /// `tojson`, with Jinja's `trim_blocks` and `lstrip_blocks` on, as Hugging
    /// Face's transformers renders them.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ServingError> {
        let env = match &self.inner.template {
            None => {
                return Err(ServingError::invalid(
                    "messages",
                    "this model has no chat template; use /v1/completions",
                ))
            }
            Some(Err(e)) => {
                return Err(ServingError::invalid(
                    "messages",
                    format!("this model's chat template does not compile: {e}"),
                ))
            }
            Some(Ok(env)) => env,
        };
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ServingError::invalid("messages", template_message(&e)))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.inner.bos_token,
                eos_token => &self.inner.eos_token,
            })
            .map_err(|e| ServingError::invalid("messages", template_message(&e)))
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder {
            tokenizer: self.clone(),
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }
}

/// Streaming detokenization: push token ids one at a time, get the new text.
///
/// Decoding token by token is wrong in two ways: a multi-byte character split over
/// tokens decodes to U+FFFD until its last byte arrives, and decoders such as
/// SentencePiece's drop the leading space of the first token they see. Each step is
/// `tokenizers`' [`DecodeStream`](tokenizers::DecodeStream) step, which decodes a
/// small window of the latest ids and returns what it adds to the text already
/// returned, holding back text that ends in U+FFFD until more ids complete it;
/// [`finish`] flushes what is held back. The concatenation of every `push` and
/// `finish` equals [`TextTokenizer::decode`] of all the ids.
///
/// `DecodeStream` itself borrows its tokenizer, and a decoder lives in the
/// generation engine beside the tokenizer it would borrow, so this keeps the
/// stream's state and takes the same step through
/// [`step_decode_stream`](tokenizers::tokenizer::step_decode_stream).
///
/// [`finish`]: IncrementalDecoder::finish
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: TextTokenizer,
    /// The window: the ids of `prefix` and those after it.
    ids: Vec<u32>,
    /// The text of the window's ids already returned.
    prefix: String,
    /// Where in `ids` the ids of `prefix` end.
    prefix_index: usize,
}

impl IncrementalDecoder {
    /// Adds one token; returns the text it completes, possibly empty.
    pub fn push(&mut self, token: u32) -> Result<String, ServingError> {
        let step = tokenizers::tokenizer::step_decode_stream(
            &self.tokenizer.inner.tokenizer,
            vec![token],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        );
        match step {
            Ok(text) => Ok(text.unwrap_or_default()),
            // The window's text no longer starts with what was returned (a decoder
            // that rewrites earlier text): hold it back, as for an incomplete
            // character, until `finish`.
            Err(e) if e.is::<tokenizers::tokenizer::DecodeStreamError>() => Ok(String::new()),
            Err(e) => Err(ServingError::model(format!("detokenizing: {e}"))),
        }
    }

    /// Ends the stream: returns the text held back (an incomplete character
    /// decodes to U+FFFD here) and resets the decoder.
    pub fn finish(&mut self) -> Result<String, ServingError> {
        let text = self.tokenizer.decode(&self.ids)?;
        let common = common_prefix_len(&self.prefix, &text);
        self.ids.clear();
        self.prefix.clear();
        self.prefix_index = 0;
        Ok(text[common..].to_owned())
    }
}

/// The byte length of the longest common prefix of `a` and `b` that ends on a
/// character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

fn parse_json(name: &str, bytes: Option<&[u8]>) -> Result<serde_json::Value, ServingError> {
    match bytes {
        None => Ok(serde_json::Value::Null),
        Some(bytes) => {
            serde_json::from_slice(bytes).map_err(|e| ServingError::model(format!("{name}: {e}")))
        }
    }
}

/// A special token string of tokenizer_config.json: either `"<s>"` or an added
/// token object `{"content": "<s>", ...}`.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn push_ids(ids: &mut Vec<u32>, value: Option<&serde_json::Value>) {
    let as_id = |v: &serde_json::Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Some(serde_json::Value::Array(list)) => {
            for id in list.iter().filter_map(as_id) {
                push_unique(ids, id);
            }
        }
        Some(v) => {
            if let Some(id) = as_id(v) {
                push_unique(ids, id);
            }
        }
        None => {}
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of named templates
/// of which the one named `default` is used.
fn chat_template(config: &serde_json::Value) -> Result<Option<String>, ServingError> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)),
        Some(_) => Err(ServingError::model(
            "tokenizer_config.json: chat_template is neither a string nor a list",
        )),
    }
}

fn compile_template(source: String) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_template_owned(TEMPLATE_NAME, source)
        .map_err(|e| template_message(&e))?;
    Ok(env)
}

/// What templates call to reject a conversation, e.g. roles that do not alternate.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The message a client should see: the template's own words for
/// `raise_exception`, minijinja's description otherwise.
fn template_message(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_owned(),
        _ => format!("chat template: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{write_tiny_llama, TinyLlama};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn tiny() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(dir.path(), &TinyLlama::default()).unwrap();
        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        TextTokenizer::new(
            &read("tokenizer.json"),
            Some(&read("tokenizer_config.json")),
            Some(&read("generation_config.json")),
            Some(&read("config.json")),
        )
        .unwrap()
    }

    fn stream(tok: &TextTokenizer, ids: &[u32]) -> String {
        let mut decoder = tok.decoder();
        let mut out = String::new();
        for &id in ids {
            out.push_str(&decoder.push(id).unwrap());
        }
        out.push_str(&decoder.finish().unwrap());
        out
    }

    #[test]
    fn streaming_equals_decoding_multibyte_text() {
        let tok = tiny();
        for text in [
            "héllo wörld 日本語 🎉",
            "plain ascii, nothing special",
            "🎉🎉 mixed: Ω≈ç√ and 中文字符 again",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
            assert_eq!(stream(&tok, &ids), text);
        }
    }

    #[test]
    fn streaming_holds_back_incomplete_characters() {
        let tok = tiny();
        let ids = tok.encode("🎉", false).unwrap();
        assert!(ids.len() > 1, "the emoji should take several byte tokens");
        let mut decoder = tok.decoder();
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(decoder.push(id).unwrap(), "");
        }
        assert_eq!(decoder.push(ids[ids.len() - 1]).unwrap(), "🎉");
        assert_eq!(decoder.finish().unwrap(), "");
    }

    #[test]
    fn streaming_equals_decoding_random_ids() {
        let tok = tiny();
        let vocab = tok.vocab_size() as u32;
        let seed = 7;
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..200 {
            let len = rng.random_range(0..40);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            assert_eq!(
                stream(&tok, &ids),
                tok.decode(&ids).unwrap(),
                "seed {seed} round {round} ids {ids:?}"
            );
        }
    }

    #[test]
    fn eos_ids_are_the_union_of_all_configs() {
        let tok = tiny();
        let end = tok.encode("</s>", false).unwrap();
        let im_end = tok.encode("<|im_end|>", false).unwrap();
        assert_eq!(end.len(), 1);
        assert_eq!(im_end.len(), 1);
        assert_eq!(tok.eos_ids(), &[end[0], im_end[0]]);
        let bos = tok.encode("", true).unwrap();
        assert_eq!(bos, tok.encode("<s>", false).unwrap());
    }

    #[test]
    fn chatml_template_renders() {
        let tok = tiny();
        assert!(tok.has_chat_template());
        let messages = [
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi!".into(),
            },
        ];
        let prompt = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let prompt = tok.apply_chat_template(&messages[1..], false).unwrap();
        assert_eq!(prompt, "<|im_start|>user\nHi!<|im_end|>\n");
    }

    fn with_template(config: serde_json::Value) -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(dir.path(), &TinyLlama::default()).unwrap();
        let json = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
        TextTokenizer::new(&json, Some(config.to_string().as_bytes()), None, None).unwrap()
    }

    #[test]
    fn templates_get_python_methods_tojson_and_exceptions() {
        let tok = with_template(serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "unused"},
                {"name": "default", "template":
                    "{{ bos_token }}{% for m in messages %}\
                     {% if m.role == 'system' %}{{ raise_exception('no system messages, ' + m.content.strip()) }}{% endif %}\
                     [{{ m.role.upper() }}] {{ m.content.strip() | tojson }}\n\
                     {% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"}
            ]
        }));
        assert_eq!(tok.eos_ids(), &[tok.encode("</s>", false).unwrap()[0]]);
        let user = ChatMessage {
            role: "user".into(),
            content: "  say \"hi\"  ".into(),
        };
        let prompt = tok
            .apply_chat_template(std::slice::from_ref(&user), true)
            .unwrap();
        assert_eq!(prompt, "<s>[USER] \"say \\\"hi\\\"\"\n</s>");

        let system = ChatMessage {
            role: "system".into(),
            content: " hush ".into(),
        };
        let err = tok.apply_chat_template(&[system, user], true).unwrap_err();
        match err {
            ServingError::InvalidRequest { message, param } => {
                assert_eq!(message, "no system messages, hush");
                assert_eq!(param.as_deref(), Some("messages"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn no_template_is_an_invalid_request() {
        let tok = with_template(serde_json::json!({"eos_token": "</s>"}));
        assert!(!tok.has_chat_template());
        let err = tok.apply_chat_template(&[], true).unwrap_err();
        assert!(err.to_string().contains("no chat template"), "{err}");

        let tok = with_template(serde_json::json!({"chat_template": "{% for %}"}));
        assert!(!tok.has_chat_template());
        let err = tok.apply_chat_template(&[], true).unwrap_err();
        assert!(matches!(err, ServingError::InvalidRequest { .. }), "{err}");
    }

    #[test]
    fn padding_and_truncation_are_off() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_llama(dir.path(), &TinyLlama::default()).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("tokenizer.json")).unwrap())
                .unwrap();
        json["padding"] = serde_json::json!({
            "strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 0, "pad_type_id": 0, "pad_token": "<s>"
        });
        json["truncation"] = serde_json::json!({
            "direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0
        });
        let tok = TextTokenizer::new(json.to_string().as_bytes(), None, None, None).unwrap();
        let ids = tok
            .encode("a sentence that is longer than four tokens", false)
            .unwrap();
        assert!(ids.len() > 4 && ids.len() < 128, "{}", ids.len());
    }
}
