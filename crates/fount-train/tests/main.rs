//! Integration tests of fount-train.
#![allow(missing_docs, clippy::unwrap_used)]

/// Loss, gradients and one AdamW step against PyTorch's, on the fixture models.
mod grads;
/// Pretraining runs: learning, exact resumption, refusals.
mod train;
mod util;
