//! The API's objects, as OpenAI's spec and SDK shape them: the create request, the job, its
//! events and checkpoints, the lists, and the page query.

use fount_store::FtJob;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// `POST /v1/fine_tuning/jobs`, as OpenAI's `CreateFineTuningJobRequest`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CreateJob {
    /// The base model: the model this server serves.
    pub model: String,
    /// A file of the caller's, uploaded with purpose `fine-tune`.
    pub training_file: String,
    /// A file to measure validation loss and token accuracy on.
    #[serde(default)]
    pub validation_file: Option<String>,
    /// Up to 64 characters added to the model's name.
    #[serde(default)]
    pub suffix: Option<String>,
    /// 0 to 2147483647; generated when absent.
    #[serde(default)]
    pub seed: Option<i64>,
    /// `{type: "supervised", supervised: {hyperparameters: {…}}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub method: Option<Value>,
    /// Deprecated: the supervised hyperparameters (`n_epochs`, `batch_size`,
    /// `learning_rate_multiplier`, each a number or `"auto"`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub hyperparameters: Option<Value>,
    /// Weights & Biases integrations: not supported (an empty list or null only).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub integrations: Option<Value>,
    /// Up to 16 string pairs, echoed on the job.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// A fine-tuning job, as OpenAI's `fine_tuning.job`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobObject {
    /// `ftjob-…`.
    pub id: String,
    /// Always `fine_tuning.job`.
    pub object: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `{code, message, param}` once failed.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// Unix seconds, once finished.
    pub finished_at: Option<i64>,
    /// `ft:…`, once succeeded.
    pub fine_tuned_model: Option<String>,
    /// The supervised hyperparameters, resolved once the files are validated.
    #[schema(value_type = Object)]
    pub hyperparameters: Value,
    /// The base model.
    pub model: String,
    /// The tenant.
    pub organization_id: String,
    /// The results file (a CSV of the steps' figures, base64 as OpenAI's).
    pub result_files: Vec<String>,
    /// `validating_files`, `queued`, `running`, `paused`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    /// Billable tokens, once succeeded.
    pub trained_tokens: Option<i64>,
    /// The training file.
    pub training_file: String,
    /// The validation file.
    pub validation_file: Option<String>,
    /// The seed.
    pub seed: i64,
    /// Always null.
    pub estimated_finish: Option<i64>,
    /// Always empty.
    #[schema(value_type = Vec<Object>)]
    pub integrations: Vec<Value>,
    /// The method with its hyperparameters.
    #[schema(value_type = Object)]
    pub method: Value,
    /// The request's metadata.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// The suffix asked for.
    pub user_provided_suffix: Option<String>,
}

/// `GET /v1/fine_tuning/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Always `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<JobObject>,
    /// Whether more follow (pass the last id as `after`).
    pub has_more: bool,
}

/// A job's event, as OpenAI's `fine_tuning.job.event`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventObject {
    /// `ftevent-…`.
    pub id: String,
    /// Always `fine_tuning.job.event`.
    pub object: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// What happened.
    pub message: String,
    /// `message` or `metrics`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A metrics event's figures.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// `GET /v1/fine_tuning/jobs/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    /// Always `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<EventObject>,
    /// Whether more follow.
    pub has_more: bool,
}

/// A checkpoint, as OpenAI's `fine_tuning.job.checkpoint`: a model of its own.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointObject {
    /// `ftckpt_…`.
    pub id: String,
    /// Always `fine_tuning.job.checkpoint`.
    pub object: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `ft:…:ckpt-step-N`, callable as a model.
    pub fine_tuned_model_checkpoint: String,
    /// Its job.
    pub fine_tuning_job_id: String,
    /// Steps taken.
    pub step_number: i64,
    /// `step`, `train_loss`, `train_mean_token_accuracy`, `valid_loss`,
    /// `valid_mean_token_accuracy`, `full_valid_loss`, `full_valid_mean_token_accuracy`.
    #[schema(value_type = Object)]
    pub metrics: Value,
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointList {
    /// Always `list`.
    pub object: String,
    /// The latest step first.
    pub data: Vec<CheckpointObject>,
    /// The first checkpoint's id.
    pub first_id: Option<String>,
    /// The last checkpoint's id.
    pub last_id: Option<String>,
    /// Whether more follow.
    pub has_more: bool,
}

/// The query of the list routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The id of the last item of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Items per page, 1 to 100.
    #[serde(default)]
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
}

pub(super) fn millis_to_secs(ms: i64) -> i64 {
    ms / 1000
}

pub(super) fn parse_json(s: &Option<String>) -> Option<Value> {
    s.as_deref().and_then(|s| serde_json::from_str(s).ok())
}

/// The API's object of a stored job.
pub fn object(j: &FtJob) -> JobObject {
    let method = parse_json(&Some(j.method.clone())).unwrap_or(Value::Null);
    let hyperparameters = method["supervised"]["hyperparameters"].clone();
    JobObject {
        id: j.id.clone(),
        object: "fine_tuning.job".into(),
        created_at: millis_to_secs(j.created_at_ms),
        error: parse_json(&j.error),
        finished_at: j.finished_at_ms.map(millis_to_secs),
        fine_tuned_model: j.fine_tuned_model.clone(),
        hyperparameters,
        model: j.model.clone(),
        organization_id: j.tenant_id.clone(),
        result_files: j.result_file.iter().cloned().collect(),
        status: j.status.name().into(),
        trained_tokens: j.trained_tokens,
        training_file: j.training_file.clone(),
        validation_file: j.validation_file.clone(),
        seed: j.seed,
        estimated_finish: None,
        integrations: Vec::new(),
        method,
        metadata: parse_json(&j.metadata),
        user_provided_suffix: j.suffix.clone(),
    }
}
