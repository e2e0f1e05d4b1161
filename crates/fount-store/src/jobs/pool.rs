//! What the pool reads and holds besides jobs: tenants' job quotas, slot usage for budgets and
//! fair share, and the lease that lets one pool act at a time.

use sqlx::Row;

use super::{JobQuota, Priority};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::time::now_ms;

impl Store {
    /// Sets a tenant's limits on the pool (replacing the previous ones).
    pub async fn set_job_quota(&self, tenant_id: &str, q: &JobQuota) -> Result<()> {
        if self.tenant(tenant_id).await?.is_none() {
            return Err(Error::NotFound(format!("tenant {tenant_id:?}")));
        }
        sqlx::query(
            "INSERT INTO job_quotas (tenant_id, running_jobs, slot_seconds_per_day, \
                                     slot_seconds_per_month, max_priority) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id) DO UPDATE SET running_jobs = excluded.running_jobs, \
               slot_seconds_per_day = excluded.slot_seconds_per_day, \
               slot_seconds_per_month = excluded.slot_seconds_per_month, \
               max_priority = excluded.max_priority",
        )
        .bind(tenant_id)
        .bind(q.running_jobs)
        .bind(q.slot_seconds_per_day)
        .bind(q.slot_seconds_per_month)
        .bind(q.max_priority.map(Priority::rank))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A tenant's limits on the pool (all `None` when never set).
    pub async fn job_quota(&self, tenant_id: &str) -> Result<JobQuota> {
        let row = sqlx::query(
            "SELECT running_jobs, slot_seconds_per_day, slot_seconds_per_month, max_priority \
             FROM job_quotas WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(JobQuota::default());
        };
        let max: Option<i64> = r.try_get("max_priority")?;
        Ok(JobQuota {
            running_jobs: r.try_get("running_jobs")?,
            slot_seconds_per_day: r.try_get("slot_seconds_per_day")?,
            slot_seconds_per_month: r.try_get("slot_seconds_per_month")?,
            max_priority: max.map(Priority::from_rank),
        })
    }

    /// Slot time of the attempts that started since `from_ms`, per tenant, in milliseconds
    /// (attempts still running are not in it).
    pub async fn slot_ms_since(&self, from_ms: i64) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT tenant_id, CAST(SUM(slot_ms) AS BIGINT) AS ms FROM usage_records \
             WHERE kind = 'training' AND created_at_ms >= $1 GROUP BY tenant_id ORDER BY tenant_id",
        )
        .bind(from_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("tenant_id")?, r.try_get("ms")?)))
            .collect()
    }

    /// Every ended attempt since `from_ms`: tenant, start (Unix ms) and slot time (ms), for
    /// usage that decays with age.
    pub async fn slot_usage_since(&self, from_ms: i64) -> Result<Vec<(String, i64, i64)>> {
        let rows = sqlx::query(
            "SELECT tenant_id, created_at_ms, slot_ms FROM usage_records \
             WHERE kind = 'training' AND created_at_ms >= $1",
        )
        .bind(from_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("tenant_id")?,
                    r.try_get("created_at_ms")?,
                    r.try_get("slot_ms")?,
                ))
            })
            .collect()
    }

    /// Takes or renews the pool's lease for `holder` until `ttl_ms` from now. A lease held by
    /// someone else is taken when it expired or when `holder_gone` says its holder is dead.
    /// Returns whether `holder` holds it now.
    pub async fn take_pool_lease(
        &self,
        holder: &str,
        ttl_ms: i64,
        holder_gone: impl Fn(&str) -> bool,
    ) -> Result<bool> {
        let now = now_ms();
        let current =
            sqlx::query("SELECT holder, expires_at_ms FROM pool_lease WHERE name = 'pool'")
                .fetch_optional(&self.pool)
                .await?;
        let done = match current {
            None => sqlx::query(
                "INSERT INTO pool_lease (name, holder, expires_at_ms) VALUES ('pool', $1, $2) \
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(holder)
            .bind(now + ttl_ms)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            Some(r) => {
                let other: String = r.try_get("holder")?;
                let expires: i64 = r.try_get("expires_at_ms")?;
                if other != holder && expires > now && !holder_gone(&other) {
                    return Ok(false);
                }
                sqlx::query(
                    "UPDATE pool_lease SET holder = $1, expires_at_ms = $2 \
                     WHERE name = 'pool' AND holder = $3 AND expires_at_ms = $4",
                )
                .bind(holder)
                .bind(now + ttl_ms)
                .bind(&other)
                .bind(expires)
                .execute(&self.pool)
                .await?
                .rows_affected()
            }
        };
        Ok(done > 0)
    }

    /// Gives the lease up (a pool that stops cleanly), when `holder` holds it.
    pub async fn release_pool_lease(&self, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM pool_lease WHERE name = 'pool' AND holder = $1")
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
