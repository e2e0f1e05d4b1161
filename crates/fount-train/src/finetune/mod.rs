//! LoRA supervised fine-tuning: OpenAI chat JSONL rendered with the base model's chat template,
//! loss on assistant tokens only, short examples packed into shared forward passes, the base
//! frozen (it holds no gradients), and a PEFT adapter out.
//!
//! - [`config`]: the settings ([`FinetuneConfig`]) and their defaults;
//! - [`data`]: reading and tokenizing the chat file ([`read_chat_file`]);
//! - [`params`]: the trainable adapter ([`LoraParams`]) and writing it in PEFT's format;
//! - [`eval`]: held-out loss and accuracy, and exact-match answers ([`chat_accuracy`]);
//! - here: the loop ([`finetune`]) with checkpoints and exact resumption.

pub mod config;
pub mod data;
pub mod eval;
pub mod params;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fount_model::publish::Staged;
use fount_model::{peft, LoraAdapter, LoraBatch, Model};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

pub use config::FinetuneConfig;
pub use data::{read_chat_file, tokenize_chat, DataReport, Example};
pub use eval::{chat_accuracy, evaluate};
pub use fount_model::peft::TargetModules;
pub use params::LoraParams;

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::loss::backward_cross_entropy;
use crate::optim::{learning_rate, AdamW, Grads};
use data::{open_chat_base, pack, steps_of, ChatBase};

/// Metrics of one fine-tuning step.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneStep {
    /// 1-based.
    pub step: u64,
    /// Of the total.
    pub steps: u64,
    /// Mean loss over the step's assistant tokens.
    pub loss: f64,
    /// The fraction of those tokens the model predicted (its most likely token).
    pub accuracy: f64,
    /// The epoch the step belongs to (0-based).
    pub epoch: u64,
    /// Validation loss and token accuracy, when measured after this step (the end of an epoch
    /// with `epoch_checkpoints`).
    pub eval: Option<(f64, f64)>,
    /// Whether a checkpoint was written after this step.
    pub checkpoint: bool,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step's forward pass.
    pub tokens: usize,
}

/// The result of a fine-tuning run.
#[derive(Debug, Clone)]
pub struct FinetuneOutcome {
    /// Where the adapter was written.
    pub adapter: PathBuf,
    /// Steps taken.
    pub steps: u64,
    /// Examples read.
    pub data: DataReport,
    /// Held-out examples.
    pub held_out: usize,
    /// Validation loss and token accuracy of the base model and of the adapter, when any
    /// examples were held out.
    pub base_eval: Option<(f64, f64)>,
    /// The same with the adapter.
    pub eval: Option<(f64, f64)>,
    /// Whether it stopped on a signal: `adapter` is then the checkpoint's, holding the steps
    /// taken so far, and `--resume` continues the run.
    pub interrupted: bool,
}

/// What a fine-tuning checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch under way.
    pub epoch: u64,
    /// Steps of that epoch already taken.
    pub in_epoch: usize,
    /// SHA-256 of the chat file trained on.
    pub data_sha256: String,
    /// The settings of the run (a resumed run must have the same).
    pub config: FinetuneConfig,
}

impl FinetuneState {
    /// The settings that decide the trained weights: all but where and how often to save.
    fn decisive(cfg: &FinetuneConfig) -> FinetuneConfig {
        FinetuneConfig {
            checkpoint_every: 0,
            keep_checkpoints: config::default_keep(),
            ..cfg.clone()
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = fs_err::read(path)?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// The seed of step `step`'s dropout masks.
fn dropout_seed(seed: u64, step: u64) -> u64 {
    (seed ^ 0xd50f_u64.rotate_left(40)).wrapping_add(step.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Fine-tunes a LoRA adapter on the base model in `base` with the chat file `data`, writing a
/// PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) into `out` and checkpoints
/// into `out/checkpoints`. With `resume`, continues from the newest complete checkpoint there
/// and ends with the weights an uninterrupted run would have. `on_step` sees every step; `stop`
/// ends the run early with a checkpoint.
///
/// The phases: `prepare` (the frozen base, the examples and the held-out split), the adapter
/// and optimizer (fresh, or restored by `resume_from`), the epochs of `train_step`s with
/// checkpoints, the evaluation, and the adapter published in `out`.
pub fn finetune(
    base: &Path,
    data: &Path,
    out: &Path,
    ft: &FinetuneConfig,
    resume: bool,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&FinetuneStep),
) -> Result<FinetuneOutcome> {
    ft.validate()?;
    if out.join(peft::CONFIG_FILE).exists() {
        return Err(Error::Exists {
            dir: out.to_path_buf(),
            what: "an adapter; choose another --out",
        });
    }
    let ckpt_root = out.join("checkpoints");
    let existing = checkpoint::list(&ckpt_root)?;
    if !resume && !existing.is_empty() {
        return Err(Error::Exists {
            dir: out.to_path_buf(),
            what: "checkpoints of a run; pass --resume to continue it, or choose another --out",
        });
    }
    let Prepared {
        model,
        examples,
        eval_set,
        report,
        data_sha256,
    } = prepare(base, data, ft)?;
    let lora = LoraParams::init(model.config(), ft)?;
    let adapter = lora.adapter()?;
    let (mut opt, mut step, mut epoch, mut skip) = match existing.last().filter(|_| resume) {
        Some((_, dir)) => resume_from(dir, &lora, ft, &data_sha256, data)?,
        None => {
            let sizes: Vec<(String, usize)> = lora
                .params
                .iter()
                .map(|(n, v)| (n.to_string(), v.elem_count()))
                .collect();
            (AdamW::new(ft.adamw, &sizes), 0, 0, 0)
        }
    };
    let per_epoch = groups_of(&examples, &(0..examples.len()).collect::<Vec<_>>(), ft).len();
    let total = ((per_epoch as f64) * ft.epochs).ceil().max(1.0) as u64;
    let warmup = ft.warmup.unwrap_or(total / 20);
    let min_lr = ft.min_lr.unwrap_or(ft.lr / 10.0);
    let base_eval = if eval_set.is_empty() {
        None
    } else {
        Some(evaluate(&model, None, &eval_set, ft.tokens_per_step)?)
    };
    let base_name = base.display().to_string();
    let save = |step: u64, epoch: u64, in_epoch: usize, opt: &AdamW| -> Result<PathBuf> {
        let state = FinetuneState {
            step,
            epoch,
            in_epoch,
            data_sha256: data_sha256.clone(),
            config: ft.clone(),
        };
        let weights = |d: &Path| lora.save_peft(&d.join("adapter"), ft, &base_name);
        let tmp = checkpoint::stage(&ckpt_root, step, &weights, opt, &state)?;
        checkpoint::write_rank(&tmp, 0, &state)?;
        checkpoint::commit(&ckpt_root, &tmp, step, ft.keep_checkpoints)
    };

    let mut grads = Grads::default();
    'outer: while step < total {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut erng = rand_chacha::ChaCha8Rng::seed_from_u64(ft.seed.wrapping_add(epoch));
        order.shuffle(&mut erng);
        let groups = groups_of(&examples, &order, ft);
        for (i, group) in groups.iter().enumerate().skip(skip) {
            if step >= total {
                break 'outer;
            }
            if stop.load(Ordering::SeqCst) {
                let dir = save(step, epoch, i, &opt)?;
                return Ok(FinetuneOutcome {
                    adapter: dir.join("adapter"),
                    steps: step,
                    data: report,
                    held_out: eval_set.len(),
                    base_eval,
                    eval: None,
                    interrupted: true,
                });
            }
            let (measured, grad_norm, tokens) =
                train_step(&model, &lora, &adapter, ft, group, step, &mut grads)?;
            let lr = learning_rate(step, ft.lr, min_lr, warmup, total);
            opt.update(&lora.params, &grads, lr)?;
            step += 1;
            let epoch_end = i + 1 == groups.len() && ft.epoch_checkpoints && step < total;
            let eval = match epoch_end && !eval_set.is_empty() {
                true => Some(evaluate(
                    &model,
                    Some(&adapter),
                    &eval_set,
                    ft.tokens_per_step,
                )?),
                false => None,
            };
            let checkpoint = epoch_end
                || ft.checkpoint_every > 0 && step % ft.checkpoint_every == 0 && step < total;
            if checkpoint {
                if epoch_end {
                    save(step, epoch + 1, 0, &opt)?;
                } else {
                    save(step, epoch, i + 1, &opt)?;
                }
            }
            on_step(&FinetuneStep {
                step,
                steps: total,
                loss: measured.loss,
                accuracy: measured.accuracy.unwrap_or(0.0),
                epoch,
                eval,
                checkpoint,
                lr,
                grad_norm,
                tokens,
            });
        }
        skip = 0;
        epoch += 1;
    }
    let eval = if eval_set.is_empty() {
        None
    } else {
        Some(evaluate(
            &model,
            Some(&adapter),
            &eval_set,
            ft.tokens_per_step,
        )?)
    };
    // written beside, synced, and moved in weights first: `adapter_config.json` appears last, so
    // a kill never leaves a directory that loads as a half-written adapter
    let staged = Staged::begin_at(out.join("adapter.partial"), out)?;
    lora.save_peft(staged.path(), ft, &base_name)?;
    staged.commit_files_into(&[peft::WEIGHTS_FILE, peft::CONFIG_FILE])?;
    Ok(FinetuneOutcome {
        adapter: out.to_path_buf(),
        steps: step,
        data: report,
        held_out: eval_set.len(),
        base_eval,
        eval,
        interrupted: false,
    })
}

/// What a run trains on: the frozen base, the training examples, the held-out ones, and what
/// reading the file found.
struct Prepared {
    model: Model,
    examples: Vec<Example>,
    eval_set: Vec<Example>,
    report: DataReport,
    data_sha256: String,
}

/// Loads the frozen base (plain tensors, so no gradient is computed or kept for it), reads and
/// checks the chat file, and holds out `eval_fraction` of the examples after a seeded shuffle.
fn prepare(base: &Path, data: &Path, ft: &FinetuneConfig) -> Result<Prepared> {
    let ChatBase {
        tokenizer,
        template,
        model,
        ..
    } = open_chat_base(base)?;
    let cfg = model.config().clone();
    if ft.recompute && cfg.moe.is_some() {
        return Err(Error::Config {
            field: "recompute",
            reason: "is for dense models; fine-tune an MoE model without it".into(),
        });
    }
    let max_len = ft
        .max_len
        .unwrap_or(cfg.max_position_embeddings)
        .min(cfg.max_position_embeddings);
    let (mut examples, report) = read_chat_file(data, &template, &tokenizer, max_len, ft.truncate)?;
    if let Some(t) = examples
        .iter()
        .flat_map(|e| &e.tokens)
        .find(|&&t| t as usize >= cfg.vocab_size)
    {
        return Err(Error::Input {
            path: data.to_path_buf(),
            reason: format!("token {t} outside the model's vocabulary"),
        });
    }
    let data_sha256 = sha256_file(data)?;
    // held out: every k-th example after a seeded shuffle
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ft.seed ^ 0x5f7);
    examples.shuffle(&mut rng);
    let eval_set: Vec<Example> = match &ft.validation_file {
        Some(v) => read_chat_file(v, &template, &tokenizer, max_len, ft.truncate)?.0,
        None => {
            let held = ((examples.len() as f64) * ft.eval_fraction).round() as usize;
            let held = held.min(examples.len().saturating_sub(1));
            examples.drain(..held).collect()
        }
    };
    Ok(Prepared {
        model,
        examples,
        eval_set,
        report,
        data_sha256,
    })
}

/// Restores the adapter and optimizer from the checkpoint `dir`, which must have been written
/// with the same decisive settings and the same data file; returns the optimizer, the step, the
/// epoch and the steps of that epoch already taken.
fn resume_from(
    dir: &Path,
    lora: &LoraParams,
    ft: &FinetuneConfig,
    data_sha256: &str,
    data: &Path,
) -> Result<(AdamW, u64, u64, usize)> {
    let loaded = checkpoint::load::<FinetuneState>(dir, 0, &lora.params, ft.adamw)?;
    let s = loaded.state;
    if FinetuneState::decisive(&s.config) != FinetuneState::decisive(ft) {
        return Err(Error::Resume {
            dir: dir.to_path_buf(),
            reason: "was written with other settings than these; resume with the same config"
                .into(),
        });
    }
    if s.data_sha256 != data_sha256 {
        return Err(Error::Resume {
            dir: dir.to_path_buf(),
            reason: format!(
                "was trained on another file than {} (its SHA-256 differs)",
                data.display()
            ),
        });
    }
    lora.restore(&dir.join("adapter"))?;
    Ok((loaded.optimizer, s.step, s.epoch, s.in_epoch))
}

/// Forward and backward over one step's examples through the adapter (with this step's dropout
/// masks), leaving clipped gradients in `grads`; returns the loss, the gradient norm before
/// clipping, and the tokens in the forward pass.
fn train_step(
    model: &Model,
    lora: &LoraParams,
    adapter: &Arc<LoraAdapter>,
    ft: &FinetuneConfig,
    group: &[&Example],
    step: u64,
    grads: &mut Grads,
) -> Result<(crate::loss::StepLoss, f64, usize)> {
    let (batch, targets, mask) = pack(group);
    let this = if ft.lora_dropout > 0.0 {
        let plain = LoraAdapter::clone(adapter);
        Arc::new(plain.with_dropout(ft.lora_dropout as f32, dropout_seed(ft.seed, step)))
    } else {
        adapter.clone()
    };
    let mut lb = LoraBatch::none();
    lb.push(0..batch.len(), this);
    grads.clear();
    let loss = backward_cross_entropy(
        model,
        &batch,
        &lb,
        &targets,
        &mask,
        ft.recompute,
        true,
        &mut |store| grads.accumulate(&lora.params, store, 1.0),
    )?;
    let grad_norm = if ft.clip > 0.0 {
        grads.clip(ft.clip)
    } else {
        grads.norm()
    };
    Ok((loss, grad_norm, batch.len()))
}

/// One epoch's steps in `order`: `batch_size` examples each when set (OpenAI's batches),
/// otherwise packed up to `tokens_per_step` tokens.
fn groups_of<'a>(
    examples: &'a [Example],
    order: &[usize],
    ft: &FinetuneConfig,
) -> Vec<Vec<&'a Example>> {
    match ft.batch_size {
        Some(b) => order
            .chunks(b.max(1))
            .map(|c| c.iter().map(|&i| &examples[i]).collect())
            .collect(),
        None => steps_of(examples, order, ft.tokens_per_step),
    }
}
