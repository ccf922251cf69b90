//! The `/v1` routes, each documented in the OpenAPI document under the `inference`
//! tag, and their router. Requests are relayed to a replica as they came; the
//! documented request and answer bodies are what the model servers take and send.

use std::sync::Arc;
use std::time::Instant;

use aigrid_api::openai::{
    ChatCompletion, ChatRequest, Completion, CompletionRequest, EmbeddingList, EmbeddingRequest,
    ModelCard, ModelList, OpenAiErrorBody,
};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, MethodRouter};
use axum::{Json, Router};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::balancer::Gateway;
use super::error::GatewayError;
use super::table::Route;

/// `GET /v1/models`: the models with a ready replica, one per name.
#[utoipa::path(
    get, path = "/v1/models", tag = "inference",
    responses(
        (status = 200, description = "The models served now (those of the API key's circle)", body = ModelList),
        (status = 401, description = "No API key where one is required, or an invalid one", body = OpenAiErrorBody),
        (status = 429, description = "Too many requests in flight", body = OpenAiErrorBody),
    )
)]
async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let resp = match gateway
        .admit()
        .and_then(|p| Ok((p, gateway.scope(&headers)?)))
    {
        Ok((_permit, scope)) => Json(gateway.list(&scope)).into_response(),
        Err(e) => e.into_response(),
    };
    gateway.record(Route::Models, resp.status(), started);
    resp
}

/// `GET /v1/models/{model}`: one model, by name, digest or unique digest prefix.
#[utoipa::path(
    get, path = "/v1/models/{model}", tag = "inference",
    params(("model" = String, Path, description = "A pushed model's name, its digest, or a unique digest prefix of at least 6 characters")),
    responses(
        (status = 200, description = "The model, served now", body = ModelCard),
        (status = 401, description = "No API key where one is required, or an invalid one", body = OpenAiErrorBody),
        (status = 400, description = "The prefix matches more than one model", body = OpenAiErrorBody),
        (status = 404, description = "No such model", body = OpenAiErrorBody),
        (status = 429, description = "Too many requests in flight", body = OpenAiErrorBody),
        (status = 503, description = "The model exists but no replica is ready (`model_not_ready`; \"loading\" while it is being deployed)", body = OpenAiErrorBody),
    )
)]
async fn get_model(
    State(gateway): State<Arc<Gateway>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let resp = match gateway
        .admit()
        .and_then(|p| Ok((p, gateway.scope(&headers)?)))
    {
        Ok((_permit, scope)) => match gateway.retrieve(&scope, &model) {
            Ok(entry) => Json(entry).into_response(),
            Err(e) => e.into_response(),
        },
        Err(e) => e.into_response(),
    };
    gateway.record(Route::Models, resp.status(), started);
    resp
}

/// What a relayed request may be answered instead of a replica's answer, in
/// OpenAI's error shape: by the gateway, or by the replica refusing it.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Documentation only: the bodies are built by `GatewayError` and the replicas.
enum RelayErrors {
    /// Invalid request, no `model`, or an ambiguous digest prefix.
    #[response(status = 400)]
    BadRequest(OpenAiErrorBody),
    /// No API key where one is required, or an invalid one.
    #[response(status = 401)]
    Unauthorized(OpenAiErrorBody),
    /// No such model.
    #[response(status = 404)]
    NotFound(OpenAiErrorBody),
    /// Body too large.
    #[response(status = 413)]
    TooLarge(OpenAiErrorBody),
    /// Too many requests in flight here or at the replica.
    #[response(status = 429)]
    RateLimited(OpenAiErrorBody),
    /// The replica failed.
    #[response(status = 500)]
    Failed(OpenAiErrorBody),
    /// No replica ready (`model_not_ready`; "loading" while it is being deployed).
    #[response(status = 503)]
    NotReady(OpenAiErrorBody),
    /// The replica did not answer in time.
    #[response(status = 504)]
    Timeout(OpenAiErrorBody),
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

/// `POST /v1/completions`: text completion of one or more prompts.
#[utoipa::path(
    post, path = "/v1/completions", tag = "inference", request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, server-sent events each carrying a chunk, then `data: [DONE]`", content(
            (Completion = "application/json"),
            (Completion = "text/event-stream"),
        )),
        RelayErrors,
    )
)]
async fn completions(State(gateway): State<Arc<Gateway>>, req: Request) -> Response {
    relay(&gateway, Route::Completions, req).await
}

/// `POST /v1/chat/completions`: a chat answer, the model's chat template applied.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "inference", request_body = ChatRequest,
    responses(
        (status = 200, description = "The answer; with `stream`, server-sent events each carrying a `chat.completion.chunk`, then `data: [DONE]`", content(
            (ChatCompletion = "application/json"),
            (ChatCompletion = "text/event-stream"),
        )),
        RelayErrors,
    )
)]
async fn chat_completions(State(gateway): State<Arc<Gateway>>, req: Request) -> Response {
    relay(&gateway, Route::ChatCompletions, req).await
}

/// `POST /v1/embeddings`: one vector per input.
#[utoipa::path(
    post, path = "/v1/embeddings", tag = "inference", request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "The embeddings", body = EmbeddingList),
        RelayErrors,
    )
)]
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

/// The documented routes, each answering 405 in OpenAI's shape to other methods.
fn documented() -> OpenApiRouter<Arc<Gateway>> {
    OpenApiRouter::new()
        .routes(routes!(list_models).map(only))
        .routes(routes!(get_model).map(only))
        .routes(routes!(completions).map(only))
        .routes(routes!(chat_completions).map(only))
        .routes(routes!(embeddings).map(only))
}

/// The gateway's part of the OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().into_openapi()
}

/// The `/v1` routes, to merge into a server's router.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config().max_body_bytes;
    let (routes, _) = documented().split_for_parts();
    routes
        .route("/v1/{*rest}", any(unknown_route))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gateway)
}
