//! `POST /v1/moderations` (OpenAI's shape, so `client.moderations.create` works unchanged) and
//! the admin routes that set policies and throw the operator's switches.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use fount_safety::guard::Turn;
use fount_safety::{Moderation, Policy};
use fount_store::{Subject, SuspendKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::admin::{store_err, tenancy, tenant_id};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::log_act;
use crate::state::AppState;
use crate::tenancy::Caller;

/// Most inputs in one moderation request.
pub const MAX_INPUTS: usize = 64;

/// `input`: one text or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ModerationInput {
    /// One text.
    One(String),
    /// Several texts, each moderated on its own.
    Many(Vec<String>),
}

/// A moderation request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ModerationRequest {
    /// The text(s) to classify.
    pub input: ModerationInput,
    /// `omni-moderation-latest` (or none): the rules; a served model's or adapter's name: the
    /// rules and that model asked in the Llama Guard 3 format.
    #[serde(default)]
    pub model: Option<String>,
}

/// One input's result.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModerationResult {
    /// Whether any category is flagged.
    pub flagged: bool,
    /// Every category and whether it is flagged.
    pub categories: BTreeMap<String, bool>,
    /// Every category's score (1 where a rule or the guard named it).
    pub category_scores: BTreeMap<String, f64>,
}

/// The moderation of every input.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModerationResponse {
    /// `modr-…`.
    pub id: String,
    /// The model as asked.
    pub model: String,
    /// One per input, in order.
    pub results: Vec<ModerationResult>,
}

/// The names OpenAI's moderation models go by; they select the rules alone.
const RULE_MODELS: [&str; 4] = [
    "omni-moderation-latest",
    "text-moderation-latest",
    "text-moderation-stable",
    "fount-rules",
];

/// `POST /v1/moderations`
#[utoipa::path(post, path = "/v1/moderations", tag = "safety", request_body = ModerationRequest,
    responses((status = 200, body = ModerationResponse), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, description = "Unknown model", body = crate::protocol::ErrorResponse),
              (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn moderations(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody<ModerationRequest>,
) -> ApiResult<Json<ModerationResponse>> {
    let caller = caller.map(|Extension(c)| c);
    let inputs = match body.input {
        ModerationInput::One(t) => vec![t],
        ModerationInput::Many(ts) => ts,
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("input holds 1 to {MAX_INPUTS} texts, not {}", inputs.len()),
        ));
    }
    let model = body.model.unwrap_or_else(|| RULE_MODELS[0].to_string());
    let guard = if RULE_MODELS.contains(&model.as_str()) {
        None
    } else {
        // a served model or public adapter; another tenant's is not found
        let resolved = crate::validate::resolve_model(&state, &model, caller.as_ref())?;
        if let Some(e) = state
            .safety
            .suspension(caller.as_ref(), &model, resolved.as_deref())
        {
            return Err(e);
        }
        Some(resolved.unwrap_or_else(|| model.clone()))
    };
    let id = format!("modr-{:032x}", rand::random::<u128>());
    let subject = super::check::Subject::new(caller.as_ref(), &id, "operator", false);
    let mut results = Vec::with_capacity(inputs.len());
    for text in &inputs {
        let hits = state.safety.scan(None, text, true);
        let verdict = match &guard {
            Some(g) => super::check::ask_guard(&state, g, Turn::User, &[(Turn::User, text)]).await,
            None => None,
        };
        let m = Moderation::of(&hits, verdict.as_ref());
        if m.flagged {
            let decision = fount_safety::Decision {
                action: fount_safety::Action::Log,
                categories: m
                    .categories
                    .iter()
                    .filter(|(_, f)| *f)
                    .map(|(c, _)| *c)
                    .collect(),
                rules: m.rules.clone(),
            };
            state
                .safety
                .record(subject.record("moderation", "log", &decision, text));
        }
        results.push(ModerationResult {
            flagged: m.flagged,
            categories: m
                .categories
                .iter()
                .map(|(c, f)| (c.name().to_string(), *f))
                .collect(),
            category_scores: m
                .scores
                .iter()
                .map(|(c, s)| (c.name().to_string(), *s))
                .collect(),
        });
    }
    Ok(Json(ModerationResponse { id, model, results }))
}

/// A policy to set.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct PolicyBody {
    /// The policy as TOML (docs/safety.md).
    pub policy: String,
}

/// Checks a policy file and that its guard is served; the error names what is wrong.
pub fn check_policy(state: &AppState, text: &str) -> ApiResult<Policy> {
    let policy = Policy::parse(text).map_err(|e| ApiError::invalid("policy", e.to_string()))?;
    if let Some(g) = &policy.spec.guard {
        let served = g == &state.cfg.model_name || state.engine.adapters().current(g).is_some();
        if !served {
            return Err(ApiError::invalid(
                "policy",
                format!("guard {g:?} is not a model or public adapter this server serves"),
            ));
        }
    }
    Ok(policy)
}

async fn key_id(state: &AppState, id: &str) -> ApiResult<String> {
    tenancy(state)?
        .store()
        .keys(None)
        .await
        .map_err(store_err)?
        .into_iter()
        .find(|k| k.id == id || k.prefix == id)
        .map(|k| k.id)
        .ok_or(ApiError::NotFound {
            message: format!("no key {id:?}"),
            param: None,
            code: "not_found",
        })
}

async fn set(state: &AppState, who: Subject<'_>, body: &PolicyBody) -> ApiResult<()> {
    check_policy(state, &body.policy)?;
    tenancy(state)?
        .store()
        .set_policy(who, &body.policy)
        .await
        .map_err(store_err)?;
    state.safety.reload().await.map_err(store_err)?;
    Ok(())
}

/// `PUT /admin/v1/tenants/{tenant}/policy`: sets a tenant's policy (the old one stays in force
/// if this one is refused).
#[utoipa::path(put, path = "/admin/v1/tenants/{tenant}/policy", tag = "admin", request_body = PolicyBody,
    params(("tenant" = String, Path, description = "The tenant's name")),
    responses((status = 200, body = PolicyBody), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse), (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn set_tenant_policy(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<PolicyBody>,
) -> ApiResult<Json<PolicyBody>> {
    let id = tenant_id(&state, &tenant).await?;
    set(&state, Subject::Tenant(&id), &body).await?;
    log_act(
        &state,
        "policy.set",
        (format!("tenant/{id}"), json!({"policy": &body.policy})),
    )
    .await;
    Ok(Json(body))
}

/// `PUT /admin/v1/keys/{id}/policy`: sets a key's policy (in force instead of its tenant's).
#[utoipa::path(put, path = "/admin/v1/keys/{id}/policy", tag = "admin", request_body = PolicyBody,
    params(("id" = String, Path, description = "`key_…` or the `fk-…` prefix")),
    responses((status = 200, body = PolicyBody), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse), (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn set_key_policy(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PolicyBody>,
) -> ApiResult<Json<PolicyBody>> {
    let id = key_id(&state, &id).await?;
    set(&state, Subject::Key(&id), &body).await?;
    log_act(
        &state,
        "policy.set",
        (format!("key/{id}"), json!({"policy": &body.policy})),
    )
    .await;
    Ok(Json(body))
}

/// A suspension to throw.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SuspensionBody {
    /// `tenant` (by name), `key` (id or prefix), `model` or `adapter` (the engine's name:
    /// `{tenant id}/{name}` for a tenant's own).
    pub kind: String,
    /// Which.
    pub name: String,
    /// Why (shown to the callers refused).
    #[serde(default)]
    pub reason: String,
}

async fn resolve(state: &AppState, kind: &str, name: &str) -> ApiResult<(SuspendKind, String)> {
    let k = SuspendKind::parse(kind).ok_or_else(|| {
        ApiError::invalid(
            "kind",
            format!("kind is tenant, key, model or adapter, not {kind:?}"),
        )
    })?;
    let name = match k {
        SuspendKind::Tenant => tenant_id(state, name).await?,
        SuspendKind::Key => key_id(state, name).await?,
        SuspendKind::Model | SuspendKind::Adapter => name.to_string(),
    };
    Ok((k, name))
}

/// `POST /admin/v1/suspensions`: suspends a tenant, key, model or adapter at once, on every
/// replica that shares the store; running requests of it end with a `suspended` error.
#[utoipa::path(post, path = "/admin/v1/suspensions", tag = "admin", request_body = SuspensionBody,
    responses((status = 200, body = SuspensionBody), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse), (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn suspend(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<SuspensionBody>,
) -> ApiResult<Json<SuspensionBody>> {
    let (kind, name) = resolve(&state, &body.kind, &body.name).await?;
    let reason = if body.reason.is_empty() {
        "no reason given"
    } else {
        &body.reason
    };
    tenancy(&state)?
        .store()
        .suspend(kind, &name, reason)
        .await
        .map_err(store_err)?;
    state.safety.reload().await.map_err(store_err)?;
    operator_record(&state, "suspend", kind, &name, reason);
    log_act(
        &state,
        "suspend",
        (format!("{}/{name}", kind.name()), json!({"reason": reason})),
    )
    .await;
    Ok(Json(body))
}

/// `DELETE /admin/v1/suspensions/{kind}/{name}`: lifts a suspension.
#[utoipa::path(delete, path = "/admin/v1/suspensions/{kind}/{name}", tag = "admin",
    params(("kind" = String, Path, description = "tenant, key, model or adapter"),
           ("name" = String, Path, description = "Which")),
    responses((status = 200, body = crate::protocol::Deleted), (status = 400, description = "Unknown kind", body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse)))]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult<Json<crate::protocol::Deleted>> {
    let (k, id) = resolve(&state, &kind, &name).await?;
    let lifted = tenancy(&state)?
        .store()
        .resume(k, &id)
        .await
        .map_err(store_err)?;
    if !lifted {
        return Err(ApiError::NotFound {
            message: format!("{kind} {name:?} is not suspended"),
            param: None,
            code: "not_found",
        });
    }
    state.safety.reload().await.map_err(store_err)?;
    operator_record(&state, "resume", k, &id, "");
    log_act(&state, "resume", (format!("{}/{id}", k.name()), json!({}))).await;
    Ok(Json(crate::protocol::Deleted {
        id,
        object: "suspension",
        deleted: true,
    }))
}

/// The audit record of an operator's switch.
pub fn operator_record(
    state: &AppState,
    action: &str,
    kind: SuspendKind,
    name: &str,
    reason: &str,
) {
    let subject =
        super::check::Subject::new(None, &format!("{}/{name}", kind.name()), "operator", true);
    let decision = fount_safety::Decision {
        action: fount_safety::Action::Log,
        categories: Vec::new(),
        rules: Vec::new(),
    };
    let mut rec = subject.record("operator", action, &decision, reason);
    if kind == SuspendKind::Tenant {
        rec.tenant_id = Some(name.to_string());
    }
    state.safety.record(rec);
}
