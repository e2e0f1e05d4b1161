//! A pool job that succeeded: the model served, then the job `succeeded` with its results file
//! and its bill.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use fount_store::{FileRecord, FtJob, FtStatus, FtUpdate, Store, UsageKind, UsageRecord};

use super::{event, model_name, Follower, Row};
use crate::state::AppState;

impl Follower {
    /// A pool job that succeeded: the model served, then the job `succeeded` with its bill.
    pub(super) async fn succeed(
        &mut self,
        state: &AppState,
        store: &Store,
        job: &FtJob,
        out: &Path,
    ) -> Result<(), String> {
        let name = model_name(store, job).await?;
        let rows = self.rows.get(&job.id).cloned().unwrap_or_default();
        let last = rows
            .keys()
            .next_back()
            .copied()
            .or(job.total_steps)
            .unwrap_or(0);
        let (location, digest) = self.checkpoint(state, store, job, last, out).await?;
        self.register(
            state,
            &job.tenant_id,
            &name,
            out,
            (&location, digest.as_deref()),
        );
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
        }
        Ok(())
    }
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
        crate::files::hex(&sha2::Sha256::digest(bytes.as_bytes()))
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
