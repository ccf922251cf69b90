//! One error enum for serving, and its OpenAI error shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What went wrong while loading or serving a model.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The request is malformed or asks for something impossible.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The request field at fault, if one is.
        param: Option<String>,
    },
    /// The prompt and the requested tokens do not fit the model's context.
    #[error("{0}")]
    ContextLength(String),
    /// No such model is served here.
    #[error("the model `{0}` does not exist or is not served here")]
    ModelNotFound(String),
    /// The request body is over the limit.
    #[error("request body is over the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Too many requests at once.
    #[error("{0}")]
    Overloaded(String),
    /// The model is not loaded (yet, or it failed to load).
    #[error("{0}")]
    NotReady(String),
    /// A model file is missing or malformed.
    #[error("model: {0}")]
    Model(String),
    /// Reading the model from the store failed (including failed verification).
    #[error(transparent)]
    Store(#[from] aigrid_store::store::StoreError),
    /// A tensor operation failed.
    #[error("inference: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading a local file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl ServingError {
    /// An invalid request naming the field at fault.
    pub fn invalid(param: impl Into<Option<&'static str>>, message: impl Into<String>) -> Self {
        ServingError::InvalidRequest {
            message: message.into(),
            param: param.into().map(str::to_owned),
        }
    }

    /// A malformed model.
    pub fn model(message: impl Into<String>) -> Self {
        ServingError::Model(message.into())
    }

    /// The HTTP status, OpenAI error `type` and `code` of this error.
    pub fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            ServingError::InvalidRequest { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            ServingError::ContextLength(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            ServingError::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            ServingError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            ServingError::Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            ServingError::NotReady(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_not_ready"),
            ),
            ServingError::Model(_)
            | ServingError::Store(_)
            | ServingError::Candle(_)
            | ServingError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        }
    }

    /// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> ErrorBody {
        let (_, kind, code) = self.parts();
        let param = match self {
            ServingError::InvalidRequest { param, .. } => param.clone(),
            ServingError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.into(),
                param,
                code: code.map(str::to_owned),
            },
        }
    }
}

/// OpenAI's error envelope.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// OpenAI's error object.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// A sentence saying what is wrong.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A stable code, where there is one.
    pub code: Option<String>,
}

impl IntoResponse for ServingError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        (status, axum::Json(self.body())).into_response()
    }
}
