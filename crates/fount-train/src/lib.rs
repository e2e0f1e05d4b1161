//! fount-train: pretraining and fine-tuning on the model core of `fount-model`.
//!
//! - [`Params`]: a model's weights as variables, so that its forward pass records gradients.
//! - [`loss`]: next-token cross-entropy over packed batches; the MoE load-balancing loss as HF
//!   transformers computes it.
//! - [`optim`]: AdamW with f32 moments and decoupled weight decay (operation for operation as
//!   `torch.optim.AdamW`), clipping by global norm, warmup and cosine decay.
//! - [`pretrain`]: the pretraining loop over token shards ([`TrainConfig`]), with validation, a
//!   JSONL metrics log, and crash-consistent [`checkpoint`]s that resume bit for bit.
//! - [`finetune`]: LoRA fine-tuning on chat JSONL (assistant tokens only, examples packed, the
//!   base frozen) writing PEFT adapters.
//!
//! Every directory a run publishes (checkpoints, the final model, the adapter) goes through
//! [`fount_model::publish`]; the PEFT format is [`fount_model::peft`]'s.

pub mod checkpoint;
pub mod error;
pub mod finetune;
pub mod loss;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod optim;
mod params;
pub mod pretrain;

pub use error::{Error, Result};
pub use params::Params;
pub use pretrain::config::TrainConfig;
pub use pretrain::{train, Collective, Observer, Outcome, Quiet, Single, StepMetrics};
