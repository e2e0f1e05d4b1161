//! fount-train: pretraining and fine-tuning on the model core of `fount-model`.
//!
//! - [`Params`]: a model's weights as variables, so that its forward pass records gradients.
//! - [`loss`]: next-token cross-entropy over packed batches; the MoE load-balancing loss as HF
//!   transformers computes it.
//! - [`optim`]: AdamW with f32 moments and decoupled weight decay (operation for operation as
//!   `torch.optim.AdamW`), clipping by global norm, warmup and cosine decay.

pub mod error;
pub mod loss;
pub mod optim;
mod params;

pub use error::{Error, Result};
pub use params::Params;
