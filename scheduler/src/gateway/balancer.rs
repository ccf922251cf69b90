//! The [`Gateway`] of one server: a routing table rebuilt as the applied state
//! moves, replicas probed for readiness, and per request the ready replica with the
//! fewest requests outstanding through this server.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_consensus::RaftNode;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{stream, StreamExt};
use parking_lot::{Mutex, RwLock};
use prometheus::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::GatewayError;
use super::hold::{Holding, FAST_PROBE};
use super::keys::Scope;
use super::load::{Loads, ReplicaLoad};
use super::metrics::GatewayMetrics;
use super::relay::{forwarded_request_headers, requested_model, stream_back};
use super::samples::{ReplicaStats, Samples};
use super::table::{Elastic, Resolution, Route, Routes};
use crate::clock::{SharedClock, SystemClock};
use crate::state::models::ModelName;
use crate::state::ClusterState;
use aigrid_api::openai::{ModelCard, ModelList};

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
    /// Whether a request must present a circle's API key (a server listening beyond
    /// loopback); without, a request with no key sees every model.
    pub require_api_key: bool,
    /// How long a request for a scaled model with no ready replica waits for one
    /// before 503 with `Retry-After`.
    pub hold_timeout: Duration,
    /// Requests this server holds at once for models to scale up; more get 429.
    pub max_held: usize,
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
            require_api_key: false,
            hold_timeout: Duration::from_secs(60),
            max_held: 256,
        }
    }
}

impl GatewayConfig {
    /// Checks the settings as a whole; the message names the offending one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes < 1024 {
            return Err("gateway max body bytes must be at least 1024".into());
        }
        if self.max_in_flight == 0 || self.probe_concurrency == 0 || self.max_held == 0 {
            return Err(
                "gateway max in-flight, max held and probe concurrency must be at least 1".into(),
            );
        }
        let zero = [
            ("probe interval", self.probe_interval),
            ("probe timeout", self.probe_timeout),
            ("connect timeout", self.connect_timeout),
            ("read timeout", self.read_timeout),
            ("hold timeout", self.hold_timeout),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("gateway {name} must be positive"));
        }
        Ok(())
    }
}

/// The digest as metrics label it: its first 12 characters.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// Fewest time between two rebuilds of the routing table made for requests
/// ([`Gateway::current`]).
const REBUILD_FOR_REQUESTS_EVERY: Duration = Duration::from_millis(20);

/// The inference gateway of one server. Cheap to share: handlers hold an `Arc`.
pub struct Gateway {
    pub(super) raft: RaftNode<ClusterState>,
    pub(super) config: GatewayConfig,
    pub(super) clock: SharedClock,
    client: reqwest::Client,
    routes: RwLock<Arc<Routes>>,
    /// Held while the routing table is rebuilt (one rebuild at a time, and a table
    /// never replaced by one built from an older applied state), with when a
    /// request last rebuilt it.
    rebuilding: tokio::sync::Mutex<Option<Instant>>,
    /// Endpoints whose last probe answered 200, less those that refused a request
    /// since.
    ready: Mutex<HashSet<String>>,
    /// Requests relayed and not finished, per endpoint.
    outstanding: Arc<Mutex<HashMap<String, usize>>>,
    in_flight: Arc<Semaphore>,
    /// Breaks ties between equally loaded replicas in turn.
    rotation: AtomicUsize,
    /// Counts requests split between canaries and the rest, so each side gets
    /// its percent of every hundred.
    split_turn: AtomicUsize,
    /// Each replica's recent requests.
    samples: Samples,
    /// Each replica's load, as its probes report it.
    loads: Loads,
    /// Requests waiting for a scaled model's first ready replica.
    pub(super) holding: Holding,
    pub(super) metrics: GatewayMetrics,
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

/// What a relayed request sends to a replica.
struct Outgoing<'a> {
    route: Route,
    asked: &'a str,
    headers: &'a axum::http::HeaderMap,
    body: &'a Bytes,
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
    /// How it bounds, probes and relays.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

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
            rebuilding: tokio::sync::Mutex::new(None),
            ready: Mutex::new(HashSet::new()),
            outstanding: Arc::new(Mutex::new(HashMap::new())),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            rotation: AtomicUsize::new(0),
            split_turn: AtomicUsize::new(0),
            samples: Samples::default(),
            loads: Loads::default(),
            holding: Holding::default(),
            metrics: GatewayMetrics::register(registry)?,
            clock: Arc::new(SystemClock),
            config,
        })
    }

    /// The gateway reading the time it writes into commands (a wake) from `clock`.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    pub(super) fn routes(&self) -> Arc<Routes> {
        self.routes.read().clone()
    }

    /// Whether the model of `digest` has a replica that answered its last probe.
    pub(super) fn has_ready(&self, routes: &Routes, digest: &str) -> bool {
        let ready = self.ready.lock();
        routes.replicas(digest).iter().any(|e| ready.contains(e))
    }

    /// The load the replica at `endpoint` reported at its latest probes, if one
    /// answered within the last few seconds.
    pub fn replica_load(&self, endpoint: &str) -> Option<ReplicaLoad> {
        self.loads.get(endpoint, Instant::now())
    }

    /// The routing table at least as new as the state this server has applied now:
    /// the one kept if it is, else rebuilt here. Requests arriving during a rebuild
    /// wait for it and share it, and rebuilds made for requests are at least
    /// [`REBUILD_FOR_REQUESTS_EVERY`] apart (a request waits out the rest), so
    /// requests for models that do not exist cost no more than that many rebuilds.
    async fn current(&self) -> Arc<Routes> {
        let applied = self.raft.status().applied_index;
        let fresh = |r: &Routes| r.applied.is_some_and(|a| a >= applied);
        let routes = self.routes();
        if fresh(&routes) {
            return routes;
        }
        let mut last = self.rebuilding.lock().await;
        let routes = self.routes();
        if fresh(&routes) {
            return routes;
        }
        if let Some(at) = *last {
            tokio::time::sleep_until((at + REBUILD_FOR_REQUESTS_EVERY).into()).await;
        }
        self.rebuild();
        *last = Some(Instant::now());
        self.routes()
    }

    /// Rebuilds the routing table if the applied state moved since it was built
    /// (after any rebuild under way).
    async fn refresh(&self) {
        let _one = self.rebuilding.lock().await;
        self.rebuild();
    }

    /// Rebuilds the routing table if the applied state moved since it was built;
    /// the caller holds `rebuilding`.
    fn rebuild(&self) {
        let applied = self.raft.status().applied_index;
        if self.routes.read().applied.is_some_and(|a| a >= applied) {
            return;
        }
        let routes = self.raft.read_local(|s| {
            // Where the servers reach each replica: its node's recorded address
            // and its assigned port, never an endpoint a node reported.
            let servers = s.model_servers();
            let deployed = s
                .deployed_models()
                .into_iter()
                .map(str::to_ascii_lowercase)
                .collect();
            let mut routes = Routes::build(applied, s.model_names(), servers, deployed)
                .with_splits(s.traffic_splits());
            for (digest, circle) in s.deployed_circles() {
                routes
                    .deployed_by
                    .entry(digest.to_ascii_lowercase())
                    .or_default()
                    .insert(circle.map(str::to_owned));
            }
            for group in s.scaled_groups() {
                routes
                    .elastic
                    .entry(group.digest)
                    .or_default()
                    .push(Elastic {
                        job_id: group.job_id,
                        group: group.group,
                        count: group.count,
                        min: group.scaling.min,
                    });
            }
            routes
        });
        *self.routes.write() = Arc::new(routes);
        self.metrics.rebuilds.inc();
    }

    /// Keeps routes and readiness current until `shutdown` turns true: every probe
    /// interval, does what [`Gateway::probe_now`] does; while requests are held,
    /// probes the replicas of their models every [`FAST_PROBE`] in between.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut last_full = Instant::now();
        loop {
            let held = self.holding.digests();
            let pause = if held.is_empty() {
                self.config
                    .probe_interval
                    .saturating_sub(last_full.elapsed())
            } else {
                FAST_PROBE.min(self.config.probe_interval)
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.holding.hurry.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let held = self.holding.digests();
            if held.is_empty() || last_full.elapsed() >= self.config.probe_interval {
                self.probe_now().await;
                last_full = Instant::now();
            } else {
                self.refresh().await;
                self.probe_models(&held).await;
            }
            self.holding.probed.notify_waiters();
        }
    }

    /// Rebuilds the routes if the applied state moved, then probes every replica's
    /// `/ready` and replaces the ready set with those that answered 200.
    pub async fn probe_now(&self) {
        self.refresh().await;
        self.probe_all().await;
    }

    /// Probes `endpoints` at once (bounded), answering those that are ready.
    async fn probe_each(&self, endpoints: HashSet<String>) -> HashSet<String> {
        stream::iter(endpoints)
            .map(|endpoint| async move { self.probe(&endpoint).await.then_some(endpoint) })
            .buffer_unordered(self.config.probe_concurrency)
            .filter_map(|ready| async move { ready })
            .collect()
            .await
    }

    /// Probes the replicas of the models of `digests` only, updating their part of
    /// the ready set.
    async fn probe_models(&self, digests: &[String]) {
        let routes = self.routes();
        let endpoints: HashSet<String> = digests
            .iter()
            .flat_map(|d| routes.replicas(d))
            .cloned()
            .collect();
        let up = self.probe_each(endpoints.clone()).await;
        let mut ready = self.ready.lock();
        for endpoint in endpoints {
            if up.contains(&endpoint) {
                ready.insert(endpoint);
            } else {
                ready.remove(&endpoint);
            }
        }
    }

    /// Probes every known replica at once (bounded) and replaces the ready set.
    async fn probe_all(&self) {
        let routes = self.routes();
        let endpoints: HashSet<String> = routes.replicas.values().flatten().cloned().collect();
        // Samples and loads of replicas no longer routed to are forgotten.
        self.samples.retain(|e| endpoints.contains(e));
        self.loads.retain(|e| endpoints.contains(e));
        let ready = self.probe_each(endpoints).await;
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

    /// Whether the replica at `endpoint` answered its last probe ready.
    pub fn is_ready(&self, endpoint: &str) -> bool {
        self.ready.lock().contains(endpoint)
    }

    /// What this server relayed to the replica at `endpoint` in the `window`
    /// ending now.
    pub fn replica_stats(&self, endpoint: &str, window: Duration) -> ReplicaStats {
        self.samples.stats(endpoint, window)
    }

    /// The model a request for `asked` goes to: as the routing table resolves it,
    /// except that a name whose newest model has no ready replica goes to the
    /// newest model of that name that has one.
    fn resolve_ready<'r>(&self, routes: &'r Routes, asked: &str) -> Resolution<'r> {
        let resolved = routes.resolve(asked);
        let Resolution::Found(model) = resolved else {
            return resolved;
        };
        if model.name != asked {
            return resolved;
        }
        if self.has_ready(routes, &model.digest) {
            return resolved;
        }
        routes
            .models
            .iter()
            .filter(|m| m.name == asked)
            .find(|m| self.has_ready(routes, &m.digest))
            .map_or(resolved, Resolution::Found)
    }

    /// The replicas a request for `model` (asked as `asked`) tries, in two sides:
    /// while a rollout's canaries wait, the side this request's turn picks
    /// (canaries with the rollout's percent) then the other; otherwise the model's
    /// replicas.
    fn sides<'r>(&self, routes: &'r Routes, model: &ModelName, asked: &str) -> [&'r [String]; 2] {
        let plain = [routes.replicas(&model.digest), &[][..]];
        if asked != model.name {
            return plain;
        }
        let Some(split) = routes.splits.get(&model.name) else {
            return plain;
        };
        let turn = self.split_turn.fetch_add(1, Ordering::Relaxed) % 100;
        if turn < usize::from(split.percent) {
            [&split.canary, &split.stable]
        } else {
            [&split.stable, &split.canary]
        }
    }

    /// True when the replica's `/ready` answers 200 within the probe timeout; the
    /// load its answer reports, if any, is recorded.
    async fn probe(&self, endpoint: &str) -> bool {
        /// More than a `/ready` answer ever needs; a longer one is not read.
        const MOST: usize = 4096;
        #[derive(serde::Deserialize)]
        struct ReadyAnswer {
            load: Option<aigrid_api::ReplicaLoadReport>,
        }
        let sent = self
            .client
            .get(format!("{endpoint}/ready"))
            .timeout(self.config.probe_timeout)
            .send()
            .await;
        let Ok(mut resp) = sent else {
            return false;
        };
        if resp.status() != StatusCode::OK {
            return false;
        }
        let mut body = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() > MOST {
                return true;
            }
        }
        if let Ok(ReadyAnswer { load: Some(load) }) = serde_json::from_slice(&body) {
            self.loads.record(endpoint, Instant::now(), load);
        }
        true
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

    pub(crate) fn record(&self, route: Route, status: StatusCode, started: Instant) {
        self.metrics
            .requests
            .with_label_values(&[route.label(), status.as_str()])
            .inc();
        self.metrics
            .seconds
            .with_label_values(&[route.label()])
            .observe(started.elapsed().as_secs_f64());
    }

    pub(crate) fn admit(&self) -> Result<OwnedSemaphorePermit, GatewayError> {
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| GatewayError::RateLimited {
                limit: self.config.max_in_flight,
            })
    }

    /// Relays one inference request, answering the replica's response or an error.
    /// The scope of a request's API key ([`super::keys`]).
    pub(crate) fn scope(&self, headers: &axum::http::HeaderMap) -> Result<Scope, GatewayError> {
        super::keys::scope(headers, self.config.require_api_key, |key| {
            let hash = key.secret_hash();
            self.raft
                .read_local(|s| s.api_key_circle(&key.id, &hash).map(str::to_owned))
        })
    }

    pub(crate) async fn relay(&self, route: Route, req: Request) -> Result<Response, GatewayError> {
        let permit = self.admit()?;
        let scope = self.scope(req.headers())?;
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
        let mut resolved = self.resolve_ready(&routes, &asked);
        let served =
            matches!(&resolved, Resolution::Found(m) if self.has_ready(&routes, &m.digest));
        if !served {
            // The table trails the applied state by up to a probe interval. Before
            // an answer the newest state could change (no such model, none of its
            // replicas ready, nothing to hold for), bring it up to what this server
            // has applied: a model or job committed and applied here is never
            // refused for a table built before it.
            routes = self.current().await;
            resolved = self.resolve_ready(&routes, &asked);
        }
        let model = match resolved {
            // A model the key may not call is answered as one that does not exist.
            Resolution::Found(model) if routes.visible(&scope, &model.digest) => model,
            Resolution::Found(_) | Resolution::Unknown => {
                return Err(GatewayError::ModelNotFound(asked))
            }
            Resolution::Ambiguous(matches) => {
                return Err(GatewayError::AmbiguousModel { asked, matches })
            }
        };
        let (digest, name) = (model.digest.clone(), model.name.clone());
        let elastic = routes.elastic.contains_key(&digest);
        let outgoing = Outgoing {
            route,
            asked: &asked,
            headers: &headers,
            body: &body,
        };
        let mut permit = Some(permit);
        let mut tried: Vec<String> = Vec::new();
        let mut waited = false;
        loop {
            if elastic && !waited && !self.has_ready(&routes, &digest) {
                // A scaled model with no ready replica (at zero, or its last one
                // just went): wait for one, waking its groups at zero.
                routes = self.hold(&name, &digest).await?;
                waited = true;
            }
            let model = routes
                .models
                .iter()
                .find(|m| m.digest == digest)
                .ok_or_else(|| GatewayError::ModelNotFound(asked.clone()))?;
            if let Some(answer) = self
                .attempt(&outgoing, &routes, model, &mut tried, &mut permit)
                .await?
            {
                return Ok(answer);
            }
            if !elastic || waited {
                return Err(routes.not_ready(model, tried.len()));
            }
        }
    }

    /// Sends the request to the ready replicas of `model` in turn (skipping those
    /// in `tried`, adding each that cannot be reached) until one answers; `None`
    /// when none could.
    async fn attempt(
        &self,
        out: &Outgoing<'_>,
        routes: &Routes,
        model: &ModelName,
        tried: &mut Vec<String>,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<Option<Response>, GatewayError> {
        let [first, second] = self.sides(routes, model, out.asked);
        while let Some(outstanding) = self
            .pick(model, first, tried)
            .or_else(|| self.pick(model, second, tried))
        {
            let endpoint = outstanding.endpoint.clone();
            let sent_at = Instant::now();
            let sent = self
                .client
                .post(format!("{endpoint}{}", out.route.path()))
                .headers(forwarded_request_headers(out.headers))
                .body(out.body.clone())
                .send()
                .await;
            let failed = sent
                .as_ref()
                .map_or(true, |resp| resp.status().is_server_error());
            self.samples.record(&endpoint, sent_at.elapsed(), failed);
            match sent {
                Ok(resp) => return Ok(Some(stream_back(resp, (outstanding, permit.take())))),
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
        Ok(None)
    }

    /// `GET /v1/models/{model}`: one model, by name, digest or unique digest prefix,
    /// as `GET /v1/models` lists it; a model that exists but has no ready replica is
    /// not ready (503), as a request for it would be.
    pub(crate) fn retrieve(&self, scope: &Scope, asked: &str) -> Result<ModelCard, GatewayError> {
        let routes = self.routes();
        let model = match self.resolve_ready(&routes, asked) {
            Resolution::Found(model) if routes.visible(scope, &model.digest) => model,
            Resolution::Found(_) | Resolution::Unknown => {
                return Err(GatewayError::ModelNotFound(asked.to_owned()))
            }
            Resolution::Ambiguous(matches) => {
                return Err(GatewayError::AmbiguousModel {
                    asked: asked.to_owned(),
                    matches,
                })
            }
        };
        if !self.has_ready(&routes, &model.digest) {
            return Err(routes.not_ready(model, 0));
        }
        Ok(card(model))
    }

    /// `GET /v1/models`: the models with a ready replica, one entry per name (the
    /// model a request by that name goes to).
    pub(crate) fn list(&self, scope: &Scope) -> ModelList {
        let routes = self.routes();
        let ready = self.ready.lock();
        let mut seen = HashSet::new();
        let data = routes
            .models
            .iter()
            .filter(|m| routes.visible(scope, &m.digest))
            .filter(|m| routes.replicas(&m.digest).iter().any(|e| ready.contains(e)))
            .filter(|m| seen.insert(m.name.clone()))
            .map(card)
            .collect();
        ModelList {
            object: "list".to_owned(),
            data,
        }
    }
}

/// A model as `GET /v1/models` lists it: OpenAI's shape plus its digest.
fn card(model: &ModelName) -> ModelCard {
    ModelCard {
        id: model.name.clone(),
        object: "model".to_owned(),
        created: model.created_at.as_millis() / 1000,
        owned_by: "aigrid".to_owned(),
        digest: Some(model.digest.clone()),
    }
}
