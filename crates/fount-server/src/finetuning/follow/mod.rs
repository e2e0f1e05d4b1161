//! The loop that moves fine-tuning jobs along (every server runs one; what it writes is keyed,
//! so two servers following one store write each event, checkpoint and bill once; a server
//! with `work` off only registers the models, steps 2 to 4 being left to the others).
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
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use fount_store::{FtEvent, FtJob, FtStatus, FtUpdate, Store};
use serde_json::{json, Value};

use super::validate;
use crate::state::AppState;
use crate::validate::private_name;

mod finish;
mod mirror;
mod queue;

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
        if !cfg.work {
            return Ok(());
        }
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
            if self.registered.contains(&name) {
                continue;
            }
            // a model kept in the artifacts store is registered by its digest, fetched on use
            let digest = match (crate::artifacts::key_of(&m.path), state.artifacts()) {
                (Some(key), Some(a)) => {
                    Some(a.manifest(key).await.map_err(|e| e.to_string())?.digest)
                }
                _ => None,
            };
            // a relative path (a job's `out_dir`) is under the fine-tuning directory
            let path = match state.fine_tuning() {
                Some(cfg) if digest.is_none() => cfg.dir.join(&m.path).display().to_string(),
                _ => m.path.clone(),
            };
            state.register_location(&name, &path, digest.as_deref());
            self.registered.insert(name);
        }
        Ok(())
    }

    /// Serves `model` of `tenant` from `path` here (kept at `location`, with `digest`, for the
    /// other replicas).
    fn register(
        &mut self,
        state: &AppState,
        tenant: &str,
        model: &str,
        path: &Path,
        location: (&str, Option<&str>),
    ) {
        let name = private_name(tenant, model);
        if self.registered.insert(name.clone()) {
            state.register_adapter(&name, path.to_path_buf());
            state.registry.applied(&name, location.0, location.1);
            crate::ledger::log_model_in_background(state, model, path, "fine-tuned adapter");
        }
    }
}

/// Where a job's trainer writes its adapter and checkpoints: its recorded `out_dir`, under the
/// fine-tuning directory of the server that follows it (jobs are recorded with a relative one,
/// so the replica that took the request need not be the one whose directory the job uses).
fn out_dir(cfg: &crate::finetuning::FineTuningConfig, job: &FtJob) -> std::path::PathBuf {
    cfg.dir.join(&job.out_dir)
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
