//! Integration tests of fount-tokenizer.
// Tests fail by panicking: unwrapping here is the assertion, and a failing std::fs call names
// its path in the assertion message.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

/// The trained tokenizer's normaliser, pre-tokenizer and pieces against transformers' Qwen2.
mod pretokenizer;
