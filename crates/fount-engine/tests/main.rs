//! Integration tests of the engine on a tiny random model with random adapters.
// Tests fail by panicking: unwrapping here is the assertion.
#![allow(missing_docs, clippy::unwrap_used)]

mod engine;
mod util;
