//! Several servers on one PostgreSQL: the replicas alive, the requests each has admitted,
//! rate windows and budgets shared by all of them, the sweep that records a dead replica's
//! requests, and the registry of adapters registered through the API.
//!
//! A request's admission is one transaction ([`Store::admit_shared`]): it takes its tenant's
//! and then its key's advisory lock, reads what both have used (requests and tokens in the last
//! minute by second, requests open now, tokens used and reserved this day and month), lets the
//! caller decide, and charges the minute and inserts the open request. The transaction that
//! writes a request's usage record deletes its open request, so used plus reserved is exact at
//! every moment on every replica.

use sqlx::Row;

use crate::error::Result;
use crate::safety::subject_key;
use crate::store::{Backend, Store, Subject};
use crate::time::{day_start, month_start};
use crate::usage::{UsageKind, UsageRecord};

/// The status a request recorded by the sweep carries: its replica died before it ended, and
/// the client saw what a load balancer answers then (502).
pub const ABANDONED_STATUS: i64 = 502;

/// What a tenant or a key has used of its rate windows and budgets, read under its lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests charged in the last 60 seconds.
    pub minute_requests: i64,
    /// Tokens charged in the last 60 seconds.
    pub minute_tokens: i64,
    /// Requests charged in the current second.
    pub second_requests: i64,
    /// The oldest second (Unix) with a charge in the minute.
    pub oldest_second: Option<i64>,
    /// Requests admitted and not yet recorded, on every replica.
    pub in_flight: i64,
    /// Tokens used and reserved this UTC day, when asked for.
    pub day: Option<(i64, i64)>,
    /// Tokens used and reserved this UTC month, when asked for.
    pub month: Option<(i64, i64)>,
}

/// What an admission needs to read of one subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wants {
    /// A requests- or tokens-per-minute limit (the minute is charged either way).
    pub minute: bool,
    /// A limit of concurrent requests.
    pub concurrent: bool,
    /// A daily budget.
    pub day: bool,
    /// A monthly budget.
    pub month: bool,
}

impl Wants {
    fn any(&self) -> bool {
        self.minute || self.concurrent || self.day || self.month
    }
}

/// A request asking to be admitted.
#[derive(Debug, Clone)]
pub struct Admission<'a> {
    /// Its request id (its usage record's).
    pub request_id: &'a str,
    /// The replica admitting it.
    pub replica_id: &'a str,
    /// Its tenant.
    pub tenant_id: &'a str,
    /// Its key.
    pub key_id: &'a str,
    /// The model asked for.
    pub model: &'a str,
    /// The most tokens it may use (prompts plus every token it may generate).
    pub tokens: i64,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// What the tenant's quota and the key's need read.
    pub wants: [Wants; 2],
}

/// A replica on the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// `rep_…`.
    pub id: String,
    /// Where it listens.
    pub address: String,
    /// When it joined, Unix ms.
    pub started_at_ms: i64,
    /// Its last heartbeat, Unix ms.
    pub heartbeat_ms: i64,
    /// Requests it has admitted and not yet recorded.
    pub open_requests: i64,
}

/// An adapter in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterEntry {
    /// The engine's name (`{tenant id}/{name}` for a tenant's own).
    pub name: String,
    /// A local directory, or a key in the artifacts store.
    pub location: String,
    /// SHA-256 of its files, when known.
    pub digest: Option<String>,
    /// The registry version of its last change.
    pub version: i64,
    /// Whether it was removed.
    pub removed: bool,
}

/// The advisory lock of a subject, held until the transaction ends.
const LOCK: &str = "SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(hashtext($1))) AS l";

impl Store {
    /// Records replica `id` (listening at `address`) as alive, now.
    pub async fn join_replica(&self, id: &str, address: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO replicas (id, address, started_at_ms, heartbeat_ms) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms",
        )
        .bind(id)
        .bind(address)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews replica `id`'s heartbeat; false when it was already taken for dead (and its open
    /// requests recorded as abandoned).
    pub async fn heartbeat(&self, id: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE replicas SET heartbeat_ms = $2 WHERE id = $1")
            .bind(id)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes replica `id` at a clean stop (after its last usage record is written).
    pub async fn leave_replica(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The replicas whose heartbeat is at or after `since_ms`, oldest first, with the requests
    /// each has open.
    pub async fn replicas(&self, since_ms: i64) -> Result<Vec<Replica>> {
        let rows = sqlx::query(
            "SELECT id, address, started_at_ms, heartbeat_ms, \
               (SELECT CAST(COUNT(*) AS BIGINT) FROM open_requests o WHERE o.replica_id = r.id) AS open \
             FROM replicas r WHERE heartbeat_ms >= $1 ORDER BY started_at_ms, id",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Replica {
                    id: r.try_get("id")?,
                    address: r.try_get("address")?,
                    started_at_ms: r.try_get("started_at_ms")?,
                    heartbeat_ms: r.try_get("heartbeat_ms")?,
                    open_requests: r.try_get("open")?,
                })
            })
            .collect()
    }

    /// Takes every replica whose heartbeat is older than `dead_before_ms` for dead and writes
    /// a usage record for each request it had open: status [`ABANDONED_STATUS`], no tokens
    /// billed (what it streamed before it died is unknown). Also drops rate-window seconds
    /// older than two minutes. Returns the records written; replicas sweeping at once write
    /// each record once.
    pub async fn sweep(&self, dead_before_ms: i64, now_ms: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        // the first statement writes: replicas sweeping at once take turns on the rows
        sqlx::query("DELETE FROM replicas WHERE heartbeat_ms < $1")
            .bind(dead_before_ms)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "DELETE FROM open_requests WHERE replica_id NOT IN (SELECT id FROM replicas) \
             RETURNING request_id, tenant_id, key_id, model, created_at_ms",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut records = Vec::with_capacity(rows.len());
        for r in &rows {
            let created_at_ms: i64 = r.try_get("created_at_ms")?;
            records.push(UsageRecord {
                request_id: r.try_get("request_id")?,
                tenant_id: r.try_get("tenant_id")?,
                key_id: r.try_get("key_id")?,
                model: r.try_get("model")?,
                adapter: None,
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                status: ABANDONED_STATUS,
                latency_ms: (now_ms - created_at_ms).max(0),
                created_at_ms,
                cost_picodollars: 0,
                kind: UsageKind::Inference,
                slot_ms: 0,
            });
        }
        let written = self.record_usage_in(&mut tx, &records).await?;
        sqlx::query("DELETE FROM quota_seconds WHERE second < $1")
            .bind(now_ms.div_euclid(1000) - 120)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(written)
    }

    /// Requests admitted and not yet recorded, on every replica.
    pub async fn open_requests(&self) -> Result<i64> {
        let row = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM open_requests")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Admits a request against quotas every replica shares: [`Store::admit_batch`] of one.
    pub async fn admit_shared<E>(
        &self,
        a: &Admission<'_>,
        decide: impl FnOnce(&[Counters; 2]) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<(), E>> {
        let mut decide = Some(decide);
        let mut out = self
            .admit_batch(std::slice::from_ref(a), |_, c| match decide.take() {
                Some(d) => d(c),
                None => Ok(()),
            })
            .await?;
        Ok(out.pop().unwrap_or(Ok(())))
    }

    /// Admits requests of one tenant and key against quotas every replica shares, in one
    /// transaction: under the tenant's and the key's locks (PostgreSQL advisory locks, in that
    /// order) it reads their [`Counters`] (as any admission's `wants` asks), lets `decide` judge
    /// each admission in turn against the counters with the ones before it charged, then charges
    /// the minute of both subjects with those admitted (limited or not) and records them as
    /// open. Returns each admission's verdict, in order. The commit does not wait for
    /// the disk (`synchronous_commit = off`): a database crash may forget the admissions of its
    /// last moments, never a usage record.
    pub async fn admit_batch<E>(
        &self,
        batch: &[Admission<'_>],
        mut decide: impl FnMut(usize, &[Counters; 2]) -> std::result::Result<(), E>,
    ) -> Result<Vec<std::result::Result<(), E>>> {
        let Some(a) = batch.first() else {
            return Ok(Vec::new());
        };
        let subjects = [Subject::Tenant(a.tenant_id), Subject::Key(a.key_id)];
        let mut tx = self.pool.begin().await?;
        let mut counters = [Counters::default(), Counters::default()];
        // what any of them needs read
        let wants = batch.iter().fold([Wants::default(); 2], |mut w, b| {
            for (w, b) in w.iter_mut().zip(&b.wants) {
                w.minute |= b.minute;
                w.concurrent |= b.concurrent;
                w.day |= b.day;
                w.month |= b.month;
            }
            w
        });
        let reads = wants.iter().any(Wants::any);
        match self.backend() {
            Backend::Postgres => {
                sqlx::query("SET LOCAL synchronous_commit TO OFF")
                    .execute(&mut *tx)
                    .await?;
                if reads {
                    for who in subjects {
                        sqlx::query(LOCK)
                            .bind(subject_key(who))
                            .fetch_one(&mut *tx)
                            .await?;
                    }
                }
            }
            // SQLite has one writer: write first to hold it (a transaction that read first
            // could not take it later without failing at once)
            Backend::Sqlite => {
                sqlx::query("UPDATE registry_version SET version = version WHERE id = 1")
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let second = a.now_ms.div_euclid(1000);
        if reads {
            for ((who, wants), c) in subjects.iter().zip(&wants).zip(&mut counters) {
                self.read_counters(&mut tx, *who, wants, a.now_ms, c)
                    .await?;
            }
        }
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut admitted: Vec<&Admission<'_>> = Vec::with_capacity(batch.len());
        for (i, b) in batch.iter().enumerate() {
            let v = decide(i, &counters);
            if v.is_ok() {
                for c in &mut counters {
                    c.minute_requests += 1;
                    c.minute_tokens += b.tokens;
                    c.second_requests += 1;
                    c.oldest_second.get_or_insert(second);
                    c.in_flight += 1;
                    for r in [c.day.as_mut(), c.month.as_mut()].into_iter().flatten() {
                        r.1 += b.tokens;
                    }
                }
                admitted.push(b);
            }
            verdicts.push(v);
        }
        if admitted.is_empty() {
            tx.rollback().await?;
            return Ok(verdicts);
        }
        let tokens: i64 = admitted.iter().map(|b| b.tokens).sum();
        // every minute is charged, limited or not: a limit set later counts what came before
        sqlx::query(
            "INSERT INTO quota_seconds (subject, second, requests, tokens) VALUES ($1, $2, $3, $4), ($5, $2, $3, $4) \
             ON CONFLICT (subject, second) DO UPDATE SET \
             requests = quota_seconds.requests + excluded.requests, \
             tokens = quota_seconds.tokens + excluded.tokens",
        )
        .bind(subject_key(subjects[0]))
        .bind(second)
        .bind(admitted.len() as i64)
        .bind(tokens)
        .bind(subject_key(subjects[1]))
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "INSERT INTO open_requests (request_id, replica_id, tenant_id, key_id, model, tokens, created_at_ms) VALUES {}",
            crate::usage::placeholders(admitted.len(), 7)
        );
        let mut q = sqlx::query(&sql);
        for b in &admitted {
            q = q
                .bind(b.request_id)
                .bind(b.replica_id)
                .bind(b.tenant_id)
                .bind(b.key_id)
                .bind(b.model)
                .bind(b.tokens)
                .bind(b.now_ms);
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(verdicts)
    }

    /// Reads what `who` has used into `c` (the budgets as `wants` asks), in one statement.
    async fn read_counters(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        who: Subject<'_>,
        wants: &Wants,
        now_ms: i64,
        c: &mut Counters,
    ) -> Result<()> {
        let second = now_ms.div_euclid(1000);
        let (column, id) = match who {
            Subject::Tenant(id) => ("tenant_id", id),
            Subject::Key(id) => ("key_id", id),
        };
        let minute = "FROM quota_seconds WHERE subject = $1 AND second > $2";
        let days = "FROM quota_days WHERE subject = $1 AND day_ms >=";
        let open = format!("FROM open_requests WHERE {column} = $4");
        let r = sqlx::query(&format!(
            "SELECT \
               (SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) {minute}) AS r, \
               (SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) {minute}) AS t, \
               (SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM quota_seconds \
                  WHERE subject = $1 AND second = $3) AS s, \
               (SELECT MIN(second) {minute}) AS oldest, \
               (SELECT CAST(COUNT(*) AS BIGINT) {open}) AS n, \
               (SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) {open}) AS reserved, \
               (SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) {days} $5) AS day, \
               (SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) {days} $6) AS month"
        ))
        .bind(subject_key(who))
        .bind(second - 60)
        .bind(second)
        .bind(id)
        .bind(day_start(now_ms))
        .bind(month_start(now_ms))
        .fetch_one(&mut **tx)
        .await?;
        c.minute_requests = r.try_get("r")?;
        c.minute_tokens = r.try_get("t")?;
        c.second_requests = r.try_get("s")?;
        c.oldest_second = r.try_get("oldest")?;
        c.in_flight = r.try_get("n")?;
        let reserved: i64 = r.try_get("reserved")?;
        if wants.day {
            c.day = Some((r.try_get("day")?, reserved));
        }
        if wants.month {
            c.month = Some((r.try_get("month")?, reserved));
        }
        Ok(())
    }

    /// Registers (or replaces) adapter `name` at `location` with `digest`; returns the new
    /// registry version.
    pub async fn registry_put(
        &self,
        name: &str,
        location: &str,
        digest: Option<&str>,
        now_ms: i64,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let version = bump_registry(&mut tx).await?;
        sqlx::query(
            "INSERT INTO adapters (name, location, digest, version, removed, updated_at_ms) \
             VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (name) DO UPDATE SET \
             location = excluded.location, digest = excluded.digest, version = excluded.version, \
             removed = 0, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(name)
        .bind(location)
        .bind(digest)
        .bind(version)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    /// Marks adapter `name` removed; false when the registry has no such adapter.
    pub async fn registry_remove(&self, name: &str, now_ms: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let version = bump_registry(&mut tx).await?;
        let done = sqlx::query(
            "UPDATE adapters SET removed = 1, version = $2, updated_at_ms = $3 \
             WHERE name = $1 AND removed = 0",
        )
        .bind(name)
        .bind(version)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The registry's version: it changes whenever an adapter is registered or removed.
    pub async fn registry_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT version FROM registry_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("version")?)
    }

    /// Registry entries changed after version `since`, in the order of their changes.
    pub async fn registry_since(&self, since: i64) -> Result<Vec<AdapterEntry>> {
        let rows = sqlx::query(
            "SELECT name, location, digest, version, removed FROM adapters \
             WHERE version > $1 ORDER BY version",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let removed: i64 = r.try_get("removed")?;
                Ok(AdapterEntry {
                    name: r.try_get("name")?,
                    location: r.try_get("location")?,
                    digest: r.try_get("digest")?,
                    version: r.try_get("version")?,
                    removed: removed != 0,
                })
            })
            .collect()
    }
}

/// Bumps the registry version (first, so writers take turns) and returns it.
async fn bump_registry(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<i64> {
    sqlx::query("UPDATE registry_version SET version = version + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    let row = sqlx::query("SELECT version FROM registry_version WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("version")?)
}
