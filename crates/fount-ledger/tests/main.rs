//! fount-ledger's tests: one binary (one PostgreSQL cluster for all of them).
#![allow(missing_docs)]

mod log;
mod properties;
mod vectors;
mod witness;
