//! The store over one `sqlx` pool, SQLite or PostgreSQL.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::keys::{new_id, ApiKey, Scope};

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file in the data directory, WAL mode.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A tenant: the unit of keys, quotas, usage and isolation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// `ten_…`.
    pub id: String,
    /// A unique name.
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// What is stored of a key (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// `key_…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// A label.
    pub name: String,
    /// The public prefix, `fk-1a2b3c4d`.
    pub prefix: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which it is refused.
    pub expires_at: Option<i64>,
    /// Unix seconds it was revoked.
    pub revoked_at: Option<i64>,
}

/// A tenant's limits; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quota {
    /// Requests per minute.
    pub requests_per_minute: Option<i64>,
    /// Prompt plus completion tokens per minute.
    pub tokens_per_minute: Option<i64>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<i64>,
    /// Tokens per UTC month.
    pub tokens_per_month: Option<i64>,
    /// Requests running at once.
    pub concurrent_requests: Option<i64>,
    /// Largest prompt plus completion.
    pub max_context: Option<i64>,
    /// Models and adapters it may use (`None`: all it can see).
    pub models: Option<Vec<String>>,
    /// The tenant's share of the engine when tenants contend for it, relative to other tenants
    /// (1 when `None`; ignored on a key's quota).
    pub weight: Option<i64>,
}

/// Whose quota: a tenant's, or one key's (applied on top of its tenant's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject<'a> {
    /// A tenant, by id.
    Tenant(&'a str),
    /// A key, by id.
    Key(&'a str),
}

/// What a model costs, in micro-dollars per million tokens (so one token costs that many
/// picodollars).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    /// Per million prompt tokens not served from the prefix cache.
    pub input: i64,
    /// Per million prompt tokens served from the prefix cache.
    pub cached_input: i64,
    /// Per million generated tokens.
    pub output: i64,
}

impl Price {
    /// The cost of a request, in picodollars.
    pub fn cost(&self, prompt: i64, cached: i64, completion: i64) -> i64 {
        let p = i128::from(prompt - cached) * i128::from(self.input)
            + i128::from(cached) * i128::from(self.cached_input)
            + i128::from(completion) * i128::from(self.output);
        i64::try_from(p).unwrap_or(i64::MAX)
    }

    /// Parses a price in dollars per million tokens (`"0.15"`) into micro-dollars.
    pub fn parse_dollars(s: &str) -> Option<i64> {
        let s = s.trim().trim_start_matches('$');
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty()
            || frac.len() > 6
            || !whole
                .chars()
                .chain(frac.chars())
                .all(|c| c.is_ascii_digit())
        {
            return None;
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let frac: i64 = format!("{frac:0<6}").parse().ok()?;
        whole.checked_mul(1_000_000)?.checked_add(frac)
    }
}

/// Formats picodollars (or micro-dollars per million tokens) as dollars, `"0.000150"`.
pub fn dollars(pico: i128, decimals: u32) -> String {
    let scale = 10i128.pow(12 - decimals.min(12));
    let units = (pico + scale / 2).div_euclid(scale);
    let d = 10i128.pow(decimals.min(12));
    format!(
        "{}.{:0width$}",
        units.div_euclid(d),
        units.rem_euclid(d),
        width = decimals.min(12) as usize
    )
}

/// One request's metering record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The request id (`chatcmpl-…`): a record is written once per id.
    pub request_id: String,
    /// The tenant billed.
    pub tenant_id: String,
    /// The key used.
    pub key_id: String,
    /// The model named in the request.
    pub model: String,
    /// The adapter, when the model was one.
    pub adapter: Option<String>,
    /// Prompt tokens (all prompts).
    pub prompt_tokens: i64,
    /// Of those, served from the prefix cache.
    pub cached_tokens: i64,
    /// Generated tokens (all choices).
    pub completion_tokens: i64,
    /// The HTTP status answered (499 when the client went away).
    pub status: i64,
    /// From arrival to the last byte, in milliseconds.
    pub latency_ms: i64,
    /// Unix milliseconds of arrival.
    pub created_at_ms: i64,
    /// What it cost at the model's price when it was served, in picodollars.
    pub cost_picodollars: i64,
}

/// Usage of one tenant, day and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSummary {
    /// The tenant.
    pub tenant_id: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// The model.
    pub model: String,
    /// Requests.
    pub requests: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Cost, in picodollars.
    pub cost_picodollars: i64,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn now_s() -> i64 {
    now_ms() / 1000
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn key_info(r: &AnyRow) -> Result<KeyInfo> {
    let scopes: String = r.try_get("scopes")?;
    Ok(KeyInfo {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        scopes: scopes.split(',').filter_map(Scope::parse).collect(),
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

/// Usage records per `INSERT` statement.
const USAGE_ROWS: usize = 64;

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// The `INSERT` of `rows` usage records (up to [`USAGE_ROWS`]); a request id already recorded
/// is skipped.
fn usage_sql(rows: usize) -> String {
    const COLUMNS: usize = 12;
    let mut sql = String::from(
        "INSERT INTO usage_records (request_id, tenant_id, key_id, model, adapter, prompt_tokens, \
             cached_tokens, completion_tokens, status, latency_ms, created_at_ms, \
             cost_picodollars) VALUES ",
    );
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..COLUMNS {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * COLUMNS + col + 1));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (request_id) DO NOTHING");
    sql
}

/// Binds `records` to the query of [`usage_sql`].
fn bind_usage<'q>(mut q: AnyQuery<'q>, records: &'q [UsageRecord]) -> AnyQuery<'q> {
    for r in records {
        q = q
            .bind(&r.request_id)
            .bind(&r.tenant_id)
            .bind(&r.key_id)
            .bind(&r.model)
            .bind(&r.adapter)
            .bind(r.prompt_tokens)
            .bind(r.cached_tokens)
            .bind(r.completion_tokens)
            .bind(r.status)
            .bind(r.latency_ms)
            .bind(r.created_at_ms)
            .bind(r.cost_picodollars);
    }
    q
}

fn tenant(r: &AnyRow) -> Result<Tenant> {
    Ok(Tenant {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Opens the store: PostgreSQL at `database_url` when given, else `fount.db` (SQLite, WAL)
    /// in `data_dir`, created if missing. Runs pending migrations.
    pub async fn open(data_dir: impl AsRef<Path>, database_url: Option<&str>) -> Result<Store> {
        match database_url {
            Some(url) => Store::connect(url).await,
            None => {
                let dir = data_dir.as_ref();
                fs_err::create_dir_all(dir)?;
                let file = dir.join("fount.db");
                Store::connect(&format!("sqlite://{}?mode=rwc", file.display())).await
            }
        }
    }

    /// Connects to `sqlite://…` or `postgres://…` and runs pending migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::Url(url.to_string()));
        };
        let mut opts = AnyPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_secs(5))
            .max_connections(match backend {
                // one writer at a time in SQLite; readers share the WAL
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            });
        if backend == Backend::Sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    // a commit survives a killed process without an fsync of its own (the WAL
                    // is synced at checkpoints); a power cut may lose the last commits, so a
                    // deployment that must survive one runs on PostgreSQL
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 10000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let pool = opts.connect(url).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Store { pool, backend })
    }

    /// The database in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Creates a tenant with a unique `name`.
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(Error::Invalid(format!(
                "tenant names are 1 to 64 letters, digits, '-', '_' or '.'; {name:?} is not"
            )));
        }
        if self.tenant_by_name(name).await?.is_some() {
            return Err(Error::Invalid(format!("a tenant named {name:?} exists")));
        }
        let t = Tenant {
            id: new_id("ten"),
            name: name.to_string(),
            created_at: now_s(),
        };
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&t.id)
            .bind(&t.name)
            .bind(t.created_at)
            .execute(&self.pool)
            .await?;
        Ok(t)
    }

    /// Every tenant, by name.
    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant).collect()
    }

    /// The tenant named `name`.
    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT id, name, created_at FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(tenant).transpose()
    }

    /// The tenant with id `id`.
    pub async fn tenant(&self, id: &str) -> Result<Option<Tenant>> {
        let row = sqlx::query("SELECT id, name, created_at FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(tenant).transpose()
    }

    /// Creates a key for `tenant_id`; the key is returned once and stored only as a hash.
    pub async fn create_key(
        &self,
        tenant_id: &str,
        name: &str,
        scopes: &[Scope],
        expires_at: Option<i64>,
    ) -> Result<(ApiKey, KeyInfo)> {
        if self.tenant(tenant_id).await?.is_none() {
            return Err(Error::NotFound(format!("tenant {tenant_id:?}")));
        }
        if scopes.is_empty() {
            return Err(Error::Invalid("a key needs at least one scope".into()));
        }
        let key = ApiKey::generate();
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let info = KeyInfo {
            id: new_id("key"),
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            prefix: key.prefix().unwrap_or_default().to_string(),
            scopes,
            created_at: now_s(),
            expires_at,
            revoked_at: None,
        };
        let scope_list: Vec<&str> = info.scopes.iter().map(|s| s.name()).collect();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, hash, scopes, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)",
        )
        .bind(&info.id)
        .bind(&info.tenant_id)
        .bind(&info.name)
        .bind(&info.prefix)
        .bind(key.hash())
        .bind(scope_list.join(","))
        .bind(info.created_at)
        .bind(info.expires_at)
        .execute(&self.pool)
        .await?;
        Ok((key, info))
    }

    /// Keys, of one tenant or all, newest first.
    pub async fn keys(&self, tenant_id: Option<&str>) -> Result<Vec<KeyInfo>> {
        const COLS: &str =
            "id, tenant_id, name, prefix, scopes, created_at, expires_at, revoked_at";
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query(&format!(
                    "SELECT {COLS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, id"
                ))
                .bind(t)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {COLS} FROM api_keys ORDER BY created_at DESC, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(key_info).collect()
    }

    /// Revokes the key with this id or prefix; returns whether one was revoked now.
    pub async fn revoke_key(&self, id_or_prefix: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE (id = $2 OR prefix = $2) AND revoked_at IS NULL",
        )
        .bind(now_s())
        .bind(id_or_prefix)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The key and tenant behind a secret, if it is known, not revoked and not expired.
    pub async fn authenticate(&self, key: &ApiKey) -> Result<Option<(KeyInfo, Tenant)>> {
        if key.prefix().is_none() {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT k.id, k.tenant_id, k.name, k.prefix, k.scopes, k.created_at, k.expires_at, k.revoked_at, \
                    t.name AS tenant_name, t.created_at AS tenant_created_at \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.hash = $1",
        )
        .bind(key.hash())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let info = key_info(&row)?;
        if info.revoked_at.is_some() || info.expires_at.is_some_and(|e| e <= now_s()) {
            return Ok(None);
        }
        let t = Tenant {
            id: info.tenant_id.clone(),
            name: row.try_get("tenant_name")?,
            created_at: row.try_get("tenant_created_at")?,
        };
        Ok(Some((info, t)))
    }

    /// Sets a tenant's or a key's quota (replacing the previous one).
    pub async fn set_quota(&self, who: Subject<'_>, q: &Quota) -> Result<()> {
        let (table, column, id) = match who {
            Subject::Tenant(id) => {
                if self.tenant(id).await?.is_none() {
                    return Err(Error::NotFound(format!("tenant {id:?}")));
                }
                ("quotas", "tenant_id", id)
            }
            Subject::Key(id) => {
                let found = sqlx::query("SELECT id FROM api_keys WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                if found.is_none() {
                    return Err(Error::NotFound(format!("key {id:?}")));
                }
                ("key_quotas", "key_id", id)
            }
        };
        let models = q
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        let weight = if table == "quotas" { ", weight" } else { "" };
        let weight_value = if table == "quotas" { ", $9" } else { "" };
        let weight_update = if table == "quotas" {
            ", weight = excluded.weight"
        } else {
            ""
        };
        let sql = format!(
            "INSERT INTO {table} ({column}, requests_per_minute, tokens_per_minute, tokens_per_day, \
                                 tokens_per_month, concurrent_requests, max_context, models{weight}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8{weight_value}) \
             ON CONFLICT ({column}) DO UPDATE SET \
               requests_per_minute = excluded.requests_per_minute, \
               tokens_per_minute = excluded.tokens_per_minute, \
               tokens_per_day = excluded.tokens_per_day, \
               tokens_per_month = excluded.tokens_per_month, \
               concurrent_requests = excluded.concurrent_requests, \
               max_context = excluded.max_context, \
               models = excluded.models{weight_update}"
        );
        let mut query = sqlx::query(&sql)
            .bind(id)
            .bind(q.requests_per_minute)
            .bind(q.tokens_per_minute)
            .bind(q.tokens_per_day)
            .bind(q.tokens_per_month)
            .bind(q.concurrent_requests)
            .bind(q.max_context)
            .bind(models);
        if table == "quotas" {
            query = query.bind(q.weight);
        }
        query.execute(&self.pool).await?;
        Ok(())
    }

    /// A tenant's or a key's quota (all `None` when never set).
    pub async fn quota(&self, who: Subject<'_>) -> Result<Quota> {
        let (sql, id) = match who {
            Subject::Tenant(id) => (
                "SELECT requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month, \
                        concurrent_requests, max_context, models, weight \
                 FROM quotas WHERE tenant_id = $1",
                id,
            ),
            Subject::Key(id) => (
                "SELECT requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month, \
                        concurrent_requests, max_context, models, CAST(NULL AS BIGINT) AS weight \
                 FROM key_quotas WHERE key_id = $1",
                id,
            ),
        };
        let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
        let Some(r) = row else {
            return Ok(Quota::default());
        };
        let models: Option<String> = r.try_get("models")?;
        Ok(Quota {
            requests_per_minute: r.try_get("requests_per_minute")?,
            tokens_per_minute: r.try_get("tokens_per_minute")?,
            tokens_per_day: r.try_get("tokens_per_day")?,
            tokens_per_month: r.try_get("tokens_per_month")?,
            concurrent_requests: r.try_get("concurrent_requests")?,
            max_context: r.try_get("max_context")?,
            models: models.and_then(|m| serde_json::from_str(&m).ok()),
            weight: r.try_get("weight")?,
        })
    }

    /// Sets `model`'s price (a model or adapter name, as clients pass it).
    pub async fn set_price(&self, model: &str, p: &Price) -> Result<()> {
        if [p.input, p.cached_input, p.output].iter().any(|&v| v < 0) {
            return Err(Error::Invalid("prices cannot be negative".into()));
        }
        sqlx::query(
            "INSERT INTO prices (model, input, cached_input, output, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (model) DO UPDATE SET input = excluded.input, \
               cached_input = excluded.cached_input, output = excluded.output, \
               updated_at = excluded.updated_at",
        )
        .bind(model)
        .bind(p.input)
        .bind(p.cached_input)
        .bind(p.output)
        .bind(now_ms() / 1000)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every price set, by model name.
    pub async fn prices(&self) -> Result<Vec<(String, Price)>> {
        let rows =
            sqlx::query("SELECT model, input, cached_input, output FROM prices ORDER BY model")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("model")?,
                    Price {
                        input: r.try_get("input")?,
                        cached_input: r.try_get("cached_input")?,
                        output: r.try_get("output")?,
                    },
                ))
            })
            .collect()
    }

    /// Prompt plus completion tokens recorded for a tenant or a key since `from_ms`.
    pub async fn tokens_used_since(&self, who: Subject<'_>, from_ms: i64) -> Result<i64> {
        let (sql, id) = match who {
            Subject::Tenant(id) => (
                "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS t \
                 FROM usage_records WHERE tenant_id = $1 AND created_at_ms >= $2",
                id,
            ),
            Subject::Key(id) => (
                "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS t \
                 FROM usage_records WHERE key_id = $1 AND created_at_ms >= $2",
                id,
            ),
        };
        let row = sqlx::query(sql)
            .bind(id)
            .bind(from_ms)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("t")?)
    }

    /// Writes usage records in one transaction; a request id already recorded is skipped, so
    /// writing a batch again never duplicates a record. Returns the records written now.
    pub async fn record_usage(&self, records: &[UsageRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        if records.len() <= USAGE_ROWS {
            // one statement is its own transaction: one round trip to the database
            let sql = usage_sql(records.len());
            let q = bind_usage(sqlx::query(&sql), records);
            return Ok(q.execute(&self.pool).await?.rows_affected());
        }
        let mut tx = self.pool.begin().await?;
        let mut written = 0;
        for chunk in records.chunks(USAGE_ROWS) {
            let sql = usage_sql(chunk.len());
            let q = bind_usage(sqlx::query(&sql), chunk);
            written += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(written)
    }

    /// Records of one tenant (or all) with `from_ms <= created_at_ms < to_ms`, oldest first.
    pub async fn usage(
        &self,
        tenant_id: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageRecord>> {
        let rows = sqlx::query(
            "SELECT request_id, tenant_id, key_id, model, adapter, prompt_tokens, cached_tokens, \
                    completion_tokens, status, latency_ms, created_at_ms, cost_picodollars \
             FROM usage_records \
             WHERE ($1 = '' OR tenant_id = $1) AND created_at_ms >= $2 AND created_at_ms < $3 \
             ORDER BY created_at_ms, request_id",
        )
        .bind(tenant_id.unwrap_or(""))
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRecord {
                    request_id: r.try_get("request_id")?,
                    tenant_id: r.try_get("tenant_id")?,
                    key_id: r.try_get("key_id")?,
                    model: r.try_get("model")?,
                    adapter: r.try_get("adapter")?,
                    prompt_tokens: r.try_get("prompt_tokens")?,
                    cached_tokens: r.try_get("cached_tokens")?,
                    completion_tokens: r.try_get("completion_tokens")?,
                    status: r.try_get("status")?,
                    latency_ms: r.try_get("latency_ms")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                    cost_picodollars: r.try_get("cost_picodollars")?,
                })
            })
            .collect()
    }

    /// Usage summed by tenant, UTC day and model over `[from_ms, to_ms)`.
    pub async fn usage_summary(
        &self,
        tenant_id: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageSummary>> {
        // summed here rather than in SQL: day arithmetic differs between the two databases
        let mut out: Vec<UsageSummary> = Vec::new();
        for r in self.usage(tenant_id, from_ms, to_ms).await? {
            let day = utc_day(r.created_at_ms);
            match out
                .iter_mut()
                .find(|s| s.tenant_id == r.tenant_id && s.day == day && s.model == r.model)
            {
                Some(s) => {
                    s.requests += 1;
                    s.prompt_tokens += r.prompt_tokens;
                    s.cached_tokens += r.cached_tokens;
                    s.completion_tokens += r.completion_tokens;
                    s.cost_picodollars = s.cost_picodollars.saturating_add(r.cost_picodollars);
                }
                None => out.push(UsageSummary {
                    tenant_id: r.tenant_id,
                    day,
                    model: r.model,
                    requests: 1,
                    prompt_tokens: r.prompt_tokens,
                    cached_tokens: r.cached_tokens,
                    completion_tokens: r.completion_tokens,
                    cost_picodollars: r.cost_picodollars,
                }),
            }
        }
        out.sort_by(|a, b| (&a.tenant_id, &a.day, &a.model).cmp(&(&b.tenant_id, &b.day, &b.model)));
        Ok(out)
    }

    /// Closes the pool, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `YYYY-MM-DD` (UTC) of Unix milliseconds.
pub fn utc_day(ms: i64) -> String {
    // days since 1970-01-01 to a civil date (Howard Hinnant's algorithm)
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unix milliseconds of 00:00 UTC of `YYYY-MM-DD`.
pub fn day_start_ms(day: &str) -> Result<i64> {
    let bad = || Error::Invalid(format!("{day:?} is not a date such as 2026-11-29"));
    let mut parts = day.split('-').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let (y, m, d) = (y?, m?, d?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // civil date to days since 1970-01-01 (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400_000)
}

impl UsageRecord {
    /// The header of [`UsageRecord::csv_row`].
    pub const CSV_HEADER: &'static str = "request_id,tenant_id,key_id,model,adapter,prompt_tokens,\
cached_tokens,completion_tokens,status,latency_ms,created_at_ms,cost_usd";

    /// The record as one CSV row (RFC 4180 quoting), cost in dollars.
    pub fn csv_row(&self) -> String {
        let field = |s: &str| {
            if s.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            field(&self.request_id),
            field(&self.tenant_id),
            field(&self.key_id),
            field(&self.model),
            field(self.adapter.as_deref().unwrap_or("")),
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
            self.status,
            self.latency_ms,
            self.created_at_ms,
            dollars(i128::from(self.cost_picodollars), 12),
        )
    }

    /// The record as a JSON object, cost in dollars as a decimal string.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "request_id": self.request_id, "tenant_id": self.tenant_id,
            "key_id": self.key_id, "model": self.model, "adapter": self.adapter,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens, "status": self.status,
            "latency_ms": self.latency_ms, "created_at_ms": self.created_at_ms,
            "cost_usd": dollars(i128::from(self.cost_picodollars), 12),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn days_parse() {
        use super::day_start_ms;
        assert_eq!(day_start_ms("1970-01-01").ok(), Some(0));
        assert_eq!(day_start_ms("2026-11-29").ok(), Some(1_795_910_400_000));
        assert_eq!(day_start_ms("2000-03-01").ok(), Some(951_868_800_000));
        assert!(day_start_ms("2026-13-01").is_err());
        assert!(day_start_ms("2026-11-29-1").is_err());
        assert!(day_start_ms("yesterday").is_err());
    }

    #[test]
    fn utc_days() {
        assert_eq!(super::utc_day(0), "1970-01-01");
        assert_eq!(super::utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(super::utc_day(1_795_910_400_000 - 1), "2026-11-28");
        assert_eq!(super::utc_day(1_795_910_400_000), "2026-11-29");
    }
}
