//! Integration tests of the store, each run on SQLite and on PostgreSQL.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

/// Tenants, keys (hashed, revocable, expiring), quotas, usage records.
mod store;

/// The pool's jobs: submit, the state machine against the database, attempts billed once,
/// quotas, the lease.
mod jobs;

/// Fine-tuning jobs, their events and checkpoints; owners pausing, resuming and cancelling
/// pool jobs.
mod finetuning;

/// Safety policies, suspensions and their version, audit records.
mod safety;
mod util;

/// What replicas share: rate windows and open requests under concurrent admissions, the
/// sweep of a dead replica's requests, the adapter registry.
mod replicas;
