//! Integration tests of the engine on a tiny random model with random adapters.
// Tests fail by panicking: unwrapping here is the assertion, and a failing std::fs call names
// its path in the assertion message.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

mod engine;
mod util;
