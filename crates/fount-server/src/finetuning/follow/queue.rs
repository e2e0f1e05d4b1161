//! A new job: its files copied into its directory and checked, then its pool job queued.

use std::path::Path;
use std::sync::Arc;

use fount_store::{FtJob, FtStatus, FtUpdate, Job, NewJob, Store};
use serde_json::{json, Value};

use super::{event, fail, Follower, BASE_LR};
use crate::finetuning::validate::{self, Which};
use crate::finetuning::FineTuningConfig;
use crate::state::AppState;

impl Follower {
    /// Checks a new job's files and queues its pool job, or fails it.
    pub(super) async fn validate(
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
            let fetched = !found
                || crate::files::local_copy(state, &job.tenant_id, id, &src)
                    .await
                    .is_ok();
            if !found || !fetched || tokio::fs::copy(&src, &dest).await.is_err() {
                let r = validate::Refusal {
                    code: which.invalid(),
                    message: format!("The file {id} no longer exists"),
                    param: which.param(),
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
                    param: which.param(),
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
        let out = super::out_dir(cfg, job);
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
            // cancelled while its files were checked, or queued first by another server
            // following the store, which may hold this very pool job: that one runs
            let now = store
                .ft_job(&job.tenant_id, &job.id)
                .await
                .map_err(|e| e.to_string())?;
            if now.and_then(|j| j.pool_job_id).as_deref() != Some(pool_job.id.as_str()) {
                let _ = store.ask_job(&pool_job.id, fount_store::Ask::Cancel).await;
            }
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
}
