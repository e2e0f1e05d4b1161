//! The pretraining loop: token windows from shards, forward and backward over packed
//! micro-batches, gradient accumulation, clipping, AdamW on the schedule, validation, metrics,
//! checkpoints, and exact resumption.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fount_data::shard::{Sampler, ShardSet};
use fount_model::{Batch, Logits, LoraBatch, Model, NoCache};
use serde::Serialize;

use crate::checkpoint::{self, State};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, load_balancing_loss, row_weights, weighted_cross_entropy};
use crate::optim::{learning_rate, AdamW, Grads};
use crate::params::Params;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// The step just taken (1-based).
    pub step: u64,
    /// Mean next-token cross-entropy of the step's batch.
    pub loss: f64,
    /// The load-balancing loss (MoE models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// The router z-loss (MoE models, when on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub z_loss: Option<f64>,
    /// Each expert's share of the routed (token, slot) pairs, over all layers (MoE models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<Vec<f64>>,
    /// Tokens routed past an expert's capacity (fount's MoE is dropless: always 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_tokens: Option<u64>,
    /// The learning rate the step used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second over the step (all processes).
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation against the measured matmul peak.
    pub mfu: f64,
    /// Validation loss, on steps that measure it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Seconds since the run (or its resumption) started.
    pub elapsed_s: f64,
}

/// How processes share a run (data parallel): gradients are summed over all of them.
pub trait Collective {
    /// This process's index.
    fn rank(&self) -> usize;
    /// Processes.
    fn world(&self) -> usize;
    /// Sums `values` element-wise over every process, in place.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()>;
    /// Sums one number over every process.
    fn sum_f64(&self, value: f64) -> Result<f64>;
    /// Waits until every process is here.
    fn barrier(&self) {}
}

/// One process alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, value: f64) -> Result<f64> {
        Ok(value)
    }
}

/// What a run reports as it goes.
pub trait Observer {
    /// Once, before the first step: the step it starts from and the total.
    fn start(&mut self, _from: u64, _steps: u64) {}
    /// After every step.
    fn step(&mut self, _m: &StepMetrics) {}
    /// After a checkpoint is written.
    fn checkpoint(&mut self, _dir: &Path) {}
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct Quiet;
impl Observer for Quiet {}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Steps done in total.
    pub step: u64,
    /// Whether it stopped early on request (a signal); a checkpoint was written.
    pub interrupted: bool,
    /// The final model (`out/final`), when the run finished.
    pub final_model: Option<PathBuf>,
    /// The last validation loss.
    pub val_loss: Option<f64>,
    /// The training loss of the last step.
    pub loss: f64,
}

/// Measured f32 matmul throughput of this machine, FLOP/s (the MFU denominator).
pub fn matmul_peak() -> Result<f64> {
    // large enough to reach the kernel's steady rate; the best of several, as the first runs
    // pay for page faults and thread wake-ups
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let _ = a.matmul(&b)?; // warm
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let t = Instant::now();
        let _ = a.matmul(&b)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best.max(1e-9))
}

/// Training FLOPs per token: 6 × (parameters but the input embedding) plus attention,
/// 12 × layers × hidden × sequence length (PaLM's count).
pub fn flops_per_token(model: &Model, params: &Params, seq_len: usize) -> f64 {
    flops_per_token_of(model.config(), params.count(), seq_len)
}

/// [`flops_per_token`] for a model of `config` with `params` parameters in all.
pub fn flops_per_token_of(c: &fount_model::Config, params: usize, seq_len: usize) -> f64 {
    let embed = c.vocab_size * c.hidden_size;
    let n = params.saturating_sub(embed);
    6.0 * n as f64 + 12.0 * (c.num_hidden_layers * c.hidden_size * seq_len) as f64
}

/// Packs `windows` (each `seq_len + 1` tokens) into a batch with next-token targets.
fn pack(windows: &[Vec<u32>], seq_len: usize) -> (Batch, Vec<u32>, Vec<bool>) {
    let mut batch = Batch::default();
    let mut targets = Vec::with_capacity(windows.len() * seq_len);
    for w in windows {
        batch.push(&w[..seq_len], 0);
        targets.extend_from_slice(&w[1..=seq_len]);
    }
    let mask = vec![true; targets.len()];
    (batch, targets, mask)
}

/// The losses of one micro-batch: (total to differentiate, cross-entropy, aux, z, expert shares).
struct MicroLoss {
    total: Tensor,
    ce: f64,
    aux: Option<f64>,
    z: Option<f64>,
    load: Option<Vec<f64>>,
}

fn micro_loss(model: &Model, cfg: &TrainConfig, windows: &[Vec<u32>]) -> Result<MicroLoss> {
    let (batch, targets, mask) = pack(windows, cfg.seq_len);
    let out = model.forward(&batch, &mut NoCache, Logits::All)?;
    let (ce, _) = cross_entropy(&out.logits, &targets, &mask)?;
    let ce_value = f64::from(ce.to_scalar::<f32>()?);
    let Some(moe) = model.config().moe else {
        return Ok(MicroLoss {
            total: ce,
            ce: ce_value,
            aux: None,
            z: None,
            load: None,
        });
    };
    let (aux, load) = load_balancing_loss(&out.router_logits, moe.num_experts, moe.top_k)?;
    let coef = cfg.moe.aux_loss_coef.unwrap_or(moe.router_aux_loss_coef);
    let aux_value = f64::from(aux.to_scalar::<f32>()?);
    let mut total = (ce + (aux * coef)?)?;
    let mut z_value = None;
    if cfg.moe.z_loss_coef > 0.0 {
        let all = Tensor::cat(&out.router_logits, 0)?.to_dtype(DType::F32)?;
        let lse = all.exp()?.sum(1)?.log()?;
        let z = lse.sqr()?.mean_all()?;
        z_value = Some(f64::from(z.to_scalar::<f32>()?));
        total = (total + (z * cfg.moe.z_loss_coef)?)?;
    }
    Ok(MicroLoss {
        total,
        ce: ce_value,
        aux: Some(aux_value),
        z: z_value,
        load: Some(load),
    })
}

/// Mean validation loss over `batches` micro-batches of the validation split (the same windows
/// every time).
fn validate(model: &Model, cfg: &TrainConfig, val: &ShardSet) -> Result<Option<f64>> {
    let Ok(mut sampler) = Sampler::new(val, cfg.seq_len, 0) else {
        return Ok(None); // too little validation data for one window
    };
    let batches = cfg
        .eval_batches
        .min(sampler.windows_per_epoch().div_ceil(cfg.micro_batch));
    let mut total = 0.0;
    let mut w = Vec::new();
    for _ in 0..batches {
        let mut windows = Vec::with_capacity(cfg.micro_batch);
        for _ in 0..cfg.micro_batch {
            sampler.next_window(&mut w);
            windows.push(w.clone());
        }
        let (batch, targets, mask) = pack(&windows, cfg.seq_len);
        let out = model.forward(&batch, &mut NoCache, Logits::All)?;
        let (ce, _) = cross_entropy(&out.logits.detach(), &targets, &mask)?;
        total += f64::from(ce.to_scalar::<f32>()?);
    }
    Ok((batches > 0).then(|| total / batches as f64))
}

/// Runs (or, with `resume`, continues) the pretraining run of `cfg`. Stops early, writing a
/// checkpoint, once `stop` is set.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    stop: &AtomicBool,
    comm: &dyn Collective,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    cfg.validate()?;
    let ckpt_root = cfg.out.join("checkpoints");
    let metrics_path = cfg.out.join("metrics.jsonl");
    let existing = checkpoint::list(&ckpt_root)?;
    if !resume && (!existing.is_empty() || metrics_path.exists()) {
        return Err(Error::Invalid(format!(
            "{} already holds a run; pass --resume to continue it, or choose another out",
            cfg.out.display()
        )));
    }
    let train_set = ShardSet::open(&cfg.data, &cfg.split).map_err(|e| {
        Error::Invalid(format!(
            "training shards {}/{}-*.bin: {e}",
            cfg.data.display(),
            cfg.split
        ))
    })?;
    let val_set = ShardSet::open(&cfg.data, &cfg.val_split).ok();

    // the model and optimizer: fresh, or from the newest complete checkpoint
    let resumed = if resume {
        existing.last().cloned()
    } else {
        None
    };
    let model_dir = match &resumed {
        Some((_, dir)) => dir.join("model"),
        None => cfg.model.clone(),
    };
    let (model, params) = Params::load(&model_dir)?;
    if cfg.recompute && model.config().moe.is_some() {
        return Err(Error::Invalid(
            "recompute is for dense models; train an MoE model without it".into(),
        ));
    }
    let vocab = model.config().vocab_size;
    let sizes: Vec<(String, usize)> = params
        .iter()
        .map(|(n, v)| (n.to_string(), v.elem_count()))
        .collect();
    let (mut opt, mut sampler, start) = match &resumed {
        Some((_, dir)) => {
            let loaded = checkpoint::load::<State>(dir, comm.rank(), &params, cfg.adamw)?;
            let s = &loaded.state;
            if (s.world, s.micro_batch, s.accumulation)
                != (comm.world(), cfg.micro_batch, cfg.accumulation)
            {
                return Err(Error::Invalid(format!(
                    "{} was written by {} process(es) × micro_batch {} × accumulation {}; this run has {} × {} × {}",
                    dir.display(),
                    s.world,
                    s.micro_batch,
                    s.accumulation,
                    comm.world(),
                    cfg.micro_batch,
                    cfg.accumulation
                )));
            }
            let sampler = Sampler::restore(&train_set, s.sampler)
                .map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
            (loaded.optimizer, sampler, s.step)
        }
        None => (
            AdamW::new(cfg.adamw, &sizes),
            Sampler::new(&train_set, cfg.seq_len, cfg.seed)
                .map_err(|e| Error::Invalid(format!("training shards: {e}")))?,
            0,
        ),
    };
    if sampler.state().seq_len != cfg.seq_len {
        return Err(Error::Invalid(format!(
            "the checkpoint was trained with seq_len {}, the config says {}",
            sampler.state().seq_len,
            cfg.seq_len
        )));
    }
    if comm.rank() == 0 {
        fs_err::create_dir_all(&cfg.out)?;
        fs_err::write(
            cfg.out.join("config.json"),
            serde_json::to_vec_pretty(cfg).unwrap_or_default(),
        )?;
    }
    // the metrics log: on resume, drop lines past the checkpoint (steps that will run again)
    let mut metrics = if comm.rank() == 0 {
        let kept: Vec<String> = if resume && metrics_path.exists() {
            fs_err::read_to_string(&metrics_path)?
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= start)
                })
                .map(str::to_string)
                .collect()
        } else {
            Vec::new()
        };
        let mut f = fs_err::File::create(&metrics_path)?;
        for l in kept {
            writeln!(f, "{l}")?;
        }
        Some(f)
    } else {
        None
    };

    let peak = matmul_peak()?;
    let per_token = flops_per_token(&model, &params, cfg.seq_len);
    let world = comm.world();
    let per_step_windows = cfg.micro_batch * cfg.accumulation * world;
    let scale = 1.0 / (cfg.accumulation * world) as f32;
    let started = Instant::now();
    let mut grads = Grads::default();
    let mut window = Vec::new();
    let mut last_loss = f64::NAN;
    let mut last_val = None;
    observer.start(start, cfg.steps);
    let mut step = start;
    // process 0 writes the shared part, every process its own state, process 0 completes it
    let save =
        |step: u64, opt: &AdamW, sampler: &Sampler, observer: &mut dyn Observer| -> Result<()> {
            let state = State {
                step,
                sampler: sampler.state(),
                world,
                micro_batch: cfg.micro_batch,
                accumulation: cfg.accumulation,
            };
            let tmp = checkpoint::dir_of(&ckpt_root, step).with_extension("partial");
            comm.barrier();
            if comm.rank() == 0 {
                let weights =
                    |d: &Path| checkpoint::write_model(&params, &cfg.model, &d.join("model"));
                checkpoint::stage(&ckpt_root, step, &weights, opt, &state)?;
            }
            comm.barrier();
            checkpoint::write_rank(&tmp, comm.rank(), &state)?;
            comm.barrier();
            if comm.rank() == 0 {
                let dir = checkpoint::commit(&ckpt_root, &tmp, step, cfg.keep_checkpoints)?;
                observer.checkpoint(&dir);
            }
            comm.barrier();
            Ok(())
        };
    while step < cfg.steps {
        // every process stops at the same step, whichever got the signal
        let stopping = comm.sum_f64(f64::from(u8::from(stop.load(Ordering::SeqCst))))? > 0.0;
        if stopping {
            save(step, &opt, &sampler, observer)?;
            return Ok(Outcome {
                step,
                interrupted: true,
                final_model: None,
                val_loss: last_val,
                loss: last_loss,
            });
        }
        let t0 = Instant::now();
        grads.clear();
        // every process draws the step's windows in the same order and keeps its own share
        let mut all: Vec<Vec<u32>> = Vec::with_capacity(per_step_windows);
        for _ in 0..per_step_windows {
            sampler.next_window(&mut window);
            if let Some(&t) = window.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::Invalid(format!(
                    "token id {t} in the shards is outside the model's vocabulary of {vocab}: the model and the shards were made with different tokenizers"
                )));
            }
            all.push(window.clone());
        }
        let (mut ce_sum, mut aux_sum, mut z_sum) = (0.0, 0.0, 0.0);
        let mut load_sum: Option<Vec<f64>> = None;
        for a in 0..cfg.accumulation {
            let first = (a * world + comm.rank()) * cfg.micro_batch;
            let mine = &all[first..first + cfg.micro_batch];
            let l = if cfg.recompute {
                let (batch, targets, mask) = pack(mine, cfg.seq_len);
                let weights = row_weights(&mask)?;
                let ce = model.backward_checkpointed(
                    &batch,
                    &LoraBatch::none(),
                    &mut |logits, rows| {
                        weighted_cross_entropy(logits, &targets[rows.clone()], &weights[rows])
                    },
                    &mut |store| grads.accumulate(&params, store, scale),
                )?;
                MicroLoss {
                    ce,
                    total: Tensor::new(ce as f32, &candle_core::Device::Cpu)?,
                    aux: None,
                    z: None,
                    load: None,
                }
            } else {
                let l = micro_loss(&model, cfg, mine)?;
                let store = l.total.backward()?;
                grads.accumulate(&params, &store, scale)?;
                l
            };
            ce_sum += l.ce;
            aux_sum += l.aux.unwrap_or(0.0);
            z_sum += l.z.unwrap_or(0.0);
            if let Some(load) = l.load {
                let acc = load_sum.get_or_insert_with(|| vec![0.0; load.len()]);
                for (x, y) in acc.iter_mut().zip(load) {
                    *x += y;
                }
            }
        }
        for (_, g) in grads.iter_mut() {
            comm.all_reduce_sum(g)?;
        }
        let micro = (cfg.accumulation * world) as f64;
        let loss = comm.sum_f64(ce_sum)? / micro;
        let grad_norm = if cfg.clip > 0.0 {
            grads.clip(cfg.clip)
        } else {
            grads.norm()
        };
        let lr = learning_rate(step, cfg.lr, cfg.min_lr(), cfg.warmup(), cfg.steps);
        opt.update(&params, &grads, lr)?;
        step += 1;
        last_loss = loss;
        let val_loss = match &val_set {
            Some(v) if step == cfg.steps || (cfg.eval_every > 0 && step % cfg.eval_every == 0) => {
                validate(&model, cfg, v)?
            }
            _ => None,
        };
        if val_loss.is_some() {
            last_val = val_loss;
        }
        let secs = t0.elapsed().as_secs_f64();
        let tokens = (per_step_windows * cfg.seq_len) as f64;
        let moe = model.config().moe.is_some();
        let m = StepMetrics {
            step,
            loss,
            aux_loss: moe.then_some(aux_sum / cfg.accumulation as f64),
            z_loss: (moe && cfg.moe.z_loss_coef > 0.0).then_some(z_sum / cfg.accumulation as f64),
            expert_load: load_sum.map(|l| l.iter().map(|x| x / cfg.accumulation as f64).collect()),
            dropped_tokens: moe.then_some(0),
            lr,
            grad_norm,
            tokens_per_s: tokens / secs,
            mfu: tokens * per_token / secs / (peak * world as f64),
            val_loss,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        if let Some(f) = metrics.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&m).unwrap_or_default())?;
            f.flush()?;
        }
        observer.step(&m);
        if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 && step < cfg.steps {
            save(step, &opt, &sampler, observer)?;
        }
    }
    save(step, &opt, &sampler, observer)?;
    let final_dir = cfg.out.join("final");
    if comm.rank() == 0 {
        let tmp = cfg.out.join("final.partial");
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        checkpoint::write_model(&params, &cfg.model, &tmp)?;
        if final_dir.exists() {
            fs_err::remove_dir_all(&final_dir)?;
        }
        fs_err::rename(&tmp, &final_dir)?;
    }
    Ok(Outcome {
        step,
        interrupted: false,
        final_model: Some(final_dir),
        val_loss: last_val,
        loss: last_loss,
    })
}

/// The unigram entropy of the training split (nats per token): the loss of a model that knows
/// only token frequencies, the bar a trained model must clear.
pub fn unigram_entropy(data: &Path, split: &str) -> Result<f64> {
    let set = ShardSet::open(data, split).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut counts = std::collections::HashMap::<u32, u64>::new();
    let mut buf = Vec::new();
    let n = set.num_tokens();
    let mut pos = 0;
    while pos < n {
        let end = (pos + (1 << 20)).min(n);
        set.read(pos, end, &mut buf);
        for &t in &buf {
            *counts.entry(t).or_default() += 1;
        }
        buf.clear();
        pos = end;
    }
    let total = n as f64;
    Ok(counts
        .values()
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum())
}
