//! `/admin/v1/…`: tenants, keys, quotas and usage over HTTP, for keys with the `admin` scope —
//! the same operations as `fount admin`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use fount_store::{Price, Quota, Scope, Subject};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::ledger::log_act;
use crate::state::AppState;
use fount_ledger::statement;

/// A tenant.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TenantView {
    /// `ten_…`.
    pub id: String,
    /// Its unique name.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// `GET /admin/v1/tenants`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TenantList {
    /// Always `list`.
    pub object: &'static str,
    /// By name.
    pub data: Vec<TenantView>,
}

/// `POST /admin/v1/tenants`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateTenant {
    /// 1 to 64 letters, digits, `-`, `_` or `.`.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
}

/// `POST /admin/v1/keys`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateKey {
    /// The tenant's name.
    pub tenant: String,
    /// A label.
    #[serde(default)]
    pub name: Option<String>,
    /// `inference`, `admin`, `files`, `fine_tuning` (default: `inference`).
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Days until it expires (default: never).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub expires_in_days: Option<u32>,
}

/// A key as stored (never the secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyView {
    /// `key_…`.
    pub id: String,
    /// The public prefix, `fk-1a2b3c4d`.
    pub prefix: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Its label.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, when it expires.
    pub expires_at: Option<i64>,
    /// Unix seconds, when it was revoked.
    pub revoked_at: Option<i64>,
}

/// A new key: the secret appears here once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The secret (`fk-…`); store it now.
    pub key: String,
    /// What is stored of it.
    pub info: KeyView,
}

/// `GET /admin/v1/keys`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyList {
    /// Always `list`.
    pub object: &'static str,
    /// Newest first.
    pub data: Vec<KeyView>,
}

/// A tenant's quota (`null`: unlimited).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct QuotaView {
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<i64>,
    /// Tokens per minute.
    #[serde(default)]
    pub tokens_per_minute: Option<i64>,
    /// Tokens per UTC day.
    #[serde(default)]
    pub tokens_per_day: Option<i64>,
    /// Tokens per UTC month.
    #[serde(default)]
    pub tokens_per_month: Option<i64>,
    /// Requests running at once.
    #[serde(default)]
    pub concurrent_requests: Option<i64>,
    /// Largest prompt plus completion.
    #[serde(default)]
    pub max_context: Option<i64>,
    /// Models and adapters it may use (`null`: all it can see).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The tenant's share of the engine when tenants contend for it (default 1; a key's quota
    /// has none).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub weight: Option<i64>,
}

impl QuotaView {
    fn quota(&self) -> ApiResult<Quota> {
        if self.weight.is_some_and(|w| w < 1) {
            return Err(ApiError::invalid("weight", "weight must be at least 1"));
        }
        Ok(Quota {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            tokens_per_month: self.tokens_per_month,
            concurrent_requests: self.concurrent_requests,
            max_context: self.max_context,
            models: self.models.clone(),
            weight: self.weight,
        })
    }
}

/// A model's price, in dollars per million tokens as decimal strings (`"0.15"`, up to six
/// places).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PriceView {
    /// Per million prompt tokens.
    pub input: String,
    /// Per million prompt tokens served from the prefix cache (default: `input`).
    #[serde(default)]
    pub cached_input: Option<String>,
    /// Per million generated tokens.
    pub output: String,
    /// Per million trained tokens of fine-tuning jobs on this base model (default: 0).
    #[serde(default)]
    pub training: Option<String>,
}

/// A model and its price.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PricedModel {
    /// The model or adapter name.
    pub model: String,
    /// Its price.
    #[serde(flatten)]
    pub price: PriceView,
}

/// `GET /admin/v1/prices`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PriceList {
    /// Always `list`.
    pub object: &'static str,
    /// By model name.
    pub data: Vec<PricedModel>,
}

/// `GET /admin/v1/usage` filters.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct UsageFilter {
    /// Only this tenant's (by name).
    #[serde(default)]
    pub tenant: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC), inclusive.
    #[serde(default)]
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC), inclusive.
    #[serde(default)]
    pub to: Option<String>,
}

/// `GET /admin/v1/usage`: usage records, oldest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageExport {
    /// Always `list`.
    pub object: &'static str,
    /// One object per request: ids, model, adapter, token counts, status, latency, time and
    /// `cost_usd` (as `fount admin usage export --format json` writes them).
    pub data: Vec<serde_json::Value>,
}

/// `?tenant=` filters.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct TenantFilter {
    /// Only this tenant's (by name).
    #[serde(default)]
    pub tenant: Option<String>,
}

pub(crate) fn store_err(e: fount_store::Error) -> ApiError {
    match e {
        fount_store::Error::Invalid(m) => ApiError::invalid("name", m),
        fount_store::Error::NotFound(m) => ApiError::NotFound {
            message: format!("{m} not found"),
            param: None,
            code: "not_found",
        },
        other => ApiError::Internal(other.to_string()),
    }
}

pub(crate) fn tenancy(state: &AppState) -> ApiResult<&Arc<crate::tenancy::Tenancy>> {
    state.tenancy().ok_or(ApiError::NotFound {
        message: "the admin API needs tenancy (fount serve --data-dir)".into(),
        param: None,
        code: "not_found",
    })
}

pub(crate) async fn tenant_id(state: &AppState, name: &str) -> ApiResult<String> {
    let t = tenancy(state)?;
    t.store()
        .tenant_by_name(name)
        .await
        .map_err(store_err)?
        .map(|t| t.id)
        .ok_or(ApiError::NotFound {
            message: format!("no tenant named {name:?}"),
            param: Some("tenant".into()),
            code: "not_found",
        })
}

fn key_view(k: fount_store::KeyInfo) -> KeyView {
    KeyView {
        id: k.id,
        prefix: k.prefix,
        tenant_id: k.tenant_id,
        name: k.name,
        scopes: k.scopes.iter().map(|s| s.name().to_string()).collect(),
        created_at: k.created_at,
        expires_at: k.expires_at,
        revoked_at: k.revoked_at,
    }
}

/// `GET /admin/v1/tenants`
#[utoipa::path(get, path = "/admin/v1/tenants", tag = "admin",
    responses((status = 200, body = TenantList), (status = 401, body = crate::protocol::ErrorResponse),
              (status = 403, body = crate::protocol::ErrorResponse)))]
pub async fn list_tenants(State(state): State<Arc<AppState>>) -> ApiResult<Json<TenantList>> {
    let tenants = tenancy(&state)?
        .store()
        .tenants()
        .await
        .map_err(store_err)?;
    Ok(Json(TenantList {
        object: "list",
        data: tenants
            .into_iter()
            .map(|t| TenantView {
                id: t.id,
                name: t.name,
                created_at: t.created_at,
            })
            .collect(),
    }))
}

/// `POST /admin/v1/tenants`
#[utoipa::path(post, path = "/admin/v1/tenants", tag = "admin", request_body = CreateTenant,
    responses((status = 200, body = TenantView), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn create_tenant(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<CreateTenant>,
) -> ApiResult<Json<TenantView>> {
    let t = tenancy(&state)?
        .store()
        .create_tenant(&body.name)
        .await
        .map_err(store_err)?;
    log_act(&state, "tenant.create", statement::tenant_created(&t)).await;
    Ok(Json(TenantView {
        id: t.id,
        name: t.name,
        created_at: t.created_at,
    }))
}

/// `POST /admin/v1/keys`: the secret is in the answer, once.
#[utoipa::path(post, path = "/admin/v1/keys", tag = "admin", request_body = CreateKey,
    responses((status = 200, body = CreatedKey), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse), (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<CreateKey>,
) -> ApiResult<Json<CreatedKey>> {
    let id = tenant_id(&state, &body.tenant).await?;
    let scopes = match &body.scopes {
        None => vec![Scope::Inference],
        Some(names) => names
            .iter()
            .map(|n| {
                Scope::parse(n).ok_or_else(|| {
                    ApiError::invalid(
                        "scopes",
                        format!("unknown scope {n:?} (inference, admin, files, fine_tuning)"),
                    )
                })
            })
            .collect::<ApiResult<Vec<_>>>()?,
    };
    if scopes.is_empty() {
        return Err(ApiError::invalid(
            "scopes",
            "a key needs at least one scope",
        ));
    }
    let expires = body
        .expires_in_days
        .filter(|d| *d > 0)
        .map(|d| fount_store::now_ms() / 1000 + i64::from(d) * 86_400);
    let name = body.name.clone().unwrap_or_else(|| "default".into());
    let (key, info) = tenancy(&state)?
        .store()
        .create_key(&id, &name, &scopes, expires)
        .await
        .map_err(store_err)?;
    log_act(&state, "key.create", statement::key_created(&info)).await;
    Ok(Json(CreatedKey {
        key: key.expose().to_string(),
        info: key_view(info),
    }))
}

/// `GET /admin/v1/keys`
#[utoipa::path(get, path = "/admin/v1/keys", tag = "admin", params(TenantFilter),
    responses((status = 200, body = KeyList), (status = 401, body = crate::protocol::ErrorResponse),
              (status = 403, body = crate::protocol::ErrorResponse), (status = 404, body = crate::protocol::ErrorResponse)))]
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    Query(f): Query<TenantFilter>,
) -> ApiResult<Json<KeyList>> {
    let id = match &f.tenant {
        Some(t) => Some(tenant_id(&state, t).await?),
        None => None,
    };
    let keys = tenancy(&state)?
        .store()
        .keys(id.as_deref())
        .await
        .map_err(store_err)?;
    Ok(Json(KeyList {
        object: "list",
        data: keys.into_iter().map(key_view).collect(),
    }))
}

/// `DELETE /admin/v1/keys/{id}`: revokes a key by id or prefix, at once.
#[utoipa::path(delete, path = "/admin/v1/keys/{id}", tag = "admin",
    params(("id" = String, Path, description = "`key_…` or the `fk-…` prefix")),
    responses((status = 200, body = crate::protocol::Deleted), (status = 401, body = crate::protocol::ErrorResponse),
              (status = 403, body = crate::protocol::ErrorResponse), (status = 404, body = crate::protocol::ErrorResponse)))]
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::protocol::Deleted>> {
    if !tenancy(&state)?
        .store()
        .revoke_key(&id)
        .await
        .map_err(store_err)?
    {
        return Err(ApiError::NotFound {
            message: format!("no active key {id:?}"),
            param: None,
            code: "not_found",
        });
    }
    log_act(&state, "key.revoke", (format!("key/{id}"), json!({}))).await;
    Ok(Json(crate::protocol::Deleted {
        id,
        object: "key",
        deleted: true,
    }))
}

/// `PUT /admin/v1/quotas/{tenant}`: replaces a tenant's quota.
#[utoipa::path(put, path = "/admin/v1/quotas/{tenant}", tag = "admin", request_body = QuotaView,
    params(("tenant" = String, Path, description = "The tenant's name")),
    responses((status = 200, body = QuotaView), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse), (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn set_quota(
    State(state): State<Arc<AppState>>,
    Path(tenant): Path<String>,
    JsonBody(q): JsonBody<QuotaView>,
) -> ApiResult<Json<QuotaView>> {
    let id = tenant_id(&state, &tenant).await?;
    tenancy(&state)?
        .store()
        .set_quota(Subject::Tenant(&id), &q.quota()?)
        .await
        .map_err(store_err)?;
    log_act(&state, "quota.set", (format!("tenant/{id}"), json!(&q))).await;
    Ok(Json(q))
}

/// `PUT /admin/v1/keys/{id}/quota`: replaces a key's quota (applied on top of its tenant's).
#[utoipa::path(put, path = "/admin/v1/keys/{id}/quota", tag = "admin", request_body = QuotaView,
    params(("id" = String, Path, description = "`key_…` or the `fk-…` prefix")),
    responses((status = 200, body = QuotaView), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse), (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn set_key_quota(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(q): JsonBody<QuotaView>,
) -> ApiResult<Json<QuotaView>> {
    if q.weight.is_some() {
        return Err(ApiError::invalid(
            "weight",
            "weight is a tenant's share; a key has none",
        ));
    }
    let store = tenancy(&state)?.store();
    let key = store
        .keys(None)
        .await
        .map_err(store_err)?
        .into_iter()
        .find(|k| k.id == id || k.prefix == id)
        .ok_or(ApiError::NotFound {
            message: format!("no key {id:?}"),
            param: None,
            code: "not_found",
        })?;
    store
        .set_quota(Subject::Key(&key.id), &q.quota()?)
        .await
        .map_err(store_err)?;
    log_act(&state, "quota.set", (format!("key/{}", key.id), json!(&q))).await;
    Ok(Json(q))
}

/// `GET /admin/v1/prices`
#[utoipa::path(get, path = "/admin/v1/prices", tag = "admin",
    responses((status = 200, body = PriceList), (status = 401, body = crate::protocol::ErrorResponse),
              (status = 403, body = crate::protocol::ErrorResponse)))]
pub async fn list_prices(State(state): State<Arc<AppState>>) -> ApiResult<Json<PriceList>> {
    let prices = tenancy(&state)?.store().prices().await.map_err(store_err)?;
    let d = |micro: i64| fount_store::dollars(i128::from(micro) * 1_000_000, 6);
    Ok(Json(PriceList {
        object: "list",
        data: prices
            .into_iter()
            .map(|(model, p)| PricedModel {
                model,
                price: PriceView {
                    input: d(p.input),
                    cached_input: Some(d(p.cached_input)),
                    output: d(p.output),
                    training: Some(d(p.training)),
                },
            })
            .collect(),
    }))
}

/// `PUT /admin/v1/prices/{model}`: sets a model's (or adapter's) price; records from then on
/// carry their cost at it.
#[utoipa::path(put, path = "/admin/v1/prices/{model}", tag = "admin", request_body = PriceView,
    params(("model" = String, Path, description = "A model or adapter name")),
    responses((status = 200, body = PriceView), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 413, body = crate::protocol::ErrorResponse)))]
pub async fn set_price(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    JsonBody(p): JsonBody<PriceView>,
) -> ApiResult<Json<PriceView>> {
    let parse = |field: &'static str, v: &str| {
        Price::parse_dollars(v).ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{v:?} is not a price in dollars per million tokens, such as \"0.15\""),
            )
        })
    };
    let input = parse("input", &p.input)?;
    let price = Price {
        input,
        cached_input: match &p.cached_input {
            Some(c) => parse("cached_input", c)?,
            None => input,
        },
        output: parse("output", &p.output)?,
        training: match &p.training {
            Some(t) => parse("training", t)?,
            None => 0,
        },
    };
    tenancy(&state)?
        .store()
        .set_price(&model, &price)
        .await
        .map_err(store_err)?;
    log_act(&state, "price.set", (format!("model/{model}"), json!(&p))).await;
    Ok(Json(p))
}

/// `GET /admin/v1/usage`: usage records of every tenant (or one), by day range.
#[utoipa::path(get, path = "/admin/v1/usage", tag = "admin", params(UsageFilter),
    responses((status = 200, body = UsageExport), (status = 400, body = crate::protocol::ErrorResponse),
              (status = 401, body = crate::protocol::ErrorResponse), (status = 403, body = crate::protocol::ErrorResponse),
              (status = 404, body = crate::protocol::ErrorResponse)))]
pub async fn export_usage(
    State(state): State<Arc<AppState>>,
    Query(f): Query<UsageFilter>,
) -> ApiResult<Json<UsageExport>> {
    let day = |field: &'static str, d: &str| {
        fount_store::day_start_ms(d).map_err(|e| ApiError::invalid(field, e.to_string()))
    };
    let from = f
        .from
        .as_deref()
        .map(|d| day("from", d))
        .transpose()?
        .unwrap_or(0);
    let to = match f.to.as_deref() {
        Some(d) => day("to", d)? + 86_400_000,
        None => i64::MAX,
    };
    let tenant = match &f.tenant {
        Some(t) => Some(tenant_id(&state, t).await?),
        None => None,
    };
    let records = tenancy(&state)?
        .store()
        .usage(tenant.as_deref(), from, to)
        .await
        .map_err(store_err)?;
    Ok(Json(UsageExport {
        object: "list",
        data: records.iter().map(|r| r.to_json()).collect(),
    }))
}
