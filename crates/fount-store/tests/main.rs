//! Integration tests of the store, each run on SQLite and on PostgreSQL.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

/// Tenants, keys (hashed, revocable, expiring), quotas, usage records.
mod store;
mod util;
