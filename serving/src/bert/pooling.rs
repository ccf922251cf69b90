//! sentence-transformers' pooling: which of `modules.json`'s modules pool and
//! normalize, and how (`1_Pooling/config.json`).

use super::*;

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
pub(super) struct Module {
    #[serde(default)]
    pub(super) path: String,
    #[serde(rename = "type")]
    pub(super) kind: String,
}

/// sentence-transformers' Pooling `config.json`; modes it has that are not
/// supported here must be off.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct PoolingConfig {
    pub(super) pooling_mode_cls_token: bool,
    pub(super) pooling_mode_mean_tokens: bool,
    pub(super) pooling_mode_max_tokens: bool,
    pub(super) pooling_mode_mean_sqrt_len_tokens: bool,
    pub(super) pooling_mode_weightedmean_tokens: bool,
    pub(super) pooling_mode_lasttoken: bool,
}

pub(super) fn modules(modules_json: &[u8]) -> Result<Vec<Module>, ServingError> {
    serde_json::from_slice(modules_json)
        .map_err(|e| ServingError::model(format!("modules.json: {e}")))
}

/// Whether a module's `type` (e.g. `sentence_transformers.models.Pooling`) names
/// the class `class`.
pub(super) fn is_class(module: &Module, class: &str) -> bool {
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

pub(super) fn pooling_mode(bytes: &[u8]) -> Result<PoolingMode, ServingError> {
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
