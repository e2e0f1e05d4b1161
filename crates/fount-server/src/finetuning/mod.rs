//! OpenAI's Fine-tuning API on the compute pool: a tenant creates a job over a file it uploaded,
//! follows its events and checkpoints, pauses, resumes or cancels it, and calls the model it
//! makes, `ft:{base}:{tenant}:{suffix}:{id}`, on this server the moment it succeeds.
//!
//! - here: the routes (`/v1/fine_tuning/jobs…`) and the checks of a create request;
//! - `objects.rs`: the API's objects;
//! - [`validate`]: the files checked before anything runs, with OpenAI's codes;
//! - [`follow`]: the loop that moves each job along: it validates new jobs and queues their pool
//!   job (`queue.rs`), mirrors the pool job's states as events and turns the trainer's
//!   checkpoints into models (`mirror.rs`), and on success registers the model, bills the trained
//!   tokens and writes the results file (`finish.rs`).
//!
//! A job is one pool job (`fount finetune …` over a copy of its files in the job's own
//! directory), so it has the pool's quotas, priorities and preemption.

pub mod follow;
mod objects;
pub mod validate;

use objects::{millis_to_secs, parse_json};
pub use objects::{
    object, CheckpointList, CheckpointObject, CreateJob, EventList, EventObject, JobList,
    JobObject, PageQuery,
};

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::{Extension, Json};
use fount_store::{FtJob, FtStatus, FtUpdate, Priority, Store};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::state::AppState;
use crate::tenancy::Caller;

/// Where fine-tuning jobs live and how they run.
#[derive(Debug, Clone)]
pub struct FineTuningConfig {
    /// Each job's directory (`{dir}/{ftjob-…}`: its files, config, adapter, log).
    pub dir: PathBuf,
    /// The served base model's directory (what `fount finetune --base` reads).
    pub base_dir: PathBuf,
    /// The pool priority of fine-tuning jobs.
    pub priority: Priority,
    /// How often jobs are followed.
    pub every: std::time::Duration,
    /// Whether this server checks new jobs' files and follows their runs (it reads and writes
    /// `dir`); without, it only serves the models jobs make, from the artifacts store.
    pub work: bool,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// The caller, the store and the configuration, or why there are none.
fn context<'a>(
    state: &'a AppState,
    caller: &'a Option<Extension<Caller>>,
) -> ApiResult<(&'a Caller, &'a Store, &'a FineTuningConfig)> {
    match (state.tenancy(), state.fine_tuning(), caller) {
        (Some(t), Some(cfg), Some(Extension(c))) => Ok((c, t.store(), cfg)),
        _ => Err(ApiError::NotFound {
            message: "fine-tuning runs only with tenancy and the pool on (fount serve --data-dir, without --no-pool)".into(),
            param: None,
            code: "not_found",
        }),
    }
}

fn no_such_job(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("Could not find fine-tune: {id}"),
        param: Some("fine_tuning_job_id".into()),
        code: "fine_tune_not_found",
    }
}

async fn find(store: &Store, caller: &Caller, id: &str) -> ApiResult<FtJob> {
    store
        .ft_job(&caller.tenant.id, id)
        .await
        .map_err(internal)?
        .ok_or_else(|| no_such_job(id))
}

/// A page that could not be read: `after` names nothing of the job's (404), or the store failed.
fn page_error(e: fount_store::Error, job: &str) -> ApiError {
    match e {
        fount_store::Error::NotFound(what) => ApiError::NotFound {
            message: format!("no {what} in {job}"),
            param: Some("after".into()),
            code: "not_found",
        },
        e => internal(e),
    }
}

fn limit(q: &PageQuery, default: i64) -> ApiResult<i64> {
    match q.limit.as_deref() {
        None => Ok(default),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", "limit is 1 to 100")),
    }
}

/// One hyperparameter: `"auto"` (or absent) is `None`; a number in range is kept.
fn hyper(v: &Value, name: &str, lo: f64, hi: f64, integer: bool) -> ApiResult<Option<f64>> {
    let param = format!("hyperparameters.{name}");
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f >= lo && f <= hi && (!integer || f.fract() == 0.0) && f > 0.0 => {
                Ok(Some(f))
            }
            _ => Err(ApiError::invalid(
                &param,
                format!(
                    "{param} must be \"auto\" or {} from {lo} to {hi}, not {x}",
                    if integer { "an integer" } else { "a number" }
                ),
            )),
        },
    }
}

/// The hyperparameters asked for, from `method` or the older top-level field.
fn asked_hyperparameters(body: &CreateJob) -> ApiResult<Value> {
    let mut from_method = None;
    if let Some(m) = body.method.as_ref().filter(|m| !m.is_null()) {
        let kind = m
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("supervised");
        if kind != "supervised" {
            return Err(ApiError::invalid(
                "method.type",
                format!("method {kind:?} is not supported; only \"supervised\" fine-tuning is"),
            ));
        }
        from_method = m
            .get("supervised")
            .and_then(|s| s.get("hyperparameters"))
            .cloned();
    }
    let h =
        match (from_method, &body.hyperparameters) {
            (Some(_), Some(h)) if !h.is_null() => return Err(ApiError::invalid(
                "hyperparameters",
                "give the hyperparameters under method.supervised, or at the top level, not both",
            )),
            (Some(h), _) => h,
            (None, Some(h)) => h.clone(),
            (None, None) => json!({}),
        };
    if h.is_null() {
        return Ok(json!({}));
    }
    if !h.is_object() {
        return Err(ApiError::invalid(
            "hyperparameters",
            "hyperparameters must be an object",
        ));
    }
    hyper(&h, "n_epochs", 1.0, 50.0, true)?;
    hyper(&h, "batch_size", 1.0, 256.0, true)?;
    hyper(&h, "learning_rate_multiplier", 0.0, 1e6, false)?;
    Ok(h)
}

fn check_metadata(m: &Option<Value>) -> ApiResult<Option<String>> {
    let Some(m) = m.as_ref().filter(|m| !m.is_null()) else {
        return Ok(None);
    };
    let ok = m.as_object().is_some_and(|o| {
        o.len() <= 16
            && o.iter().all(|(k, v)| {
                k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512)
            })
    });
    if !ok {
        return Err(ApiError::invalid(
            "metadata",
            "metadata is at most 16 pairs of strings, keys up to 64 characters and values up to 512",
        ));
    }
    Ok(Some(m.to_string()))
}

/// `POST /v1/fine_tuning/jobs`: creates a job; its files are validated before it is queued.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs", tag = "fine-tuning", request_body = CreateJob,
    responses(
        (status = 200, description = "The job, validating its files", body = JobObject),
        (status = 400, description = "A bad field, or a file that is not a fine-tune file of the caller's", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "An unknown base model (`model_not_found`), or fine-tuning off", body = crate::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = crate::protocol::ErrorResponse),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody<CreateJob>,
) -> ApiResult<Json<JobObject>> {
    let (caller, store, _) = context(&state, &caller)?;
    let tenancy = state.tenancy().ok_or_else(|| internal("tenancy is off"))?;
    if body.model != state.cfg.model_name || !tenancy.limits(caller).await?.allows(&body.model) {
        return Err(ApiError::NotFound {
            message: format!(
                "The model `{}` does not exist or you do not have access to it.",
                body.model
            ),
            param: None,
            code: "model_not_found",
        });
    }
    if let Some(s) = &body.suffix {
        let ok = (1..=64).contains(&s.chars().count())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(ApiError::invalid(
                "suffix",
                "suffix is 1 to 64 letters, digits, '-' or '_'",
            ));
        }
    }
    let seed = match body.seed {
        Some(s) if (0..=2_147_483_647).contains(&s) => s,
        Some(_) => return Err(ApiError::invalid("seed", "seed is 0 to 2147483647")),
        None => i64::from(rand::random::<u32>() >> 1),
    };
    if body
        .integrations
        .as_ref()
        .is_some_and(|i| !(i.is_null() || i.as_array().is_some_and(|a| a.is_empty())))
    {
        return Err(ApiError::invalid(
            "integrations",
            "integrations (Weights & Biases) are not supported; follow the job's events instead",
        ));
    }
    let asked = asked_hyperparameters(&body)?;
    let metadata = check_metadata(&body.metadata)?;
    for (param, id) in [
        ("training_file", Some(&body.training_file)),
        ("validation_file", body.validation_file.as_ref()),
    ] {
        let Some(id) = id else { continue };
        let f = store.file(&caller.tenant.id, id).await.map_err(internal)?;
        match f {
            Some(f) if f.purpose == "fine-tune" => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    param,
                    format!("{id} was not uploaded with purpose 'fine-tune'"),
                ))
            }
            None => return Err(ApiError::invalid(param, format!("invalid {param}: {id}"))),
        }
    }
    let id = fount_store::ft_id("ftjob");
    let job = FtJob {
        id: id.clone(),
        tenant_id: caller.tenant.id.clone(),
        model: body.model.clone(),
        training_file: body.training_file.clone(),
        validation_file: body.validation_file.clone(),
        suffix: body.suffix.clone(),
        seed,
        method: json!({"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": asked.get("n_epochs").cloned().unwrap_or(json!("auto")),
            "batch_size": asked.get("batch_size").cloned().unwrap_or(json!("auto")),
            "learning_rate_multiplier":
                asked.get("learning_rate_multiplier").cloned().unwrap_or(json!("auto")),
        }}})
        .to_string(),
        metadata,
        status: FtStatus::ValidatingFiles,
        error: None,
        pool_job_id: None,
        // relative: under the fine-tuning directory of whichever server validates and follows it
        out_dir: format!("{id}/adapter"),
        fine_tuned_model: None,
        billable_tokens: None,
        total_steps: None,
        trained_tokens: None,
        result_file: None,
        created_at_ms: fount_store::now_ms(),
        finished_at_ms: None,
    };
    store.insert_ft_job(&job).await.map_err(internal)?;
    let files = match &job.validation_file {
        Some(v) => format!(
            "Validating training file: {} and validation file: {v}",
            job.training_file
        ),
        None => format!("Validating training file: {}", job.training_file),
    };
    follow::event(
        store,
        &job.id,
        "created",
        "info",
        &format!("Created fine-tuning job: {id}"),
        None,
    )
    .await;
    follow::event(store, &job.id, "validating", "info", &files, None).await;
    Ok(Json(object(&job)))
}

/// `GET /v1/fine_tuning/jobs`: the caller's jobs, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs", tag = "fine-tuning", params(PageQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A bad limit", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "`after` names no job of the caller's, or fine-tuning off", body = crate::protocol::ErrorResponse),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Json<JobList>> {
    let (caller, store, _) = context(&state, &caller)?;
    let limit = limit(&q, 20)?;
    let (jobs, has_more) = match store
        .ft_jobs(&caller.tenant.id, q.after.as_deref(), limit)
        .await
    {
        Ok(r) => r,
        Err(fount_store::Error::NotFound(_)) => {
            return Err(no_such_job(q.after.as_deref().unwrap_or("")))
        }
        Err(e) => return Err(internal(e)),
    };
    Ok(Json(JobList {
        object: "list".into(),
        data: jobs.iter().map(object).collect(),
        has_more,
    }))
}

/// `GET /v1/fine_tuning/jobs/{fine_tuning_job_id}`.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}", tag = "fine-tuning",
    params(("fine_tuning_job_id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = JobObject),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = crate::protocol::ErrorResponse),
    ))]
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobObject>> {
    let (caller, store, _) = context(&state, &caller)?;
    Ok(Json(object(&find(store, caller, &id).await?)))
}

/// What the owner asks of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Cancel,
    Pause,
    Resume,
}

async fn act(
    state: &AppState,
    caller: &Option<Extension<Caller>>,
    id: &str,
    what: Act,
) -> ApiResult<Json<JobObject>> {
    let (caller, store, _) = context(state, caller)?;
    for _ in 0..20 {
        let job = find(store, caller, id).await?;
        let refuse = |why: &str| {
            Err(ApiError::invalid(
                "fine_tuning_job_id",
                format!("Job {id} is {}: {why}", job.status.name()),
            ))
        };
        let to = match (what, job.status) {
            (_, s) if s.is_terminal() => return refuse("it has finished"),
            (Act::Cancel, _) => FtStatus::Cancelled,
            (Act::Pause, FtStatus::Queued | FtStatus::Running) => FtStatus::Paused,
            (Act::Pause, _) => return refuse("only a queued or running job can be paused"),
            (Act::Resume, FtStatus::Paused) => FtStatus::Queued,
            (Act::Resume, _) => return refuse("only a paused job can be resumed"),
        };
        if let Some(pool_id) = &job.pool_job_id {
            let ask = match what {
                Act::Cancel => fount_store::Ask::Cancel,
                Act::Pause => fount_store::Ask::Pause,
                Act::Resume => fount_store::Ask::Resume,
            };
            match store.ask_job(pool_id, ask).await {
                Ok(_) => {}
                Err(fount_store::Error::Conflict(why)) if what != Act::Cancel => {
                    return Err(ApiError::invalid("fine_tuning_job_id", why))
                }
                // a pool job that already ended: the job's own status decides
                Err(fount_store::Error::Conflict(_)) => {}
                Err(e) => return Err(internal(e)),
            }
        }
        let changed = store
            .update_ft_job(
                id,
                job.status,
                &FtUpdate {
                    status: Some(to),
                    ..FtUpdate::default()
                },
            )
            .await
            .map_err(internal)?;
        if changed {
            let (key, message) = match what {
                Act::Cancel => (
                    "cancelled".to_string(),
                    "The job has been cancelled".to_string(),
                ),
                Act::Pause => (
                    format!("pause:{}", fount_store::now_ms()),
                    "The job has been paused; it stops at a checkpoint and resumes from it".into(),
                ),
                Act::Resume => (
                    format!("resume:{}", fount_store::now_ms()),
                    "The job has been resumed; it waits for a slot".into(),
                ),
            };
            follow::event(store, id, &key, "info", &message, None).await;
            return Ok(Json(object(&find(store, caller, id).await?)));
        }
        // the follower moved it meanwhile: read it again
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Err(ApiError::invalid(
        "fine_tuning_job_id",
        format!("Job {id} keeps changing; try again"),
    ))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`: cancels a job at once (a running one is stopped).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", tag = "fine-tuning",
    params(("fine_tuning_job_id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, cancelled", body = JobObject),
        (status = 400, description = "The job has finished", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = crate::protocol::ErrorResponse),
    ))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobObject>> {
    act(&state, &caller, &id, Act::Cancel).await
}

/// `POST /v1/fine_tuning/jobs/{id}/pause`: holds a job (a running one stops at a checkpoint).
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause", tag = "fine-tuning",
    params(("fine_tuning_job_id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, paused", body = JobObject),
        (status = 400, description = "The job is not queued or running", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = crate::protocol::ErrorResponse),
    ))]
pub async fn pause(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobObject>> {
    act(&state, &caller, &id, Act::Pause).await
}

/// `POST /v1/fine_tuning/jobs/{id}/resume`: lets a paused job wait for a slot again.
#[utoipa::path(post, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume", tag = "fine-tuning",
    params(("fine_tuning_job_id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, queued", body = JobObject),
        (status = 400, description = "The job is not paused (or still stopping)", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = crate::protocol::ErrorResponse),
    ))]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<JobObject>> {
    act(&state, &caller, &id, Act::Resume).await
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: the job's events, newest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", tag = "fine-tuning",
    params(("fine_tuning_job_id" = String, Path, description = "The job's id"), PageQuery),
    responses(
        (status = 200, description = "A page of events", body = EventList),
        (status = 400, description = "A bad limit", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such job of the caller's, or no such event", body = crate::protocol::ErrorResponse),
    ))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Json<EventList>> {
    let (caller, store, _) = context(&state, &caller)?;
    let limit = limit(&q, 20)?;
    let job = find(store, caller, &id).await?;
    let (events, has_more) = store
        .ft_events(&job.id, q.after.as_deref(), limit)
        .await
        .map_err(|e| page_error(e, &id))?;
    Ok(Json(EventList {
        object: "list".into(),
        data: events
            .into_iter()
            .map(|e| EventObject {
                id: e.id,
                object: "fine_tuning.job.event".into(),
                created_at: millis_to_secs(e.created_at_ms),
                level: e.level,
                message: e.message,
                kind: e.kind,
                data: parse_json(&e.data),
            })
            .collect(),
        has_more,
    }))
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: the job's checkpoints, the latest first.
#[utoipa::path(get, path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", tag = "fine-tuning",
    params(("fine_tuning_job_id" = String, Path, description = "The job's id"), PageQuery),
    responses(
        (status = 200, description = "A page of checkpoints", body = CheckpointList),
        (status = 400, description = "A bad limit", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the fine_tuning scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such job of the caller's, or no such checkpoint", body = crate::protocol::ErrorResponse),
    ))]
pub async fn checkpoints(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Json<CheckpointList>> {
    let (caller, store, _) = context(&state, &caller)?;
    let limit = limit(&q, 10)?;
    let job = find(store, caller, &id).await?;
    let (ckpts, has_more) = store
        .ft_checkpoints(&job.id, q.after.as_deref(), limit)
        .await
        .map_err(|e| page_error(e, &id))?;
    let data: Vec<CheckpointObject> = ckpts
        .into_iter()
        .map(|c| CheckpointObject {
            id: c.id,
            object: "fine_tuning.job.checkpoint".into(),
            created_at: millis_to_secs(c.created_at_ms),
            fine_tuned_model_checkpoint: c.model,
            fine_tuning_job_id: c.job_id,
            step_number: c.step,
            metrics: serde_json::from_str(&c.metrics).unwrap_or(json!({})),
        })
        .collect();
    Ok(Json(CheckpointList {
        object: "list".into(),
        first_id: data.first().map(|c| c.id.clone()),
        last_id: data.last().map(|c| c.id.clone()),
        data,
        has_more,
    }))
}
