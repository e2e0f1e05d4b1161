//! Jobs of the compute pool: their records, their history, and the one function that owns every
//! change of state.
//!
//! A job's state changes only through [`Store::transition_job`], which applies [`next`] and
//! writes the new state with a compare-and-set on the state and the attempt number read before:
//! a change computed from a stale record matches no row and is refused, so two writers (the pool
//! and `fount jobs cancel`) can never both move one job. Every change appends a row to
//! `job_events` in the same transaction, and an attempt that ends writes its usage record
//! (`kind = 'training'`, id `job-….N`) there too: exactly once, by the record's primary key.
//!
//! ```text
//! queued ──start──▶ running ──succeed──▶ succeeded
//!   ▲                 │ │ └──fail──────▶ failed
//!   │                 │ └────cancel────▶ cancelled ◀──cancel── queued, preempted
//!   └──requeue── preempted ◀──preempt──┘
//! ```

use std::fmt;

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::keys::new_id;
use crate::store::Store;
use crate::time::now_ms;
use crate::usage::UsageRecord;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for a slot (the record's `reason` says why it has none yet).
    Queued,
    /// An attempt is running on an executor.
    Running,
    /// Its attempt was stopped to make room (or its process was lost); it is requeued next.
    Preempted,
    /// The command exited 0.
    Succeeded,
    /// The command failed; the record carries the error and the last lines of its log.
    Failed,
    /// Cancelled by its owner or an operator.
    Cancelled,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Preempted,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The lower-case name, as stored and printed.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Preempted => "preempted",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses [`JobState::name`].
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.name() == s)
    }

    /// Whether nothing can happen to the job any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// An attempt starts (a new attempt number).
    Start,
    /// The attempt exited 0.
    Succeed,
    /// The attempt failed.
    Fail,
    /// The attempt was stopped to make room, or its process was lost.
    Preempt,
    /// A preempted job waits for a slot again.
    Requeue,
    /// The owner cancelled it.
    Cancel,
}

impl Transition {
    /// Every transition.
    pub const ALL: [Transition; 6] = [
        Transition::Start,
        Transition::Succeed,
        Transition::Fail,
        Transition::Preempt,
        Transition::Requeue,
        Transition::Cancel,
    ];
}

/// The state after `t` from `from`, or `None` when `t` cannot happen in `from`. The only place
/// that decides which changes are legal.
pub fn next(from: JobState, t: Transition) -> Option<JobState> {
    use JobState::*;
    use Transition::*;
    match (from, t) {
        (Queued, Start) => Some(Running),
        (Running, Succeed) => Some(Succeeded),
        (Running, Fail) => Some(Failed),
        (Running, Preempt) => Some(Preempted),
        (Preempted, Requeue) => Some(Queued),
        (Queued | Running | Preempted, Cancel) => Some(Cancelled),
        _ => None,
    }
}

/// A job's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Runs when nothing else waits; preempted first.
    Low,
    /// The default.
    Normal,
    /// Preempts lower classes when no slot is free.
    High,
}

impl Priority {
    /// Every class, lowest first.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// Parses [`Priority::name`].
    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.name() == s)
    }

    fn rank(self) -> i64 {
        self as i64
    }

    fn from_rank(r: i64) -> Priority {
        match r {
            i64::MIN..=0 => Priority::Low,
            1 => Priority::Normal,
            _ => Priority::High,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stop {
    /// To make room for a job of higher priority: it checkpoints and is requeued.
    Preempt,
    /// Its tenant's slot-second budget ran out: it checkpoints and waits for the next period.
    Budget,
    /// Its owner cancelled it.
    Cancel,
    /// It ran past its time limit: it fails.
    TimeLimit,
}

impl Stop {
    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Preempt => "preempt",
            Stop::Budget => "budget",
            Stop::Cancel => "cancel",
            Stop::TimeLimit => "time_limit",
        }
    }

    fn parse(s: &str) -> Option<Stop> {
        [Stop::Preempt, Stop::Budget, Stop::Cancel, Stop::TimeLimit]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

/// A job as submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// The tenant it runs for.
    pub tenant_id: String,
    /// A label.
    pub name: Option<String>,
    /// Its class.
    pub priority: Priority,
    /// `train`, `finetune` or `data`.
    pub kind: String,
    /// The `fount` command line, without `fount`.
    pub command: Vec<String>,
    /// The working directory it runs in (relative paths in `command` are relative to it).
    pub cwd: String,
    /// The directory it writes (absolute): no two live jobs may share one.
    pub out_dir: String,
    /// A file that exists once the command has finished its work.
    pub done_marker: String,
    /// Slot seconds after which an attempt is stopped as failed.
    pub time_limit_s: Option<i64>,
    /// Where the job's log goes; `{id}` is replaced by the job's id.
    pub log_path: String,
}

/// A job's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// `job-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// A label.
    pub name: Option<String>,
    /// Its class.
    pub priority: Priority,
    /// `train`, `finetune` or `data`.
    pub kind: String,
    /// The `fount` command line, without `fount`.
    pub command: Vec<String>,
    /// The working directory it runs in.
    pub cwd: String,
    /// The directory it writes.
    pub out_dir: String,
    /// The file that exists once the command has finished its work.
    pub done_marker: String,
    /// Slot seconds after which an attempt fails.
    pub time_limit_s: Option<i64>,
    /// Its state.
    pub state: JobState,
    /// Why it is in that state (for a queued job: what it waits for).
    pub reason: String,
    /// Attempts started so far (the fencing number of the current one).
    pub attempts: i64,
    /// A stop asked of the running attempt, and when its signal was sent (Unix ms; `None`
    /// until the pool sends it).
    pub stop: Option<(Stop, Option<i64>)>,
    /// The executor of the current or last attempt (`local`, `slurm`).
    pub executor: Option<String>,
    /// How that executor finds the attempt (`pid:starttime`, a Slurm job id).
    pub handle: Option<String>,
    /// The job's log file.
    pub log_path: String,
    /// The step of the newest complete checkpoint seen.
    pub checkpoint_step: Option<i64>,
    /// Slot time of the attempts that ended, in milliseconds.
    pub slot_ms: i64,
    /// When the current attempt started (Unix ms).
    pub started_at_ms: Option<i64>,
    /// When it was submitted (Unix ms).
    pub created_at_ms: i64,
    /// When it reached a final state (Unix ms).
    pub finished_at_ms: Option<i64>,
    /// Why it failed, with the last lines of its log.
    pub error: Option<String>,
}

/// One entry of a job's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The state entered.
    pub state: JobState,
    /// When (Unix ms).
    pub at_ms: i64,
    /// Why.
    pub reason: String,
}

/// A tenant's limits on the pool; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuota {
    /// Jobs running at once.
    pub running_jobs: Option<i64>,
    /// Slot seconds per UTC day.
    pub slot_seconds_per_day: Option<i64>,
    /// Slot seconds per UTC month.
    pub slot_seconds_per_month: Option<i64>,
    /// The highest priority its jobs may ask for.
    pub max_priority: Option<Priority>,
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter<'a> {
    /// One tenant's jobs.
    pub tenant_id: Option<&'a str>,
    /// Jobs in these states (all when empty).
    pub states: &'a [JobState],
}

/// A change of state with what it records.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// What happens.
    pub transition: Transition,
    /// Why (shown in the history and as the job's reason).
    pub reason: &'a str,
    /// For [`Transition::Start`]: the executor.
    pub executor: Option<&'a str>,
    /// For [`Transition::Fail`]: the error and the log's tail.
    pub error: Option<&'a str>,
    /// For a change that ends an attempt: the process's exit status.
    pub exit_status: Option<i64>,
    /// When it happened (Unix ms); now when `None`. An attempt found dead after a restart ends
    /// when its log was last written.
    pub at_ms: Option<i64>,
}

impl<'a> Change<'a> {
    /// `transition` for `reason`.
    pub fn new(transition: Transition, reason: &'a str) -> Change<'a> {
        Change {
            transition,
            reason,
            executor: None,
            error: None,
            exit_status: None,
            at_ms: None,
        }
    }
}

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
const LIVE: &str = "('queued', 'running', 'preempted')";

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
    /// asked is kept, except that a cancel replaces the others. Returns whether the request is
    /// now recorded.
    pub async fn request_job_stop(&self, id: &str, attempt: i64, stop: Stop) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET stop = $1 \
             WHERE id = $2 AND attempts = $3 AND state = 'running' \
               AND (stop IS NULL OR $1 = 'cancel')",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sequence of transitions up to length 6 from `queued`: each step is legal exactly
    /// when [`next`] says so, terminal states accept nothing, and the only ways back to
    /// `queued` pass through `preempted`.
    #[test]
    fn every_sequence_follows_the_machine() {
        fn walk(state: JobState, depth: usize, path: &mut Vec<Transition>, seen: &mut usize) {
            *seen += 1;
            if depth == 0 {
                return;
            }
            for t in Transition::ALL {
                match next(state, t) {
                    Some(to) => {
                        assert!(!state.is_terminal(), "{path:?}: {state} -> {to}");
                        if to == JobState::Queued {
                            assert_eq!(state, JobState::Preempted, "{path:?}");
                        }
                        if to == JobState::Running {
                            assert_eq!((state, t), (JobState::Queued, Transition::Start));
                        }
                        path.push(t);
                        walk(to, depth - 1, path, seen);
                        path.pop();
                    }
                    None => assert!(
                        state.is_terminal()
                            || !matches!(
                                (state, t),
                                (JobState::Queued, Transition::Start)
                                    | (JobState::Running, Transition::Succeed)
                                    | (JobState::Running, Transition::Fail)
                                    | (JobState::Running, Transition::Preempt)
                                    | (JobState::Preempted, Transition::Requeue)
                                    | (_, Transition::Cancel)
                            ),
                        "{path:?}: {state} refused {t:?}"
                    ),
                }
            }
        }
        let mut seen = 0;
        walk(JobState::Queued, 6, &mut Vec::new(), &mut seen);
        assert!(seen > 10, "{seen}");
        let legal: usize = JobState::ALL
            .iter()
            .map(|&s| {
                Transition::ALL
                    .iter()
                    .filter(|&&t| next(s, t).is_some())
                    .count()
            })
            .sum();
        assert_eq!(legal, 8);
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.name()), Some(s));
        }
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.name()), Some(p));
            assert_eq!(Priority::from_rank(p.rank()), p);
        }
        assert_eq!(JobState::parse("paused"), None);
    }
}
