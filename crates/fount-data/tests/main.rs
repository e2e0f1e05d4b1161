//! Integration tests of fount-data: rules at their thresholds, agreement with datatrove, readers
//! and bad input, PII, MinHash, shards, and whole runs.
// Tests fail by panicking: unwrapping here is the assertion, and a failing std::fs call names
// its path in the assertion message.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

mod agreement;
mod minhash;
mod pii;
mod pipeline;
mod read;
mod rules;
mod shards;
