//! The run configuration of `fount train`: a TOML file whose every field has a default but the
//! model, the data, the output directory and the step count.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::AdamWConfig;

/// A pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model directory to start from (Hugging Face format, e.g. from `fount model init`).
    /// Relative paths are relative to the configuration file.
    pub model: PathBuf,
    /// The token shards directory (`fount data` writes `DIR/shards`).
    pub data: PathBuf,
    /// Where the run writes checkpoints, `metrics.jsonl` and the final model (`out/final`).
    pub out: PathBuf,
    /// Optimizer steps.
    pub steps: u64,
    /// Shard name prefix of the training split.
    #[serde(default = "default_split")]
    pub split: String,
    /// Shard name prefix of the validation split; validation is skipped when it has no shards.
    #[serde(default = "default_val_split")]
    pub val_split: String,
    /// Tokens per training sequence.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Sequences per forward pass (per process).
    #[serde(default = "default_micro_batch")]
    pub micro_batch: usize,
    /// Micro-batches whose gradients are summed before each step.
    #[serde(default = "default_accumulation")]
    pub accumulation: usize,
    /// Peak learning rate, reached after the warmup.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Learning rate at the end of the cosine decay (default: a tenth of `lr`).
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Steps of linear warmup (default: a twentieth of `steps`).
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Largest global gradient norm; larger gradients are scaled down to it (0: no clipping).
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Seed of the data order.
    #[serde(default)]
    pub seed: u64,
    /// Steps between validation losses (0: only at the end).
    #[serde(default = "default_every")]
    pub eval_every: u64,
    /// Micro-batches of validation data per validation loss.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Steps between checkpoints (0: only at the end and on a signal).
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
    /// Complete checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// AdamW settings.
    #[serde(default)]
    pub adamw: AdamWConfig,
    /// Mixture-of-experts losses.
    #[serde(default)]
    pub moe: MoeLosses,
    /// Activation recomputation (gradient checkpointing): keep only each layer's input during
    /// the forward pass and recompute the rest during the backward pass. Activation memory
    /// drops to one layer's, for a second forward pass of compute (about a third more per
    /// step); the weights come out the same. Dense models only.
    #[serde(default)]
    pub recompute: bool,
}

/// The auxiliary losses of a mixture-of-experts model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeLosses {
    /// Coefficient of the load-balancing loss (default: the model's `router_aux_loss_coef`).
    #[serde(default)]
    pub aux_loss_coef: Option<f64>,
    /// Coefficient of the router z-loss, the mean squared log-sum-exp of the router logits
    /// (ST-MoE); 0 turns it off.
    #[serde(default)]
    pub z_loss_coef: f64,
}

fn default_split() -> String {
    "train".into()
}
fn default_val_split() -> String {
    "validation".into()
}
fn default_seq_len() -> usize {
    128
}
fn default_micro_batch() -> usize {
    8
}
fn default_accumulation() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-3
}
fn default_clip() -> f64 {
    1.0
}
fn default_every() -> u64 {
    100
}
fn default_eval_batches() -> usize {
    8
}
fn default_keep() -> usize {
    2
}

impl TrainConfig {
    /// Reads a configuration file; relative paths in it are taken from its directory.
    pub fn from_file(path: &Path) -> Result<TrainConfig> {
        let text = fs_err::read_to_string(path)?;
        let mut cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.model, &mut cfg.data, &mut cfg.out] {
            // `artifacts:KEY` names a stored input, fetched by the command that runs the config
            if p.is_relative() && !p.to_string_lossy().starts_with("artifacts:") {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("steps", "must be at least 1"));
        }
        if self.seq_len < 2 || self.micro_batch == 0 || self.accumulation == 0 {
            return Err(Error::config(
                "seq_len",
                "must be at least 2, micro_batch and accumulation at least 1",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(
                "lr",
                format!("must be positive, not {}", self.lr),
            ));
        }
        if self
            .min_lr
            .is_some_and(|m| !(m.is_finite() && m >= 0.0 && m <= self.lr))
        {
            return Err(Error::config("min_lr", "must be between 0 and lr"));
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return Err(Error::config("clip", "must be 0 (off) or positive"));
        }
        let a = &self.adamw;
        if !(0.0..1.0).contains(&a.beta1) || !(0.0..1.0).contains(&a.beta2) || a.eps <= 0.0 {
            return Err(Error::config(
                "adamw",
                "betas must be in [0, 1) and eps positive",
            ));
        }
        if self.keep_checkpoints == 0 {
            return Err(Error::config("keep_checkpoints", "must be at least 1"));
        }
        Ok(())
    }

    /// The learning rate at the end of the decay.
    pub fn min_lr(&self) -> f64 {
        self.min_lr.unwrap_or(self.lr / 10.0)
    }

    /// Warmup steps.
    pub fn warmup(&self) -> u64 {
        self.warmup.unwrap_or(self.steps / 20)
    }
}
