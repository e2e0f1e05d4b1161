//! The loop that moves fine-tuning jobs along (every server runs one; what it writes is keyed,
//! so two servers following one store write each event, checkpoint and bill once).
//!
//! Each tick:
//! 1. models made by fine-tuning (here or on another server) are registered as their tenant's
//!    private adapters;
//! 2. a job in `validating_files` gets its files copied into its directory and checked; a valid
//!    one gets its `fount finetune` pool job and is `queued`, an invalid one `failed`;
//! 3. a queued or running job mirrors its pool job: the pool's history becomes events (started,
//!    preempted, resumed), a queued pool job's reason becomes one (what it waits behind), each
//!    row of the trainer's metrics CSV a metrics event, and each complete checkpoint a model;
//! 4. a pool job that succeeded gives its job the model (registered first, so it answers the
//!    moment `succeeded` is visible), the results file and the trained tokens' usage record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use fount_store::{
    FileRecord, FtCheckpoint, FtEvent, FtJob, FtStatus, FtUpdate, Job, JobState, NewJob, Stop,
    Store, UsageKind, UsageRecord,
};
use serde_json::{json, Value};

use super::validate::{self, Which};
use super::FineTuningConfig;
use crate::state::AppState;
use crate::validate::private_name;

/// The learning rate a multiplier of 1 stands for (`fount finetune`'s default for LoRA).
pub const BASE_LR: f64 = 1e-3;

/// The last event time handed out: events of one job are strictly ordered even when written in
/// one millisecond.
static LAST_EVENT_MS: AtomicI64 = AtomicI64::new(0);

fn event_time(at: Option<i64>) -> i64 {
    match at {
        Some(at) => at,
        None => {
            let now = fount_store::now_ms();
            let prev = LAST_EVENT_MS.fetch_max(now, Ordering::SeqCst);
            if prev >= now {
                LAST_EVENT_MS.fetch_add(1, Ordering::SeqCst) + 1
            } else {
                now
            }
        }
    }
}

async fn event_at(
    store: &Store,
    job: &str,
    key: &str,
    at: Option<i64>,
    level: &str,
    message: &str,
    data: Option<Value>,
) {
    let e = FtEvent {
        id: fount_store::ft_id("ftevent"),
        job_id: job.to_string(),
        key: key.to_string(),
        created_at_ms: event_time(at),
        level: level.to_string(),
        message: message.to_string(),
        kind: if data.is_some() { "metrics" } else { "message" }.to_string(),
        data: data.map(|d| d.to_string()),
    };
    if let Err(err) = store.add_ft_event(&e).await {
        tracing::warn!("{job}: writing an event: {err}");
    }
}

/// Adds the event `key` of `job` (once: a second with the key is ignored).
pub async fn event(
    store: &Store,
    job: &str,
    key: &str,
    level: &str,
    message: &str,
    data: Option<Value>,
) {
    event_at(store, job, key, None, level, message, data).await;
}

/// One row of the trainer's metrics CSV.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Row {
    step: i64,
    loss: f64,
    acc: f64,
    valid: Option<(f64, f64)>,
}

fn parse_rows(text: &str) -> BTreeMap<i64, Row> {
    let mut rows = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(step), Some(loss), Some(acc)) = (
            f.first().and_then(|s| s.parse().ok()),
            f.get(1).and_then(|s| s.parse().ok()),
            f.get(2).and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        let valid = match (
            f.get(3).and_then(|s| s.parse().ok()),
            f.get(4).and_then(|s| s.parse().ok()),
        ) {
            (Some(l), Some(a)) => Some((l, a)),
            _ => None,
        };
        // a resumed run writes its steps again: the last row of a step is the run's
        rows.insert(
            step,
            Row {
                step,
                loss,
                acc,
                valid,
            },
        );
    }
    rows
}

fn metrics(row: Option<&Row>, step: i64) -> Value {
    match row {
        Some(r) => json!({
            "step": step,
            "train_loss": r.loss,
            "train_mean_token_accuracy": r.acc,
            "valid_loss": r.valid.map(|v| v.0),
            "valid_mean_token_accuracy": r.valid.map(|v| v.1),
            "full_valid_loss": r.valid.map(|v| v.0),
            "full_valid_mean_token_accuracy": r.valid.map(|v| v.1),
        }),
        None => json!({"step": step}),
    }
}

/// What a follower remembers between ticks (all of it can be rebuilt from the store and the
/// jobs' directories).
#[derive(Debug, Default)]
pub struct Follower {
    /// `{job}/{key}` of the events known written (a job's are read once, then kept here).
    emitted: HashSet<String>,
    /// Jobs whose written events were read.
    keys_read: HashSet<String>,
    registered: HashSet<String>,
    models_since: i64,
    rows: HashMap<String, BTreeMap<i64, Row>>,
    checkpoints: HashSet<(String, i64)>,
}

impl Follower {
    /// A follower that knows nothing yet.
    pub fn new() -> Follower {
        Follower::default()
    }

    /// One pass over the jobs.
    pub async fn tick(&mut self, state: &Arc<AppState>) -> Result<(), String> {
        let (Some(tenancy), Some(cfg)) = (state.tenancy(), state.fine_tuning()) else {
            return Ok(());
        };
        let store = tenancy.store().clone();
        self.register_models(state, &store).await?;
        let jobs = store.live_ft_jobs().await.map_err(|e| e.to_string())?;
        for job in &jobs {
            let r = match job.status {
                FtStatus::ValidatingFiles => self.validate(state, cfg, &store, job).await,
                _ => self.follow(state, cfg, &store, job).await,
            };
            if let Err(e) = r {
                tracing::warn!("{}: {e}", job.id);
            }
        }
        // what is remembered of jobs that ended is forgotten
        let live: HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let of = |k: &str| k.split('/').next().unwrap_or("").to_string();
        self.emitted.retain(|k| live.contains(of(k).as_str()));
        self.keys_read.retain(|k| live.contains(k.as_str()));
        self.rows.retain(|k, _| live.contains(k.as_str()));
        self.checkpoints.retain(|(k, _)| live.contains(k.as_str()));
        Ok(())
    }

    /// Writes the event `key` of `job` unless it is known written.
    #[allow(clippy::too_many_arguments)]
    async fn emit(
        &mut self,
        store: &Store,
        job: &str,
        key: &str,
        at: Option<i64>,
        level: &str,
        message: &str,
        data: Option<Value>,
    ) {
        if self.emitted.insert(format!("{job}/{key}")) {
            event_at(store, job, key, at, level, message, data).await;
        }
    }

    /// Whether the event `key` of `job` is written.
    fn has(&self, job: &str, key: &str) -> bool {
        self.emitted.contains(&format!("{job}/{key}"))
    }

    /// Registers every fine-tuned model and checkpoint not yet served here.
    async fn register_models(&mut self, state: &AppState, store: &Store) -> Result<(), String> {
        let models = store
            .ft_models(self.models_since)
            .await
            .map_err(|e| e.to_string())?;
        for m in models {
            // a little overlap: a model committed late with an earlier time is still seen
            self.models_since = self.models_since.max(m.created_at_ms - 10_000);
            let name = private_name(&m.tenant_id, &m.name);
            if self.registered.insert(name.clone()) {
                state.register_adapter(&name, PathBuf::from(&m.path));
            }
        }
        Ok(())
    }

    fn register(&mut self, state: &AppState, tenant: &str, model: &str, path: &Path) {
        let name = private_name(tenant, model);
        if self.registered.insert(name.clone()) {
            state.register_adapter(&name, path.to_path_buf());
        }
    }

    /// Checks a new job's files and queues its pool job, or fails it.
    async fn validate(
        &mut self,
        state: &Arc<AppState>,
        cfg: &FineTuningConfig,
        store: &Store,
        job: &FtJob,
    ) -> Result<(), String> {
        let dir = cfg.dir.join(&job.id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let files_dir = state
            .files()
            .map(|f| f.dir.clone())
            .ok_or("the Files API is off")?;
        let mut copies = Vec::new();
        for (which, id, name) in [
            (Which::Training, Some(&job.training_file), "train.jsonl"),
            (
                Which::Validation,
                job.validation_file.as_ref(),
                "valid.jsonl",
            ),
        ] {
            let Some(id) = id else { continue };
            let dest = dir.join(name);
            let src = files_dir.join(&job.tenant_id).join(id);
            let found = store
                .file(&job.tenant_id, id)
                .await
                .map_err(|e| e.to_string())?
                .is_some();
            if !found || tokio::fs::copy(&src, &dest).await.is_err() {
                let r = validate::Refusal {
                    code: match which {
                        Which::Training => "invalid_training_file",
                        Which::Validation => "invalid_validation_file",
                    },
                    message: format!("The file {id} no longer exists"),
                    param: match which {
                        Which::Training => "training_file",
                        Which::Validation => "validation_file",
                    },
                };
                return fail(store, job, &r).await;
            }
            copies.push((which, dest));
        }
        let st = state.clone();
        let context = state.config.max_position_embeddings;
        let checked = tokio::task::spawn_blocking(move || {
            let Some(template) = st.template.as_ref() else {
                return Err(validate::Refusal {
                    code: "invalid_model",
                    message: "The base model has no chat template to render examples with".into(),
                    param: "model",
                });
            };
            let mut reports = Vec::new();
            for (which, path) in &copies {
                let file = fs_err::File::open(path).map_err(|e| validate::Refusal {
                    code: "invalid_file_format",
                    message: format!("The file cannot be read: {e}"),
                    param: match which {
                        Which::Training => "training_file",
                        Which::Validation => "validation_file",
                    },
                })?;
                reports.push(validate::check(
                    std::io::BufReader::new(file),
                    *which,
                    template,
                    &st.tokenizer,
                    context,
                )?);
            }
            Ok(reports)
        })
        .await
        .map_err(|e| e.to_string())?;
        let reports = match checked {
            Ok(r) => r,
            Err(r) => return fail(store, job, &r).await,
        };
        let train = reports.first().cloned().unwrap_or_default();
        let asked: Value = serde_json::from_str(&job.method).unwrap_or(Value::Null);
        let h = &asked["supervised"]["hyperparameters"];
        let n = train.examples;
        let epochs = h["n_epochs"]
            .as_u64()
            .map_or_else(|| validate::auto_epochs(n), |e| e as u32);
        let batch = h["batch_size"]
            .as_u64()
            .map_or_else(|| validate::auto_batch_size(n), |b| b as u32);
        let mult = h["learning_rate_multiplier"].as_f64().unwrap_or(1.0);
        let total_steps = n.div_ceil(batch as usize) as i64 * i64::from(epochs);
        let billable = train.tokens as i64 * i64::from(epochs);
        let method = json!({"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": mult,
        }}});
        let out = PathBuf::from(&job.out_dir);
        let mut toml = format!(
            "# fine-tuning job {id}: OpenAI's hyperparameters as fount finetune settings\n\
             lr = {lr:e}\nepochs = {epochs}\nbatch_size = {batch}\nseed = {seed}\n\
             truncate = true\neval_fraction = 0.0\nepoch_checkpoints = true\n\
             keep_checkpoints = {epochs}\n",
            id = job.id,
            lr = BASE_LR * mult,
            seed = job.seed,
        );
        if job.validation_file.is_some() {
            let v = dir.join("valid.jsonl").display().to_string();
            toml += &format!("validation_file = {}\n", Value::String(v));
        }
        let config = dir.join("config.toml");
        tokio::fs::write(&config, toml)
            .await
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let pool_job = match self.pool_job_named(store, job).await? {
            Some(j) => j,
            None => {
                let s = |p: &Path| p.display().to_string();
                let new = NewJob {
                    tenant_id: job.tenant_id.clone(),
                    name: Some(job.id.clone()),
                    priority: cfg.priority,
                    kind: "finetune".into(),
                    command: vec![
                        "finetune".into(),
                        "--base".into(),
                        s(&cfg.base_dir),
                        "--data".into(),
                        s(&dir.join("train.jsonl")),
                        "--out".into(),
                        s(&out),
                        "--config".into(),
                        s(&config),
                        "--metrics".into(),
                        s(&dir.join("metrics.csv")),
                    ],
                    cwd: s(&dir),
                    out_dir: s(&out),
                    done_marker: s(&out.join("adapter_config.json")),
                    time_limit_s: None,
                    log_path: s(&dir.join("log.txt")),
                };
                store.submit_job(&new).await.map_err(|e| e.to_string())?
            }
        };
        let queued = store
            .update_ft_job(
                &job.id,
                FtStatus::ValidatingFiles,
                &FtUpdate {
                    status: Some(FtStatus::Queued),
                    method: Some(method.to_string()),
                    pool_job_id: Some(pool_job.id.clone()),
                    billable_tokens: Some(billable),
                    total_steps: Some(total_steps),
                    ..FtUpdate::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if !queued {
            // cancelled while its files were checked
            let _ = store.ask_job(&pool_job.id, fount_store::Ask::Cancel).await;
            return Ok(());
        }
        if train.truncated > 0 {
            event(
                store,
                &job.id,
                "truncated",
                "warn",
                &format!(
                    "{} example(s) are longer than the context of {} tokens and are truncated from the end",
                    train.truncated, state.config.max_position_embeddings
                ),
                None,
            )
            .await;
        }
        event(
            store,
            &job.id,
            "validated",
            "info",
            "Files validated, moving job to queued state",
            None,
        )
        .await;
        Ok(())
    }

    /// The pool job of `job` submitted by an earlier attempt that stopped before recording it.
    async fn pool_job_named(&self, store: &Store, job: &FtJob) -> Result<Option<Job>, String> {
        let jobs = store
            .jobs(&fount_store::JobFilter {
                tenant_id: Some(&job.tenant_id),
                states: &[],
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok(jobs
            .into_iter()
            .find(|j| j.name.as_deref() == Some(job.id.as_str()) && !j.state.is_terminal()))
    }

    /// Mirrors a queued, running or paused job's pool job.
    async fn follow(
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
        self.metrics_events(store, job, &dir).await;
        self.checkpoints(state, store, job, &dir).await?;
        let to = match (pool.state, pool.stop) {
            (JobState::Queued | JobState::Preempted, _) => FtStatus::Queued,
            (JobState::Running, Some((Stop::Pause, _))) => FtStatus::Paused,
            (JobState::Running, _) => FtStatus::Running,
            (JobState::Paused, _) => FtStatus::Paused,
            (JobState::Succeeded, _) => return self.succeed(state, store, job, &dir).await,
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
    ) -> Result<(), String> {
        let root = Path::new(&job.out_dir).join("checkpoints");
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

    /// Records and serves the checkpoint of `step` held in `path`.
    async fn checkpoint(
        &mut self,
        state: &AppState,
        store: &Store,
        job: &FtJob,
        step: i64,
        path: &Path,
    ) -> Result<(), String> {
        let model = format!("{}:ckpt-step-{step}", model_name(store, job).await?);
        self.register(state, &job.tenant_id, &model, path);
        let row = self.rows.get(&job.id).and_then(|r| r.get(&step)).copied();
        let c = FtCheckpoint {
            id: fount_store::ft_id("ftckpt").replacen('-', "_", 1),
            job_id: job.id.clone(),
            step,
            model: model.clone(),
            path: path.display().to_string(),
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
        Ok(())
    }

    /// A pool job that succeeded: the model served, then the job `succeeded` with its bill.
    async fn succeed(
        &mut self,
        state: &AppState,
        store: &Store,
        job: &FtJob,
        dir: &Path,
    ) -> Result<(), String> {
        let name = model_name(store, job).await?;
        let out = PathBuf::from(&job.out_dir);
        let rows = self.rows.get(&job.id).cloned().unwrap_or_default();
        let last = rows
            .keys()
            .next_back()
            .copied()
            .or(job.total_steps)
            .unwrap_or(0);
        self.checkpoint(state, store, job, last, &out).await?;
        self.register(state, &job.tenant_id, &name, &out);
        let result_file = write_results(state, store, job, &rows).await?;
        let tokens = job.billable_tokens.unwrap_or(0);
        let price = store
            .prices()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|(m, _)| *m == job.model)
            .map(|(_, p)| p)
            .unwrap_or_default();
        let now = fount_store::now_ms();
        let usage = UsageRecord {
            request_id: format!("{}.trained", job.id),
            tenant_id: job.tenant_id.clone(),
            key_id: String::new(),
            model: job.model.clone(),
            adapter: Some(name.clone()),
            prompt_tokens: tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            status: 200,
            latency_ms: now - job.created_at_ms,
            created_at_ms: now,
            cost_picodollars: price.training_cost(tokens),
            kind: UsageKind::Training,
            slot_ms: 0,
        };
        event(
            store,
            &job.id,
            "model",
            "info",
            &format!("New fine-tuned model created: {name}"),
            None,
        )
        .await;
        let done = store
            .update_ft_job(
                &job.id,
                job.status,
                &FtUpdate {
                    status: Some(FtStatus::Succeeded),
                    fine_tuned_model: Some(name),
                    trained_tokens: Some(tokens),
                    result_file: Some(result_file),
                    usage: Some(usage),
                    ..FtUpdate::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if done {
            event(
                store,
                &job.id,
                "succeeded",
                "info",
                "The job has successfully completed",
                None,
            )
            .await;
            let _ = dir;
        }
        Ok(())
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

/// `ft:{base}:{tenant}:{suffix}:{id}`: the id is the job id's first 8 characters after `ftjob-`.
async fn model_name(store: &Store, job: &FtJob) -> Result<String, String> {
    let tenant = store
        .tenant(&job.tenant_id)
        .await
        .map_err(|e| e.to_string())?
        .map_or_else(|| job.tenant_id.clone(), |t| t.name);
    let id: String = job
        .id
        .trim_start_matches("ftjob-")
        .chars()
        .take(8)
        .collect();
    Ok(format!(
        "ft:{}:{tenant}:{}:{id}",
        job.model,
        job.suffix.as_deref().unwrap_or("")
    ))
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

/// The results file: the metrics CSV (the last row of each step) as OpenAI serves it, base64.
async fn write_results(
    state: &AppState,
    store: &Store,
    job: &FtJob,
    rows: &BTreeMap<i64, Row>,
) -> Result<String, String> {
    let mut csv =
        String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    for r in rows.values() {
        let (vl, va) = r.valid.map_or((String::new(), String::new()), |(l, a)| {
            (l.to_string(), a.to_string())
        });
        csv += &format!("{},{},{},{vl},{va}\n", r.step, r.loss, r.acc);
    }
    let bytes = base64::engine::general_purpose::STANDARD.encode(csv);
    let files = state.files().ok_or("the Files API is off")?;
    // one results file per job, whoever writes it
    let id = format!("file-{}", job.id.trim_start_matches("ftjob-"));
    if store
        .file(&job.tenant_id, &id)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(id);
    }
    let dir = files.dir.join(&job.tenant_id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| e.to_string())?;
    let tmp = dir.join(format!("{id}.partial"));
    tokio::fs::write(&tmp, &bytes)
        .await
        .map_err(|e| e.to_string())?;
    tokio::fs::rename(&tmp, dir.join(&id))
        .await
        .map_err(|e| e.to_string())?;
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(bytes.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let record = FileRecord {
        id: id.clone(),
        tenant_id: job.tenant_id.clone(),
        filename: "step_metrics.csv".into(),
        purpose: "fine-tune-results".into(),
        bytes: bytes.len() as i64,
        sha256: digest,
        created_at_ms: fount_store::now_ms(),
    };
    match store.insert_file(&record).await {
        Ok(()) => Ok(id),
        // written meanwhile by another follower
        Err(_)
            if store
                .file(&job.tenant_id, &id)
                .await
                .ok()
                .flatten()
                .is_some() =>
        {
            Ok(id)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Fails `job` with `r` as its error (from whatever status it had).
async fn fail(store: &Store, job: &FtJob, r: &validate::Refusal) -> Result<(), String> {
    let param = if r.param.is_empty() {
        Value::Null
    } else {
        Value::String(r.param.into())
    };
    let error = json!({"code": r.code, "message": r.message, "param": param});
    let done = store
        .update_ft_job(
            &job.id,
            job.status,
            &FtUpdate {
                status: Some(FtStatus::Failed),
                error: Some(error.to_string()),
                ..FtUpdate::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    if done {
        event(store, &job.id, "failed", "error", &r.message, None).await;
    }
    Ok(())
}

/// Follows fine-tuning jobs every `cfg.every` until the process ends.
pub async fn run(state: Arc<AppState>) {
    let every = state
        .fine_tuning()
        .map_or(std::time::Duration::from_millis(200), |c| c.every);
    let mut f = Follower::new();
    loop {
        if let Err(e) = f.tick(&state).await {
            tracing::warn!("following fine-tuning jobs: {e}");
        }
        tokio::time::sleep(every).await;
    }
}
