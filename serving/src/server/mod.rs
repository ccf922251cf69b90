//! The model server: the OpenAI-compatible `/v1/*` routes, `/health` (alive, also
//! while loading), `/ready` (the model verified and warmed up), `/status` (loading
//! phase and bytes) and `/metrics`.
//!
//! Every `/v1` request passes one door: a permit from a semaphore (429 when none is
//! left), a body read under the size limit (413), JSON parsed into the request type
//! (400 naming what is wrong), the model name checked (404) and the model ready
//! (503). Errors use OpenAI's shape.

use crate::loader::{self, LoadStatus, Phase, Runtime};
use crate::metrics::Metrics;
use crate::{ModelSource, ServingError};
use aigrid_api::openai::ModelCard;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::{Limits, ServeConfig};

mod embeddings;
mod generation;

use embeddings::embeddings;
use generation::{chat, completions};

/// Most stop strings a request may give, as OpenAI allows.
const MAX_STOP: usize = 4;

struct App {
    source: ModelSource,
    names: Vec<String>,
    shown: String,
    created: u64,
    device: String,
    limits: Limits,
    status: LoadStatus,
    runtime: OnceLock<Runtime>,
    permits: Arc<Semaphore>,
    metrics: Metrics,
}

/// A bound model server. Loading starts when it runs; `/health` answers at once.
pub struct Server {
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    source: ModelSource,
    device: candle_core::Device,
}

impl Server {
    /// Opens the device, checks the precision asked for against it, then binds the
    /// listen address: a device this build or machine cannot use, or a precision it
    /// cannot run, is an error ([`ServingError::Model`]) before anything listens.
    pub async fn bind(config: ServeConfig, source: ModelSource) -> Result<Server, ServingError> {
        let device = config.device.open()?;
        // Whether the model embeds or generates is known once it loads (and only
        // chooses the default); what the device allows is known now.
        crate::dense::Precision::resolve_on(config.precision, &device, false)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServingError::Io {
                path: config.listen.to_string(),
                source,
            })?;
        Ok(Server {
            listener,
            config,
            source,
            device,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Loads the model in the background and serves until `shutdown` resolves. A
    /// failed load is logged and shown at `/status`; the server stays up, never ready.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServingError> {
        let Server {
            listener,
            config,
            source,
            device,
        } = self;
        let mut names = config.names.clone();
        names.push(source.id());
        let app = Arc::new(App {
            source: source.clone(),
            shown: names[0].clone(),
            names,
            created: unix_now(),
            device: match &device {
                candle_core::Device::Cpu => "cpu".into(),
                other => format!("{other:?}"),
            },
            limits: config.limits.clone(),
            status: LoadStatus::default(),
            runtime: OnceLock::new(),
            permits: Arc::new(Semaphore::new(config.limits.max_concurrent_requests.max(1))),
            metrics: Metrics::new(),
        });
        let loading = app.clone();
        let precision = config.precision;
        tokio::spawn(async move {
            let started = Instant::now();
            match loader::load(
                &source,
                &device,
                precision,
                &loading.limits,
                &loading.metrics,
                &loading.status,
            )
            .await
            {
                Ok(runtime) => {
                    let _ = loading.runtime.set(runtime);
                    loading.metrics.ready.set(1);
                    tracing::info!(model = %source.id(), secs = started.elapsed().as_secs_f64(), "model ready");
                }
                Err(e) => {
                    tracing::error!(model = %source.id(), error = %e, "loading the model failed; it will not become ready");
                    loading.status.fail(&e);
                }
            }
        });
        // Streamed tokens are small writes: without TCP_NODELAY each would wait for
        // the ACK of the one before, which the client may delay by up to 40 ms.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY on a connection");
            }
        });
        axum::serve(listener, router(app))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServingError::Io {
                path: "listener".into(),
                source,
            })
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|uri: axum::http::Uri| async move {
            let mut body = ServingError::invalid(None, format!("no route {}", uri.path())).body();
            body.error.code = Some("not_found".into());
            (StatusCode::NOT_FOUND, Json(body))
        })
        .with_state(app)
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let phase = app.status.phase();
    let code = if phase == Phase::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let load = aigrid_api::ReplicaLoadReport {
        in_flight: u64::try_from(app.metrics.in_flight.get()).unwrap_or(0),
        requests: app.metrics.requests_answered(),
        generated_tokens: app.metrics.tokens_out.get(),
    };
    (
        code,
        Json(json!({"ready": phase == Phase::Ready, "phase": phase, "load": load})),
    )
        .into_response()
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let mut report = serde_json::to_value(app.status.report()).expect("status serializes");
    report["model"] = json!(app.names.last());
    report["names"] = json!(app.names);
    report["device"] = json!(app.device);
    if let ModelSource::Store(reader) = &app.source {
        let f = reader.stats();
        report["store"] = json!({
            "shard_requests": f.requests,
            "hedged_requests": f.hedged,
            "bad_shards": f.bad_shards,
            "bytes_fetched_verified": f.bytes,
            "stripes_reconstructed": f.reconstructed,
            "cache_hits": f.cache_hits,
        });
    }
    Json(report).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<ModelCard> = if app.runtime.get().is_some() {
        vec![ModelCard {
            id: app.shown.clone(),
            object: "model".into(),
            created: app.created,
            owned_by: "aigrid".into(),
            digest: None,
        }]
    } else {
        Vec::new()
    };
    Json(json!({"object": "list", "data": data})).into_response()
}

/// A request admitted through the door: it holds a concurrency permit until dropped.
struct Admission {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
    route: &'static str,
    started: Instant,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .request_duration
            .with_label_values(&[self.route])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// How much of a refused body is read and dropped before the 413, and for how long
/// at most. A server that answers and closes with a body still arriving resets the
/// connection, and a client still writing it (the gateway relaying a body over this
/// server's limit among them) sees the reset, not the answer: it took the replica
/// for gone. Past either bound the rest is left unread.
const REFUSED_BODY_DRAIN_BYTES: usize = 16 << 20;
const REFUSED_BODY_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what is left of a refused body, within the bounds above.
async fn drain_refused(mut stream: axum::body::BodyDataStream) {
    let drain = async {
        let mut read = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read >= REFUSED_BODY_DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_BODY_DRAIN_TIME, drain).await;
}

/// The door every `/v1` POST passes.
async fn admit<T: DeserializeOwned>(
    app: &Arc<App>,
    route: &'static str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(T, Admission, Runtime), ServingError> {
    let permit = app.permits.clone().try_acquire_owned().map_err(|_| {
        ServingError::Overloaded(format!(
            "more than {} requests at once; retry later",
            app.limits.max_concurrent_requests
        ))
    })?;
    app.metrics.in_flight.inc();
    let admission = Admission {
        _permit: permit,
        metrics: app.metrics.clone(),
        route,
        started: Instant::now(),
    };
    let limit = app.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > limit) {
        drain_refused(stream).await;
        return Err(ServingError::TooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ServingError::TooLarge { limit })?;
        if bytes.len() + chunk.len() > limit {
            drain_refused(stream).await;
            return Err(ServingError::TooLarge { limit });
        }
        bytes.extend_from_slice(&chunk);
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ServingError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ServingError::invalid(
            None,
            "the body must be a JSON object",
        ));
    }
    match value.get("model") {
        Some(Value::String(model)) => {
            if !app.names.iter().any(|n| n == model) {
                return Err(ServingError::ModelNotFound(model.clone()));
            }
        }
        Some(_) => return Err(ServingError::invalid("model", "model must be a string")),
        None => return Err(ServingError::invalid("model", "model is required")),
    }
    let request: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ServingError::InvalidRequest {
            message: format!("{path}: {}", e.inner()),
            param: Some(path),
        }
    })?;
    let runtime = app.runtime.get().cloned().ok_or_else(|| {
        ServingError::NotReady(match app.status.phase() {
            Phase::Failed => "the model failed to load; see /status".to_string(),
            phase => format!(
                "the model is loading ({}); retry when /ready answers 200",
                serde_json::to_value(phase)
                    .expect("phase serializes")
                    .as_str()
                    .unwrap_or("loading")
            ),
        })
    })?;
    Ok((request, admission, runtime))
}

fn count(app: &App, route: &str, status: StatusCode) {
    app.metrics
        .requests
        .with_label_values(&[route, status.as_str()])
        .inc();
}

/// Answers `result`, counting it.
fn answer(app: &App, route: &str, result: Result<Response, ServingError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    count(app, route, response.status());
    response
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
