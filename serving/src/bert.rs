//! BERT-family sentence embeddings (all-MiniLM-L6-v2 and similar) with
//! sentence-transformers pooling and normalization.
//!
//! A sentence-transformers model is the BERT encoder followed by modules listed in
//! `modules.json`: a Pooling module that turns per-token vectors into one vector
//! (its `config.json` says how) and often a Normalize module. [`Pooling`] reads
//! those files; [`Embedder`] runs the encoder over a padded batch and pools over
//! the real tokens only, so a sentence embeds the same alone or in any batch.

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, HiddenAct, PositionEmbeddingType};
use serde::Deserialize;

use crate::error::ServingError;

/// How per-token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The mean over the real tokens.
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
    /// The element-wise maximum over the real tokens.
    Max,
}

/// A sentence-transformers pooling: the mode and whether vectors are scaled to
/// unit length (which makes the dot product equal the cosine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// How tokens are pooled.
    pub mode: PoolingMode,
    /// Whether the pooled vector is L2-normalized.
    pub normalize: bool,
}

/// One entry of sentence-transformers' `modules.json`.
#[derive(Debug, Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// sentence-transformers' Pooling `config.json`; modes it has that are not
/// supported here must be off.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PoolingConfig {
    pooling_mode_cls_token: bool,
    pooling_mode_mean_tokens: bool,
    pooling_mode_max_tokens: bool,
    pooling_mode_mean_sqrt_len_tokens: bool,
    pooling_mode_weightedmean_tokens: bool,
    pooling_mode_lasttoken: bool,
}

fn modules(modules_json: &[u8]) -> Result<Vec<Module>, ServingError> {
    serde_json::from_slice(modules_json)
        .map_err(|e| ServingError::model(format!("modules.json: {e}")))
}

/// Whether a module's `type` (e.g. `sentence_transformers.models.Pooling`) names
/// the class `class`.
fn is_class(module: &Module, class: &str) -> bool {
    module.kind.rsplit('.').next() == Some(class)
}

impl Pooling {
    /// From sentence-transformers files: `modules.json` (a
    /// `sentence_transformers.models.Normalize` module means normalize; the
    /// Pooling module's `path` holds its config) and that pooling config.json.
    /// With no modules.json: mean pooling, normalized. With no pooling config:
    /// mean pooling, sentence-transformers' default.
    pub fn from_files(
        modules_json: Option<&[u8]>,
        pooling_config: Option<&[u8]>,
    ) -> Result<Self, ServingError> {
        let normalize = match modules_json {
            None => true,
            Some(bytes) => modules(bytes)?.iter().any(|m| is_class(m, "Normalize")),
        };
        let mode = match pooling_config {
            None => PoolingMode::Mean,
            Some(bytes) => pooling_mode(bytes)?,
        };
        Ok(Pooling { mode, normalize })
    }

    /// The pooling config path modules.json names (e.g. `1_Pooling/config.json`),
    /// if any.
    pub fn config_path(modules_json: &[u8]) -> Result<Option<String>, ServingError> {
        Ok(modules(modules_json)?
            .iter()
            .find(|m| is_class(m, "Pooling"))
            .map(|m| {
                let dir = m.path.trim_matches('/');
                if dir.is_empty() {
                    "config.json".to_owned()
                } else {
                    format!("{dir}/config.json")
                }
            }))
    }
}

fn pooling_mode(bytes: &[u8]) -> Result<PoolingMode, ServingError> {
    let config: PoolingConfig = serde_json::from_slice(bytes)
        .map_err(|e| ServingError::model(format!("pooling config.json: {e}")))?;
    if config.pooling_mode_mean_sqrt_len_tokens
        || config.pooling_mode_weightedmean_tokens
        || config.pooling_mode_lasttoken
    {
        return Err(ServingError::model(
            "pooling config.json: only mean, cls and max pooling are supported",
        ));
    }
    match (
        config.pooling_mode_mean_tokens,
        config.pooling_mode_cls_token,
        config.pooling_mode_max_tokens,
    ) {
        (true, false, false) => Ok(PoolingMode::Mean),
        (false, true, false) => Ok(PoolingMode::Cls),
        (false, false, true) => Ok(PoolingMode::Max),
        (false, false, false) => Err(ServingError::model(
            "pooling config.json: no pooling mode is on",
        )),
        _ => Err(ServingError::model(
            "pooling config.json: concatenated pooling modes are not supported",
        )),
    }
}

/// The fields of a BERT config.json this module reads, with BERT's defaults for
/// the ones that are often left out.
#[derive(Debug, Deserialize)]
struct BertConfigFile {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_max_position")]
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_position() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfigFile {
    fn to_config(&self) -> Result<Config, ServingError> {
        let hidden_act = match self.hidden_act.as_str() {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => HiddenAct::GeluApproximate,
            "relu" => HiddenAct::Relu,
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
        Ok(Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act,
            // Inference only: dropout is never applied.
            hidden_dropout_prob: 0.0,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            initializer_range: 0.02,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_token_id.unwrap_or(0) as usize,
            position_embedding_type: PositionEmbeddingType::Absolute,
            use_cache: false,
            classifier_dropout: None,
            model_type: self.model_type.clone(),
        })
    }
}

/// A BERT encoder with its pooling: token ids in, one vector per input out.
pub struct Embedder {
    model: BertModel,
    pooling: Pooling,
    device: Device,
    vocab_size: usize,
    hidden_size: usize,
    max_position: usize,
    pad_token_id: u32,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("pooling", &self.pooling)
            .field("device", &self.device)
            .field("dimensions", &self.hidden_size)
            .field("max_tokens", &self.max_position)
            .finish()
    }
}

impl Embedder {
    /// Loads the encoder from `vb` (tensor names with or without the `bert.`
    /// prefix) and `config_json`, the model's config.json.
    pub fn new(vb: VarBuilder, config_json: &[u8], pooling: Pooling) -> Result<Self, ServingError> {
        let file: BertConfigFile = serde_json::from_slice(config_json)
            .map_err(|e| ServingError::model(format!("config.json: {e}")))?;
        let config = file.to_config()?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let device = vb.device().clone();
        let model = BertModel::load(vb, &config)?;
        Ok(Embedder {
            model,
            pooling,
            device,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            max_position: config.max_position_embeddings,
            pad_token_id: file.pad_token_id.unwrap_or(0),
        })
    }

    /// The longest input in tokens (`max_position_embeddings`).
    pub fn max_tokens(&self) -> usize {
        self.max_position
    }

    /// The length of the vectors (`hidden_size`).
    pub fn dimensions(&self) -> usize {
        self.hidden_size
    }

    /// Where the model's tensors live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds a batch of token-id sequences of any lengths in one forward pass.
    ///
    /// Shorter sequences are padded with `pad_token_id` and masked out of attention
    /// and pooling. Returns one vector per input, in order.
    pub fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ServingError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for (i, ids) in batch.iter().enumerate() {
            if ids.is_empty() {
                return Err(ServingError::invalid(
                    "input",
                    format!("input {i} has no tokens"),
                ));
            }
            if ids.len() > self.max_position {
                return Err(ServingError::ContextLength(format!(
                    "input {i} has {} tokens; this model takes at most {}",
                    ids.len(),
                    self.max_position
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(ServingError::invalid(
                    "input",
                    format!(
                        "input {i} has token id {bad}; the vocabulary has {} ids",
                        self.vocab_size
                    ),
                ));
            }
        }

        let rows = batch.len();
        let len = batch.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows * len);
        let mut mask = Vec::with_capacity(rows * len);
        for seq in batch {
            ids.extend_from_slice(seq);
            ids.resize(ids.len() + len - seq.len(), self.pad_token_id);
            mask.extend(std::iter::repeat_n(1u32, seq.len()));
            mask.extend(std::iter::repeat_n(0u32, len - seq.len()));
        }
        let ids = Tensor::from_vec(ids, (rows, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, len), &self.device)?;
        let token_types = ids.zeros_like()?;

        let hidden = self
            .model
            .forward(&ids, &token_types, Some(&mask))?
            .to_dtype(DType::F32)?;
        // [rows, len, 1]: 1 for real tokens, 0 for padding.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let pooled = match self.pooling.mode {
            PoolingMode::Mean => {
                let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
                let count = mask.sum(1)?;
                sum.broadcast_div(&count)?
            }
            PoolingMode::Cls => hidden.i((.., 0))?,
            PoolingMode::Max => {
                // Padding is pushed far below any real activation, as
                // sentence-transformers does.
                let penalty = ((mask - 1.0)? * 1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)?
            }
        };
        let pooled = if self.pooling.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    const CONFIG: &str = r#"{
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0
    }"#;

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    fn pooling_config(mode: &str) -> String {
        format!(
            r#"{{"word_embedding_dimension": 384, "pooling_mode_cls_token": {},
                "pooling_mode_mean_tokens": {}, "pooling_mode_max_tokens": {},
                "pooling_mode_mean_sqrt_len_tokens": false}}"#,
            mode == "cls",
            mode == "mean",
            mode == "max"
        )
    }

    /// A randomly initialized BERT and its tensors by name.
    fn random_bert(pooling: Pooling) -> (Embedder, HashMap<String, Tensor>) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let embedder = Embedder::new(vb, CONFIG.as_bytes(), pooling).unwrap();
        let tensors = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        (embedder, tensors)
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    #[test]
    fn pooling_from_sentence_transformers_files() {
        for (mode, want) in [
            ("mean", PoolingMode::Mean),
            ("cls", PoolingMode::Cls),
            ("max", PoolingMode::Max),
        ] {
            let config = pooling_config(mode);
            let pooling =
                Pooling::from_files(Some(MODULES.as_bytes()), Some(config.as_bytes())).unwrap();
            assert_eq!(
                pooling,
                Pooling {
                    mode: want,
                    normalize: true
                }
            );
        }
        let no_normalize = r#"[{"idx": 1, "name": "1", "path": "1_Pooling/",
            "type": "sentence_transformers.models.Pooling"}]"#;
        let config = pooling_config("cls");
        let pooling =
            Pooling::from_files(Some(no_normalize.as_bytes()), Some(config.as_bytes())).unwrap();
        assert!(!pooling.normalize);
        assert_eq!(
            Pooling::config_path(no_normalize.as_bytes())
                .unwrap()
                .as_deref(),
            Some("1_Pooling/config.json")
        );
        assert_eq!(
            Pooling::config_path(MODULES.as_bytes()).unwrap().as_deref(),
            Some("1_Pooling/config.json")
        );
        assert_eq!(Pooling::config_path(b"[]").unwrap(), None);
        assert_eq!(
            Pooling::from_files(None, None).unwrap(),
            Pooling {
                mode: PoolingMode::Mean,
                normalize: true
            }
        );
        let weighted = br#"{"pooling_mode_weightedmean_tokens": true}"#;
        assert!(Pooling::from_files(None, Some(weighted)).is_err());
        let two = br#"{"pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": true}"#;
        assert!(Pooling::from_files(None, Some(two)).is_err());
    }

    #[test]
    fn padding_does_not_change_embeddings() {
        for mode in [PoolingMode::Mean, PoolingMode::Cls, PoolingMode::Max] {
            let (embedder, _) = random_bert(Pooling {
                mode,
                normalize: true,
            });
            let short = vec![2, 17, 33, 3];
            let long: Vec<u32> = (0..60).map(|i| 1 + (i * 7) % 99).collect();
            let alone = embedder.embed(std::slice::from_ref(&short)).unwrap();
            let batch = embedder
                .embed(&[long.clone(), short.clone(), long])
                .unwrap();
            assert_eq!(batch.len(), 3);
            assert_eq!(batch[1].len(), embedder.dimensions());
            let cos = cosine(&alone[0], &batch[1]);
            assert!(cos > 0.9999, "{mode:?}: cosine {cos}");
            let norm: f32 = batch[1].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{mode:?}: norm {norm}");
            assert!(cosine(&batch[0], &batch[1]) < 0.9999);
        }
    }

    #[test]
    fn loads_with_the_bert_prefix() {
        let pooling = Pooling {
            mode: PoolingMode::Mean,
            normalize: false,
        };
        let (plain, tensors) = random_bert(pooling);
        let prefixed = tensors
            .into_iter()
            .map(|(name, t)| (format!("bert.{name}"), t))
            .collect();
        let vb = VarBuilder::from_tensors(prefixed, DType::F32, &Device::Cpu);
        let prefixed = Embedder::new(vb, CONFIG.as_bytes(), pooling).unwrap();
        let input = vec![vec![5, 6, 7]];
        let (a, b) = (
            plain.embed(&input).unwrap(),
            prefixed.embed(&input).unwrap(),
        );
        assert!(cosine(&a[0], &b[0]) > 0.99999);
        assert_eq!(prefixed.max_tokens(), 64);
        assert_eq!(prefixed.dimensions(), 32);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (embedder, _) = random_bert(Pooling {
            mode: PoolingMode::Mean,
            normalize: true,
        });
        assert!(embedder.embed(&[]).unwrap().is_empty());
        assert!(matches!(
            embedder.embed(&[vec![]]),
            Err(ServingError::InvalidRequest { .. })
        ));
        assert!(matches!(
            embedder.embed(&[vec![1; 65]]),
            Err(ServingError::ContextLength(_))
        ));
        assert!(matches!(
            embedder.embed(&[vec![100]]),
            Err(ServingError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn embedder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Embedder>();
        check::<crate::tokenizer::TextTokenizer>();
        fn send<T: Send>() {}
        send::<crate::tokenizer::IncrementalDecoder>();
    }
}
