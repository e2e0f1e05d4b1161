//! Integration tests of the pool.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]
