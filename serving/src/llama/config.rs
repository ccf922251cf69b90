//! The shape of a Llama-family model, from a Hugging Face config.json or a GGUF
//! file's metadata.

use super::*;

/// The shape of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f32,
    /// Llama 3 rotary frequency scaling, when the model uses it.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence (prompt and completion).
    pub max_position_embeddings: usize,
    /// Whether the output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v projections carry a bias (qwen2).
    pub attention_bias: bool,
    /// Mistral's attention window.
    pub sliding_window: Option<usize>,
    /// Rotary pairs interleaved (GGUF llama) rather than split in halves (Hugging Face).
    pub rope_interleaved: bool,
}

/// Llama 3's rotary frequency scaling (`rope_scaling` with `rope_type: llama3`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    /// Scaling factor for low frequencies.
    pub factor: f32,
    /// Wavelength bound below which frequencies are scaled fully.
    pub low_freq_factor: f32,
    /// Wavelength bound above which frequencies are kept.
    pub high_freq_factor: f32,
    /// Context the model was trained with.
    pub original_max_position_embeddings: usize,
}

#[derive(Deserialize)]
pub(super) struct HfConfig {
    #[serde(default)]
    pub(super) model_type: Option<String>,
    pub(super) vocab_size: usize,
    pub(super) hidden_size: usize,
    pub(super) intermediate_size: usize,
    pub(super) num_hidden_layers: usize,
    pub(super) num_attention_heads: usize,
    #[serde(default)]
    pub(super) num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub(super) head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub(super) rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub(super) rope_theta: f32,
    #[serde(default)]
    pub(super) rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_position")]
    pub(super) max_position_embeddings: usize,
    #[serde(default)]
    pub(super) tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub(super) attention_bias: Option<bool>,
    #[serde(default)]
    pub(super) sliding_window: Option<usize>,
    #[serde(default)]
    pub(super) use_sliding_window: Option<bool>,
}

pub(super) fn default_eps() -> f64 {
    1e-6
}
pub(super) fn default_theta() -> f32 {
    10_000.0
}
pub(super) fn default_max_position() -> usize {
    4096
}

/// Architectures this decoder runs, as `model_type` names them.
pub const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

impl LlamaConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(bytes: &[u8]) -> Result<Self, ServingError> {
        let hf: HfConfig = serde_json::from_slice(bytes)
            .map_err(|e| ServingError::model(format!("config.json: {e}")))?;
        let architecture = hf.model_type.unwrap_or_else(|| "llama".into());
        if !ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(ServingError::model(format!(
                "config.json: model_type `{architecture}` is not a text-generation architecture served here (llama, mistral, qwen2)"
            )));
        }
        let rope_scaling = match hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => {
                let kind = value
                    .get("rope_type")
                    .or_else(|| value.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(serde_json::from_value(value).map_err(|e| {
                        ServingError::model(format!("config.json: rope_scaling: {e}"))
                    })?),
                    other => {
                        return Err(ServingError::model(format!(
                            "config.json: rope_scaling type `{other}` is not supported"
                        )))
                    }
                }
            }
        };
        let qwen = architecture == "qwen2";
        let config = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: hf.attention_bias.unwrap_or(qwen),
            sliding_window: match (architecture.as_str(), hf.use_sliding_window) {
                (_, Some(false)) | ("llama", None) | ("qwen2", None) => None,
                _ => hf.sliding_window,
            },
            rope_interleaved: false,
            architecture,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the metadata of a GGUF file (`llama` and `qwen2` architectures).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ServingError> {
        let get = |key: &str| content.metadata.get(key);
        let architecture = get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "llama".into());
        if architecture != "llama" && architecture != "qwen2" {
            return Err(ServingError::model(format!(
                "GGUF architecture `{architecture}` is not served here (llama, qwen2)"
            )));
        }
        let int = |key: &str| -> Result<usize, ServingError> {
            let full = format!("{architecture}.{key}");
            get(&full)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| ServingError::model(format!("GGUF metadata lacks `{full}`")))
        };
        let float = |key: &str, default: f32| -> f32 {
            get(&format!("{architecture}.{key}"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(default)
        };
        let hidden_size = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let vocab_size = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| ServingError::model("GGUF file has no token_embd.weight"))?;
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: int("attention.head_count_kv").unwrap_or(heads),
            head_dim: hidden_size / heads.max(1),
            rms_norm_eps: f64::from(float("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta: float("rope.freq_base", 10_000.0),
            rope_scaling: None,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            rope_interleaved: architecture == "llama",
            architecture,
        };
        config.validate()?;
        Ok(config)
    }

    pub(super) fn validate(&self) -> Result<(), ServingError> {
        let bad = |what: &str| Err(ServingError::model(format!("model config: {what}")));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad("query heads must be a multiple of key/value heads");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("head width must be positive and even");
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocabulary, width and layers must be positive");
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive");
        }
        Ok(())
    }

    /// Bytes of KV cache one token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 4
    }
}
