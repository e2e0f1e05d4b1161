//! `fount-model`: the model definitions every other part of fount runs.
//!
//! One Llama-family decoder covers Llama, Qwen2, Mistral and Mixtral (sparse MoE), loaded from
//! a Hugging Face model directory and producing the same logits as `transformers`. Its forward
//! takes a packed [`Batch`] and the sequences' key/value state as a [`KvView`], so the same
//! code prefills, decodes from a contiguous cache, decodes from the engine's paged cache, and
//! trains.
//!
//! The pipeline of a generation:
//! 1. [`ModelFiles`] finds `config.json`, the safetensors weights, the tokenizer, the chat
//!    template and `generation_config.json`.
//! 2. [`Model::load`] resolves the config ([`HfConfig`] → [`Config`]) and maps the weights.
//! 3. [`ChatTemplate`] renders messages; [`Tokenizer`] turns text into ids.
//! 4. [`Model::forward`] produces logits; [`Sampler`] picks tokens.
//! 5. [`TextStream`] and [`StopMatcher`] turn ids back into text that is safe to stream.
//!
//! ```no_run
//! use fount_model::{generate, GenerateOptions, Model, ModelFiles, Tokenizer};
//! # fn main() -> fount_model::Result<()> {
//! let dir = std::path::Path::new("models/tiny");
//! let model = Model::load(dir, candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let tokenizer = Tokenizer::from_file(&ModelFiles::open(dir)?.tokenizer_path())?;
//! let prompt = tokenizer.encode("Hello", true)?;
//! let opts = GenerateOptions { max_tokens: 16, ..Default::default() };
//! generate(&model, &tokenizer, &prompt, &opts, |text| print!("{text}"))?;
//! # Ok(()) }
//! ```

mod batch;
pub mod blocks;
mod chat;
mod config;
mod error;
mod files;
mod generate;
pub mod gguf;
pub mod init;
pub mod kernels;
mod kv;
mod layers;
pub mod lora;
mod model;
mod moe;
pub mod ops;
pub mod peft;
pub mod publish;
pub mod quantize;
pub mod rope;
pub mod sampling;
mod source;
mod stop;
mod tokenizer;
mod weights;

pub use batch::{Batch, Logits};
pub use chat::{ChatTemplate, Message};
pub use config::{Arch, Config, HfConfig, HfRopeScaling, MoeConfig, RopeScaling};
pub use error::{Error, Result};
pub use files::{GenerationConfig, ModelFiles};
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use kv::{KvCache, KvView, NoCache};
pub use layers::{Attention, LayerCtx, Linear, Mlp, RmsNorm, Weight};
pub use lora::{LoraAdapter, LoraBatch, Proj};
pub use model::{Model, Output, RECOMPUTE_TOKENS};
pub use moe::SparseMoe;
pub use ops::Kernels;
pub use sampling::{Sampler, SamplingParams, TokenHistory};
pub use source::{is_gguf, Loaded};
pub use stop::{StopMatcher, StopStep, TextOutput};
pub use tokenizer::{TextStream, Tokenizer};
pub use weights::Weights;
