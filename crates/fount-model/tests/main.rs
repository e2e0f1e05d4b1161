// Tests fail by panicking: unwrapping here is the assertion, and a failing std::fs call names
// its path in the assertion message.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

//! Integration tests of fount-model against references produced by HF transformers.

/// Chat templates render byte-identically to `apply_chat_template`.
mod chat;
/// Every user-reachable error names what is wrong.
mod errors;
/// GGUF files load back to the same model; malformed ones are clear errors.
mod gguf;
/// `fount model init` writes directories that load and run.
mod init;
/// LoRA adapters match PEFT; batches mix adapters; batch-invariant mode.
mod lora;
/// Logits and greedy decoding match transformers on four architectures.
mod parity;

mod util;
