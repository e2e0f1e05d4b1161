//! fount-train: pretraining and fine-tuning on the model core of `fount-model`.
//!
//! - [`Params`]: a model's weights as variables, so that its forward pass records gradients.
//! - [`loss`]: next-token cross-entropy over packed batches; the MoE load-balancing loss as HF
//!   transformers computes it.
//! - [`optim`]: AdamW with f32 moments and decoupled weight decay (operation for operation as
//!   `torch.optim.AdamW`), clipping by global norm, warmup and cosine decay.
//! - [`train`]: the pretraining loop over token shards ([`TrainConfig`]), with validation, a
//!   JSONL metrics log, and crash-consistent [`checkpoint`]s that resume bit for bit.
//! - [`sft`]: LoRA fine-tuning on chat JSONL (assistant tokens only, examples packed, the base
//!   frozen) writing PEFT adapters.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod loss;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod optim;
mod params;
pub mod plot;
pub mod run;
pub mod sft;

pub use config::TrainConfig;
pub use error::{Error, Result};
pub use params::Params;
pub use run::{train, Collective, Observer, Outcome, Quiet, Single, StepMetrics};
