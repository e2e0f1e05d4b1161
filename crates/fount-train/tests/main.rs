//! Integration tests of fount-train.
#![allow(missing_docs, clippy::unwrap_used, clippy::disallowed_methods)]

/// Loss, gradients and one AdamW step against PyTorch's, on the fixture models.
mod grads;
/// PEFT reading fount's adapters.
mod peft;
/// Activation recomputation against stored activations.
mod recompute;
/// LoRA fine-tuning: learning, merging, refusals.
mod sft;
/// Pretraining runs: learning, exact resumption, refusals.
mod train;
mod util;
