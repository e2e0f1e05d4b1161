//! Prices and usage records: what each request used and cost, written once per request id, and
//! read back per tenant, day and model for bills and budgets.

use sqlx::Row;

use crate::error::{Error, Result};
use crate::store::{Store, Subject};
use crate::time::{now_ms, utc_day};

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
    /// Per million trained tokens (fine-tuning jobs: the tokens of the training file times the
    /// epochs).
    pub training: i64,
}

impl Price {
    /// The cost of a request, in picodollars.
    pub fn cost(&self, prompt: i64, cached: i64, completion: i64) -> i64 {
        let p = i128::from(prompt - cached) * i128::from(self.input)
            + i128::from(cached) * i128::from(self.cached_input)
            + i128::from(completion) * i128::from(self.output);
        i64::try_from(p).unwrap_or(i64::MAX)
    }

    /// The cost of training on `tokens` tokens, in picodollars.
    pub fn training_cost(&self, tokens: i64) -> i64 {
        i64::try_from(i128::from(tokens) * i128::from(self.training)).unwrap_or(i64::MAX)
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

/// What a usage record meters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum UsageKind {
    /// One API request: tokens.
    #[default]
    Inference,
    /// One attempt of a pool job: slot time.
    Training,
}

impl UsageKind {
    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            UsageKind::Inference => "inference",
            UsageKind::Training => "training",
        }
    }

    fn parse(s: &str) -> UsageKind {
        if s == "training" {
            UsageKind::Training
        } else {
            UsageKind::Inference
        }
    }
}

/// One request's (or one job attempt's) metering record.
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
    /// A request, or an attempt of a pool job (`request_id` is then `job-….N`, `model` the
    /// command, `adapter` the job's name, `status` the exit status, `-1` when unknown).
    pub kind: UsageKind,
    /// Pool slot time, in milliseconds (0 for a request).
    pub slot_ms: i64,
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
    /// What was metered: requests, or training (pool jobs' attempts and fine-tuning jobs'
    /// trained tokens).
    pub kind: UsageKind,
    /// Requests (job attempts and finished fine-tuning jobs for training).
    pub requests: i64,
    /// Prompt tokens (trained tokens for training).
    pub prompt_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Cost, in picodollars.
    pub cost_picodollars: i64,
    /// Slot time of pool jobs, in milliseconds.
    pub slot_ms: i64,
}

/// Usage records per `INSERT` statement.
const USAGE_ROWS: usize = 64;

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// The `INSERT` of `rows` usage records (up to [`USAGE_ROWS`]); a request id already recorded
/// is skipped.
/// `($1, …, $cols), ($cols+1, …), …`: `rows` groups of `cols` numbered placeholders.
pub(crate) fn placeholders(rows: usize, cols: usize) -> String {
    let mut sql = String::new();
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..cols {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", row * cols + col + 1));
        }
        sql.push(')');
    }
    sql
}

fn usage_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO usage_records (request_id, tenant_id, key_id, model, adapter, prompt_tokens, \
             cached_tokens, completion_tokens, status, latency_ms, created_at_ms, \
             cost_picodollars, kind, slot_ms) VALUES ",
    );
    sql.push_str(&placeholders(rows, 14));
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
            .bind(r.cost_picodollars)
            .bind(r.kind.name())
            .bind(r.slot_ms);
    }
    q
}

impl Store {
    /// Sets `model`'s price (a model or adapter name, as clients pass it).
    pub async fn set_price(&self, model: &str, p: &Price) -> Result<()> {
        if [p.input, p.cached_input, p.output, p.training]
            .iter()
            .any(|&v| v < 0)
        {
            return Err(Error::Invalid("prices cannot be negative".into()));
        }
        sqlx::query(
            "INSERT INTO prices (model, input, cached_input, output, training, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (model) DO UPDATE SET input = excluded.input, \
               cached_input = excluded.cached_input, output = excluded.output, \
               training = excluded.training, updated_at = excluded.updated_at",
        )
        .bind(model)
        .bind(p.input)
        .bind(p.cached_input)
        .bind(p.output)
        .bind(p.training)
        .bind(now_ms() / 1000)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every price set, by model name.
    pub async fn prices(&self) -> Result<Vec<(String, Price)>> {
        let rows = sqlx::query(
            "SELECT model, input, cached_input, output, training FROM prices ORDER BY model",
        )
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
                        training: r.try_get("training")?,
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
    /// writing a batch again never duplicates a record. On PostgreSQL the same transaction
    /// closes the records' open requests (shared quotas). Returns the records written now.
    pub async fn record_usage(&self, records: &[UsageRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        if records.len() <= USAGE_ROWS && self.backend() == crate::Backend::Sqlite {
            // one statement is its own transaction: one round trip to the database
            let sql = usage_sql(records.len());
            let q = bind_usage(sqlx::query(&sql), records);
            return Ok(q.execute(&self.pool).await?.rows_affected());
        }
        let mut tx = self.pool.begin().await?;
        let written = self.record_usage_in(&mut tx, records).await?;
        tx.commit().await?;
        Ok(written)
    }

    /// [`Store::record_usage`] inside the transaction `tx`.
    pub(crate) async fn record_usage_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        records: &[UsageRecord],
    ) -> Result<u64> {
        let mut written = 0;
        for chunk in records.chunks(USAGE_ROWS) {
            let sql = usage_sql(chunk.len());
            if self.backend() == crate::Backend::Sqlite {
                let q = bind_usage(sqlx::query(&sql), chunk);
                written += q.execute(&mut **tx).await?.rows_affected();
                continue;
            }
            // the records written now (not those already there) count to their tenant's and
            // key's day, in the same transaction (budgets shared by replicas)
            let sql = format!(
                "{sql} RETURNING tenant_id, key_id, prompt_tokens + completion_tokens AS tokens, created_at_ms"
            );
            let rows = bind_usage(sqlx::query(&sql), chunk)
                .fetch_all(&mut **tx)
                .await?;
            written += rows.len() as u64;
            let mut days: std::collections::BTreeMap<(String, i64), i64> = Default::default();
            for r in &rows {
                let (tenant, key): (String, String) =
                    (r.try_get("tenant_id")?, r.try_get("key_id")?);
                let (tokens, at): (i64, i64) = (r.try_get("tokens")?, r.try_get("created_at_ms")?);
                let day = at - at.rem_euclid(86_400_000);
                *days.entry((format!("t:{tenant}"), day)).or_default() += tokens;
                if !key.is_empty() {
                    *days.entry((format!("k:{key}"), day)).or_default() += tokens;
                }
            }
            if !days.is_empty() {
                let sql = format!(
                    "INSERT INTO quota_days (subject, day_ms, tokens) VALUES {} \
                     ON CONFLICT (subject, day_ms) DO UPDATE SET tokens = quota_days.tokens + excluded.tokens",
                    placeholders(days.len(), 3)
                );
                let mut q = sqlx::query(&sql);
                for ((subject, day), tokens) in &days {
                    q = q.bind(subject.clone()).bind(*day).bind(*tokens);
                }
                q.execute(&mut **tx).await?;
            }
            {
                // the requests recorded are no longer open (replicas' shared quotas)
                let sql = format!(
                    "DELETE FROM open_requests WHERE request_id IN ({})",
                    (1..=chunk.len())
                        .map(|i| format!("${i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q.bind(&r.request_id);
                }
                q.execute(&mut **tx).await?;
            }
        }
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
                    completion_tokens, status, latency_ms, created_at_ms, cost_picodollars, \
                    kind, slot_ms \
             FROM usage_records \
             WHERE ($1 = '' OR tenant_id = $1) AND created_at_ms >= $2 AND created_at_ms < $3 \
             ORDER BY created_at_ms, request_id",
        )
        .bind(tenant_id.unwrap_or(""))
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_row).collect()
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
            match out.iter_mut().find(|s| {
                s.tenant_id == r.tenant_id && s.day == day && s.model == r.model && s.kind == r.kind
            }) {
                Some(s) => {
                    s.requests += 1;
                    s.prompt_tokens += r.prompt_tokens;
                    s.cached_tokens += r.cached_tokens;
                    s.completion_tokens += r.completion_tokens;
                    s.cost_picodollars = s.cost_picodollars.saturating_add(r.cost_picodollars);
                    s.slot_ms += r.slot_ms;
                }
                None => out.push(UsageSummary {
                    tenant_id: r.tenant_id,
                    day,
                    model: r.model,
                    kind: r.kind,
                    requests: 1,
                    prompt_tokens: r.prompt_tokens,
                    cached_tokens: r.cached_tokens,
                    completion_tokens: r.completion_tokens,
                    cost_picodollars: r.cost_picodollars,
                    slot_ms: r.slot_ms,
                }),
            }
        }
        out.sort_by(|a, b| {
            (&a.tenant_id, &a.day, &a.model, a.kind.name()).cmp(&(
                &b.tenant_id,
                &b.day,
                &b.model,
                b.kind.name(),
            ))
        });
        Ok(out)
    }
}

impl UsageRecord {
    /// The header of [`UsageRecord::csv_row`].
    pub const CSV_HEADER: &'static str = "request_id,tenant_id,key_id,model,adapter,prompt_tokens,\
cached_tokens,completion_tokens,status,latency_ms,created_at_ms,cost_usd,kind,slot_seconds";

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
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}.{:03}",
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
            self.kind.name(),
            self.slot_ms / 1000,
            self.slot_ms % 1000,
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
            "kind": self.kind.name(), "slot_ms": self.slot_ms,
        })
    }
}

/// The columns [`usage_row`] reads.
pub(crate) const USAGE_COLUMNS: &str = "request_id, tenant_id, key_id, model, adapter, \
    prompt_tokens, cached_tokens, completion_tokens, status, latency_ms, created_at_ms, \
    cost_picodollars, kind, slot_ms";

/// A usage record from a row of [`USAGE_COLUMNS`].
pub(crate) fn usage_row(r: &sqlx::any::AnyRow) -> Result<UsageRecord> {
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
        kind: UsageKind::parse(&r.try_get::<String, _>("kind")?),
        slot_ms: r.try_get("slot_ms")?,
    })
}
