//! Integration tests of fount-data: rules at their thresholds, agreement with datatrove, readers
//! and bad input, PII, MinHash, shards, and whole runs.
// Tests fail by panicking: unwrapping here is the assertion.
#![allow(missing_docs, clippy::unwrap_used)]

mod agreement;
mod minhash;
mod pii;
mod pipeline;
mod read;
mod rules;
mod shards;
mod tokenizer;
