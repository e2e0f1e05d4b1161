//! The pool's loop: each tick follows the running attempts, ends the ones that exited, signals
//! the ones asked to stop, then asks [`crate::schedule::decide`] what to start and stop.
//!
//! Crash safety is a matter of order. Every change is committed to the store before it is
//! acted on: a job is `running` (with a new attempt number) before its process is spawned, a
//! stop is recorded before its signal is sent. So after a `kill -9` at any moment, the next
//! pool finds each attempt either alive (its stored handle, or [`Executor::find`] when the
//! handle was not stored yet) and adopts it, or gone, and then ends it by what it left: its
//! done marker, or a requeue that resumes from its newest checkpoint. The lease in the store
//! lets one pool at a time act, so no job ever runs twice at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fount_store::{
    day_start, month_start, now_ms, Change, Job, JobFilter, JobState, Stop, Store, Subject,
    Transition,
};

use crate::error::Result;
use crate::executor::{local, Executor, Launch, Status, EXIT_CHECKPOINTED};
use crate::schedule::{decayed, decide, Active, Decision, Snapshot, TenantView, Waiting};

/// How the pool behaves.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Jobs that run at once.
    pub slots: usize,
    /// How long a job asked to stop may take to checkpoint before it is killed.
    pub grace: Duration,
    /// How often the pool looks at its jobs.
    pub tick: Duration,
    /// The half-life of past usage in fair sharing.
    pub half_life: Duration,
    /// Slot time charged per running job when ranking tenants' shares.
    pub entry_penalty: Duration,
    /// How long the pool's lease lasts without renewal.
    pub lease_ttl: Duration,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            slots: 1,
            grace: Duration::from_secs(60),
            tick: Duration::from_millis(200),
            half_life: Duration::from_secs(7 * 24 * 3600),
            entry_penalty: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(15),
        }
    }
}

/// The arguments that make a command continue from its newest checkpoint.
pub fn resume_args(kind: &str) -> &'static [&'static str] {
    match kind {
        "train" | "finetune" => &["--resume"],
        // `fount data run` on the same directory skips the input files it finished
        _ => &[],
    }
}

/// The step of the newest complete checkpoint under `out/checkpoints`.
pub fn newest_checkpoint(out: &Path) -> Option<i64> {
    let entries = fs_err::read_dir(out.join("checkpoints")).ok()?;
    entries
        .flatten()
        .filter(|e| e.path().join("COMPLETE").exists())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<i64>()
                .ok()
        })
        .max()
}

/// The last `n` lines of the file at `path`.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = fs_err::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    // progress bars redraw with carriage returns: keep the last state of each line
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn modified_ms(path: &Path) -> Option<i64> {
    let t = fs_err::metadata(path).ok()?.modified().ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// This process as a lease holder: `host:pid:starttime`.
fn holder() -> String {
    let host = fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let me = std::process::id() as i32;
    format!(
        "{host}:{}",
        local::handle_of(me).unwrap_or_else(|| format!("{me}:0"))
    )
}

/// Whether the lease holder `h` was a process on this host that is gone.
fn holder_gone(h: &str) -> bool {
    let Some((host, handle)) = h.split_once(':') else {
        return false;
    };
    let this = fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    host == this && !local::alive(handle)
}

/// The compute pool over one store and one executor.
pub struct Pool {
    store: Store,
    exec: Box<dyn Executor>,
    cfg: PoolConfig,
    holder: String,
    reasons: HashMap<String, String>,
    tenants: HashMap<String, TenantView>,
    tenants_at: Option<Instant>,
}

impl Pool {
    /// A pool acting on `store`'s jobs through `exec`.
    pub fn new(store: Store, exec: Box<dyn Executor>, cfg: PoolConfig) -> Pool {
        Pool {
            store,
            exec,
            cfg,
            holder: holder(),
            reasons: HashMap::new(),
            tenants: HashMap::new(),
            tenants_at: None,
        }
    }

    /// Ticks until `stop` is set, then gives the lease up. Running attempts are left running:
    /// the next pool adopts them.
    pub async fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            if let Err(e) = self.tick().await {
                tracing::warn!("pool tick: {e}");
            }
            let rest = self.cfg.tick.saturating_sub(started.elapsed());
            tokio::time::sleep(rest).await;
        }
        self.store.release_pool_lease(&self.holder).await?;
        Ok(())
    }

    /// One round: follow, end and signal the running attempts, then schedule. Returns false
    /// when another pool holds the lease (and nothing was done).
    pub async fn tick(&mut self) -> Result<bool> {
        let ttl = i64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(i64::MAX);
        if !self
            .store
            .take_pool_lease(&self.holder, ttl, holder_gone)
            .await?
        {
            return Ok(false);
        }
        let live = self
            .jobs_in(&[JobState::Running, JobState::Preempted])
            .await?;
        for job in live {
            if let Err(e) = self.follow(job).await {
                tracing::warn!("following a job: {e}");
            }
        }
        self.schedule().await?;
        Ok(true)
    }

    /// Every job in `states`, of all tenants.
    async fn jobs_in(&self, states: &[JobState]) -> Result<Vec<Job>> {
        Ok(self
            .store
            .jobs(&JobFilter {
                tenant_id: None,
                states,
            })
            .await?)
    }

    /// Follows one running (or preempted) job.
    async fn follow(&mut self, job: Job) -> Result<()> {
        if job.state == JobState::Preempted {
            self.store
                .transition_job(
                    &job,
                    &Change::new(Transition::Requeue, "requeued; resumes from its checkpoint"),
                )
                .await?;
            return Ok(());
        }
        let handle = match &job.handle {
            Some(h) => Some(h.clone()),
            None => {
                let found = self.exec.find(&job.id, job.attempts)?;
                if let Some(h) = &found {
                    tracing::info!("{}: adopted attempt {} as {h}", job.id, job.attempts);
                    self.store.set_job_handle(&job.id, job.attempts, h).await?;
                }
                found
            }
        };
        let status = match &handle {
            Some(h) => self.exec.status(h)?,
            None => Status::Exited(None),
        };
        match status {
            Status::Running => {
                let h = handle.unwrap_or_default();
                self.running(&job, &h).await
            }
            Status::Exited(code) => self.ended(&job, code).await,
        }
    }

    /// A running attempt: time limit, stop signals, grace, checkpoints.
    async fn running(&mut self, job: &Job, handle: &str) -> Result<()> {
        let now = now_ms();
        let elapsed = now - job.started_at_ms.unwrap_or(now);
        if job.stop.is_none() && job.time_limit_s.is_some_and(|l| elapsed > l * 1000) {
            self.store
                .request_job_stop(&job.id, job.attempts, Stop::TimeLimit)
                .await?;
            return self.signal(job, handle).await;
        }
        match job.stop {
            Some((_, None)) => self.signal(job, handle).await?,
            Some((_, Some(at))) => {
                let grace = i64::try_from(self.cfg.grace.as_millis()).unwrap_or(i64::MAX);
                if now - at > grace {
                    tracing::info!("{}: grace period over; killing it", job.id);
                    self.exec.kill(handle)?;
                }
            }
            None => {}
        }
        if let Some(step) = newest_checkpoint(Path::new(&job.out_dir)) {
            if job.checkpoint_step != Some(step) {
                self.store.set_job_checkpoint(&job.id, step).await?;
            }
        }
        Ok(())
    }

    /// Sends the stop signal of `job`'s attempt, recorded first so that it is sent once.
    async fn signal(&mut self, job: &Job, handle: &str) -> Result<()> {
        if self.store.mark_job_signalled(&job.id, job.attempts).await? {
            self.exec.terminate(handle)?;
        }
        Ok(())
    }

    /// An attempt that ended with `code` (`None`: killed, or unknown).
    async fn ended(&mut self, job: &Job, code: Option<i32>) -> Result<()> {
        let log = Path::new(&job.log_path);
        if let Some(step) = newest_checkpoint(Path::new(&job.out_dir)) {
            if job.checkpoint_step != Some(step) {
                self.store.set_job_checkpoint(&job.id, step).await?;
            }
        }
        // a process found dead after a restart ended when it last wrote to its log
        let at = match code {
            Some(_) => None,
            None => modified_ms(log).filter(|&m| job.started_at_ms.is_some_and(|s| m >= s)),
        };
        let done = Path::new(&job.done_marker).exists();
        let stop = job.stop.map(|(s, _)| s);
        let change = |t, reason| Change {
            exit_status: code.map(i64::from),
            at_ms: at,
            ..Change::new(t, reason)
        };
        let error;
        let c = match (code, stop) {
            (Some(0), _) => change(Transition::Succeed, "finished"),
            (None, None) if done => change(Transition::Succeed, "finished while unobserved"),
            (_, Some(Stop::Cancel)) => change(Transition::Cancel, "cancelled"),
            (Some(EXIT_CHECKPOINTED), Some(Stop::Pause)) => {
                change(Transition::Pause, "paused by its owner; checkpointed")
            }
            (_, Some(Stop::Pause)) => change(
                Transition::Pause,
                "paused by its owner; it wrote no checkpoint on the signal and resumes from its last",
            ),
            (_, Some(Stop::TimeLimit)) => {
                error = format!(
                    "ran past its time limit of {} s\n{}",
                    job.time_limit_s.unwrap_or(0),
                    tail(log, 20)
                );
                Change {
                    error: Some(&error),
                    ..change(Transition::Fail, "time limit")
                }
            }
            (Some(EXIT_CHECKPOINTED), Some(Stop::Preempt)) => change(
                Transition::Preempt,
                "preempted by a job of higher priority; checkpointed",
            ),
            (_, Some(Stop::Preempt)) => change(
                Transition::Preempt,
                "preempted by a job of higher priority; it wrote no checkpoint on the signal \
                 (killed after the grace period, or a command without one) and resumes from its last",
            ),
            (Some(EXIT_CHECKPOINTED), Some(Stop::Budget)) => change(
                Transition::Preempt,
                "stopped at a checkpoint: its tenant's slot-second budget is spent",
            ),
            (_, Some(Stop::Budget)) => change(
                Transition::Preempt,
                "stopped: its tenant's slot-second budget is spent; resumes from its last checkpoint",
            ),
            (Some(EXIT_CHECKPOINTED), None) => change(
                Transition::Preempt,
                "stopped by a signal from outside the pool; checkpointed",
            ),
            (None, None) => change(
                Transition::Preempt,
                "its process was lost (a pool restart or a node failure); resumes from its checkpoint",
            ),
            (Some(n), None) => {
                error = format!("exited with status {n}\n{}", tail(log, 20));
                Change {
                    error: Some(&error),
                    ..change(Transition::Fail, "the command failed")
                }
            }
        };
        let after = self.store.transition_job(job, &c).await?;
        // its slot time counts against its tenant's budgets from now on
        self.tenants_at = None;
        tracing::info!("{}: {} ({})", job.id, after.state, c.reason);
        Ok(())
    }

    /// Refreshes what the scheduler knows of tenants (at most once a second).
    async fn tenant_views(&mut self, tenants: &[&str]) -> Result<()> {
        let fresh = self
            .tenants_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            && tenants.iter().all(|t| self.tenants.contains_key(*t));
        if fresh {
            return Ok(());
        }
        let now = now_ms();
        let day: HashMap<String, i64> = self
            .store
            .slot_ms_since(day_start(now))
            .await?
            .into_iter()
            .collect();
        let month: HashMap<String, i64> = self
            .store
            .slot_ms_since(month_start(now))
            .await?
            .into_iter()
            .collect();
        let hl = i64::try_from(self.cfg.half_life.as_millis()).unwrap_or(i64::MAX);
        let mut decay: HashMap<String, f64> = HashMap::new();
        for (t, at, ms) in self
            .store
            .slot_usage_since(now.saturating_sub(hl.saturating_mul(6)))
            .await?
        {
            *decay.entry(t).or_default() += decayed(ms, at, now, hl);
        }
        let mut views = HashMap::new();
        for &t in tenants {
            views.insert(
                t.to_string(),
                TenantView {
                    quota: self.store.job_quota(t).await?,
                    weight: self
                        .store
                        .quota(Subject::Tenant(t))
                        .await?
                        .weight
                        .unwrap_or(1),
                    day_ms: day.get(t).copied().unwrap_or(0),
                    month_ms: month.get(t).copied().unwrap_or(0),
                    decayed_ms: decay.get(t).copied().unwrap_or(0.0),
                },
            );
        }
        self.tenants = views;
        self.tenants_at = Some(Instant::now());
        Ok(())
    }

    /// Decides and acts: starts, stops, and the reasons of the jobs that wait.
    async fn schedule(&mut self) -> Result<()> {
        let queued = self.jobs_in(&[JobState::Queued]).await?;
        let running = self.jobs_in(&[JobState::Running]).await?;
        if queued.is_empty() && running.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&str> = queued
            .iter()
            .chain(&running)
            .map(|j| j.tenant_id.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        self.tenant_views(&names).await?;
        let snapshot = Snapshot {
            slots: self.cfg.slots,
            now_ms: now_ms(),
            waiting: queued
                .iter()
                .map(|j| Waiting {
                    id: j.id.clone(),
                    tenant: j.tenant_id.clone(),
                    priority: j.priority,
                    created_at_ms: j.created_at_ms,
                })
                .collect(),
            active: running
                .iter()
                .map(|j| Active {
                    id: j.id.clone(),
                    attempt: j.attempts,
                    tenant: j.tenant_id.clone(),
                    priority: j.priority,
                    started_at_ms: j.started_at_ms.unwrap_or(0),
                    stopping: j.stop.is_some(),
                })
                .collect(),
            tenants: self.tenants.clone(),
            entry_penalty_ms: self.cfg.entry_penalty.as_millis() as f64,
        };
        let by_id: HashMap<&str, &Job> = queued
            .iter()
            .chain(&running)
            .map(|j| (j.id.as_str(), j))
            .collect();
        for d in decide(&snapshot) {
            match d {
                Decision::Start(id) => {
                    if let Some(job) = by_id.get(id.as_str()) {
                        self.reasons.remove(&id);
                        if let Err(e) = self.start(job).await {
                            tracing::warn!("{id}: cannot start: {e}");
                        }
                    }
                }
                Decision::Stop { id, attempt, why } => {
                    if self.store.request_job_stop(&id, attempt, why).await? {
                        tracing::info!("{id}: asked to stop ({})", why.name());
                        // the record read for this decision has the handle: signal it now
                        if let Some(job) = by_id.get(id.as_str()) {
                            if let Some(h) = &job.handle {
                                self.signal(job, h).await?;
                            }
                        }
                    }
                }
                Decision::Wait { id, reason } => {
                    if self.reasons.get(&id) != Some(&reason) {
                        self.store.set_job_reason(&id, &reason).await?;
                        self.reasons.insert(id, reason);
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts an attempt of `job`: `running` is committed first, then the process spawned.
    async fn start(&mut self, job: &Job) -> Result<()> {
        let reason = if job.attempts == 0 {
            "started".to_string()
        } else {
            format!("resumed (attempt {})", job.attempts + 1)
        };
        let running = self
            .store
            .transition_job(
                job,
                &Change {
                    executor: Some(self.exec.name()),
                    ..Change::new(Transition::Start, &reason)
                },
            )
            .await?;
        let mut args = job.command.clone();
        if running.attempts > 1 {
            for a in resume_args(&job.kind) {
                if !args.iter().any(|x| x == a) {
                    args.push((*a).to_string());
                }
            }
        }
        let launch = Launch {
            job_id: job.id.clone(),
            attempt: running.attempts,
            args,
            log: PathBuf::from(&job.log_path),
            cwd: PathBuf::from(&job.cwd),
        };
        match self.exec.start(&launch) {
            Ok(h) => {
                self.store
                    .set_job_handle(&job.id, running.attempts, &h)
                    .await?;
                tracing::info!("{}: attempt {} started as {h}", job.id, running.attempts);
                Ok(())
            }
            Err(e) => {
                let error = e.to_string();
                self.store
                    .transition_job(
                        &running,
                        &Change {
                            error: Some(&error),
                            ..Change::new(Transition::Fail, "could not start")
                        },
                    )
                    .await?;
                Err(e)
            }
        }
    }
}
