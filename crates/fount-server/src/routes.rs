//! The route handlers. Each turns its body into a validated request (or answers an error) and
//! hands it on; the OpenAPI document is generated from the annotations here.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::answer;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::protocol::{
    ChatCompletionRequest, CompletionRequest, Deleted, Health, ModelCard, ModelList,
    RegisterAdapter,
};
use crate::safety::check;
use crate::state::AppState;
use crate::tenancy::{Caller, Metering};
use crate::validate::{self, Valid};

/// `POST /v1/chat/completions`
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "generation",
    request_body = ChatCompletionRequest,
    responses(
        (status = 401, description = "No valid API key (with tenancy on)", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
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
    caller: Option<Extension<Caller>>,
    JsonBody(mut body): JsonBody<ChatCompletionRequest>,
) -> ApiResult<Response> {
    let caller = caller.map(|Extension(c)| c);
    let id = answer::random_id("chatcmpl");
    let metering = metering(&state, caller.as_ref(), &id, &body.model);
    if let Some(e) = suspended(&state, caller.as_ref(), &body.model) {
        return Metering::fail(metering, e).await;
    }
    let output = match check::chat_input(&state, caller.as_ref(), &id, &mut body).await {
        Ok(o) => o,
        Err(e) => return Metering::fail(metering, e).await,
    };
    let valid = validate::chat(&state, &body, caller.as_ref());
    let valid = match admit(&state, caller.as_ref(), &metering, valid).await {
        Ok(v) => v,
        Err(e) => return Metering::fail(metering, e).await,
    };
    let controls = controls(&state, caller, &valid, output.as_ref());
    answer::chat(state, valid, id, metering, controls).await
}

/// Why a request of `caller` for `model` may not run, if the operator suspended its tenant,
/// key, model or adapter (an unknown model is left to validation to name).
fn suspended(state: &AppState, caller: Option<&Caller>, model: &str) -> Option<ApiError> {
    let adapter = validate::resolve_model(state, model, caller).ok()?;
    state.safety.suspension(caller, model, adapter.as_deref())
}

/// What a validated request's answer is held to while it runs.
fn controls(
    state: &Arc<AppState>,
    caller: Option<Caller>,
    valid: &Valid,
    output: Option<&check::OutputCheck>,
) -> check::Controls {
    let adapter = valid.requests.first().and_then(|r| r.adapter.clone());
    let choices: usize = valid.requests.iter().map(|r| r.n).sum();
    check::Controls::new(state, caller, adapter, output, choices)
}

/// A meter for a request of an authenticated caller, when tenancy is on.
fn metering(state: &AppState, caller: Option<&Caller>, id: &str, model: &str) -> Option<Metering> {
    let (tenancy, caller) = (state.tenancy()?, caller?);
    Some(tenancy.meter(caller, id, model, &state.cfg.model_name, None))
}

/// Holds a validated request to its caller's quotas ([`crate::tenancy::Tenancy::admit`]), when
/// tenancy is on.
async fn admit(
    state: &AppState,
    caller: Option<&Caller>,
    metering: &Option<Metering>,
    valid: ApiResult<Valid>,
) -> ApiResult<Valid> {
    let mut valid = valid?;
    if let Some(adapter) = valid.requests.first().and_then(|r| r.adapter.as_deref()) {
        state.ready_adapter(adapter).await?;
    }
    if let (Some(tenancy), Some(caller), Some(m)) = (state.tenancy(), caller, metering) {
        tenancy
            .admit(caller, &valid.model, &mut valid.requests, m)
            .await?;
    }
    Ok(valid)
}

/// `POST /v1/completions`
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "generation",
    request_body = CompletionRequest,
    responses(
        (status = 401, description = "No valid API key (with tenancy on)", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
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
    caller: Option<Extension<Caller>>,
    JsonBody(mut body): JsonBody<CompletionRequest>,
) -> ApiResult<Response> {
    let caller = caller.map(|Extension(c)| c);
    let id = answer::random_id("cmpl");
    let metering = metering(&state, caller.as_ref(), &id, &body.model);
    if let Some(e) = suspended(&state, caller.as_ref(), &body.model) {
        return Metering::fail(metering, e).await;
    }
    let output = match check::completion_input(&state, caller.as_ref(), &id, &mut body).await {
        Ok(o) => o,
        Err(e) => return Metering::fail(metering, e).await,
    };
    let valid = validate::completion(&state, &body, caller.as_ref());
    let valid = match admit(&state, caller.as_ref(), &metering, valid).await {
        Ok(v) => v,
        Err(e) => return Metering::fail(metering, e).await,
    };
    let controls = controls(&state, caller, &valid, output.as_ref());
    answer::completion(state, valid, id, metering, controls).await
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

/// The card of adapter `name` (the engine's name) shown to its caller as `shown`.
fn adapter_card(state: &AppState, name: &str, shown: &str) -> ModelCard {
    let created = state
        .adapter_times
        .lock()
        .ok()
        .and_then(|t| t.get(name).copied())
        .unwrap_or(state.started);
    ModelCard {
        id: shown.to_string(),
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
    responses(
        (status = 200, description = "The base model, then its adapters", body = ModelList),
        (status = 401, description = "No valid API key (with tenancy on)", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn list_models(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
) -> ApiResult<Json<ModelList>> {
    let caller = caller.map(|Extension(c)| c);
    let limits = match (state.tenancy(), &caller) {
        (Some(t), Some(c)) => t.limits(c).await?,
        _ => Default::default(),
    };
    let visible = |name: &str| limits.allows(name);
    let mut data = Vec::new();
    if visible(&state.cfg.model_name) {
        data.push(base_card(&state));
    }
    let own = caller.as_ref().map(|c| format!("{}/", c.tenant.id));
    for (name, _, _) in state.engine.adapters().list() {
        let shown = match (name.split_once('/'), &own) {
            // public
            (None, _) => name.clone(),
            // the caller's own
            (Some(_), Some(own)) if name.starts_with(own.as_str()) => name[own.len()..].to_string(),
            // another tenant's: not there
            _ => continue,
        };
        if visible(&shown) {
            data.push(adapter_card(&state, &name, &shown));
        }
    }
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// `GET /v1/models/{id}`
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "models",
    params(("id" = String, Path, description = "A model or adapter name")),
    responses(
        (status = 401, description = "No valid API key (with tenancy on)", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
        (status = 200, description = "The model", body = ModelCard),
        (status = 404, description = "Unknown model", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelCard>> {
    let caller = caller.map(|Extension(c)| c);
    if let (Some(t), Some(c)) = (state.tenancy(), &caller) {
        if !t.limits(c).await?.allows(&id) {
            return Err(ApiError::model_not_found(&id));
        }
    }
    match validate::resolve_model(&state, &id, caller.as_ref())? {
        None => Ok(Json(base_card(&state))),
        Some(name) => Ok(Json(adapter_card(&state, &name, &id))),
    }
}

/// The engine's name of adapter `name` registered or removed by `caller`: private to the
/// caller's tenant unless the key is an admin key (or tenancy is off).
fn engine_name(caller: Option<&Caller>, name: &str) -> String {
    match caller {
        Some(c) if !c.is_admin() => validate::private_name(&c.tenant.id, name),
        _ => name.to_string(),
    }
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// `POST /v1/adapters`: registers a PEFT adapter directory under a name (a new version if the
/// name exists: running streams keep the old one).
#[utoipa::path(
    post,
    path = "/v1/adapters",
    tag = "admin",
    request_body = RegisterAdapter,
    responses(
        (status = 401, description = "No valid API key (with tenancy on)", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
        (status = 200, description = "Registered", body = ModelCard),
        (status = 400, description = "Bad name, or no usable adapter at the path", body = crate::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = crate::protocol::ErrorResponse),
        (status = 503, description = "Shutting down", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn register_adapter(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody<RegisterAdapter>,
) -> ApiResult<Json<ModelCard>> {
    let caller = caller.map(|Extension(c)| c);
    if !valid_name(&body.name) || body.name == state.cfg.model_name {
        return Err(ApiError::invalid(
            "name",
            format!(
                "adapter names are 1 to 128 letters, digits, '-', '_', '.' or ':' and differ from the base model's name; {:?} is not",
                body.name
            ),
        ));
    }
    // an adapter already in the artifacts store is fetched (and checked) first
    let (dir, stored) = match crate::artifacts::key_of(&body.path) {
        Some(key) => {
            let a = state.artifacts().ok_or_else(|| {
                ApiError::invalid(
                    "path",
                    "this server keeps no artifacts store (fount serve --artifacts)",
                )
            })?;
            let dir = a.fetch_dir(key, None).await.map_err(|e| {
                ApiError::invalid("path", format!("no usable adapter at {:?}: {e}", body.path))
            })?;
            let digest = fount_artifacts::manifest_of(&dir).map_err(internal)?.digest;
            (dir, Some((body.path.clone(), digest)))
        }
        None => {
            let dir = PathBuf::from(&body.path);
            (std::path::absolute(&dir).unwrap_or(dir), None)
        }
    };
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
    // a tenant's adapters are its own; an admin key registers public ones
    let name = engine_name(caller.as_ref(), &body.name);
    // every replica finds it where this one wrote it: the artifacts store, or the path given
    let (location, digest) = match (stored, state.artifacts()) {
        (Some((location, digest)), _) => (location, Some(digest)),
        (None, Some(a)) => {
            let (location, digest) = state
                .upload_adapter(a, &name, &dir)
                .await
                .map_err(internal)?;
            (location, Some(digest))
        }
        (None, None) => (dir.display().to_string(), None),
    };
    state.register_adapter(&name, dir.clone());
    state.registry.applied(&name, &location, digest.as_deref());
    if let Some(t) = state.tenancy() {
        t.store()
            .registry_put(&name, &location, digest.as_deref(), fount_store::now_ms())
            .await
            .map_err(internal)?;
    }
    crate::ledger::log_model(&state, &body.name, &dir, "adapter").await;
    Ok(Json(adapter_card(&state, &name, &body.name)))
}

/// `DELETE /v1/adapters/{id}`: removes an adapter; running streams on it finish.
#[utoipa::path(
    delete,
    path = "/v1/adapters/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "The adapter's name")),
    responses(
        (status = 401, description = "No valid API key (with tenancy on)", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
        (status = 200, description = "Removed", body = Deleted),
        (status = 404, description = "No such adapter", body = crate::protocol::ErrorResponse),
        (status = 503, description = "Shutting down", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn delete_adapter(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Deleted>> {
    let caller = caller.map(|Extension(c)| c);
    let name = engine_name(caller.as_ref(), &id);
    if id.contains('/') || !state.engine.adapters().remove(&name) {
        return Err(ApiError::NotFound {
            message: format!("no adapter named {id:?}"),
            param: None,
            code: "adapter_not_found",
        });
    }
    if let Ok(mut t) = state.adapter_times.lock() {
        t.remove(&name);
    }
    state.registry.forget(&name);
    if let Some(t) = state.tenancy() {
        t.store()
            .registry_remove(&name, fount_store::now_ms())
            .await
            .map_err(internal)?;
    }
    crate::ledger::log_act(
        &state,
        "adapter.remove",
        (format!("model/{name}"), serde_json::json!({})),
    )
    .await;
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

/// With tenancy on, every `/v1/` request needs a key with the `inference` scope (or `admin`),
/// every `/admin/v1/` request one with `admin`; the caller goes into the request's extensions.
/// Keys are never logged.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(tenancy) = state.tenancy() else {
        return next.run(req).await;
    };
    let admin = req.uri().path().starts_with("/admin/");
    if !(admin || req.uri().path().starts_with("/v1/")) {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match tenancy.authenticate(header).await {
        Err(e) => e.into_response(),
        Ok(caller) => {
            use fount_store::Scope;
            if admin && !caller.is_admin() {
                return ApiError::Forbidden("admin").into_response();
            }
            // each API needs its own scope; an admin key has them all
            let path = req.uri().path();
            let (scope, name) = if path.starts_with("/v1/files") {
                (Scope::Files, "files")
            } else if path.starts_with("/v1/fine_tuning") {
                (Scope::FineTuning, "fine_tuning")
            } else {
                (Scope::Inference, "inference")
            };
            if !(admin || caller.key.scopes.contains(&scope) || caller.is_admin()) {
                return ApiError::Forbidden(name).into_response();
            }
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
    }
}

/// `GET /v1/usage`: the caller's own usage by UTC day and model.
#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "tenancy",
    responses(
        (status = 200, description = "Usage by day and model", body = crate::protocol::UsageReport),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "Tenancy is off", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn usage(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
) -> ApiResult<Json<crate::protocol::UsageReport>> {
    let (Some(t), Some(Extension(c))) = (state.tenancy(), caller) else {
        return Err(ApiError::NotFound {
            message: "usage is recorded only with tenancy on (fount serve --data-dir)".into(),
            param: None,
            code: "not_found",
        });
    };
    let rows = t
        .store()
        .usage_summary(Some(&c.tenant.id), 0, i64::MAX)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(crate::protocol::UsageReport {
        object: "list",
        data: rows
            .into_iter()
            .map(|r| {
                let training = r.kind == fount_store::UsageKind::Training;
                crate::protocol::UsageRow {
                    day: r.day,
                    model: r.model,
                    kind: r.kind.name().into(),
                    requests: r.requests,
                    prompt_tokens: if training { 0 } else { r.prompt_tokens },
                    cached_tokens: r.cached_tokens,
                    completion_tokens: r.completion_tokens,
                    trained_tokens: if training { r.prompt_tokens } else { 0 },
                    slot_seconds: r.slot_ms as f64 / 1000.0,
                    cost_usd: fount_store::dollars(i128::from(r.cost_picodollars), 6),
                }
            })
            .collect(),
    }))
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
    let response =
        if state.is_draining() && (route.starts_with("/v1/") || route.starts_with("/admin/")) {
            ApiError::Draining.into_response()
        } else {
            next.run(req).await
        };
    state
        .metrics
        .record(&route, &method, response.status().as_u16(), start.elapsed());
    response
}
