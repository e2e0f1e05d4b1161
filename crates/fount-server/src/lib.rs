//! `fount-server`: the OpenAI-compatible HTTP API over the inference engine.
//!
//! A request flows through five steps:
//!
//! 1. [`extract::JsonBody`] parses the body; malformed JSON or a wrong type is a 400 naming the
//!    field, as OpenAI's API answers. With tenancy on, the key was checked before
//!    ([`routes::authenticate`]) and the request got its [`tenancy::Metering`].
//! 2. [`validate`] turns it into engine requests: ranges checked, the model or adapter resolved,
//!    the chat template applied, the prompt tokenised and fitted to the context.
//! 3. [`tenancy::Tenancy::admit`] holds it to every rule of the caller's quotas (models, context,
//!    rates, concurrency, budgets) and reserves what it may use.
//! 4. [`answer`] submits them to the [`fount_engine::Engine`] and shapes the events into one
//!    JSON answer or server-sent events chunked as OpenAI chunks them.
//! 5. [`error::ApiError`] is the one place an error becomes an OpenAI error object and a status.
//!
//! Around them: `/v1/models`, the adapter admin routes, OpenAI's Files API ([`files`]: the data
//! tenants fine-tune on, private to each) and Fine-tuning API ([`finetuning`]: jobs on the
//! compute pool whose `ft:` models this server serves as soon as they succeed), `/health`, Prometheus `/metrics`, and the OpenAPI
//! document at `/openapi.json` (generated from the handlers' annotations).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use fount_server::{serve, AppState, ServerConfig};
//! let state = AppState::load(
//!     std::path::Path::new("models/tiny"),
//!     None,
//!     fount_engine::EngineConfig::default(),
//!     ServerConfig::default(),
//! )?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod answer;
pub mod artifacts;
pub mod error;
pub mod extract;
pub mod files;
pub mod finetuning;
pub mod ledger;
pub mod metrics;
pub mod protocol;
pub mod replicas;
pub mod routes;
pub mod safety;
pub mod state;
pub mod tenancy;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use utoipa::OpenApi;

pub use error::{ApiError, ApiResult};
pub use state::{AppState, ServerConfig, SetupError};

/// The OpenAPI document of the routes served.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "fount",
        description = "OpenAI-compatible API of the fount inference server.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::chat_completions,
        routes::completions,
        routes::list_models,
        routes::get_model,
        routes::register_adapter,
        routes::delete_adapter,
        routes::usage,
        ledger::usage_proof,
        ledger::checkpoint,
        ledger::tile,
        files::upload,
        files::list,
        files::retrieve,
        files::content,
        files::delete,
        finetuning::create,
        finetuning::list,
        finetuning::retrieve,
        finetuning::cancel,
        finetuning::pause,
        finetuning::resume,
        finetuning::events,
        finetuning::checkpoints,
        admin::list_tenants,
        admin::create_tenant,
        admin::create_key,
        admin::list_keys,
        admin::revoke_key,
        admin::set_quota,
        admin::set_key_quota,
        admin::list_prices,
        admin::set_price,
        admin::export_usage,
        safety::routes::moderations,
        safety::routes::set_tenant_policy,
        safety::routes::set_key_policy,
        safety::routes::suspend,
        safety::routes::resume,
        routes::health,
        routes::metrics,
        routes::openapi,
    ),
    components(schemas(protocol::ChatCompletionChunk))
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty-printed JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

/// The router over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/v1/adapters", post(routes::register_adapter))
        .route("/v1/adapters/{id}", delete(routes::delete_adapter))
        .route("/v1/usage", get(routes::usage))
        .route("/v1/moderations", post(safety::routes::moderations))
        .route(
            "/admin/v1/tenants/{tenant}/policy",
            axum::routing::put(safety::routes::set_tenant_policy),
        )
        .route(
            "/admin/v1/keys/{id}/policy",
            axum::routing::put(safety::routes::set_key_policy),
        )
        .route("/admin/v1/suspensions", post(safety::routes::suspend))
        .route(
            "/admin/v1/suspensions/{kind}/{name}",
            delete(safety::routes::resume),
        )
        .route(
            "/v1/files",
            get(files::list)
                .post(files::upload)
                // uploads have their own limit (--max-file), far above a request's
                .layer(DefaultBodyLimit::max(
                    state
                        .files()
                        .map_or(limit, |f| f.max_bytes.saturating_add(64 * 1024)),
                )),
        )
        .route(
            "/v1/files/{file_id}",
            get(files::retrieve).delete(files::delete),
        )
        .route("/v1/files/{file_id}/content", get(files::content))
        .route(
            "/v1/fine_tuning/jobs",
            get(finetuning::list).post(finetuning::create),
        )
        .route(
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
            get(finetuning::retrieve),
        )
        .route(
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
            post(finetuning::cancel),
        )
        .route(
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause",
            post(finetuning::pause),
        )
        .route(
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume",
            post(finetuning::resume),
        )
        .route(
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
            get(finetuning::events),
        )
        .route(
            "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
            get(finetuning::checkpoints),
        )
        .route(
            "/admin/v1/tenants",
            get(admin::list_tenants).post(admin::create_tenant),
        )
        .route(
            "/admin/v1/keys",
            get(admin::list_keys).post(admin::create_key),
        )
        .route("/admin/v1/keys/{id}", delete(admin::revoke_key))
        .route(
            "/admin/v1/quotas/{tenant}",
            axum::routing::put(admin::set_quota),
        )
        .route(
            "/admin/v1/keys/{id}/quota",
            axum::routing::put(admin::set_key_quota),
        )
        .route("/admin/v1/prices", get(admin::list_prices))
        .route(
            "/admin/v1/prices/{*model}",
            axum::routing::put(admin::set_price),
        )
        .route("/admin/v1/usage", get(admin::export_usage))
        .route("/v1/usage/proof", get(ledger::usage_proof))
        .route("/ledger/checkpoint", get(ledger::checkpoint))
        .route("/ledger/tile/{*path}", get(ledger::tile))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::track,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` completes; then drains: new requests get 503
/// (a clear, retryable answer for a load balancer) while the running ones, streams included,
/// finish; once none is left the listener closes and this returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = state.clone();
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            draining.drain();
            tracing::info!(
                running = draining.requests_in_flight(),
                "draining: new requests get 503; running requests finish"
            );
            while draining.requests_in_flight() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
}
