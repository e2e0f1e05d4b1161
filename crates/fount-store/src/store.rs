//! The store over one `sqlx` pool, SQLite or PostgreSQL.

use std::path::Path;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};
use crate::keys::{new_id, ApiKey, Scope};
use crate::time::now_ms;

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

fn now_s() -> i64 {
    now_ms() / 1000
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
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
                // SQLite has no lock around migrations: processes opening a new store at once
                // (`fount serve` and `fount jobs submit`) take turns on a lock file instead
                let lock = fs_err::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join("fount.db.lock"))?;
                lock.file().lock()?;
                let store = Store::connect(&format!("sqlite://{}?mode=rwc", file.display())).await;
                lock.file().unlock()?;
                store
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

    /// Closes the pool, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
