//! `fount bench train`: training steps (forward, backward, clipping, AdamW) of full training and
//! of LoRA fine-tuning, tokens/s, MFU and peak memory, beside PyTorch (HF transformers and PEFT)
//! on the same model, batch and threads. Each measurement runs in a process of its own so that
//! its peak memory is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use fount_model::{Batch, LoraBatch, Model};
use fount_train::finetune::{FinetuneConfig, LoraParams, TargetModules};
use fount_train::loss::backward_cross_entropy;
use fount_train::optim::{AdamW, AdamWConfig, Grads};
use fount_train::Params;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Arguments of `fount bench train`.
#[derive(Debug, Args)]
pub struct TrainBench {
    /// Model directory; by default a random model of --arch/--preset is written to
    /// `target/fount-bench/` and reused.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Architecture of the generated model.
    #[arg(long, default_value = "llama")]
    pub arch: String,
    /// Preset of the generated model.
    #[arg(long, default_value = "llama-30m")]
    pub preset: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// LoRA rank (on every linear projection, alpha = 2r).
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// Recompute activations in the backward pass (gradient checkpointing), on both sides.
    #[arg(long)]
    pub recompute: bool,
    /// Reference to measure beside fount: `torch` or `none`.
    #[arg(long, default_value = "torch")]
    pub reference: String,
    /// The reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/bench/torch_train.py"))]
    pub reference_script: PathBuf,
    /// Runs one measurement (`--mode`) in this process and prints it as JSON.
    #[arg(long, hide = true)]
    pub child: bool,
    /// What the child measures: `full` or `lora`.
    #[arg(long, hide = true, default_value = "full")]
    pub mode: String,
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Figures {
    tokens_per_s: f64,
    peak_mb: f64,
}

impl Figures {
    fn parse(text: &str, who: &str) -> Result<Figures> {
        let line = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("{who} printed no result:\n{text}"))?;
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{who} printed {line:?}"))?;
        Ok(Figures {
            tokens_per_s: v["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            peak_mb: v["peak_mb"].as_f64().unwrap_or(f64::NAN),
        })
    }
}

/// Runs `fount bench train`.
pub fn bench_train(a: TrainBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dir = super::bench::bench_model(a.model.as_deref(), &a.arch, &a.preset)?;
    if a.child {
        return child(&dir, &a.mode, &a);
    }
    let model = Model::load(&dir, DType::F32, &Device::Cpu)?;
    let cfg = model.config().clone();
    let params_count = cfg.num_parameters();
    let peak = fount_train::pretrain::matmul_peak()?;
    drop(model);
    eprintln!(
        "model: {} ({} parameters), batch {} × {} tokens, {threads} threads, matmul peak {:.1} GFLOP/s",
        dir.display(),
        super::model::human_count(params_count),
        a.batch,
        a.seq_len,
        peak / 1e9
    );
    // the settings both sides are measured with
    let shared = |mode: &str| -> Vec<String> {
        [
            "--model".to_string(),
            dir.display().to_string(),
            "--batch".into(),
            a.batch.to_string(),
            "--seq-len".into(),
            a.seq_len.to_string(),
            "--steps".into(),
            a.steps.to_string(),
            "--lora-r".into(),
            a.lora_r.to_string(),
            "--mode".into(),
            mode.into(),
        ]
        .into_iter()
        .chain(a.recompute.then(|| "--recompute".to_string()))
        .collect::<Vec<_>>()
    };
    let measure = |mut cmd: Command, who: &str| -> Result<String> {
        let out = cmd.output().with_context(|| format!("running {who}"))?;
        if !out.status.success() {
            bail!("{who} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let ours = |mode: &str| -> Result<Figures> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "--threads",
            &threads.to_string(),
            "bench",
            "train",
            "--child",
        ])
        .args(shared(mode));
        Figures::parse(&measure(cmd, "fount")?, "fount")
    };
    let theirs = |mode: &str| -> Result<(String, Figures)> {
        let mut cmd = Command::new("python3");
        cmd.arg(&a.reference_script)
            .args(shared(mode))
            .args(["--threads", &threads.to_string()]);
        let text = measure(
            cmd,
            "python3 (the reference needs torch, transformers and peft)",
        )?;
        let v: serde_json::Value = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        Ok((
            v["engine"].as_str().unwrap_or("PyTorch").to_string(),
            Figures::parse(&text, "the reference")?,
        ))
    };
    let flops = fount_train::pretrain::flops_per_token_of(&cfg, params_count, a.seq_len);
    let mfu = |f: &Figures| 100.0 * f.tokens_per_s * flops / peak;
    let (full, lora) = (ours("full")?, ours("lora")?);
    println!("| engine | full training tok/s | MFU | peak MB | LoRA tok/s | LoRA peak MB | LoRA / full memory |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, full: &Figures, lora: &Figures| {
        println!(
            "| {name} | {:.0} | {:.1}% | {:.0} | {:.0} | {:.0} | {:.2}× |",
            full.tokens_per_s,
            mfu(full),
            full.peak_mb,
            lora.tokens_per_s,
            lora.peak_mb,
            lora.peak_mb / full.peak_mb
        );
    };
    row("fount", &full, &lora);
    match a.reference.as_str() {
        "none" => {}
        "torch" => {
            let (name, tfull) = theirs("full")?;
            let (_, tlora) = theirs("lora")?;
            row(&name, &tfull, &tlora);
            println!(
                "| **fount / reference** | **{:.2}×** | | {:.2}× | **{:.2}×** | {:.2}× | |",
                full.tokens_per_s / tfull.tokens_per_s,
                full.peak_mb / tfull.peak_mb,
                lora.tokens_per_s / tlora.tokens_per_s,
                lora.peak_mb / tlora.peak_mb
            );
        }
        other => bail!("unknown --reference {other:?} (torch, none)"),
    }
    Ok(())
}

/// One measurement in this process: a warm-up step, then `steps` timed ones.
fn child(dir: &Path, mode: &str, a: &TrainBench) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut batch = Batch::default();
    let mut targets = Vec::new();
    let vocab = fount_model::ModelFiles::open(dir)?.config()?.vocab_size as u32;
    for _ in 0..a.batch {
        let w: Vec<u32> = (0..=a.seq_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        batch.push(&w[..a.seq_len], 0);
        targets.extend_from_slice(&w[1..]);
    }
    let mask = vec![true; targets.len()];
    let recompute = a.recompute;
    let mut grads = Grads::default();
    let mut step: Box<dyn FnMut() -> Result<()>> = match mode {
        "full" => {
            let (model, params) = Params::load(dir)?;
            let sizes: Vec<(String, usize)> = params
                .iter()
                .map(|(n, v)| (n.to_string(), v.elem_count()))
                .collect();
            let mut opt = AdamW::new(AdamWConfig::default(), &sizes);
            Box::new(move || {
                grads.clear();
                backward_cross_entropy(
                    &model,
                    &batch,
                    &LoraBatch::none(),
                    &targets,
                    &mask,
                    recompute,
                    false,
                    &mut |store| grads.accumulate(&params, store, 1.0),
                )?;
                grads.clip(1.0);
                opt.update(&params, &grads, 1e-4)?;
                Ok(())
            })
        }
        "lora" => {
            let model = Model::load(dir, DType::F32, &Device::Cpu)?;
            let ft = FinetuneConfig {
                r: a.lora_r,
                lora_alpha: 2.0 * a.lora_r as f64,
                target_modules: TargetModules::all_linear(),
                ..FinetuneConfig::default()
            };
            let lora = LoraParams::init(model.config(), &ft)?;
            let adapter = lora.adapter()?;
            let sizes: Vec<(String, usize)> = lora
                .params
                .iter()
                .map(|(n, v)| (n.to_string(), v.elem_count()))
                .collect();
            let mut opt = AdamW::new(ft.adamw, &sizes);
            Box::new(move || {
                let mut lb = LoraBatch::none();
                lb.push(0..batch.len(), adapter.clone());
                grads.clear();
                backward_cross_entropy(
                    &model,
                    &batch,
                    &lb,
                    &targets,
                    &mask,
                    recompute,
                    false,
                    &mut |store| grads.accumulate(&lora.params, store, 1.0),
                )?;
                grads.clip(1.0);
                opt.update(&lora.params, &grads, 1e-4)?;
                Ok(())
            })
        }
        other => bail!("unknown mode {other:?} (full, lora)"),
    };
    step()?;
    let t = Instant::now();
    for _ in 0..a.steps {
        step()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let tokens = (a.batch * a.seq_len * a.steps) as f64;
    println!(
        "{}",
        json!({
            "tokens_per_s": tokens / secs,
            "peak_mb": super::data::peak_memory_mb().unwrap_or(f64::NAN),
        })
    );
    Ok(())
}
