//! The pretraining loop: token windows from shards, forward and backward over packed
//! micro-batches, gradient accumulation, clipping, AdamW on the schedule, validation, metrics,
//! checkpoints, and exact resumption.

pub mod config;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fount_data::shard::{Sampler, ShardSet};
use fount_model::publish::Staged;
use fount_model::{Batch, Logits, LoraBatch, Model, NoCache};
use serde::Serialize;

use crate::checkpoint::{self, State};
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, load_balancing_loss, row_weights, weighted_cross_entropy};
use crate::optim::{learning_rate, AdamW, Grads};
use crate::params::Params;

use config::TrainConfig;

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
///
/// The phases: `open_run` (shards, model, optimizer and data position, fresh or from the newest
/// checkpoint), the metrics log, then per step `Stepper::step` (forward and backward over every
/// micro-batch, the all-reduce, clipping and the AdamW update, validation), its metrics, and
/// checkpoints; last the final model, published whole.
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
        return Err(Error::Exists {
            dir: cfg.out.clone(),
            what: "a run; pass --resume to continue it, or choose another out",
        });
    }
    let train_set = ShardSet::open(&cfg.data, &cfg.split).map_err(|e| Error::Input {
        path: cfg.data.join(format!("{}-*.bin", cfg.split)),
        reason: format!("training shards: {e}"),
    })?;
    let val_set = ShardSet::open(&cfg.data, &cfg.val_split).ok();
    let resumed = if resume {
        existing.last().cloned()
    } else {
        None
    };
    let Run {
        model,
        params,
        mut opt,
        mut sampler,
        start,
    } = open_run(
        cfg,
        comm,
        &train_set,
        resumed.as_ref().map(|(_, d)| d.as_path()),
    )?;
    if comm.rank() == 0 {
        fs_err::create_dir_all(&cfg.out)?;
        fs_err::write(
            cfg.out.join("config.json"),
            serde_json::to_vec_pretty(cfg).unwrap_or_default(),
        )?;
    }
    let mut metrics = if comm.rank() == 0 {
        Some(open_metrics_log(&metrics_path, resume, start)?)
    } else {
        None
    };

    let world = comm.world();
    let stepper = Stepper {
        cfg,
        comm,
        model: &model,
        params: &params,
        val_set: val_set.as_ref(),
        peak: matmul_peak()?,
        per_token: flops_per_token(&model, &params, cfg.seq_len),
        started: Instant::now(),
    };
    let mut grads = Grads::default();
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
        let m = stepper.step(step, &mut sampler, &mut opt, &mut grads)?;
        step = m.step;
        last_loss = m.loss;
        if m.val_loss.is_some() {
            last_val = m.val_loss;
        }
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
        let staged = Staged::begin(&final_dir)?;
        checkpoint::write_model(&params, &cfg.model, staged.path())?;
        if final_dir.exists() {
            fs_err::remove_dir_all(&final_dir)?;
        }
        staged.commit(None)?;
    }
    Ok(Outcome {
        step,
        interrupted: false,
        final_model: Some(final_dir),
        val_loss: last_val,
        loss: last_loss,
    })
}

/// What every step of a run reads: its settings, the processes, the model, and the measures
/// its metrics are relative to.
struct Stepper<'a> {
    cfg: &'a TrainConfig,
    comm: &'a dyn Collective,
    model: &'a Model,
    params: &'a Params,
    val_set: Option<&'a ShardSet>,
    /// The machine's matmul peak (FLOP/s, one process).
    peak: f64,
    /// Training FLOPs per token.
    per_token: f64,
    /// When the run (or its resumption) started.
    started: Instant,
}

impl Stepper<'_> {
    /// Optimizer step `step + 1`: the step's windows drawn (every process draws all of them in
    /// the same order and keeps its share), forward and backward over them, the all-reduce,
    /// clipping and the AdamW update, validation on the steps that measure it; its metrics.
    fn step(
        &self,
        step: u64,
        sampler: &mut Sampler,
        opt: &mut AdamW,
        grads: &mut Grads,
    ) -> Result<StepMetrics> {
        let (cfg, comm) = (self.cfg, self.comm);
        let world = comm.world();
        let per_step_windows = cfg.micro_batch * cfg.accumulation * world;
        let vocab = self.model.config().vocab_size;
        let t0 = Instant::now();
        grads.clear();
        let mut all: Vec<Vec<u32>> = Vec::with_capacity(per_step_windows);
        let mut window = Vec::new();
        for _ in 0..per_step_windows {
            sampler.next_window(&mut window);
            if let Some(&t) = window.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::Input {
                    path: cfg.data.clone(),
                    reason: format!("token id {t} in the shards is outside the model's vocabulary of {vocab}: the model and the shards were made with different tokenizers"),
                });
            }
            all.push(window.clone());
        }
        let losses = forward_backward(self.model, self.params, cfg, comm, &all, grads)?;
        for (_, g) in grads.iter_mut() {
            comm.all_reduce_sum(g)?;
        }
        let micro = (cfg.accumulation * world) as f64;
        let loss = comm.sum_f64(losses.ce)? / micro;
        let grad_norm = if cfg.clip > 0.0 {
            grads.clip(cfg.clip)
        } else {
            grads.norm()
        };
        let lr = learning_rate(step, cfg.lr, cfg.min_lr(), cfg.warmup(), cfg.steps);
        opt.update(self.params, grads, lr)?;
        let step = step + 1;
        let val_loss = match self.val_set {
            Some(v)
                if step == cfg.steps
                    || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) =>
            {
                validate(self.model, cfg, v)?
            }
            _ => None,
        };
        let secs = t0.elapsed().as_secs_f64();
        let tokens = (per_step_windows * cfg.seq_len) as f64;
        let moe = self.model.config().moe.is_some();
        let acc = cfg.accumulation as f64;
        Ok(StepMetrics {
            step,
            loss,
            aux_loss: moe.then_some(losses.aux / acc),
            z_loss: (moe && cfg.moe.z_loss_coef > 0.0).then_some(losses.z / acc),
            expert_load: losses.load.map(|l| l.iter().map(|x| x / acc).collect()),
            dropped_tokens: moe.then_some(0),
            lr,
            grad_norm,
            tokens_per_s: tokens / secs,
            mfu: tokens * self.per_token / secs / (self.peak * world as f64),
            val_loss,
            elapsed_s: self.started.elapsed().as_secs_f64(),
        })
    }
}

/// What a run starts from: the model, its parameters, the optimizer and the data position.
struct Run<'a> {
    model: Model,
    params: Params,
    opt: AdamW,
    sampler: Sampler<'a>,
    start: u64,
}

/// Opens the run's model, optimizer and data position: fresh from `cfg.model`, or from the
/// checkpoint `resumed` (which must have been written with the same processes and batch shape).
fn open_run<'a>(
    cfg: &TrainConfig,
    comm: &dyn Collective,
    train_set: &'a ShardSet,
    resumed: Option<&Path>,
) -> Result<Run<'a>> {
    let model_dir = match resumed {
        Some(dir) => dir.join("model"),
        None => cfg.model.clone(),
    };
    let (model, params) = Params::load(&model_dir)?;
    if cfg.recompute && model.config().moe.is_some() {
        return Err(Error::Config {
            field: "recompute",
            reason: "is for dense models; train an MoE model without it".into(),
        });
    }
    let sizes: Vec<(String, usize)> = params
        .iter()
        .map(|(n, v)| (n.to_string(), v.elem_count()))
        .collect();
    let (opt, sampler, start) = match resumed {
        Some(dir) => {
            let loaded = checkpoint::load::<State>(dir, comm.rank(), &params, cfg.adamw)?;
            let s = &loaded.state;
            if (s.world, s.micro_batch, s.accumulation)
                != (comm.world(), cfg.micro_batch, cfg.accumulation)
            {
                return Err(Error::Resume {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "was written by {} process(es) × micro_batch {} × accumulation {}; this run has {} × {} × {}",
                        s.world,
                        s.micro_batch,
                        s.accumulation,
                        comm.world(),
                        cfg.micro_batch,
                        cfg.accumulation
                    ),
                });
            }
            let sampler = Sampler::restore(train_set, s.sampler).map_err(|e| Error::Resume {
                dir: dir.to_path_buf(),
                reason: format!("does not fit the training shards: {e}"),
            })?;
            (loaded.optimizer, sampler, s.step)
        }
        None => (
            AdamW::new(cfg.adamw, &sizes),
            Sampler::new(train_set, cfg.seq_len, cfg.seed).map_err(|e| Error::Input {
                path: cfg.data.clone(),
                reason: format!("training shards: {e}"),
            })?,
            0,
        ),
    };
    if sampler.state().seq_len != cfg.seq_len {
        return Err(Error::Config {
            field: "seq_len",
            reason: format!(
                "is {}, but the checkpoint was trained with {}",
                cfg.seq_len,
                sampler.state().seq_len
            ),
        });
    }
    Ok(Run {
        model,
        params,
        opt,
        sampler,
        start,
    })
}

/// The metrics log, opened for appending; on resume the lines past the checkpoint's step `start`
/// are dropped (those steps run again).
fn open_metrics_log(path: &Path, resume: bool, start: u64) -> Result<fs_err::File> {
    let kept: Vec<String> = if resume && path.exists() {
        fs_err::read_to_string(path)?
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
    let mut f = fs_err::File::create(path)?;
    for l in kept {
        writeln!(f, "{l}")?;
    }
    Ok(f)
}

/// The losses of one step on this process, summed over its micro-batches.
struct StepLosses {
    ce: f64,
    aux: f64,
    z: f64,
    load: Option<Vec<f64>>,
}

/// Forward and backward over this process's share of the step's windows `all`, one micro-batch
/// at a time, accumulating into `grads` (each scaled by one over the micro-batches of all
/// processes).
fn forward_backward(
    model: &Model,
    params: &Params,
    cfg: &TrainConfig,
    comm: &dyn Collective,
    all: &[Vec<u32>],
    grads: &mut Grads,
) -> Result<StepLosses> {
    let world = comm.world();
    let scale = 1.0 / (cfg.accumulation * world) as f32;
    let mut sums = StepLosses {
        ce: 0.0,
        aux: 0.0,
        z: 0.0,
        load: None,
    };
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
                &mut |store| grads.accumulate(params, store, scale),
            )?;
            MicroLoss {
                ce,
                total: Tensor::new(ce as f32, &candle_core::Device::Cpu)?,
                aux: None,
                z: None,
                load: None,
            }
        } else {
            let l = micro_loss(model, cfg, mine)?;
            let store = l.total.backward()?;
            grads.accumulate(params, &store, scale)?;
            l
        };
        sums.ce += l.ce;
        sums.aux += l.aux.unwrap_or(0.0);
        sums.z += l.z.unwrap_or(0.0);
        if let Some(load) = l.load {
            let acc = sums.load.get_or_insert_with(|| vec![0.0; load.len()]);
            for (x, y) in acc.iter_mut().zip(load) {
                *x += y;
            }
        }
    }
    Ok(sums)
}

/// The unigram entropy of the training split (nats per token): the loss of a model that knows
/// only token frequencies, the bar a trained model must clear.
pub fn unigram_entropy(data: &Path, split: &str) -> Result<f64> {
    let set = ShardSet::open(data, split).map_err(|e| Error::Input {
        path: data.to_path_buf(),
        reason: e.to_string(),
    })?;
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
