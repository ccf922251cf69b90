//! The control API under `/api/v1`, plus `/metrics`, `/health` and `/ready`; the
//! `/v1` inference routes come from [`crate::gateway`].
//!
//! One module per area, each with its routes built by `utoipa-axum`'s
//! [`OpenApiRouter`]: a handler's route and its documentation are one, so the
//! document lists exactly what is served. [`plumbing`] holds what every area shares
//! (state, errors, extractors, `propose`, `read`) and imports no area; this module
//! puts the areas together, adds the door (admission, 404 and 405 in the API's
//! shape) and serves the document and the index.
//!
//! | area (tag) | module | routes |
//! |---|---|---|
//! | `jobs` | [`jobs`] | `/api/v1/jobs`, `/api/v1/allocations/{id}/logs` |
//! | `nodes` | [`nodes`] | `/api/v1/nodes`, drain, revoke, a node's allocations |
//! | `agents` | [`agents`] | what agents call, signed: register, heartbeat, assignments |
//! | `join-tokens` | [`tokens`] | `/api/v1/join-tokens` |
//! | `access` | [`access`] | `/api/v1/whoami`, `/api/v1/identities`, `/api/v1/circles`, members, API keys |
//! | `chain` | [`chain`] | governed circles, `/api/v1/proposals` and decisions, `/api/v1/audit` with checkpoints, proofs, export |
//! | `cluster` | [`cluster`] | `/api/v1/cluster`, members joining and leaving |
//! | `access` | [`usage`] | `/api/v1/usage`: metered use by circle, job, node and GPU model |
//! | `treasury` | [`treasury`] | `/api/v1/treasury`: balances, ledgers, deposits, transfers; `/api/v1/farmers/{id}/ledger` |
//! | `models` | [`models`] | `/api/v1/models`, `/api/v1/storage` |
//! | `operations` | [`ops`] | `/metrics`, `/health`, `/ready` |
//! | `api` | here | `/api/v1` (the index), `/api/v1/openapi.json` |
//!
//! Who is calling is [`auth`]'s: every route but `/health`, `/ready`, `/metrics`,
//! the index and the document takes a signed request (401 otherwise) and checks
//! the signer's role (403).
//!
//! Every write is a command proposed through Raft and answered only after it is
//! applied (so a 2xx means committed); every read goes through ReadIndex unless the
//! caller asks for `?stale=true`.

pub mod access;
pub mod agents;
pub mod auth;
pub mod chain;
pub mod cluster;
pub mod deployments;
pub mod jobs;
pub mod models;
pub mod nodes;
pub mod ops;
pub mod plumbing;
mod rate;
pub mod replay;
pub mod rollouts;
pub mod tokens;
pub mod treasury;
pub mod usage;
mod verifier;

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use aigrid_api::{ApiArea, ApiIndex, ErrorCode, StorageInfo};
use aigrid_consensus::RaftNode;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use prometheus::Registry;
use tokio::sync::Semaphore;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use plumbing::{
    decode_json, ApiError, ApiLimits, ApiState, JsonBody, OptionalJsonBody, RateKey,
    MAX_MODEL_BODY_LIMIT,
};

use crate::clock::SharedClock;
use crate::hub::AgentHub;
use crate::state::ClusterState;
use plumbing::{ApiStateInner, HttpMetrics};

/// Where the document is served.
const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "aigrid control API",
        description = "Jobs, nodes, models and the replicated control plane; and the \
                       OpenAI-compatible inference gateway under `/v1`."
    ),
    tags(
        (name = "jobs", description = "Jobs: submit, list, show, delete, their versions and rollouts; allocations' output"),
        (name = "nodes", description = "Nodes: list, show, drain, revoke"),
        (name = "agents", description = "What a node's agent calls, signed with its node key"),
        (name = "join-tokens", description = "Tokens new nodes present to register"),
        (name = "access", description = "Identities, circles' members and roles, circles' API keys"),
        (name = "chain", description = "The Human Chain: governed circles, proposals of guarded changes and their signed decisions, the audit log"),
        (name = "cluster", description = "The replicated control plane and its members"),
        (name = "models", description = "The model registry and the dispersed store"),
        (name = "rollouts", description = "Fleet rollouts: a model sent to the nodes chosen by attributes, in waves, staged and attested"),
        (name = "inference", description = "The OpenAI-compatible gateway to the models served"),
        (name = "treasury", description = "Circles' balances in credits, the ledger, deposits and guarded transfers; farmers' earnings"),
        (name = "operations", description = "Metrics and probes"),
        (name = "api", description = "This index and the OpenAPI document"),
    )
)]
struct ApiDoc;

/// The routes that count against the in-flight limit, with their documentation.
fn short_routes(limits: &ApiLimits) -> OpenApiRouter<ApiState> {
    let (agents, _) = agents::routes();
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(jobs::routes())
        .merge(deployments::routes())
        .merge(rollouts::routes())
        .merge(nodes::routes())
        .merge(agents)
        .merge(tokens::routes())
        .merge(access::routes())
        .merge(chain::routes())
        .merge(cluster::routes())
        .merge(usage::routes())
        .merge(treasury::routes())
        .merge(models::routes(limits.max_model_body_bytes))
        .routes(routes!(index))
        .routes(routes!(openapi_json))
}

/// The whole document: every route a server serves, the gateway's included.
fn document(limits: &ApiLimits) -> utoipa::openapi::OpenApi {
    let (_, long_polls) = agents::routes();
    let mut doc = short_routes(limits)
        .merge(long_polls)
        .merge(ops::routes())
        .into_openapi();
    doc.merge(crate::gateway::openapi());
    doc
}

/// The OpenAPI document of the control API and the gateway, generated from the
/// routes themselves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> =
        LazyLock::new(|| document(&ApiLimits::default()));
    DOC.clone()
}

/// The OpenAPI 3.1 document of everything this server serves.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "api",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The index of the API: the document's address and, by area, its routes.
#[utoipa::path(
    get, path = "/api/v1", tag = "api",
    responses((status = 200, description = "The index", body = ApiIndex))
)]
async fn index() -> Json<ApiIndex> {
    static INDEX: LazyLock<ApiIndex> = LazyLock::new(|| index_of(&openapi()));
    Json(INDEX.clone())
}

/// The index `doc` gives: its tags in order, each with the routes it tags.
fn index_of(doc: &utoipa::openapi::OpenApi) -> ApiIndex {
    let json = serde_json::to_value(doc).unwrap_or_default();
    let mut areas: Vec<ApiArea> = json["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| ApiArea {
            name: t["name"].as_str().unwrap_or_default().to_owned(),
            description: t["description"].as_str().unwrap_or_default().to_owned(),
            routes: Vec::new(),
        })
        .collect();
    for (path, item) in json["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            for tag in op["tags"].as_array().into_iter().flatten() {
                if let Some(area) = areas
                    .iter_mut()
                    .find(|a| Some(a.name.as_str()) == tag.as_str())
                {
                    area.routes
                        .push(format!("{} {path}", method.to_ascii_uppercase()));
                }
            }
        }
    }
    ApiIndex {
        title: doc.info.title.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        openapi: OPENAPI_PATH.to_owned(),
        areas,
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route for {method} {uri}"))
}

async fn method_not_allowed(req: Request, next: Next) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let resp = next.run(req).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        return ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{method} is not allowed on {}", uri.path()),
        )
        .into_response();
    }
    resp
}

/// Counts requests and answers 429 when `max_in_flight` are already being served.
async fn admission(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        state
            .http
            .requests
            .with_label_values(&[method.as_str(), "429"])
            .inc();
        return ApiError::new(
            ErrorCode::RateLimited,
            "too many requests in flight; retry later",
        )
        .into_response();
    };
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .http
        .seconds
        .with_label_values(&[method.as_str()])
        .observe(started.elapsed().as_secs_f64());
    state
        .http
        .requests
        .with_label_values(&[method.as_str(), resp.status().as_str()])
        .inc();
    resp
}

/// Who a server trusts at start: the admins it makes a new cluster's, and its own
/// identity.
#[derive(Debug, Clone, Default)]
pub struct ServerAccess {
    /// Names and public keys of the admins of a cluster that has none yet.
    pub admins: Vec<(String, aigrid_api::PublicKey)>,
    /// This server's own identity (what its own loops sign with).
    pub server_key: Option<aigrid_api::PublicKey>,
    /// The CA this server issues nodes' data-port certificates with, when it holds
    /// the CA key.
    pub node_issuer: Option<Arc<aigrid_tls::ClusterCa>>,
}

/// The most a control write's body may be to be handled on the replica's thread.
pub const REPLICA_BODY_BYTES: u64 = 64 << 10;

/// Whether a request is handled on the replica's thread, where a server serves its
/// connections ([`crate::listener::Placement`]): the control API's writes (any
/// method but `GET`, `HEAD` and `OPTIONS` under `/api/v1/`) whose body is known to
/// be at most [`REPLICA_BODY_BYTES`]. Each ends in a proposal, which that thread
/// makes, commits and answers, so such a write is read, checked, proposed, committed
/// and answered without waking another thread. Everything else (reads, which may
/// serialise much state; large bodies, such as a model's manifest; `/v1`, the
/// console, metrics) is handled on the server's runtime, and never holds up the
/// replica.
pub fn handled_on_the_replica(method: &Method, uri: &Uri, body: Option<u64>) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        && uri.path().starts_with("/api/v1/")
        && body.is_some_and(|bytes| bytes <= REPLICA_BODY_BYTES)
}

/// The public HTTP surface of a server: control API, `/v1` inference gateway,
/// metrics, probes (Raft has a listener of its own, with mutual TLS). `storage` is
/// what `GET /api/v1/storage` answers.
// Each argument is a part the server built and owns; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn router(
    raft: RaftNode<ClusterState>,
    registry: Registry,
    limits: &ApiLimits,
    agents: Arc<AgentHub>,
    storage: StorageInfo,
    gateway: Arc<crate::gateway::Gateway>,
    clock: SharedClock,
    access: ServerAccess,
) -> prometheus::Result<Router> {
    let ServerAccess {
        admins,
        server_key,
        node_issuer,
    } = access;
    let state = ApiState::new(ApiStateInner {
        server_key,
        node_issuer,
        clock,
        nonces: Arc::new(replay::NonceCache::default()),
        verifier: verifier::Verifier::new(&registry)?,
        bootstrap_admins: Arc::new(admins),
        http: HttpMetrics::register(&registry)?,
        agents,
        raft: raft.clone(),
        registry,
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        storage: Arc::new(storage),
        model_uploads: Arc::new(Semaphore::new(limits.max_model_uploads)),
    });
    let (_, long_polls) = agents::routes();
    let (short, _) = short_routes(limits).split_for_parts();
    let (long_polls, _) = long_polls.split_for_parts();
    let (ops, _) = ops::routes().split_for_parts();
    let mut api = short
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), admission))
        .merge(long_polls)
        .merge(ops)
        .fallback(not_found)
        .layer(middleware::from_fn(method_not_allowed));
    // Outside admission, so a client over its rate takes no in-flight place; inside
    // `identify`, which names a verified signer (`RateKey`), so a signer is counted
    // as itself wherever it connects from, and anyone else by address.
    if let Some(limiter) = rate::RateLimiter::new(limits) {
        api = api.layer(middleware::from_fn_with_state(limiter, rate::limit_rate));
    }
    let api = api
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::identify,
        ))
        .with_state(state);
    // The gateway has its own body limit, admission and error shape (OpenAI's). Raft
    // is not here: it has a listener of its own, with mutual TLS.
    Ok(api
        .merge(crate::gateway::router(gateway))
        .merge(crate::console::router()))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_control_writes_are_handled_on_the_replica_and_nothing_else() {
        let on = |method: Method, path: &str, body: Option<u64>| {
            handled_on_the_replica(&method, &path.parse().unwrap(), body)
        };
        assert!(on(Method::POST, "/api/v1/jobs", Some(900)));
        assert!(on(Method::DELETE, "/api/v1/jobs/web", Some(0)));
        assert!(on(
            Method::PUT,
            "/api/v1/circles/ml/quota",
            Some(REPLICA_BODY_BYTES)
        ));
        // Reads, however small.
        assert!(!on(Method::GET, "/api/v1/jobs", Some(0)));
        assert!(!on(Method::HEAD, "/api/v1/cluster", Some(0)));
        // Bodies larger than it takes, or of unknown length (a model's manifest).
        assert!(!on(
            Method::POST,
            "/api/v1/models",
            Some(REPLICA_BODY_BYTES + 1)
        ));
        assert!(!on(Method::POST, "/api/v1/jobs", None));
        // Outside the control API: inference, the console, metrics.
        assert!(!on(Method::POST, "/v1/chat/completions", Some(100)));
        assert!(!on(Method::POST, "/api/v1", Some(0)));
        assert!(!on(Method::GET, "/metrics", Some(0)));
    }

    /// Every operation carries one tag, an area the document declares: none is
    /// tagged by its Rust module path.
    #[test]
    fn every_operation_is_tagged_by_its_area() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let declared: Vec<&str> = doc["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let tags: Vec<&str> = op["tags"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path} has no tag"))
                    .iter()
                    .map(|t| t.as_str().unwrap())
                    .collect();
                assert_eq!(tags.len(), 1, "{method} {path}: {tags:?}");
                assert!(declared.contains(&tags[0]), "{method} {path}: {tags:?}");
                operations += 1;
            }
        }
        let chat = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
        for status in ["200", "400", "404", "413", "429", "500", "503", "504"] {
            assert!(chat[status]["content"].is_object(), "{status}: {chat}");
        }
        assert!(doc["paths"]["/api/v1/nodes/{id}/heartbeat"]["post"].is_object());
        assert!(operations >= 36, "{operations} operations");
    }

    /// The index lists each area with the routes the document gives it.
    #[test]
    fn the_index_lists_every_route_by_area() {
        let doc = openapi();
        let index = index_of(&doc);
        assert_eq!(index.openapi, OPENAPI_PATH);
        let listed: usize = index.areas.iter().map(|a| a.routes.len()).sum();
        let json = serde_json::to_value(&doc).unwrap();
        let documented: usize = json["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(listed, documented);
        let jobs = index.areas.iter().find(|a| a.name == "jobs").unwrap();
        assert!(jobs.routes.contains(&"POST /api/v1/jobs".to_owned()));
        let inference = index.areas.iter().find(|a| a.name == "inference").unwrap();
        assert!(inference
            .routes
            .contains(&"GET /v1/models/{model}".to_owned()));
    }
}
