//! A BERT config.json, with BERT's defaults for what is often left out, checked
//! into the shape the encoder is built to.

use super::*;

/// The fields of a BERT config.json this module reads, with BERT's defaults for
/// the ones that are often left out.
#[derive(Debug, Deserialize)]
pub(super) struct BertConfigFile {
    pub(super) vocab_size: usize,
    pub(super) hidden_size: usize,
    pub(super) num_hidden_layers: usize,
    pub(super) num_attention_heads: usize,
    pub(super) intermediate_size: usize,
    #[serde(default = "default_act")]
    pub(super) hidden_act: String,
    #[serde(default = "default_max_position")]
    pub(super) max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub(super) type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub(super) layer_norm_eps: f64,
    #[serde(default)]
    pub(super) position_embedding_type: Option<String>,
    #[serde(default)]
    pub(super) model_type: Option<String>,
}

pub(super) fn default_act() -> String {
    "gelu".into()
}
pub(super) fn default_max_position() -> usize {
    512
}
pub(super) fn default_type_vocab() -> usize {
    2
}
pub(super) fn default_eps() -> f64 {
    1e-12
}

/// The encoder's shape, checked.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) vocab_size: usize,
    pub(super) hidden_size: usize,
    pub(super) num_hidden_layers: usize,
    pub(super) num_attention_heads: usize,
    pub(super) intermediate_size: usize,
    /// The activation between the two feed-forward projections.
    pub(super) activation: Activation,
    pub(super) max_position_embeddings: usize,
    pub(super) type_vocab_size: usize,
    pub(super) layer_norm_eps: f64,
    pub(super) model_type: Option<String>,
}

impl BertConfigFile {
    pub(super) fn to_config(&self) -> Result<Config, ServingError> {
        let activation = match self.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(ServingError::model(format!(
                    "config.json: unsupported hidden_act {other:?}"
                )))
            }
        };
        match self.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(ServingError::model(format!(
                    "config.json: unsupported position_embedding_type {other:?}"
                )))
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ServingError::model(format!(
                "config.json: hidden_size {} does not split into {} attention heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.type_vocab_size == 0 {
            return Err(ServingError::model(
                "config.json: type_vocab_size is 0; token type 0 needs an embedding",
            ));
        }
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            activation,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            layer_norm_eps: self.layer_norm_eps,
            model_type: self.model_type.clone(),
        })
    }
}
