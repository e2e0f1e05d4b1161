//! The route handlers. Each turns its body into a validated request (or answers an error) and
//! hands it on; the OpenAPI document is generated from the annotations here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::answer;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::protocol::{
    ChatCompletionRequest, CompletionRequest, Deleted, Health, ModelCard, ModelList,
    RegisterAdapter,
};
use crate::state::AppState;
use crate::validate;

/// `POST /v1/chat/completions`
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "generation",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer; with `stream`, server-sent events whose `data` is a `ChatCompletionChunk` (then `[DONE]`)",
            content(
                (crate::protocol::ChatCompletion = "application/json"),
                (crate::protocol::ChatChunkEvent = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request, or `context_length_exceeded`", body = crate::protocol::ErrorResponse),
        (status = 404, description = "Unknown model", body = crate::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = crate::protocol::ErrorResponse),
        (status = 429, description = "Queue full", body = crate::protocol::ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Shutting down", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<ChatCompletionRequest>,
) -> ApiResult<Response> {
    let valid = validate::chat(&state, &body)?;
    answer::chat(state, valid).await
}

/// `POST /v1/completions`
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "generation",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The answer; with `stream`, server-sent events whose `data` is a `Completion` chunk (then `[DONE]`)",
            content(
                (crate::protocol::Completion = "application/json"),
                (crate::protocol::CompletionChunkEvent = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request, or `context_length_exceeded`", body = crate::protocol::ErrorResponse),
        (status = 404, description = "Unknown model", body = crate::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = crate::protocol::ErrorResponse),
        (status = 429, description = "Queue full", body = crate::protocol::ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Shutting down", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<CompletionRequest>,
) -> ApiResult<Response> {
    let valid = validate::completion(&state, &body)?;
    answer::completion(state, valid).await
}

fn base_card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.cfg.model_name.clone(),
        object: "model",
        created: state.started,
        owned_by: "fount",
        parent: None,
        max_model_len: state.context(),
    }
}

fn adapter_card(state: &AppState, name: &str) -> ModelCard {
    let created = state
        .adapter_times
        .lock()
        .ok()
        .and_then(|t| t.get(name).copied())
        .unwrap_or(state.started);
    ModelCard {
        id: name.to_string(),
        object: "model",
        created,
        owned_by: "fount",
        parent: Some(state.cfg.model_name.clone()),
        max_model_len: state.context(),
    }
}

/// `GET /v1/models`
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses((status = 200, description = "The base model, then its adapters", body = ModelList))
)]
pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let mut data = vec![base_card(&state)];
    for (name, _, _) in state.engine.adapters().list() {
        data.push(adapter_card(&state, &name));
    }
    Json(ModelList {
        object: "list",
        data,
    })
}

/// `GET /v1/models/{id}`
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "models",
    params(("id" = String, Path, description = "A model or adapter name")),
    responses(
        (status = 200, description = "The model", body = ModelCard),
        (status = 404, description = "Unknown model", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelCard>> {
    match validate::resolve_model(&state, &id)? {
        None => Ok(Json(base_card(&state))),
        Some(name) => Ok(Json(adapter_card(&state, &name))),
    }
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// `POST /v1/adapters`: registers a PEFT adapter directory under a name (a new version if the
/// name exists: running streams keep the old one).
#[utoipa::path(
    post,
    path = "/v1/adapters",
    tag = "admin",
    request_body = RegisterAdapter,
    responses(
        (status = 200, description = "Registered", body = ModelCard),
        (status = 400, description = "Bad name, or no usable adapter at the path", body = crate::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = crate::protocol::ErrorResponse),
        (status = 503, description = "Shutting down", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn register_adapter(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<RegisterAdapter>,
) -> ApiResult<Json<ModelCard>> {
    if !valid_name(&body.name) || body.name == state.cfg.model_name {
        return Err(ApiError::invalid(
            "name",
            format!(
                "adapter names are 1 to 128 letters, digits, '-', '_', '.' or ':' and differ from the base model's name; {:?} is not",
                body.name
            ),
        ));
    }
    let dir = PathBuf::from(&body.path);
    // load it once to refuse an unusable adapter now rather than on a tenant's first request
    let check = {
        let (dir, config, dtype) = (dir.clone(), state.config.clone(), state.dtype);
        tokio::task::spawn_blocking(move || {
            fount_model::LoraAdapter::load(&dir, &config, dtype, &candle_core::Device::Cpu)
                .map(|_| ())
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    check.map_err(|e| ApiError::invalid("path", format!("no usable adapter at {dir:?}: {e}")))?;
    state.register_adapter(&body.name, dir);
    Ok(Json(adapter_card(&state, &body.name)))
}

/// `DELETE /v1/adapters/{id}`: removes an adapter; running streams on it finish.
#[utoipa::path(
    delete,
    path = "/v1/adapters/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The adapter's name")),
    responses(
        (status = 200, description = "Removed", body = Deleted),
        (status = 404, description = "No such adapter", body = crate::protocol::ErrorResponse),
        (status = 503, description = "Shutting down", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn delete_adapter(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Deleted>> {
    if !state.engine.adapters().remove(&id) {
        return Err(ApiError::NotFound {
            message: format!("no adapter named {id:?}"),
            param: None,
            code: "adapter_not_found",
        });
    }
    if let Ok(mut t) = state.adapter_times.lock() {
        t.remove(&id);
    }
    Ok(Json(Deleted {
        id,
        object: "model",
        deleted: true,
    }))
}

/// `GET /health`
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Serving", body = Health),
        (status = 503, description = "Draining after SIGTERM", body = Health),
    )
)]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health { status: "draining" }),
        )
            .into_response()
    } else {
        Json(Health { status: "ok" }).into_response()
    }
}

/// `GET /metrics`
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.engine.metrics());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /openapi.json`
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
        .into_response()
}

/// Any other path.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound {
        message: format!("no route for {} {}", req.method(), req.uri().path()),
        param: None,
        code: "not_found",
    }
}

/// A known path with another method.
pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(req.method().to_string(), req.uri().path().to_string())
}

/// Refuses generation and admin requests while draining, and counts every exchange.
pub async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().to_string();
    let response = if state.is_draining() && route.starts_with("/v1/") {
        ApiError::Draining.into_response()
    } else {
        next.run(req).await
    };
    state
        .metrics
        .record(&route, &method, response.status().as_u16(), start.elapsed());
    response
}
