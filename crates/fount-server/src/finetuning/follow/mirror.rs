//! A queued, running or paused job mirrors its pool job: the pool's history, the trainer's
//! metrics and its checkpoints become the job's events and models.

use std::path::Path;
use std::sync::Arc;

use fount_store::{FtCheckpoint, FtJob, FtStatus, FtUpdate, Job, JobState, Stop, Store};
use serde_json::json;

use super::{event, fail, metrics, model_name, parse_rows, Follower};
use crate::finetuning::validate;
use crate::finetuning::FineTuningConfig;
use crate::state::AppState;

impl Follower {
    /// Mirrors a queued, running or paused job's pool job.
    pub(super) async fn follow(
        &mut self,
        state: &Arc<AppState>,
        cfg: &FineTuningConfig,
        store: &Store,
        job: &FtJob,
    ) -> Result<(), String> {
        let Some(pool_id) = &job.pool_job_id else {
            return Ok(());
        };
        if self.keys_read.insert(job.id.clone()) {
            for key in store
                .ft_event_keys(&job.id)
                .await
                .map_err(|e| e.to_string())?
            {
                self.emitted.insert(format!("{}/{key}", job.id));
            }
        }
        let pool = store
            .job(pool_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("its pool job {pool_id} is gone"))?;
        self.history_events(store, job, &pool).await?;
        let dir = cfg.dir.join(&job.id);
        let out = super::out_dir(cfg, job);
        self.metrics_events(store, job, &dir).await;
        self.checkpoints(state, store, job, &dir, &out).await?;
        let to = match (pool.state, pool.stop) {
            (JobState::Queued | JobState::Preempted, _) => FtStatus::Queued,
            (JobState::Running, Some((Stop::Pause, _))) => FtStatus::Paused,
            (JobState::Running, _) => FtStatus::Running,
            (JobState::Paused, _) => FtStatus::Paused,
            (JobState::Succeeded, _) => return self.succeed(state, store, job, &out).await,
            (JobState::Failed, _) => {
                let first = pool
                    .error
                    .as_deref()
                    .and_then(|e| e.lines().last())
                    .unwrap_or("training failed");
                let r = validate::Refusal {
                    code: "training_failed",
                    message: format!("The job failed during training: {first}"),
                    param: "",
                };
                return fail(store, job, &r).await;
            }
            (JobState::Cancelled, _) => FtStatus::Cancelled,
        };
        if to != job.status {
            store
                .update_ft_job(
                    &job.id,
                    job.status,
                    &FtUpdate {
                        status: Some(to),
                        ..FtUpdate::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The pool job's history and waiting reason as events.
    async fn history_events(
        &mut self,
        store: &Store,
        job: &FtJob,
        pool: &Job,
    ) -> Result<(), String> {
        let history = store
            .job_history(&pool.id)
            .await
            .map_err(|e| e.to_string())?;
        let mut starts = 0;
        let mut ahead = None;
        for (k, h) in history.iter().enumerate().skip(1) {
            let (level, message) = match h.state {
                JobState::Running => {
                    starts += 1;
                    if starts == 1 {
                        ("info", "Fine-tuning job started".to_string())
                    } else {
                        let from = pool
                            .checkpoint_step
                            .map(|s| format!(" from its checkpoint at step {s}"))
                            .unwrap_or_default();
                        (
                            "info",
                            format!("Fine-tuning job resumed{from} (attempt {starts})"),
                        )
                    }
                }
                JobState::Preempted => {
                    if self.has(&job.id, &format!("pool:{k}")) {
                        continue;
                    }
                    if ahead.is_none() {
                        ahead = Some(ahead_of(store, job, pool).await?);
                    }
                    let a = ahead.as_deref().unwrap_or("");
                    ("warn", format!("Job preempted: {}{a}", h.reason))
                }
                JobState::Queued => ("info", format!("Job queued again: {}", h.reason)),
                JobState::Paused => ("info", format!("Job paused: {}", h.reason)),
                JobState::Failed => ("error", "Training failed".to_string()),
                JobState::Cancelled => ("info", "Training stopped: cancelled".to_string()),
                JobState::Succeeded => ("info", "Training finished".to_string()),
            };
            let key = format!("pool:{k}");
            self.emit(store, &job.id, &key, Some(h.at_ms), level, &message, None)
                .await;
        }
        let wait = format!("wait:{}", history.len());
        if pool.state == JobState::Queued
            && !matches!(pool.reason.as_str(), "submitted" | "")
            && !self.has(&job.id, &wait)
        {
            let a = match ahead {
                Some(a) => a,
                None => ahead_of(store, job, pool).await?,
            };
            let message = format!("Waiting for a slot: {}{a}", pool.reason);
            self.emit(store, &job.id, &wait, None, "info", &message, None)
                .await;
        }
        Ok(())
    }

    /// New rows of the trainer's metrics CSV as metrics events.
    async fn metrics_events(&mut self, store: &Store, job: &FtJob, dir: &Path) {
        let Ok(text) = tokio::fs::read_to_string(dir.join("metrics.csv")).await else {
            return;
        };
        let rows = parse_rows(&text);
        let seen = self.rows.get(&job.id).cloned().unwrap_or_default();
        let total = job.total_steps.unwrap_or(0);
        // at most about a hundred metrics events a job: the first step, every `every`-th,
        // the epochs' ends (with validation figures) and the last
        let every = (total / 100).max(1);
        for (step, row) in &rows {
            if seen.get(step) == Some(row) {
                continue;
            }
            if !(*step == 1 || step % every == 0 || row.valid.is_some() || *step == total) {
                continue;
            }
            let mut message = format!("Step {step}/{total}: training loss={:.2}", row.loss);
            if let Some((vl, _)) = row.valid {
                message += &format!(", validation loss={vl:.2}, full validation loss={vl:.2}");
            }
            let mut data = metrics(Some(row), *step);
            data["total_steps"] = json!(total);
            let key = format!("step:{step}");
            self.emit(store, &job.id, &key, None, "info", &message, Some(data))
                .await;
        }
        self.rows.insert(job.id.clone(), rows);
    }

    /// Each complete checkpoint of the trainer as a model of its own (its adapter linked into
    /// the job's directory, so that the trainer's pruning leaves it).
    async fn checkpoints(
        &mut self,
        state: &AppState,
        store: &Store,
        job: &FtJob,
        dir: &Path,
        out: &Path,
    ) -> Result<(), String> {
        let root = out.join("checkpoints");
        let Ok(mut entries) = tokio::fs::read_dir(&root).await else {
            return Ok(());
        };
        let mut steps = Vec::new();
        while let Ok(Some(e)) = entries.next_entry().await {
            let step = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<i64>().ok());
            if let Some(step) = step.filter(|_| e.path().join("COMPLETE").is_file()) {
                steps.push((step, e.path().join("adapter")));
            }
        }
        steps.sort();
        // the trainer writes a step's metrics row just after its checkpoint: a checkpoint is
        // recorded once its row is read, so that its metrics are there
        let newest_row = self
            .rows
            .get(&job.id)
            .and_then(|r| r.keys().next_back().copied())
            .unwrap_or(0);
        for (step, adapter) in steps {
            if self.checkpoints.contains(&(job.id.clone(), step)) {
                continue;
            }
            let keep = dir.join(format!("ckpt-step-{step}"));
            if link_adapter(&adapter, &keep).await.is_err() {
                // pruned by the trainer before it was seen
                continue;
            }
            if newest_row < step {
                continue;
            }
            self.checkpoint(state, store, job, step, &keep).await?;
        }
        Ok(())
    }

    /// Records and serves the checkpoint of `step` held in `path` (uploaded to the artifacts
    /// store, when there is one); returns where it is kept and its digest.
    pub(super) async fn checkpoint(
        &mut self,
        state: &AppState,
        store: &Store,
        job: &FtJob,
        step: i64,
        path: &Path,
    ) -> Result<(String, Option<String>), String> {
        let model = format!("{}:ckpt-step-{step}", model_name(store, job).await?);
        // with an artifacts store every checkpoint is uploaded, and every replica serves it
        // from there
        let (location, digest) = match state.artifacts() {
            Some(a) => {
                let key = format!("fine_tuning/{}/step-{step}", job.id);
                let m = a.put_dir(path, &key).await.map_err(|e| e.to_string())?;
                (format!("{}{key}", crate::artifacts::SCHEME), Some(m.digest))
            }
            None => (path.display().to_string(), None),
        };
        self.register(
            state,
            &job.tenant_id,
            &model,
            path,
            (&location, digest.as_deref()),
        );
        let row = self.rows.get(&job.id).and_then(|r| r.get(&step)).copied();
        let c = FtCheckpoint {
            id: fount_store::ft_id("ftckpt").replacen('-', "_", 1),
            job_id: job.id.clone(),
            step,
            model: model.clone(),
            path: location.clone(),
            metrics: metrics(row.as_ref(), step).to_string(),
            created_at_ms: fount_store::now_ms(),
        };
        store
            .add_ft_checkpoint(&c)
            .await
            .map_err(|e| e.to_string())?;
        self.checkpoints.insert((job.id.clone(), step));
        event(
            store,
            &job.id,
            &format!("ckpt:{step}"),
            "info",
            &format!("Checkpoint created at step {step} with Snapshot ID: {model}"),
            None,
        )
        .await;
        Ok((location, digest))
    }
}

/// What runs, or waits with a higher priority, ahead of `pool` (another tenant's jobs by their
/// priority only), as `"; ahead: …"`, or nothing.
async fn ahead_of(store: &Store, job: &FtJob, pool: &Job) -> Result<String, String> {
    let others = store
        .jobs(&fount_store::JobFilter {
            tenant_id: None,
            states: &[JobState::Running, JobState::Queued],
        })
        .await
        .map_err(|e| e.to_string())?;
    let ahead: Vec<String> = others
        .iter()
        .filter(|j| j.id != pool.id)
        .filter(|j| j.state == JobState::Running || j.priority > pool.priority)
        .map(|j| {
            let what = if j.tenant_id == job.tenant_id {
                j.name.clone().unwrap_or_else(|| j.id.clone())
            } else {
                "another tenant's job".to_string()
            };
            format!("{what} ({}, {} priority)", j.state, j.priority)
        })
        .collect();
    Ok(if ahead.is_empty() {
        String::new()
    } else {
        format!("; ahead: {}", ahead.join(", "))
    })
}

/// Hard-links (or copies) a PEFT adapter's two files from `from` into `to`.
async fn link_adapter(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.join("adapter_config.json").is_file() {
        return Ok(());
    }
    let partial = to.with_extension("partial");
    let _ = tokio::fs::remove_dir_all(&partial).await;
    tokio::fs::create_dir_all(&partial).await?;
    // the weights first: the directory loads as an adapter only once its config is there
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (src, dst) = (from.join(f), partial.join(f));
        if tokio::fs::hard_link(&src, &dst).await.is_err() {
            tokio::fs::copy(&src, &dst).await?;
        }
    }
    tokio::fs::rename(&partial, to).await
}
