//! Errors, and the one place they become OpenAI error objects with a status code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::protocol::{ErrorBody, ErrorResponse};

/// Seconds a client is asked to wait after a 429.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A malformed or out-of-range request (400 `invalid_request_error`).
    #[error("{message}")]
    Invalid {
        /// What is wrong, for people.
        message: String,
        /// The field at fault (`messages[0].role`, `temperature`, …).
        param: Option<String>,
        /// A machine-readable code, when there is one.
        code: Option<&'static str>,
    },
    /// The prompt and the tokens asked for do not fit the model's context (400
    /// `context_length_exceeded`).
    #[error("{message}")]
    ContextLength {
        /// The counts involved.
        message: String,
        /// `messages` or `prompt`.
        param: &'static str,
    },
    /// No such model, adapter or route (404).
    #[error("{message}")]
    NotFound {
        /// What was not found.
        message: String,
        /// The field that named it.
        param: Option<String>,
        /// `model_not_found`, `adapter_not_found`, `not_found`.
        code: &'static str,
    },
    /// The path exists but not with this method (405).
    #[error("{0} is not allowed on {1}")]
    MethodNotAllowed(String, String),
    /// The body is larger than the server accepts (413).
    #[error("the request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No API key, or one that is unknown, revoked or expired (401 `invalid_api_key`).
    #[error("incorrect or missing API key: send `Authorization: Bearer fk-…`")]
    Unauthorized,
    /// The key lacks the scope the route needs (403).
    #[error("this API key lacks the {0} scope")]
    Forbidden(&'static str),
    /// A tenant's rate limit (429 `rate_limit_exceeded` with `Retry-After`).
    #[error("{message}")]
    RateLimited {
        /// Which limit.
        message: String,
        /// Seconds until it frees.
        retry_after: u64,
    },
    /// A tenant's token budget is spent (429 `insufficient_quota`).
    #[error("{0}")]
    InsufficientQuota(String),
    /// The waiting queue is full (429 with `Retry-After`).
    #[error("the server is at capacity ({0} requests waiting); retry after {RETRY_AFTER_SECS} s")]
    Overloaded(usize),
    /// Usage records wait to be written past the writer's bound (429 with `Retry-After`): the
    /// database is behind, and requests that could not be recorded are not taken.
    #[error("{0} usage records are waiting to be written; retry after {RETRY_AFTER_SECS} s")]
    MeteringBacklog(usize),
    /// An operator suspended the tenant, key, model or adapter (403 `suspended`).
    #[error("{0}")]
    Suspended(String),
    /// The server is shutting down (503).
    #[error("the server is shutting down and accepts no new requests")]
    Draining,
    /// Something failed inside the server (500); the cause is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

/// `Result` with [`ApiError`].
pub type ApiResult<T> = std::result::Result<T, ApiError>;

impl ApiError {
    /// A 400 `content_policy_violation`: a policy blocks what `param` holds.
    pub fn content_policy(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: Some("content_policy_violation"),
        }
    }

    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 404 `model_not_found` for `model` (unknown, or hidden from the caller by its quota).
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError::NotFound {
            message: format!("the model {model:?} does not exist"),
            param: Some("model".into()),
            code: "model_not_found",
        }
    }

    /// The status this error is sent with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::ContextLength { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_)
            | ApiError::MeteringBacklog(_)
            | ApiError::RateLimited { .. }
            | ApiError::InsufficientQuota(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::Suspended(_) => StatusCode::FORBIDDEN,
            ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object.
    pub fn body(&self) -> ErrorResponse {
        let (kind, param, code) = match self {
            ApiError::Invalid { param, code, .. } => (
                "invalid_request_error",
                param.clone(),
                code.map(str::to_string),
            ),
            ApiError::ContextLength { param, .. } => (
                "invalid_request_error",
                Some(param.to_string()),
                Some("context_length_exceeded".into()),
            ),
            ApiError::NotFound { param, code, .. } => (
                "invalid_request_error",
                param.clone(),
                Some(code.to_string()),
            ),
            ApiError::MethodNotAllowed(..) => (
                "invalid_request_error",
                None,
                Some("method_not_allowed".into()),
            ),
            ApiError::TooLarge { .. } => (
                "invalid_request_error",
                None,
                Some("request_too_large".into()),
            ),
            ApiError::Overloaded(_) | ApiError::MeteringBacklog(_) => {
                ("rate_limit_error", None, Some("queue_full".into()))
            }
            ApiError::RateLimited { .. } => {
                ("rate_limit_error", None, Some("rate_limit_exceeded".into()))
            }
            ApiError::InsufficientQuota(_) => (
                "insufficient_quota",
                None,
                Some("insufficient_quota".into()),
            ),
            ApiError::Unauthorized => (
                "invalid_request_error",
                None,
                Some("invalid_api_key".into()),
            ),
            ApiError::Forbidden(_) => (
                "invalid_request_error",
                None,
                Some("insufficient_scope".into()),
            ),
            ApiError::Suspended(_) => ("permission_error", None, Some("suspended".into())),
            ApiError::Draining => (
                "service_unavailable_error",
                None,
                Some("shutting_down".into()),
            ),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                kind: kind.into(),
                param,
                code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "request failed");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        let retry = match &self {
            ApiError::Overloaded(_) | ApiError::MeteringBacklog(_) => Some(RETRY_AFTER_SECS),
            ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        if let Some(secs) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, ApiError::TooLarge { .. }) {
            // the rest of the body is never read, so the connection cannot carry another
            // request: say so, or a client reuses it and its next request is reset
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<fount_engine::Error> for ApiError {
    fn from(e: fount_engine::Error) -> ApiError {
        use fount_engine::Error as E;
        match e {
            E::Invalid(message) => ApiError::Invalid {
                message,
                param: None,
                code: None,
            },
            E::UnknownAdapter(name) => ApiError::NotFound {
                message: format!("the model {name:?} does not exist"),
                param: Some("model".into()),
                code: "model_not_found",
            },
            E::QueueFull(n) => ApiError::Overloaded(n),
            E::Stopped => ApiError::Draining,
            other => ApiError::Internal(other.to_string()),
        }
    }
}
