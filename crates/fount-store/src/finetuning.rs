//! Fine-tuning jobs of OpenAI's Fine-tuning API: the API's record of each job (the pool job that
//! trains it is a [`Job`](crate::Job) of its own), its events and its checkpoints.
//!
//! Lists are newest first with an `after` cursor, as the API's are. Events and checkpoints are
//! written by whichever server follows the job; each has a key of what it is about (an event's
//! `key`, a checkpoint's step), so two followers racing each other write it once.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::keys::new_id;
use crate::store::Store;
use crate::usage::UsageRecord;

/// Where a fine-tuning job is, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FtStatus {
    /// Its files are being checked.
    ValidatingFiles,
    /// Its pool job waits for a slot.
    Queued,
    /// Its pool job trains.
    Running,
    /// Held by its owner.
    Paused,
    /// Its model is served.
    Succeeded,
    /// Its files were refused, or training failed.
    Failed,
    /// Cancelled by its owner.
    Cancelled,
}

impl FtStatus {
    /// Every status.
    pub const ALL: [FtStatus; 7] = [
        FtStatus::ValidatingFiles,
        FtStatus::Queued,
        FtStatus::Running,
        FtStatus::Paused,
        FtStatus::Succeeded,
        FtStatus::Failed,
        FtStatus::Cancelled,
    ];

    /// The API's name.
    pub fn name(self) -> &'static str {
        match self {
            FtStatus::ValidatingFiles => "validating_files",
            FtStatus::Queued => "queued",
            FtStatus::Running => "running",
            FtStatus::Paused => "paused",
            FtStatus::Succeeded => "succeeded",
            FtStatus::Failed => "failed",
            FtStatus::Cancelled => "cancelled",
        }
    }

    /// Parses [`FtStatus::name`].
    pub fn parse(s: &str) -> Option<FtStatus> {
        FtStatus::ALL.into_iter().find(|st| st.name() == s)
    }

    /// Whether nothing can happen to the job any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FtStatus::Succeeded | FtStatus::Failed | FtStatus::Cancelled
        )
    }
}

/// A fine-tuning job's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FtJob {
    /// `ftjob-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The base model.
    pub model: String,
    /// The training file's id.
    pub training_file: String,
    /// The validation file's id.
    pub validation_file: Option<String>,
    /// The model name's suffix.
    pub suffix: Option<String>,
    /// The seed used.
    pub seed: i64,
    /// The method with its hyperparameters (JSON: as asked, then as resolved).
    pub method: String,
    /// The request's metadata (a JSON object).
    pub metadata: Option<String>,
    /// Where it is.
    pub status: FtStatus,
    /// `{code, message, param}` (JSON) once failed.
    pub error: Option<String>,
    /// The pool job that trains it, once queued.
    pub pool_job_id: Option<String>,
    /// Where its pool job writes (relative: under the fine-tuning directory of the server that
    /// follows it).
    pub out_dir: String,
    /// `ft:…`, once succeeded.
    pub fine_tuned_model: Option<String>,
    /// The training file's tokens times the epochs, once validated.
    pub billable_tokens: Option<i64>,
    /// Optimizer steps the run takes, once validated.
    pub total_steps: Option<i64>,
    /// Billable tokens trained on, once succeeded.
    pub trained_tokens: Option<i64>,
    /// The results file's id, once succeeded.
    pub result_file: Option<String>,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// When it reached a final status.
    pub finished_at_ms: Option<i64>,
}

/// A change to a fine-tuning job ([`Store::update_ft_job`]); `None` keeps a field.
#[derive(Debug, Clone, Default)]
pub struct FtUpdate {
    /// The new status.
    pub status: Option<FtStatus>,
    /// The resolved method.
    pub method: Option<String>,
    /// The error.
    pub error: Option<String>,
    /// The pool job.
    pub pool_job_id: Option<String>,
    /// The model.
    pub fine_tuned_model: Option<String>,
    /// The file's tokens times the epochs.
    pub billable_tokens: Option<i64>,
    /// Steps of the run.
    pub total_steps: Option<i64>,
    /// Billable tokens.
    pub trained_tokens: Option<i64>,
    /// The results file.
    pub result_file: Option<String>,
    /// A usage record written in the same transaction (the trained tokens' bill).
    pub usage: Option<UsageRecord>,
}

/// An event of a fine-tuning job.
#[derive(Debug, Clone, PartialEq)]
pub struct FtEvent {
    /// `ftevent-…`.
    pub id: String,
    /// Its job.
    pub job_id: String,
    /// What it is about (one event per key and job).
    pub key: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// What happened.
    pub message: String,
    /// `message` or `metrics`.
    pub kind: String,
    /// The metrics (a JSON object).
    pub data: Option<String>,
}

/// A checkpoint of a fine-tuning job: a model of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct FtCheckpoint {
    /// `ftckpt_…`.
    pub id: String,
    /// Its job.
    pub job_id: String,
    /// Optimizer steps taken.
    pub step: i64,
    /// `ft:…:ckpt-step-N`.
    pub model: String,
    /// The PEFT adapter directory.
    pub path: String,
    /// Its metrics (a JSON object).
    pub metrics: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
}

/// A model made by fine-tuning: a job's final model or one of its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FtModel {
    /// Its tenant.
    pub tenant_id: String,
    /// `ft:…`.
    pub name: String,
    /// The PEFT adapter directory.
    pub path: String,
    /// When it was made (Unix milliseconds).
    pub created_at_ms: i64,
}

const JOB_COLUMNS: &str = "id, tenant_id, model, training_file, validation_file, suffix, seed, \
    method, metadata, status, error, pool_job_id, out_dir, fine_tuned_model, billable_tokens, \
    total_steps, trained_tokens, result_file, created_at_ms, finished_at_ms";

fn ft_job(r: &AnyRow) -> Result<FtJob> {
    let status: String = r.try_get("status")?;
    Ok(FtJob {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        model: r.try_get("model")?,
        training_file: r.try_get("training_file")?,
        validation_file: r.try_get("validation_file")?,
        suffix: r.try_get("suffix")?,
        seed: r.try_get("seed")?,
        method: r.try_get("method")?,
        metadata: r.try_get("metadata")?,
        status: FtStatus::parse(&status)
            .ok_or_else(|| Error::Invalid(format!("stored fine-tuning status {status:?}")))?,
        error: r.try_get("error")?,
        pool_job_id: r.try_get("pool_job_id")?,
        out_dir: r.try_get("out_dir")?,
        fine_tuned_model: r.try_get("fine_tuned_model")?,
        billable_tokens: r.try_get("billable_tokens")?,
        total_steps: r.try_get("total_steps")?,
        trained_tokens: r.try_get("trained_tokens")?,
        result_file: r.try_get("result_file")?,
        created_at_ms: r.try_get("created_at_ms")?,
        finished_at_ms: r.try_get("finished_at_ms")?,
    })
}

fn ft_event(r: &AnyRow) -> Result<FtEvent> {
    Ok(FtEvent {
        id: r.try_get("id")?,
        job_id: r.try_get("job_id")?,
        key: r.try_get("key")?,
        created_at_ms: r.try_get("created_at_ms")?,
        level: r.try_get("level")?,
        message: r.try_get("message")?,
        kind: r.try_get("type")?,
        data: r.try_get("data")?,
    })
}

fn ft_checkpoint(r: &AnyRow) -> Result<FtCheckpoint> {
    Ok(FtCheckpoint {
        id: r.try_get("id")?,
        job_id: r.try_get("job_id")?,
        step: r.try_get("step")?,
        model: r.try_get("model")?,
        path: r.try_get("path")?,
        metrics: r.try_get("metrics")?,
        created_at_ms: r.try_get("created_at_ms")?,
    })
}

/// A fresh `{kind}-…` id.
pub fn ft_id(kind: &str) -> String {
    new_id(kind).replacen('_', "-", 1)
}

/// Keeps `limit + 1` rows' worth: the page and whether more follow.
fn page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    (rows, more)
}

impl Store {
    /// Records a new fine-tuning job.
    pub async fn insert_ft_job(&self, j: &FtJob) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO ft_jobs ({JOB_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
              $19, $20)"
        ))
        .bind(&j.id)
        .bind(&j.tenant_id)
        .bind(&j.model)
        .bind(&j.training_file)
        .bind(&j.validation_file)
        .bind(&j.suffix)
        .bind(j.seed)
        .bind(&j.method)
        .bind(&j.metadata)
        .bind(j.status.name())
        .bind(&j.error)
        .bind(&j.pool_job_id)
        .bind(&j.out_dir)
        .bind(&j.fine_tuned_model)
        .bind(j.billable_tokens)
        .bind(j.total_steps)
        .bind(j.trained_tokens)
        .bind(&j.result_file)
        .bind(j.created_at_ms)
        .bind(j.finished_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tenant's fine-tuning job `id` (another tenant's is `None`, as a missing one).
    pub async fn ft_job(&self, tenant_id: &str, id: &str) -> Result<Option<FtJob>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM ft_jobs WHERE id = $1 AND tenant_id = $2"
        ))
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(ft_job).transpose()
    }

    /// A page of the tenant's fine-tuning jobs, newest first, after the job `after`.
    pub async fn ft_jobs(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<FtJob>, bool)> {
        let cursor = match after {
            Some(a) => match self.ft_job(tenant_id, a).await? {
                Some(j) => Some((j.created_at_ms, j.id)),
                None => return Err(Error::NotFound(format!("fine-tuning job {a:?}"))),
            },
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM ft_jobs WHERE tenant_id = $1 \
               AND ($2 = 0 OR (created_at_ms, id) < ($3, $4)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $5"
        ))
        .bind(tenant_id)
        .bind(i64::from(cursor.is_some()))
        .bind(cursor.as_ref().map_or(0, |c| c.0))
        .bind(cursor.as_ref().map_or("", |c| c.1.as_str()))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let jobs = rows.iter().map(ft_job).collect::<Result<Vec<_>>>()?;
        Ok(page(jobs, limit))
    }

    /// Every fine-tuning job not yet in a final status, of all tenants, oldest first.
    pub async fn live_ft_jobs(&self) -> Result<Vec<FtJob>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM ft_jobs \
             WHERE status NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY created_at_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ft_job).collect()
    }

    /// Changes the job `id` if its status is still `from`; returns whether it did. A change to
    /// a final status sets the finishing time.
    pub async fn update_ft_job(&self, id: &str, from: FtStatus, u: &FtUpdate) -> Result<bool> {
        let to = u.status.unwrap_or(from);
        let finished = (to.is_terminal() && !from.is_terminal()).then(crate::now_ms);
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE ft_jobs SET status = $1, method = COALESCE($2, method), \
               error = COALESCE($3, error), pool_job_id = COALESCE($4, pool_job_id), \
               fine_tuned_model = COALESCE($5, fine_tuned_model), \
               trained_tokens = COALESCE($6, trained_tokens), \
               result_file = COALESCE($7, result_file), \
               finished_at_ms = COALESCE($8, finished_at_ms), \
               billable_tokens = COALESCE($9, billable_tokens), \
               total_steps = COALESCE($10, total_steps) \
             WHERE id = $11 AND status = $12",
        )
        .bind(to.name())
        .bind(&u.method)
        .bind(&u.error)
        .bind(&u.pool_job_id)
        .bind(&u.fine_tuned_model)
        .bind(u.trained_tokens)
        .bind(&u.result_file)
        .bind(finished)
        .bind(u.billable_tokens)
        .bind(u.total_steps)
        .bind(id)
        .bind(from.name())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        if let Some(r) = &u.usage {
            self.record_usage_in(&mut tx, std::slice::from_ref(r))
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Adds an event unless the job has one with its key; returns whether it was added.
    pub async fn add_ft_event(&self, e: &FtEvent) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO ft_events (id, job_id, key, created_at_ms, level, message, type, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (job_id, key) DO NOTHING",
        )
        .bind(&e.id)
        .bind(&e.job_id)
        .bind(&e.key)
        .bind(e.created_at_ms)
        .bind(&e.level)
        .bind(&e.message)
        .bind(&e.kind)
        .bind(&e.data)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The keys of the job's events.
    pub async fn ft_event_keys(&self, job_id: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT key FROM ft_events WHERE job_id = $1")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("key")?))
            .collect()
    }

    /// A page of the job's events, newest first, after the event `after`.
    pub async fn ft_events(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<FtEvent>, bool)> {
        let cursor = match after {
            Some(a) => {
                let row = sqlx::query(
                    "SELECT created_at_ms, id FROM ft_events WHERE id = $1 AND job_id = $2",
                )
                .bind(a)
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| Error::NotFound(format!("event {a:?}")))?;
                Some((
                    row.try_get::<i64, _>("created_at_ms")?,
                    row.try_get::<String, _>("id")?,
                ))
            }
            None => None,
        };
        let rows = sqlx::query(
            "SELECT id, job_id, key, created_at_ms, level, message, type, data FROM ft_events \
             WHERE job_id = $1 AND ($2 = 0 OR (created_at_ms, id) < ($3, $4)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $5",
        )
        .bind(job_id)
        .bind(i64::from(cursor.is_some()))
        .bind(cursor.as_ref().map_or(0, |c| c.0))
        .bind(cursor.as_ref().map_or("", |c| c.1.as_str()))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let events = rows.iter().map(ft_event).collect::<Result<Vec<_>>>()?;
        Ok(page(events, limit))
    }

    /// Adds a checkpoint unless the job has one at its step; returns whether it was added.
    pub async fn add_ft_checkpoint(&self, c: &FtCheckpoint) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO ft_checkpoints (id, job_id, step, model, path, metrics, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (job_id, step) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.job_id)
        .bind(c.step)
        .bind(&c.model)
        .bind(&c.path)
        .bind(&c.metrics)
        .bind(c.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// A page of the job's checkpoints, the latest step first, after the checkpoint `after`.
    pub async fn ft_checkpoints(
        &self,
        job_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<FtCheckpoint>, bool)> {
        let cursor = match after {
            Some(a) => {
                let row =
                    sqlx::query("SELECT step FROM ft_checkpoints WHERE id = $1 AND job_id = $2")
                        .bind(a)
                        .bind(job_id)
                        .fetch_optional(&self.pool)
                        .await?
                        .ok_or_else(|| Error::NotFound(format!("checkpoint {a:?}")))?;
                Some(row.try_get::<i64, _>("step")?)
            }
            None => None,
        };
        let rows = sqlx::query(
            "SELECT id, job_id, step, model, path, metrics, created_at_ms FROM ft_checkpoints \
             WHERE job_id = $1 AND ($2 = 0 OR step < $3) ORDER BY step DESC LIMIT $4",
        )
        .bind(job_id)
        .bind(i64::from(cursor.is_some()))
        .bind(cursor.unwrap_or(0))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let ckpts = rows.iter().map(ft_checkpoint).collect::<Result<Vec<_>>>()?;
        Ok(page(ckpts, limit))
    }

    /// Every model fine-tuning made, of all tenants: the final models of succeeded jobs and
    /// every checkpoint, created at or after `since_ms`.
    pub async fn ft_models(&self, since_ms: i64) -> Result<Vec<FtModel>> {
        let rows = sqlx::query(
            "SELECT j.tenant_id AS tenant_id, c.model AS name, c.path AS path, \
               c.created_at_ms AS created_at_ms \
             FROM ft_checkpoints c JOIN ft_jobs j ON j.id = c.job_id \
             WHERE c.created_at_ms >= $1 \
             UNION ALL \
             SELECT tenant_id, fine_tuned_model AS name, \
               COALESCE((SELECT c.path FROM ft_checkpoints c WHERE c.job_id = ft_jobs.id \
                 ORDER BY c.step DESC, c.created_at_ms DESC LIMIT 1), out_dir) AS path, \
               finished_at_ms AS created_at_ms \
             FROM ft_jobs WHERE status = 'succeeded' AND fine_tuned_model IS NOT NULL \
               AND finished_at_ms >= $1 \
             ORDER BY created_at_ms",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FtModel {
                    tenant_id: r.try_get("tenant_id")?,
                    name: r.try_get("name")?,
                    path: r.try_get("path")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                })
            })
            .collect()
    }
}
