//! fount-ledger's tests: one binary (one PostgreSQL cluster for all of them).
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

mod log;
mod properties;
mod vectors;
mod witness;
