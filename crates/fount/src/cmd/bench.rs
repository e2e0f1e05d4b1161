//! `fount bench …`: end-to-end speed figures, each beside a reference measured in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::sampling::argmax;
use fount_model::{Arch, Batch, KvCache, Logits, Model};
use rand::{Rng, SeedableRng};

/// `fount bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and batch-1 decode speed of one model.
    Generate(GenerateBench),
    /// The data pipeline (filters, MinHash, whole run) beside datatrove.
    Data(super::bench_data::DataBench),
    /// The inference engine: streams, adapters, cold adapter loads.
    Engine(super::bench_engine::EngineBench),
    /// `fount serve` against the engine called in-process (HTTP overhead).
    Serve(super::bench_serve::ServeBench),
    /// API keys, quotas and metering on against off, and the HTTP layer over a minimal model.
    Tenancy(super::bench_tenancy::TenancyBench),
    /// Several replicas on one PostgreSQL: requests/s with 1, 2 and 3 against one on SQLite,
    /// the quota error, registry propagation, and the store's own rates.
    Replicas(super::bench_replicas::ReplicasBench),
    /// What moderation costs: a policy's rules on streams (tokens/s, time to first token), the
    /// moderation endpoint, a guard model's share of a request.
    Safety(super::bench_safety::SafetyBench),
    /// Training steps, full and LoRA: tokens/s, MFU and peak memory beside PyTorch.
    Train(super::bench_train::TrainBench),
    /// The compute pool: scheduling decisions, submit to start, job overhead, preemption.
    Pool(super::bench_pool::PoolBench),
    /// The Fine-tuning API: from `succeeded` to the first answer, a job against a direct run,
    /// every tenant's `ft:` model in one batch against the base.
    Finetuning(super::bench_finetuning::FinetuningBench),
    /// The ledger: batched appends against plain inserts, proofs at a million entries, the
    /// hourly usage commitment.
    Ledger(super::bench_ledger::LedgerBench),
}

/// Arguments of `fount bench generate`.
#[derive(Debug, Args)]
pub struct GenerateBench {
    /// Model directory; by default a random model of --arch/--preset is written to
    /// `target/fount-bench/` and reused.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Architecture of the generated model.
    #[arg(long, default_value = "qwen2")]
    pub arch: String,
    /// Preset of the generated model.
    #[arg(long, default_value = "qwen2.5-0.5b")]
    pub preset: String,
    /// Prompt length.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Compute dtype.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Measure a GGUF file of this type (f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k),
    /// written from the model by `fount quantize` into `target/fount-bench/` once, beside
    /// llama.cpp on the same file.
    #[arg(long)]
    pub quant: Option<String>,
    /// Reference to measure beside fount: `torch` (HF transformers), `llama.cpp`
    /// (llama-cpp-python on the GGUF file; the default with --quant) or `none`.
    #[arg(long)]
    pub reference: Option<String>,
    /// The reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/bench/hf_generate.py"))]
    pub reference_script: PathBuf,
}

/// Runs a `fount bench` subcommand.
pub fn run(cmd: BenchCommand, threads: Option<usize>) -> Result<()> {
    match cmd {
        BenchCommand::Generate(a) => bench_generate(a, threads),
        BenchCommand::Data(a) => super::bench_data::bench_data(a, threads),
        BenchCommand::Engine(a) => super::bench_engine::bench_engine(a, threads),
        BenchCommand::Serve(a) => super::bench_serve::bench_serve(a, threads),
        BenchCommand::Tenancy(a) => super::bench_tenancy::bench_tenancy(a, threads),
        BenchCommand::Replicas(a) => super::bench_replicas::bench_replicas(a, threads),
        BenchCommand::Safety(a) => super::bench_safety::bench_safety(a, threads),
        BenchCommand::Train(a) => super::bench_train::bench_train(a, threads),
        BenchCommand::Pool(a) => super::bench_pool::bench_pool(a, threads),
        BenchCommand::Finetuning(a) => super::bench_finetuning::bench_finetuning(a, threads),
        BenchCommand::Ledger(a) => super::bench_ledger::run(a),
    }
}

/// The model to measure: `model` when given, else a random model of `arch`/`preset` written to
/// `target/fount-bench/` once and reused.
pub fn bench_model(model: Option<&Path>, arch: &str, preset_name: &str) -> Result<PathBuf> {
    if let Some(d) = model {
        return Ok(d.to_path_buf());
    }
    let a = Arch::from_short(arch).with_context(|| format!("unknown --arch {arch}"))?;
    let d = PathBuf::from("target/fount-bench").join(format!("{arch}-{preset_name}"));
    if !d.join("model.safetensors").exists() {
        eprintln!(
            "writing a random {arch} {preset_name} model to {} …",
            d.display()
        );
        init_model(a, &preset(a, preset_name)?, &InitOptions::default(), &d)?;
    }
    Ok(d)
}

struct Speed {
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

/// Resident memory of this process, bytes (`VmRSS`).
pub fn resident_bytes() -> u64 {
    fs_err::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The bench model `dir` written as a GGUF file of type `t` beside it (once, by `fount quantize`
/// in a child process, so the measuring process's resident memory is the model's alone).
pub(crate) fn quantised(dir: &Path, t: &str) -> Result<PathBuf> {
    // checked here, before a child process is started for it
    fount_model::quantize::QuantType::parse(t).with_context(|| {
        format!(
            "unknown --quant {t:?} ({})",
            fount_model::quantize::QuantType::NAMES
        )
    })?;
    let file = PathBuf::from(format!("{}.{t}.gguf", dir.display()));
    if !file.exists() {
        eprintln!("writing {} …", file.display());
        let status = Command::new(std::env::current_exe()?)
            .args(["quantize", "--model", &dir.display().to_string()])
            .args(["--out", &file.display().to_string(), "--type", t])
            .status()?;
        if !status.success() {
            bail!("fount quantize failed for {}", file.display());
        }
    }
    Ok(file)
}

fn bench_generate(a: GenerateBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dir = bench_model(a.model.as_deref(), &a.arch, &a.preset)?;
    let dtype = super::parse_dtype(&a.dtype)?;
    let gguf = a.quant.as_deref().map(|t| quantised(&dir, t)).transpose()?;
    let model = match &gguf {
        Some(f) => Model::load_gguf(f),
        None => Model::load(&dir, dtype, &Device::Cpu),
    }
    .with_context(|| format!("loading {}", dir.display()))?;
    let loaded_resident = resident_bytes();
    let cfg = model.config().clone();
    let what = match &a.quant {
        Some(t) => format!("GGUF {t}"),
        None => a.dtype.clone(),
    };
    eprintln!(
        "model: {} ({} parameters, {} layers, hidden {}), {what}, {threads} threads",
        gguf.as_deref().unwrap_or(&dir).display(),
        super::model::human_count(cfg.num_parameters()),
        cfg.num_hidden_layers,
        cfg.hidden_size,
    );
    let ours = measure(&model, a.prompt_tokens, a.decode_tokens)?;
    let resident = resident_bytes();
    println!(
        "| engine | prefill {} tok/s | decode tok/s (batch 1, {} tokens) |",
        a.prompt_tokens, a.decode_tokens
    );
    println!("|---|---|---|");
    println!(
        "| fount ({what}) | {:.1} | {:.2} |",
        ours.prefill_tok_s, ours.decode_tok_s
    );
    if let Some(f) = &gguf {
        let size = fs_err::metadata(f)?.len();
        eprintln!(
            "resident memory of this process: {:.1} MB after loading ({:.2}× the file, {:.1} MB); \
             {:.1} MB after running ({:.2}×: the KV cache, activations and freed buffers kept by \
             the allocator included)",
            loaded_resident as f64 / 1e6,
            loaded_resident as f64 / size as f64,
            size as f64 / 1e6,
            resident as f64 / 1e6,
            resident as f64 / size as f64,
        );
    }
    let reference = a
        .reference
        .clone()
        .unwrap_or_else(|| if gguf.is_some() { "llama.cpp" } else { "torch" }.to_string());
    match reference.as_str() {
        "none" => {}
        "llama.cpp" => {
            let f = gguf
                .as_deref()
                .context("--reference llama.cpp needs --quant")?;
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tools/bench/llama_cpp_generate.py");
            let (name, theirs) = reference_script(
                Command::new("python3")
                    .arg(&script)
                    .args(["--model", &f.display().to_string()])
                    .args(["--prompt-tokens", &a.prompt_tokens.to_string()])
                    .args(["--decode-tokens", &a.decode_tokens.to_string()])
                    .args(["--threads", &threads.to_string()]),
                &script,
                "llama-cpp-python (scripts/test builds it)",
            )?;
            println!(
                "| {name} | {:.1} | {:.2} |",
                theirs.prefill_tok_s, theirs.decode_tok_s
            );
            println!(
                "| **fount / llama.cpp** | **{:.2}×** | **{:.2}×** |",
                ours.prefill_tok_s / theirs.prefill_tok_s,
                ours.decode_tok_s / theirs.decode_tok_s
            );
        }
        "torch" => {
            let reference = reference_torch(&a.reference_script, &dir, &a, threads)?;
            println!(
                "| {} | {:.1} | {:.2} |",
                reference.0, reference.1.prefill_tok_s, reference.1.decode_tok_s
            );
            println!(
                "| **fount / reference** | **{:.2}×** | **{:.2}×** |",
                ours.prefill_tok_s / reference.1.prefill_tok_s,
                ours.decode_tok_s / reference.1.decode_tok_s
            );
        }
        other => bail!("unknown --reference {other:?} (torch, llama.cpp, none)"),
    }
    Ok(())
}

fn measure(model: &Model, prompt_tokens: usize, decode_tokens: usize) -> Result<Speed> {
    let cfg = model.config();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = cfg.vocab_size.min(32_000) as u32;
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let new_cache = || {
        KvCache::new(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            model.dtype(),
            model.device(),
        )
    };
    // Warm-up: thread pools, page faults of the mapped weights.
    let mut warm = new_cache();
    model.forward(
        &Batch::single(&prompt[..8.min(prompt.len())], 0),
        &mut warm,
        Logits::Last,
    )?;

    let mut kv = new_cache();
    let t0 = Instant::now();
    let out = model.forward(&Batch::single(&prompt, 0), &mut kv, Logits::Last)?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = argmax(&out.logits.squeeze(0)?.to_vec1::<f32>()?);
    let mut batch = Batch::default();
    let t0 = Instant::now();
    for step in 0..decode_tokens {
        batch.clear();
        batch.push(&[next], prompt_tokens + step);
        let out = model.forward(&batch, &mut kv, Logits::Last)?;
        next = argmax(&out.logits.squeeze(0)?.to_vec1::<f32>()?);
    }
    let decode = t0.elapsed().as_secs_f64();
    Ok(Speed {
        prefill_tok_s: prompt_tokens as f64 / prefill,
        decode_tok_s: decode_tokens as f64 / decode,
    })
}

fn reference_torch(
    script: &Path,
    dir: &Path,
    a: &GenerateBench,
    threads: usize,
) -> Result<(String, Speed)> {
    let dtype = match a.dtype.as_str() {
        "f16" => "float16",
        "bf16" => "bfloat16",
        _ => "float32",
    };
    reference_script(
        Command::new("python3")
            .arg(script)
            .args(["--model", &dir.display().to_string()])
            .args(["--prompt-tokens", &a.prompt_tokens.to_string()])
            .args(["--decode-tokens", &a.decode_tokens.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--dtype", dtype]),
        script,
        "`pip install torch transformers`",
    )
}

/// Runs a reference script that prints one JSON line of speeds.
fn reference_script(cmd: &mut Command, script: &Path, install: &str) -> Result<(String, Speed)> {
    let out = cmd
        .output()
        .with_context(|| format!("running python3 {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "the reference ({}) failed: {}\n(install it: {install}; or pass --reference none)",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("reference output {line:?}"))?;
    let f = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("reference output lacks {k}"))
    };
    Ok((
        v["engine"].as_str().unwrap_or("transformers").to_string(),
        Speed {
            prefill_tok_s: f("prefill_tok_s")?,
            decode_tok_s: f("decode_tok_s")?,
        },
    ))
}
