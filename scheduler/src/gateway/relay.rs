//! What crosses to a replica and back: the `model` field read from a request body
//! (all the gateway reads of it), the headers forwarded, and answers streamed back
//! unchanged.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use futures_util::StreamExt;
use serde::Deserialize;

use super::error::GatewayError;

/// The `model` field of a request body, which is all the gateway reads of it.
pub(crate) fn requested_model(body: &[u8]) -> Result<String, GatewayError> {
    #[derive(Deserialize)]
    struct Fields {
        #[serde(default)]
        model: Option<serde_json::Value>,
    }
    let fields: Fields =
        serde_json::from_slice(body).map_err(|e| GatewayError::InvalidJson(e.to_string()))?;
    match fields.model {
        Some(serde_json::Value::String(model)) if !model.is_empty() => Ok(model),
        _ => Err(GatewayError::MissingModel),
    }
}

/// The client's headers a replica gets: what describes the body and the answer
/// wanted, never credentials or hop-by-hop headers.
pub(crate) fn forwarded_request_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in [header::ACCEPT, HeaderName::from_static("x-request-id")] {
        if let Some(value) = from.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    let content_type = from
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers
}

/// True for headers that describe one connection rather than the answer.
pub(crate) fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// The replica's answer as it comes: status, headers and a body relayed chunk by
/// chunk. `hold` (the request's outstanding count and admission permit) lives until
/// the body is finished or dropped.
pub(crate) fn stream_back<H: Send + 'static>(resp: reqwest::Response, hold: H) -> Response {
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let body = resp.bytes_stream().map(move |chunk| {
        let _held = &hold;
        chunk
    });
    let mut out = Response::new(Body::from_stream(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}
