//! One error enum for serving, and the HTTP status and OpenAI error body of each
//! (the envelope itself is `aigrid_api::openai`'s).

use aigrid_api::openai::{OpenAiErrorBody, OpenAiErrorType};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

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

    /// The HTTP status and OpenAI error `code` of this error: the one place they
    /// are decided (the error `type` follows from the status).
    pub fn parts(&self) -> (StatusCode, Option<&'static str>) {
        match self {
            ServingError::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, None),
            ServingError::ContextLength(_) => {
                (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
            }
            ServingError::ModelNotFound(_) => (StatusCode::NOT_FOUND, Some("model_not_found")),
            ServingError::TooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large"))
            }
            ServingError::Overloaded(_) => {
                (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded"))
            }
            ServingError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, Some("model_not_ready")),
            ServingError::Model(_)
            | ServingError::Store(_)
            | ServingError::Candle(_)
            | ServingError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, None),
        }
    }

    /// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> OpenAiErrorBody {
        let (status, code) = self.parts();
        let param = match self {
            ServingError::InvalidRequest { param, .. } => param.clone(),
            ServingError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        OpenAiErrorBody::new(
            OpenAiErrorType::for_status(status.as_u16()),
            self.to_string(),
            code,
        )
        .with_param(param)
    }
}

impl IntoResponse for ServingError {
    fn into_response(self) -> Response {
        let (status, _) = self.parts();
        let mut response = (status, axum::Json(self.body())).into_response();
        // A body refused as too large is left unread: the connection cannot carry
        // another request, and the client is told so rather than finding out when
        // its next request on it fails.
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}
