//! Extractors whose failures are OpenAI error objects: a JSON body naming the field at fault,
//! and a query string.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// A request body parsed as `T`. Malformed JSON, a wrong type or a missing field becomes a 400
/// whose `param` is the path of the field (`messages[0].role`); a body over the limit a 413.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge {
                    limit: state.cfg.max_body_bytes,
                }
            } else {
                ApiError::Invalid {
                    message: format!("could not read the request body: {e}"),
                    param: None,
                    code: None,
                }
            }
        })?;
        parse(&bytes).map(JsonBody)
    }
}

/// A query string parsed as `T`; one that does not parse is a 400 with the parser's message.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(q) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::Invalid {
                message: e.body_text(),
                param: None,
                code: None,
            })?;
        Ok(QueryParams(q))
    }
}

/// Parses `bytes` as `T`, naming the offending field on failure. The body must be a JSON
/// object (serde would otherwise take an array of a struct's fields in order).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b) if *b != b'{') {
        return Err(ApiError::Invalid {
            message: "the request body must be a JSON object".into(),
            param: None,
            code: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner();
        // a missing field is reported at its parent; name the field itself
        let text = inner.to_string();
        if let Some(field) = text
            .strip_prefix("missing field `")
            .and_then(|t| t.split('`').next())
        {
            path = if path == "." {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
        }
        let message = if inner.is_eof() || inner.is_syntax() {
            format!("the request body is not valid JSON: {inner}")
        } else if path == "." {
            format!("invalid request body: {inner}")
        } else {
            format!("invalid value for {path}: {inner}")
        };
        let syntax = message.starts_with("the request body is not valid JSON");
        ApiError::Invalid {
            message,
            param: (path != "." && !syntax).then_some(path),
            code: None,
        }
    })?;
    de.end().map_err(|e| ApiError::Invalid {
        message: format!("the request body is not valid JSON: {e}"),
        param: None,
        code: None,
    })?;
    Ok(value)
}
