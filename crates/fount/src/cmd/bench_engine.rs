//! `fount bench engine`: continuous batching throughput and latency, with and without many
//! adapters, and the cost of an adapter never seen before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use fount_engine::{Engine, EngineConfig, Event, Request};
use fount_model::init::{init_lora, init_model, preset, InitOptions};
use fount_model::{Arch, Config, Model, Tokenizer};
use rand::{Rng, SeedableRng};

/// Arguments of `fount bench engine`.
#[derive(Debug, Args)]
pub struct EngineBench {
    /// Model directory; by default a random Qwen2.5-0.5B-shaped model in `target/fount-bench/`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent streams to measure, comma-separated.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// Prompt tokens per stream.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Rank of the adapters (on all attention and MLP projections).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Serve the model as a GGUF file of this type (f16, bf16, q8_0, q4_k_m, …), written once
    /// beside it by `fount quantize`.
    #[arg(long)]
    pub quant: Option<String>,
    /// Run without batch-invariant kernels (candle's blocked GEMM for many rows), to measure
    /// what invariance costs.
    #[arg(long)]
    pub no_batch_invariant: bool,
    /// Skip the adapter measurements.
    #[arg(long)]
    pub no_adapters: bool,
}

struct Run {
    wall: Duration,
    tokens: usize,
    /// Tokens per second once every stream is decoding (after the last first token).
    decode_rate: f64,
    ttft: Vec<Duration>,
    itl: Vec<Duration>,
}

pub(crate) fn pct(xs: &mut [Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.sort();
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `reqs` at once and times every token.
fn run(engine: &Engine, reqs: Vec<Request>) -> Result<Run> {
    let start = Instant::now();
    let streams = reqs
        .into_iter()
        .map(|r| engine.submit(r))
        .collect::<Result<Vec<_>, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while let Some(e) = s.next_blocking() {
                    match e {
                        Event::Token { .. } => times.push(Instant::now()),
                        Event::Finished { .. } => break,
                        Event::Error(m) => return Err(m),
                    }
                }
                Ok(times)
            })
        })
        .collect();
    let mut out = Run {
        wall: Duration::ZERO,
        tokens: 0,
        decode_rate: 0.0,
        ttft: Vec::new(),
        itl: Vec::new(),
    };
    let mut all = Vec::new();
    for h in handles {
        let times = h
            .join()
            .map_err(|_| anyhow::anyhow!("a stream thread panicked"))?
            .map_err(anyhow::Error::msg)?;
        out.tokens += times.len();
        all.push(times.clone());
        if let Some(first) = times.first() {
            out.ttft.push(*first - start);
        }
        out.itl.extend(times.windows(2).map(|w| w[1] - w[0]));
    }
    out.wall = start.elapsed();
    let steady = all.iter().filter_map(|t| t.first()).max().copied();
    let end = all.iter().filter_map(|t| t.last()).max().copied();
    if let (Some(t0), Some(t1)) = (steady, end) {
        let n = all.iter().flatten().filter(|t| **t > t0).count();
        out.decode_rate = n as f64 / (t1 - t0).as_secs_f64().max(1e-9);
    }
    Ok(out)
}

fn requests(
    n: usize,
    prompt: usize,
    decode: usize,
    vocab: usize,
    adapters: &[Option<String>],
) -> Vec<Request> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64);
    (0..n)
        .map(|i| {
            let p: Vec<u32> = (0..prompt)
                .map(|_| rng.random_range(10..vocab as u32))
                .collect();
            let mut r = Request::greedy(p, decode);
            r.adapter = adapters.get(i % adapters.len().max(1)).cloned().flatten();
            r.cache_salt = format!("bench-{i}");
            r
        })
        .collect()
}

/// Writes a random rank-`r` PEFT adapter on every projection of `cfg` (once).
fn write_adapter(dir: &Path, cfg: &Config, r: usize, seed: u64) -> Result<()> {
    if !dir.join("adapter_model.safetensors").exists() {
        init_lora(cfg, r, 0.02, seed, dir)?;
    }
    Ok(())
}

fn start(dir: &Path, gguf: Option<&Path>, invariant: bool) -> Result<(Engine, Config)> {
    let model = match gguf {
        Some(f) => Model::load_gguf(f),
        None => Model::load(dir, DType::F32, &Device::Cpu),
    }
    .with_context(|| format!("loading {}", gguf.unwrap_or(dir).display()))?;
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let cfg = EngineConfig {
        kv_bytes: 1 << 30,
        max_step_tokens: 512,
        adapter_cache_bytes: 4 << 30,
        batch_invariant: invariant,
        ..Default::default()
    };
    let config = model.config().clone();
    Ok((Engine::start(model, tok, Vec::new(), cfg)?, config))
}

/// The model to measure: `model`, or a random Qwen2.5-0.5B-shaped one written once to
/// `target/fount-bench/`.
pub fn bench_model(model: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = model {
        return Ok(d.to_path_buf());
    }
    let d = PathBuf::from("target/fount-bench/qwen2-qwen2.5-0.5b");
    if !d.join("model.safetensors").exists() {
        eprintln!(
            "writing a random qwen2.5-0.5b-shaped model to {} …",
            d.display()
        );
        init_model(
            Arch::Qwen2,
            &preset(Arch::Qwen2, "qwen2.5-0.5b")?,
            &InitOptions::default(),
            &d,
        )?;
    }
    Ok(d)
}

/// Runs the benchmark.
pub fn bench_engine(a: EngineBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dir = bench_model(a.model.as_deref())?;
    let gguf = a
        .quant
        .as_deref()
        .map(|t| super::bench::quantised(&dir, t))
        .transpose()?;
    let (engine, cfg) = start(&dir, gguf.as_deref(), !a.no_batch_invariant)?;
    let vocab = cfg.vocab_size.min(30_000);
    println!(
        "model {} ({} layers, hidden {}), {}, {threads} threads, batch-invariant {}; {} prompt + {} generated tokens per stream",
        gguf.as_deref().unwrap_or(&dir).display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        a.quant.as_deref().map_or("f32".into(), |t| format!("GGUF {t}")),
        if a.no_batch_invariant { "off" } else { "on" },
        a.prompt_tokens,
        a.decode_tokens
    );
    println!("| streams | adapters | decode tokens/s (all streams) | tokens/s incl. prefill | TTFT p50 / p99 ms | inter-token p50 / p99 ms |");
    println!("|---|---|---|---|---|---|");
    let mut base_rates = HashMap::new();
    let report = |label: &str, n: usize, r: &mut Run| -> f64 {
        let wall_rate = r.tokens as f64 / r.wall.as_secs_f64();
        let rate = r.decode_rate;
        let (t50, t99) = (pct(&mut r.ttft, 0.5), pct(&mut r.ttft, 0.99));
        let (i50, i99) = (pct(&mut r.itl, 0.5), pct(&mut r.itl, 0.99));
        println!(
            "| {n} | {label} | {rate:.1} | {wall_rate:.1} | {:.0} / {:.0} | {:.0} / {:.0} |",
            ms(t50),
            ms(t99),
            ms(i50),
            ms(i99)
        );
        rate
    };
    // warm the thread pool and allocator
    run(&engine, requests(1, 8, 2, vocab, &[None]))?;
    for &n in &a.streams {
        let mut r = run(
            &engine,
            requests(n, a.prompt_tokens, a.decode_tokens, vocab, &[None]),
        )?;
        base_rates.insert(n, report("none", n, &mut r));
    }
    if let (Some(one), Some(&max)) = (base_rates.get(&1), a.streams.iter().max()) {
        if let Some(top) = base_rates.get(&max) {
            println!(
                "\n{max} streams / 1 stream (aggregate decode tokens/s): **{:.2}×**",
                top / one
            );
        }
    }
    if a.no_adapters {
        return Ok(());
    }
    let n = a.streams.iter().copied().max().unwrap_or(32);
    let adir = PathBuf::from("target/fount-bench").join(format!("adapters-r{}", a.rank));
    let names: Vec<Option<String>> = (0..n).map(|i| Some(format!("a{i}"))).collect();
    const COLD_RUNS: usize = 7;
    for i in 0..n + COLD_RUNS {
        write_adapter(&adir.join(format!("a{i}")), &cfg, a.rank, 1000 + i as u64)?;
    }
    for i in 0..n {
        engine
            .adapters()
            .register(&format!("a{i}"), adir.join(format!("a{i}")));
    }
    // load every adapter before measuring throughput
    run(&engine, requests(n, 4, 1, vocab, &names))?;
    let mut r = run(
        &engine,
        requests(n, a.prompt_tokens, a.decode_tokens, vocab, &names),
    )?;
    let mixed = report(&format!("{n} different, rank {}", a.rank), n, &mut r);
    if let Some(base) = base_rates.get(&n) {
        println!(
            "\nmixed adapters / base only at {n} streams: **{:.2}×**",
            mixed / base
        );
    }
    // cold versus resident adapter: time to first token of one stream, median of several
    let one = |adapter: Option<String>, salt: String| -> Result<Duration> {
        let mut reqs = requests(1, a.prompt_tokens, 1, vocab, &[adapter]);
        reqs[0].cache_salt = salt;
        let mut r = run(&engine, reqs)?;
        Ok(pct(&mut r.ttft, 0.5))
    };
    let (mut cold, mut warm, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..COLD_RUNS {
        let name = format!("a{}", n + i);
        engine.adapters().register(&name, adir.join(&name));
        let file = adir.join(&name).join("adapter_model.safetensors");
        let read_start = Instant::now();
        std::hint::black_box(fs_err::read(&file)?);
        reads.push(read_start.elapsed());
        cold.push(one(Some(name), format!("cold-{i}"))?);
        // against an adapter that is resident but has not run for a while (its weights are in
        // memory, not in the CPU caches), as a tenant's adapter usually is
        warm.push(one(Some(format!("a{i}")), format!("warm-{i}"))?);
    }
    let loads = engine.adapters().load_times();
    let mut loads: Vec<Duration> = loads.iter().rev().take(COLD_RUNS).copied().collect();
    let bytes = fs_err::metadata(adir.join("a0").join("adapter_model.safetensors"))?.len();
    let (c, w) = (pct(&mut cold, 0.5), pct(&mut warm, 0.5));
    println!(
        "\nTTFT (median of {COLD_RUNS}) with an adapter never seen before {:.0} ms, resident {:.0} ms: +{:.0} ms; background load {:.0} ms, of which reading the {:.1} MB file {:.0} ms",
        ms(c),
        ms(w),
        ms(c.saturating_sub(w)),
        ms(pct(&mut loads, 0.5)),
        bytes as f64 / 1e6,
        ms(pct(&mut reads, 0.5))
    );
    Ok(())
}
