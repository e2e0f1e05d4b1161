//! Integration tests of the HTTP layer, without sockets (`app().oneshot(…)`).
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

/// Requests and their validation: status codes, OpenAI error objects, the `param` at fault.
mod errors;
/// OpenAI's Files API: upload, pages, content, delete, tenants' isolation, scopes, bad uploads.
mod files;
/// Answers and streams: JSON and server-sent events, snapshotted with ids and times masked.
mod generation;
/// Models, adapters, health, metrics and the OpenAPI document.
mod operations;
/// Replicas on one store: the adapter registry, adapters fetched from the artifacts store and
/// checked by digest.
mod replicas;
/// Safety: moderations, tenants' policies on input and output, suspensions, audit records.
mod safety;
/// Tenancy: API keys, isolation, quotas, exact metering.
mod tenancy;
mod util;
