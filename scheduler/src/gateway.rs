//! The OpenAI-compatible inference gateway under `/v1`, served by every server.
//!
//! A request names a model by its pushed name or its digest; the gateway finds the
//! running `model-server` instances of that model (as their agents reported them,
//! with an endpoint), picks the ready one with the fewest requests outstanding
//! through this server, and relays the request there, streaming the answer back
//! unchanged: status, content type and body, server-sent events chunk by chunk.
//!
//! It reads only this server's applied state, so followers serve the gateway as
//! well as the leader and no request waits for a Raft round-trip. A background task
//! rebuilds the routing table when the applied state moves and probes every
//! replica's `/ready`, keeping the set of ready replicas; a replica that refuses a
//! connection is dropped from that set until its next successful probe, and the
//! request moves on to another ready replica (each tried at most once).
//!
//! Errors leave in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`;
//! a semaphore at the door answers 429 beyond [`GatewayConfig::max_in_flight`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::openai::{OpenAiErrorBody, OpenAiErrorType};
use aigrid_consensus::RaftNode;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, MethodRouter};
use axum::{Json, Router};
use futures_util::{stream, StreamExt};
use parking_lot::{Mutex, RwLock};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::models::ModelName;
use crate::state::ClusterState;

/// Shortest digest prefix a request may name a model by.
pub const MIN_DIGEST_PREFIX: usize = 6;

/// How the gateway bounds, probes and relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Largest request body in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Requests relayed at once by this server; more get 429.
    pub max_in_flight: usize,
    /// Time between two probes of every replica's `/ready`.
    pub probe_interval: Duration,
    /// How long one probe may take before the replica counts as not ready.
    pub probe_timeout: Duration,
    /// Probes under way at once.
    pub probe_concurrency: usize,
    /// How long connecting to a replica may take before another is tried.
    pub connect_timeout: Duration,
    /// Longest silence from a replica while a request waits for or reads its
    /// answer; a generation that streams tokens is never cut while it streams.
    pub read_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 4 << 20,
            max_in_flight: 1024,
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            probe_concurrency: 64,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(300),
        }
    }
}

impl GatewayConfig {
    /// Checks the settings as a whole; the message names the offending one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes < 1024 {
            return Err("gateway max body bytes must be at least 1024".into());
        }
        if self.max_in_flight == 0 || self.probe_concurrency == 0 {
            return Err("gateway max in-flight and probe concurrency must be at least 1".into());
        }
        let zero = [
            ("probe interval", self.probe_interval),
            ("probe timeout", self.probe_timeout),
            ("connect timeout", self.connect_timeout),
            ("read timeout", self.read_timeout),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("gateway {name} must be positive"));
        }
        Ok(())
    }
}

/// The inference routes, as metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Models,
    Completions,
    ChatCompletions,
    Embeddings,
    Other,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Models => "models",
            Route::Completions => "completions",
            Route::ChatCompletions => "chat_completions",
            Route::Embeddings => "embeddings",
            Route::Other => "other",
        }
    }

    /// The path a replica serves this route at.
    fn path(self) -> &'static str {
        match self {
            Route::Models => "/v1/models",
            Route::Completions => "/v1/completions",
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Other => "/v1",
        }
    }
}

/// Why the gateway answered instead of a replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The body is not a JSON object.
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body has no `model`, or it is not a string.
    #[error("you must provide a model parameter: a pushed model's name or its digest")]
    MissingModel,
    /// The body is larger than the gateway accepts.
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No registered model has this name, digest or digest prefix.
    #[error("the model `{0}` does not exist; push it with `aigrid model push` or list models with GET /v1/models")]
    ModelNotFound(String),
    /// A digest prefix matches more than one model.
    #[error("the model `{asked}` matches {matches} model digests; give more of the digest")]
    AmbiguousModel {
        /// What the request named.
        asked: String,
        /// How many digests start with it.
        matches: usize,
    },
    /// The model exists but no replica of it can take the request now.
    #[error("{}", not_ready_message(.model, *.replicas, *.unreachable, *.deploying))]
    NotReady {
        /// The model, as resolved.
        model: String,
        /// Its replicas running with an endpoint.
        replicas: usize,
        /// Of them, those tried for this request that could not be reached.
        unreachable: usize,
        /// A live job deploys it: its replicas are being placed or started.
        deploying: bool,
    },
    /// The replica did not answer in time.
    #[error("the replica serving model `{model}` did not answer within {secs} s")]
    Timeout {
        /// The model.
        model: String,
        /// The read timeout, in seconds.
        secs: u64,
    },
    /// This server relays as many requests as it may.
    #[error("too many requests in flight on this server (limit {limit}); retry shortly")]
    RateLimited {
        /// The limit.
        limit: usize,
    },
    /// No inference route has this path.
    #[error("unknown URL: {method} {path}")]
    UnknownRoute {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The route exists, not with this method.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
}

fn not_ready_message(model: &str, replicas: usize, unreachable: usize, deploying: bool) -> String {
    match (replicas, unreachable) {
        (0, _) if deploying => format!(
            "the model `{model}` is being deployed and no replica is ready yet (loading); retry shortly"
        ),
        (0, _) => format!(
            "the model `{model}` has no replica running; deploy it with a `model-server` job"
        ),
        (n, 0) => format!(
            "the model `{model}` has {n} replica{} and none is ready yet (loading); retry shortly",
            if n == 1 { "" } else { "s" }
        ),
        (n, u) => format!(
            "the model `{model}` has {n} replica{}; {u} could not be reached and none other is \
             ready; retry shortly",
            if n == 1 { "" } else { "s" }
        ),
    }
}

impl GatewayError {
    /// The HTTP status, code and parameter of this error: the one place they are
    /// decided (OpenAI's error type follows from the status).
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            Self::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json", None),
            Self::MissingModel => (StatusCode::BAD_REQUEST, "missing_model", Some("model")),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", None),
            Self::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found", Some("model")),
            Self::AmbiguousModel { .. } => {
                (StatusCode::BAD_REQUEST, "ambiguous_model", Some("model"))
            }
            Self::NotReady { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "model_not_ready",
                Some("model"),
            ),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "replica_timeout", None),
            Self::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", None)
            }
            Self::UnknownRoute { .. } => (StatusCode::NOT_FOUND, "unknown_url", None),
            Self::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
        }
    }

    /// The body this error is sent with.
    pub fn body(&self) -> OpenAiErrorBody {
        let (status, code, param) = self.parts();
        OpenAiErrorBody::new(
            OpenAiErrorType::for_status(status.as_u16()),
            self.to_string(),
            Some(code),
        )
        .with_param(param)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, ..) = self.parts();
        let mut resp = (status, Json(self.body())).into_response();
        if matches!(self, Self::NotReady { .. } | Self::RateLimited { .. }) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// What the gateway routes by, rebuilt from the applied state when it moves.
#[derive(Debug, Default)]
struct Routes {
    /// The applied index it was built at; `None` before the first build.
    applied: Option<u64>,
    /// When it was built.
    built: Option<Instant>,
    /// Every registered model, newest first (ties by digest).
    models: Vec<ModelName>,
    /// Per model digest, the endpoints of its replicas, sorted and distinct.
    replicas: HashMap<String, Vec<String>>,
    /// The digests live jobs deploy, whether or not a replica runs yet.
    deployed: HashSet<String>,
}

/// How a request's `model` resolved.
#[derive(Debug, PartialEq, Eq)]
enum Resolution<'a> {
    Found(&'a ModelName),
    Unknown,
    Ambiguous(usize),
}

impl Routes {
    fn build(
        applied: u64,
        mut models: Vec<ModelName>,
        servers: Vec<(&str, String)>,
        deployed: HashSet<String>,
    ) -> Self {
        models.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.digest.cmp(&b.digest))
        });
        let mut replicas: HashMap<String, Vec<String>> = HashMap::new();
        for (digest, endpoint) in servers {
            replicas
                .entry(digest.to_ascii_lowercase())
                .or_default()
                .push(endpoint);
        }
        for endpoints in replicas.values_mut() {
            endpoints.sort();
            endpoints.dedup();
        }
        Routes {
            applied: Some(applied),
            built: Some(Instant::now()),
            models,
            replicas,
            deployed,
        }
    }

    fn replicas(&self, digest: &str) -> &[String] {
        self.replicas.get(digest).map_or(&[], Vec::as_slice)
    }

    /// Why `model` cannot take a request now, `unreachable` of its replicas having
    /// been tried in vain.
    fn not_ready(&self, model: &ModelName, unreachable: usize) -> GatewayError {
        GatewayError::NotReady {
            model: model.name.clone(),
            replicas: self.replicas(&model.digest).len(),
            unreachable,
            deploying: self.deployed.contains(&model.digest),
        }
    }

    /// Resolves a request's `model`: a name (the newest model of that name that has
    /// a replica, else the newest of that name), a full digest, or a digest prefix of
    /// at least [`MIN_DIGEST_PREFIX`] hex characters that only one model has.
    fn resolve(&self, asked: &str) -> Resolution<'_> {
        let mut named = self.models.iter().filter(|m| m.name == asked).peekable();
        if named.peek().is_some() {
            let named: Vec<&ModelName> = named.collect();
            let served = named.iter().find(|m| !self.replicas(&m.digest).is_empty());
            return Resolution::Found(served.unwrap_or(&named[0]));
        }
        let lower = asked.to_ascii_lowercase();
        if lower.len() < MIN_DIGEST_PREFIX || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Resolution::Unknown;
        }
        let mut matching = self.models.iter().filter(|m| m.digest.starts_with(&lower));
        match (matching.next(), matching.count()) {
            (None, _) => Resolution::Unknown,
            (Some(m), 0) => Resolution::Found(m),
            (Some(_), more) => Resolution::Ambiguous(more + 1),
        }
    }
}

/// The gateway's Prometheus metrics.
#[derive(Clone)]
struct GatewayMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
    retries: IntCounter,
    outstanding: IntGaugeVec,
    replicas: IntGaugeVec,
    replicas_ready: IntGaugeVec,
}

impl GatewayMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "aigrid_gateway_requests_total",
                "Inference gateway requests, by route and answered status",
            ),
            &["route", "status"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "aigrid_gateway_request_seconds",
                "Time until the inference gateway answered a request's status",
            )
            .buckets(prometheus::exponential_buckets(0.000_5, 2.0, 18)?),
            &["route"],
        )?;
        let retries = IntCounter::with_opts(Opts::new(
            "aigrid_gateway_retries_total",
            "Requests moved to another replica after one could not be reached",
        ))?;
        let outstanding = IntGaugeVec::new(
            Opts::new(
                "aigrid_gateway_outstanding_requests",
                "Requests relayed by this server and not yet finished, per model",
            ),
            &["model", "digest"],
        )?;
        let replicas = IntGaugeVec::new(
            Opts::new(
                "aigrid_gateway_replicas",
                "Model server replicas running with an endpoint, per model",
            ),
            &["model", "digest"],
        )?;
        let replicas_ready = IntGaugeVec::new(
            Opts::new(
                "aigrid_gateway_replicas_ready",
                "Model server replicas whose /ready answered 200 at the last probe, per model",
            ),
            &["model", "digest"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(outstanding.clone()))?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(replicas_ready.clone()))?;
        Ok(GatewayMetrics {
            requests,
            seconds,
            retries,
            outstanding,
            replicas,
            replicas_ready,
        })
    }
}

/// The digest as metrics label it: its first 12 characters.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// The inference gateway of one server. Cheap to share: handlers hold an `Arc`.
pub struct Gateway {
    raft: RaftNode<ClusterState>,
    config: GatewayConfig,
    client: reqwest::Client,
    routes: RwLock<Arc<Routes>>,
    /// Endpoints whose last probe answered 200, less those that refused a request
    /// since.
    ready: Mutex<HashSet<String>>,
    /// Requests relayed and not finished, per endpoint.
    outstanding: Arc<Mutex<HashMap<String, usize>>>,
    in_flight: Arc<Semaphore>,
    /// Breaks ties between equally loaded replicas in turn.
    rotation: AtomicUsize,
    metrics: GatewayMetrics,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("ready", &self.ready.lock().len())
            .finish_non_exhaustive()
    }
}

/// Why a gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayBuildError {
    /// Its metrics could not be registered.
    #[error("gateway metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Its HTTP client could not be built.
    #[error("gateway HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A request counted against a replica until it finishes (its answer streamed, or
/// dropped).
struct Outstanding {
    table: Arc<Mutex<HashMap<String, usize>>>,
    endpoint: String,
    gauge: prometheus::IntGauge,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(n) = table.get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                table.remove(&self.endpoint);
            }
        }
        self.gauge.dec();
    }
}

impl Gateway {
    /// A gateway over `raft`'s applied state, with metrics in `registry`. Call
    /// [`Gateway::run`] to keep its routes and readiness current.
    pub fn new(
        raft: RaftNode<ClusterState>,
        registry: &Registry,
        config: GatewayConfig,
    ) -> Result<Self, GatewayBuildError> {
        let client = reqwest::Client::builder()
            // Replicas are on the grid's own network: no proxy stands between.
            .no_proxy()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()?;
        Ok(Gateway {
            raft,
            client,
            routes: RwLock::new(Arc::new(Routes::default())),
            ready: Mutex::new(HashSet::new()),
            outstanding: Arc::new(Mutex::new(HashMap::new())),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            rotation: AtomicUsize::new(0),
            metrics: GatewayMetrics::register(registry)?,
            config,
        })
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes.read().clone()
    }

    /// Rebuilds the routing table when the applied state moved since it was built
    /// and the table is older than `min_age`.
    fn refresh(&self, min_age: Duration) {
        let applied = self.raft.status().applied_index;
        {
            let routes = self.routes.read();
            let fresh = routes.built.is_some_and(|b| b.elapsed() < min_age);
            if routes.applied == Some(applied) || fresh {
                return;
            }
        }
        let routes = self.raft.read_local(|s| {
            let servers = s
                .model_servers()
                .into_iter()
                .filter_map(|(digest, a)| Some((digest, a.endpoint.clone()?)))
                .collect();
            let deployed = s
                .deployed_models()
                .into_iter()
                .map(str::to_ascii_lowercase)
                .collect();
            Routes::build(applied, s.model_names(), servers, deployed)
        });
        *self.routes.write() = Arc::new(routes);
    }

    /// Keeps routes and readiness current until `shutdown` turns true: every probe
    /// interval, does what [`Gateway::probe_now`] does.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.probe_now().await;
        }
    }

    /// Rebuilds the routes if the applied state moved, then probes every replica's
    /// `/ready` and replaces the ready set with those that answered 200.
    pub async fn probe_now(&self) {
        self.refresh(Duration::ZERO);
        self.probe_all().await;
    }

    /// Probes every known replica at once (bounded) and replaces the ready set.
    async fn probe_all(&self) {
        let routes = self.routes();
        let endpoints: HashSet<String> = routes.replicas.values().flatten().cloned().collect();
        let ready: HashSet<String> = stream::iter(endpoints)
            .map(|endpoint| async move { self.probe(&endpoint).await.then_some(endpoint) })
            .buffer_unordered(self.config.probe_concurrency)
            .filter_map(|ready| async move { ready })
            .collect()
            .await;
        self.metrics.replicas.reset();
        self.metrics.replicas_ready.reset();
        for model in &routes.models {
            let replicas = routes.replicas(&model.digest);
            if replicas.is_empty() {
                continue;
            }
            let labels = [model.name.as_str(), short(&model.digest)];
            let up = replicas.iter().filter(|e| ready.contains(*e)).count();
            self.metrics
                .replicas
                .with_label_values(&labels)
                .set(i64::try_from(replicas.len()).unwrap_or(i64::MAX));
            self.metrics
                .replicas_ready
                .with_label_values(&labels)
                .set(i64::try_from(up).unwrap_or(i64::MAX));
        }
        *self.ready.lock() = ready;
    }

    /// True when the replica's `/ready` answers 200 within the probe timeout.
    async fn probe(&self, endpoint: &str) -> bool {
        let sent = self
            .client
            .get(format!("{endpoint}/ready"))
            .timeout(self.config.probe_timeout)
            .send()
            .await;
        matches!(sent, Ok(resp) if resp.status() == StatusCode::OK)
    }

    /// Picks the ready replica among `endpoints` with the fewest requests
    /// outstanding, skipping `tried`, taking equally loaded ones in turn, and counts
    /// the request against it.
    fn pick(
        &self,
        model: &ModelName,
        endpoints: &[String],
        tried: &[String],
    ) -> Option<Outstanding> {
        let ready = self.ready.lock();
        let candidates: Vec<&String> = endpoints
            .iter()
            .filter(|e| ready.contains(*e) && !tried.contains(e))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let mut table = self.outstanding.lock();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % candidates.len();
        let chosen = (0..candidates.len())
            .map(|i| candidates[(start + i) % candidates.len()])
            .min_by_key(|e| table.get(*e).copied().unwrap_or(0))
            .expect("at least one candidate");
        *table.entry(chosen.clone()).or_insert(0) += 1;
        let gauge = self
            .metrics
            .outstanding
            .with_label_values(&[model.name.as_str(), short(&model.digest)]);
        gauge.inc();
        Some(Outstanding {
            table: self.outstanding.clone(),
            endpoint: chosen.clone(),
            gauge,
        })
    }

    /// Drops a replica from the ready set until its next successful probe.
    fn mark_unreachable(&self, endpoint: &str) {
        self.ready.lock().remove(endpoint);
    }

    fn record(&self, route: Route, status: StatusCode, started: Instant) {
        self.metrics
            .requests
            .with_label_values(&[route.label(), status.as_str()])
            .inc();
        self.metrics
            .seconds
            .with_label_values(&[route.label()])
            .observe(started.elapsed().as_secs_f64());
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| GatewayError::RateLimited {
                limit: self.config.max_in_flight,
            })
    }

    /// Relays one inference request, answering the replica's response or an error.
    async fn relay(&self, route: Route, req: Request) -> Result<Response, GatewayError> {
        let permit = self.admit()?;
        let headers = req.headers().clone();
        let body = Bytes::from_request(req, &()).await.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(inner)
                if inner.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                GatewayError::TooLarge {
                    limit: self.config.max_body_bytes,
                }
            }
            other => GatewayError::InvalidJson(other.body_text()),
        })?;
        let asked = requested_model(&body)?;
        let mut routes = self.routes();
        let mut resolved = routes.resolve(&asked);
        if resolved == Resolution::Unknown {
            // Registered since the last rebuild, perhaps: look again, at most this often.
            self.refresh(Duration::from_millis(100));
            routes = self.routes();
            resolved = routes.resolve(&asked);
        }
        let model = match resolved {
            Resolution::Found(model) => model,
            Resolution::Unknown => return Err(GatewayError::ModelNotFound(asked)),
            Resolution::Ambiguous(matches) => {
                return Err(GatewayError::AmbiguousModel { asked, matches })
            }
        };
        let endpoints = routes.replicas(&model.digest);
        let mut tried: Vec<String> = Vec::new();
        while let Some(outstanding) = self.pick(model, endpoints, &tried) {
            let endpoint = outstanding.endpoint.clone();
            let sent = self
                .client
                .post(format!("{endpoint}{}", route.path()))
                .headers(forwarded_request_headers(&headers))
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) => return Ok(stream_back(resp, (outstanding, permit))),
                Err(e) if e.is_timeout() => {
                    tracing::warn!(%endpoint, error = %e, "replica timed out");
                    return Err(GatewayError::Timeout {
                        model: model.name.clone(),
                        secs: self.config.read_timeout.as_secs(),
                    });
                }
                Err(e) => {
                    // Nothing of an answer arrived: the replica went away or refused
                    // the connection. Another one may serve it.
                    tracing::warn!(%endpoint, error = %e, "replica unreachable; trying another");
                    self.mark_unreachable(&endpoint);
                    self.metrics.retries.inc();
                    tried.push(endpoint);
                }
            }
        }
        Err(routes.not_ready(model, tried.len()))
    }

    /// `GET /v1/models/{model}`: one model, by name, digest or unique digest prefix,
    /// as `GET /v1/models` lists it; a model that exists but has no ready replica is
    /// not ready (503), as a request for it would be.
    fn retrieve(&self, asked: &str) -> Result<ModelEntry, GatewayError> {
        let routes = self.routes();
        let model = match routes.resolve(asked) {
            Resolution::Found(model) => model,
            Resolution::Unknown => return Err(GatewayError::ModelNotFound(asked.to_owned())),
            Resolution::Ambiguous(matches) => {
                return Err(GatewayError::AmbiguousModel {
                    asked: asked.to_owned(),
                    matches,
                })
            }
        };
        let ready = self.ready.lock();
        if !routes
            .replicas(&model.digest)
            .iter()
            .any(|e| ready.contains(e))
        {
            return Err(routes.not_ready(model, 0));
        }
        Ok(ModelEntry::of(model))
    }

    /// `GET /v1/models`: the models with a ready replica, one entry per name (the
    /// model a request by that name goes to).
    fn list(&self) -> ModelList {
        let routes = self.routes();
        let ready = self.ready.lock();
        let mut seen = HashSet::new();
        let data = routes
            .models
            .iter()
            .filter(|m| routes.replicas(&m.digest).iter().any(|e| ready.contains(e)))
            .filter(|m| seen.insert(m.name.clone()))
            .map(ModelEntry::of)
            .collect();
        ModelList {
            object: "list",
            data,
        }
    }
}

/// The `model` field of a request body, which is all the gateway reads of it.
fn requested_model(body: &[u8]) -> Result<String, GatewayError> {
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
fn forwarded_request_headers(from: &HeaderMap) -> HeaderMap {
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
fn hop_by_hop(name: &HeaderName) -> bool {
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
fn stream_back<H: Send + 'static>(resp: reqwest::Response, hold: H) -> Response {
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

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelEntry>,
}

/// One model of [`ModelList`], in OpenAI's shape plus its digest.
#[derive(Debug, Serialize)]
struct ModelEntry {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    digest: String,
}

impl ModelEntry {
    fn of(model: &ModelName) -> ModelEntry {
        ModelEntry {
            id: model.name.clone(),
            object: "model",
            created: model.created_at.as_millis() / 1000,
            owned_by: "aigrid",
            digest: model.digest.clone(),
        }
    }
}

async fn list_models(State(gateway): State<Arc<Gateway>>) -> Response {
    let started = Instant::now();
    let resp = match gateway.admit() {
        Ok(_permit) => Json(gateway.list()).into_response(),
        Err(e) => e.into_response(),
    };
    gateway.record(Route::Models, resp.status(), started);
    resp
}

async fn get_model(
    State(gateway): State<Arc<Gateway>>,
    axum::extract::Path(model): axum::extract::Path<String>,
) -> Response {
    let started = Instant::now();
    let resp = match gateway.admit() {
        Ok(_permit) => match gateway.retrieve(&model) {
            Ok(entry) => Json(entry).into_response(),
            Err(e) => e.into_response(),
        },
        Err(e) => e.into_response(),
    };
    gateway.record(Route::Models, resp.status(), started);
    resp
}

async fn relay(gateway: &Gateway, route: Route, req: Request) -> Response {
    let started = Instant::now();
    let resp = match gateway.relay(route, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    gateway.record(route, resp.status(), started);
    resp
}

async fn completions(State(gateway): State<Arc<Gateway>>, req: Request) -> Response {
    relay(&gateway, Route::Completions, req).await
}

async fn chat_completions(State(gateway): State<Arc<Gateway>>, req: Request) -> Response {
    relay(&gateway, Route::ChatCompletions, req).await
}

async fn embeddings(State(gateway): State<Arc<Gateway>>, req: Request) -> Response {
    relay(&gateway, Route::Embeddings, req).await
}

async fn unknown_route(State(gateway): State<Arc<Gateway>>, method: Method, uri: Uri) -> Response {
    let resp = GatewayError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response();
    gateway.record(Route::Other, resp.status(), Instant::now());
    resp
}

async fn method_not_allowed(method: Method, uri: Uri) -> GatewayError {
    GatewayError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

fn only(route: MethodRouter<Arc<Gateway>>) -> MethodRouter<Arc<Gateway>> {
    route.fallback(method_not_allowed)
}

/// The `/v1` routes, to merge into a server's router.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.max_body_bytes;
    Router::new()
        .route("/v1/models", only(get(list_models)))
        .route("/v1/models/{model}", only(get(get_model)))
        .route("/v1/completions", only(post(completions)))
        .route("/v1/chat/completions", only(post(chat_completions)))
        .route("/v1/embeddings", only(post(embeddings)))
        .route("/v1/{*rest}", any(unknown_route))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A routing table of `(digest, name, registered at)` models and
    /// `(digest, endpoint)` replicas.
    fn routes_for(models: &[(&str, &str, u64)], servers: &[(&str, &str)]) -> Routes {
        let models = models
            .iter()
            .map(|(digest, name, at)| ModelName {
                digest: (*digest).to_owned(),
                name: (*name).to_owned(),
                created_at: aigrid_api::Timestamp::from_millis(*at),
            })
            .collect();
        let servers = servers
            .iter()
            .map(|(digest, endpoint)| (*digest, (*endpoint).to_owned()))
            .collect();
        Routes::build(1, models, servers, HashSet::new())
    }

    const A: &str = "aaaaaa11aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "aaaaaa22bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn found<'a>(r: Resolution<'a>) -> &'a str {
        match r {
            Resolution::Found(m) => &m.digest,
            other => panic!("not found: {other:?}"),
        }
    }

    #[test]
    fn names_digests_and_prefixes_resolve() {
        // Two pushes of `llama` (B newer) and one of `qwen`; only A has a replica.
        let routes = routes_for(
            &[(A, "llama", 1_000), (B, "llama", 2_000), (C, "qwen", 500)],
            &[(A, "http://10.0.0.1:9000")],
        );
        assert_eq!(
            found(routes.resolve("llama")),
            A,
            "the newest model of the name that has a replica"
        );
        assert_eq!(found(routes.resolve("qwen")), C, "else the newest");
        assert_eq!(found(routes.resolve(B)), B);
        assert_eq!(found(routes.resolve(&B.to_uppercase())), B);
        assert_eq!(found(routes.resolve("aaaaaa2")), B);
        assert_eq!(found(routes.resolve("cccccc")), C);
        assert_eq!(routes.resolve("aaaaaa"), Resolution::Ambiguous(2));
        assert_eq!(routes.resolve("ccccc"), Resolution::Unknown, "too short");
        assert_eq!(routes.resolve("mistral"), Resolution::Unknown);
        assert_eq!(routes.resolve("dddddddd"), Resolution::Unknown);

        let unserved = routes_for(&[(A, "llama", 1_000), (B, "llama", 2_000)], &[]);
        assert_eq!(found(unserved.resolve("llama")), B);
    }

    #[test]
    fn only_the_model_field_is_read() {
        assert_eq!(
            requested_model(br#"{"messages": [], "model": "llama", "stream": true}"#).unwrap(),
            "llama"
        );
        for body in [
            &br#"{"prompt": "hi"}"#[..],
            br#"{"model": 7}"#,
            br#"{"model": ""}"#,
        ] {
            assert_eq!(requested_model(body), Err(GatewayError::MissingModel));
        }
        assert!(matches!(
            requested_model(b"not json"),
            Err(GatewayError::InvalidJson(_))
        ));
        assert!(matches!(
            requested_model(b"[1, 2]"),
            Err(GatewayError::InvalidJson(_))
        ));
    }

    #[test]
    fn errors_take_openai_shape_with_one_status_each() {
        let cases = [
            (
                GatewayError::MissingModel,
                400,
                "invalid_request_error",
                "missing_model",
            ),
            (
                GatewayError::TooLarge { limit: 1 },
                413,
                "invalid_request_error",
                "request_too_large",
            ),
            (
                GatewayError::ModelNotFound("x".into()),
                404,
                "invalid_request_error",
                "model_not_found",
            ),
            (
                GatewayError::NotReady {
                    model: "x".into(),
                    replicas: 2,
                    unreachable: 0,
                    deploying: true,
                },
                503,
                "server_error",
                "model_not_ready",
            ),
            (
                GatewayError::RateLimited { limit: 1 },
                429,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
        ];
        for (error, status, kind, code) in cases {
            assert_eq!(error.parts().0.as_u16(), status, "{error}");
            let body = serde_json::to_value(error.body()).unwrap();
            assert_eq!(body["error"]["type"], kind);
            assert_eq!(body["error"]["code"], code);
            assert!(
                body["error"].get("param").is_some(),
                "param is always present"
            );
            assert!(body["error"]["message"].as_str().unwrap().len() > 5);
        }
        let loading = GatewayError::NotReady {
            model: "llama".into(),
            replicas: 2,
            unreachable: 0,
            deploying: true,
        };
        assert!(loading.to_string().contains("2 replicas"), "{loading}");
        assert!(loading.to_string().contains("loading"), "{loading}");
        // Deployed, no replica started yet: loading, not "deploy it".
        let placing = GatewayError::NotReady {
            model: "llama".into(),
            replicas: 0,
            unreachable: 0,
            deploying: true,
        };
        assert!(placing.to_string().contains("loading"), "{placing}");
        assert!(!placing.to_string().contains("deploy it"), "{placing}");
        let undeployed = GatewayError::NotReady {
            model: "llama".into(),
            replicas: 0,
            unreachable: 0,
            deploying: false,
        };
        assert!(undeployed.to_string().contains("deploy it"), "{undeployed}");
    }

    #[test]
    fn defaults_are_valid_and_zero_limits_are_not() {
        assert!(GatewayConfig::default().validate().is_ok());
        let bad = GatewayConfig {
            probe_interval: Duration::ZERO,
            ..GatewayConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("probe interval"));
        let bad = GatewayConfig {
            max_in_flight: 0,
            ..GatewayConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        assert!(hop_by_hop(&header::TRANSFER_ENCODING));
        assert!(hop_by_hop(&header::CONNECTION));
        assert!(!hop_by_hop(&header::CONTENT_TYPE));
        let mut from = HeaderMap::new();
        from.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk"));
        from.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let sent = forwarded_request_headers(&from);
        assert!(
            sent.get(header::AUTHORIZATION).is_none(),
            "credentials stay"
        );
        assert_eq!(sent[header::ACCEPT], "text/event-stream");
        assert_eq!(sent[header::CONTENT_TYPE], "application/json");
    }
}
