//! The settings of a fine-tuning run (`fount finetune --config FILE`), with their defaults.

use std::path::Path;

use fount_model::peft::{PeftConfig, TargetModules};
use fount_model::Proj;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::AdamWConfig;

fn default_targets() -> TargetModules {
    TargetModules::of(&[Proj::Q, Proj::K, Proj::V, Proj::O])
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_lr() -> f64 {
    1e-3
}
fn default_epochs() -> f64 {
    3.0
}
fn default_tokens() -> usize {
    2048
}
fn default_eval_fraction() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}
fn default_adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    }
}

/// A fine-tuning run (`fount finetune --config FILE`; every field has a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA alpha: the update is scaled by `alpha / r` (`alpha / √r` with rsLoRA).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training, as PEFT's `lora_dropout` (each adapted
    /// projection its own mask, drawn from `seed` and the step, so a resumed run draws the same
    /// masks); recorded in `adapter_config.json`.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling, `alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Projections to adapt (default: the attention projections).
    #[serde(default = "default_targets")]
    pub target_modules: TargetModules,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Final learning rate of the cosine decay (default: a tenth of `lr`).
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Warmup steps (default: a twentieth of the steps).
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Passes over the training examples.
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    /// Tokens per step: examples are packed into a forward pass up to this many.
    #[serde(default = "default_tokens")]
    pub tokens_per_step: usize,
    /// Examples per step instead (OpenAI's `batch_size`): each step takes this many examples,
    /// whatever their length, and `tokens_per_step` only bounds the evaluation's passes.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Longest example in tokens (default: the model's context).
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Cut examples longer than `max_len` (reported) instead of refusing the file.
    #[serde(default)]
    pub truncate: bool,
    /// Fraction of examples held out for validation loss and token accuracy.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// A chat file to measure validation loss and token accuracy on instead of holding out
    /// examples (OpenAI's `validation_file`).
    #[serde(default)]
    pub validation_file: Option<std::path::PathBuf>,
    /// A checkpoint, and the validation figures, at the end of every epoch but the last (as
    /// OpenAI's fine-tuning jobs make them).
    #[serde(default)]
    pub epoch_checkpoints: bool,
    /// Largest global gradient norm.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Seed of the adapter's initial `A`, the held-out split and the example order.
    #[serde(default)]
    pub seed: u64,
    /// AdamW settings (weight decay 0 by default for adapters).
    #[serde(default = "default_adamw")]
    pub adamw: AdamWConfig,
    /// Steps between checkpoints in `OUT/checkpoints` (0: only on a signal).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Complete checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Activation recomputation (gradient checkpointing): keep only each layer's input during
    /// the forward pass and recompute the rest during the backward pass, for a second forward
    /// pass of compute. Dense bases only.
    #[serde(default)]
    pub recompute: bool,
}

pub(super) fn default_keep() -> usize {
    2
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: default_targets(),
            lr: default_lr(),
            min_lr: None,
            warmup: None,
            epochs: default_epochs(),
            tokens_per_step: default_tokens(),
            batch_size: None,
            max_len: None,
            truncate: false,
            eval_fraction: default_eval_fraction(),
            validation_file: None,
            epoch_checkpoints: false,
            clip: default_clip(),
            seed: 0,
            adamw: default_adamw(),
            checkpoint_every: 0,
            keep_checkpoints: default_keep(),
            recompute: false,
        }
    }
}

impl FinetuneConfig {
    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<FinetuneConfig> {
        let text = fs_err::read_to_string(path)?;
        let cfg: FinetuneConfig = toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r", "must be at least 1"));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::config("lora_alpha", "must be positive"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config("lora_dropout", "must be in [0, 1)"));
        }
        if self.keep_checkpoints == 0 {
            return Err(Error::config("keep_checkpoints", "must be at least 1"));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.lr) || !positive(self.epochs) {
            return Err(Error::config("lr", "and epochs must be positive"));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(Error::config("eval_fraction", "must be in [0, 1)"));
        }
        if self.batch_size == Some(0) {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.tokens_per_step < 2 {
            return Err(Error::config("tokens_per_step", "must be at least 2"));
        }
        self.target_modules.resolve()?;
        Ok(())
    }

    /// The adapter's scale.
    pub fn scale(&self) -> f64 {
        fount_model::peft::scale(self.lora_alpha, self.r, self.use_rslora)
    }

    /// The `adapter_config.json` of an adapter trained with these settings on `base` (the
    /// targets as a resolved list).
    pub fn peft_config(&self, base: &str) -> Result<PeftConfig> {
        let targets = self.target_modules.resolve()?;
        Ok(PeftConfig {
            base_model_name_or_path: Some(base.to_string()),
            lora_dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            ..PeftConfig::new(self.r, self.lora_alpha, &targets)
        })
    }
}
