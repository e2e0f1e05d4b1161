//! Submitting, reading and changing jobs: the compare-and-set of [`Store::transition_job`].

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{next, Change, Job, JobEvent, JobFilter, JobState, NewJob, Priority, Stop, Transition};
use crate::error::{Error, Result};
use crate::keys::new_id;
use crate::store::Store;
use crate::time::now_ms;
use crate::usage::UsageRecord;

const JOB_COLUMNS: &str =
    "id, tenant_id, name, priority, kind, command, cwd, out_dir, done_marker, \
    time_limit_s, state, reason, attempts, stop, stop_at_ms, executor, handle, log_path, \
    checkpoint_step, slot_ms, started_at_ms, created_at_ms, finished_at_ms, error";

fn job(r: &AnyRow) -> Result<Job> {
    let command: String = r.try_get("command")?;
    let state: String = r.try_get("state")?;
    let stop: Option<String> = r.try_get("stop")?;
    let stop_at: Option<i64> = r.try_get("stop_at_ms")?;
    Ok(Job {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        priority: Priority::from_rank(r.try_get("priority")?),
        kind: r.try_get("kind")?,
        command: serde_json::from_str(&command)
            .map_err(|e| Error::Invalid(format!("stored command {command:?}: {e}")))?,
        cwd: r.try_get("cwd")?,
        out_dir: r.try_get("out_dir")?,
        done_marker: r.try_get("done_marker")?,
        time_limit_s: r.try_get("time_limit_s")?,
        state: JobState::parse(&state)
            .ok_or_else(|| Error::Invalid(format!("stored job state {state:?}")))?,
        reason: r.try_get("reason")?,
        attempts: r.try_get("attempts")?,
        stop: stop.as_deref().and_then(Stop::parse).map(|s| (s, stop_at)),
        executor: r.try_get("executor")?,
        handle: r.try_get("handle")?,
        log_path: r.try_get("log_path")?,
        checkpoint_step: r.try_get("checkpoint_step")?,
        slot_ms: r.try_get("slot_ms")?,
        started_at_ms: r.try_get("started_at_ms")?,
        created_at_ms: r.try_get("created_at_ms")?,
        finished_at_ms: r.try_get("finished_at_ms")?,
        error: r.try_get("error")?,
    })
}

/// The states in which a job still owns its output directory.
const LIVE: &str = "('queued', 'running', 'preempted', 'paused')";

impl Store {
    /// Queues a job; its record and first history entry are committed before this returns.
    /// Refuses an unknown tenant and an output directory that a live job writes.
    pub async fn submit_job(&self, new: &NewJob) -> Result<Job> {
        if self.tenant(&new.tenant_id).await?.is_none() {
            return Err(Error::NotFound(format!("tenant {:?}", new.tenant_id)));
        }
        if new.command.is_empty() {
            return Err(Error::Invalid("a job needs a command".into()));
        }
        let id = new_id("job").replacen('_', "-", 1);
        let now = now_ms();
        let command = serde_json::to_string(&new.command)
            .map_err(|e| Error::Invalid(format!("command: {e}")))?;
        let log_path = new.log_path.replace("{id}", &id);
        // the first statement writes: a transaction that read first could not be upgraded to
        // a writer once another process wrote (SQLite's WAL), and would fail instead of wait
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
             'queued', 'submitted', 0, NULL, NULL, NULL, NULL, $11, NULL, 0, NULL, $12, NULL, NULL \
             WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE out_dir = $8 AND state IN {LIVE})"
        ))
        .bind(&id)
        .bind(&new.tenant_id)
        .bind(&new.name)
        .bind(new.priority.rank())
        .bind(&new.kind)
        .bind(&command)
        .bind(&new.cwd)
        .bind(&new.out_dir)
        .bind(&new.done_marker)
        .bind(new.time_limit_s)
        .bind(&log_path)
        .bind(now)
        .execute(&mut *tx)
        .await;
        // a submit racing this one past the check meets the unique index instead
        let clash = match inserted {
            Ok(done) => done.rows_affected() == 0,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => true,
            Err(e) => return Err(e.into()),
        };
        if clash {
            tx.rollback().await?;
            let other = sqlx::query(&format!(
                "SELECT id FROM jobs WHERE out_dir = $1 AND state IN {LIVE}"
            ))
            .bind(&new.out_dir)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<String, _>("id"))
            .transpose()?
            .unwrap_or_else(|| "another job".into());
            return Err(Error::Invalid(format!(
                "{other} already writes {}; wait for it or choose another output directory",
                new.out_dir
            )));
        }
        sqlx::query(
            "INSERT INTO job_events (job_id, seq, state, at_ms, reason) \
             VALUES ($1, 0, 'queued', $2, 'submitted')",
        )
        .bind(&id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.job(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {id}")))
    }

    /// The job with this id.
    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job).transpose()
    }

    /// Jobs matching `filter`, oldest first.
    pub async fn jobs(&self, filter: &JobFilter<'_>) -> Result<Vec<Job>> {
        let states = if filter.states.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = filter
                .states
                .iter()
                .map(|s| format!("'{}'", s.name()))
                .collect();
            format!(" AND state IN ({})", names.join(", "))
        };
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 = '' OR tenant_id = $1){states} \
             ORDER BY created_at_ms, id"
        ))
        .bind(filter.tenant_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job).collect()
    }

    /// Every state `id` went through, oldest first.
    pub async fn job_history(&self, id: &str) -> Result<Vec<JobEvent>> {
        let rows = sqlx::query(
            "SELECT state, at_ms, reason FROM job_events WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(JobEvent {
                    state: JobState::parse(&state)
                        .ok_or_else(|| Error::Invalid(format!("stored job state {state:?}")))?,
                    at_ms: r.try_get("at_ms")?,
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    /// Applies `change` to the job as `seen` (its state and attempt number): refused with
    /// [`Error::Conflict`] when the transition is illegal from that state or when the stored
    /// job has moved on since it was read. Returns the job as it is now.
    pub async fn transition_job(&self, seen: &Job, change: &Change<'_>) -> Result<Job> {
        let Some(to) = next(seen.state, change.transition) else {
            return Err(Error::Conflict(format!(
                "{} is {}: it cannot {:?}",
                seen.id, seen.state, change.transition
            )));
        };
        let now = change.at_ms.unwrap_or_else(now_ms);
        let ends_attempt = seen.state == JobState::Running;
        let elapsed = match (ends_attempt, seen.started_at_ms) {
            (true, Some(s)) => (now - s).max(0),
            _ => 0,
        };
        let mut tx = self.pool.begin().await?;
        let attempts = seen.attempts + i64::from(change.transition == Transition::Start);
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, reason = $2, attempts = $3, \
               stop = NULL, stop_at_ms = NULL, executor = COALESCE($4, executor), \
               handle = CASE WHEN $5 = 1 THEN NULL ELSE handle END, \
               slot_ms = slot_ms + $6, \
               started_at_ms = CASE WHEN $5 = 1 THEN $7 ELSE started_at_ms END, \
               finished_at_ms = CASE WHEN $8 = 1 THEN $7 ELSE finished_at_ms END, \
               error = COALESCE($9, error) \
             WHERE id = $10 AND state = $11 AND attempts = $12",
        )
        .bind(to.name())
        .bind(change.reason)
        .bind(attempts)
        .bind(change.executor)
        .bind(i64::from(change.transition == Transition::Start))
        .bind(elapsed)
        .bind(now)
        .bind(i64::from(to.is_terminal()))
        .bind(change.error)
        .bind(&seen.id)
        .bind(seen.state.name())
        .bind(seen.attempts)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(format!(
                "{} changed since it was read ({} attempt {})",
                seen.id, seen.state, seen.attempts
            )));
        }
        sqlx::query(
            "INSERT INTO job_events (job_id, seq, state, at_ms, reason) \
             SELECT $1, COALESCE(MAX(seq), -1) + 1, $2, $3, $4 FROM job_events WHERE job_id = $1",
        )
        .bind(&seen.id)
        .bind(to.name())
        .bind(now)
        .bind(change.reason)
        .execute(&mut *tx)
        .await?;
        if ends_attempt {
            let record = UsageRecord {
                request_id: format!("{}.{}", seen.id, seen.attempts),
                tenant_id: seen.tenant_id.clone(),
                key_id: String::new(),
                model: seen.kind.clone(),
                adapter: seen.name.clone(),
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                status: change.exit_status.unwrap_or(-1),
                latency_ms: elapsed,
                created_at_ms: seen.started_at_ms.unwrap_or(now),
                cost_picodollars: 0,
                kind: crate::usage::UsageKind::Training,
                slot_ms: elapsed,
            };
            self.record_usage_in(&mut tx, std::slice::from_ref(&record))
                .await?;
        }
        tx.commit().await?;
        self.job(&seen.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job {}", seen.id)))
    }

    /// Records that the running attempt `attempt` of `id` runs as `handle` on its executor.
    /// Returns false when that attempt is no longer the job's running one.
    pub async fn set_job_handle(&self, id: &str, attempt: i64, handle: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET handle = $1 WHERE id = $2 AND attempts = $3 AND state = 'running'",
        )
        .bind(handle)
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records the step of the job's newest complete checkpoint.
    pub async fn set_job_checkpoint(&self, id: &str, step: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET checkpoint_step = $1 WHERE id = $2")
            .bind(step)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets the reason a queued job is still waiting (no history entry: it did not change state).
    pub async fn set_job_reason(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET reason = $1 WHERE id = $2 AND state = 'queued'")
            .bind(reason)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Asks the running attempt `attempt` of `id` to stop (the pool signals it); a stop already
    /// asked is kept, except that a cancel replaces the others and a pause replaces a
    /// preemption (both end at a checkpoint). Returns whether the request is now recorded.
    pub async fn request_job_stop(&self, id: &str, attempt: i64, stop: Stop) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET stop = $1 \
             WHERE id = $2 AND attempts = $3 AND state = 'running' \
               AND (stop IS NULL OR $1 = 'cancel' \
                    OR ($1 = 'pause' AND stop IN ('preempt', 'budget')))",
        )
        .bind(stop.name())
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records that the stop of attempt `attempt` of `id` is about to be signalled (written
    /// before the signal is sent, so a restarted pool never signals twice). Returns false when
    /// it was recorded already.
    pub async fn mark_job_signalled(&self, id: &str, attempt: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET stop_at_ms = $1 WHERE id = $2 AND attempts = $3 \
               AND state = 'running' AND stop IS NOT NULL AND stop_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// What the owner of `id` asks: to cancel it, pause it or resume it. A job waiting
    /// (queued, preempted, or paused) changes at once; a running one is asked to stop, and the
    /// pool signals it and records the change when its attempt ends (at a checkpoint for a
    /// pause). Returns the job as it is now and whether it already changed; refuses with
    /// [`Error::Conflict`] what cannot happen from its state.
    pub async fn ask_job(&self, id: &str, ask: Ask) -> Result<(Job, bool)> {
        for _ in 0..20 {
            let job = self
                .job(id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
            let (transition, stop) = match ask {
                Ask::Cancel => (Transition::Cancel, Stop::Cancel),
                Ask::Pause => (Transition::Pause, Stop::Pause),
                Ask::Resume => (Transition::Resume, Stop::Pause),
            };
            if job.state.is_terminal() {
                return Err(Error::Conflict(format!("{id} already {}", job.state)));
            }
            if next(job.state, transition).is_none() {
                return Err(Error::Conflict(format!(
                    "{id} is {}: it cannot be {}",
                    job.state,
                    ask.done()
                )));
            }
            if job.state == JobState::Running {
                if let Some((other, _)) = job
                    .stop
                    .filter(|&(s, _)| s != stop && matches!(s, Stop::Cancel | Stop::TimeLimit))
                {
                    return Err(Error::Conflict(format!(
                        "{id} is stopping already ({})",
                        other.name()
                    )));
                }
                if job.stop.is_some_and(|(s, _)| s == stop)
                    || self.request_job_stop(id, job.attempts, stop).await?
                {
                    let now = self.job(id).await?.unwrap_or(job);
                    return Ok((now, false));
                }
            } else {
                match self
                    .transition_job(&job, &super::Change::new(transition, ask.done()))
                    .await
                {
                    Ok(now) => return Ok((now, true)),
                    Err(Error::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // it changed under us: read it again
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        Err(Error::Conflict(format!(
            "{id} keeps changing state; try again"
        )))
    }
}

/// What a job's owner can ask of it ([`Store::ask_job`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// End it for good.
    Cancel,
    /// Hold it (at a checkpoint when it runs).
    Pause,
    /// Let a paused job wait for a slot again.
    Resume,
}

impl Ask {
    fn done(self) -> &'static str {
        match self {
            Ask::Cancel => "cancelled",
            Ask::Pause => "paused",
            Ask::Resume => "resumed",
        }
    }
}
