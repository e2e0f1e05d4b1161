//! `fount bench serve`: what HTTP costs. The same streams run on the engine called in-process
//! and through `fount serve` (an HTTP/1.1 client streaming server-sent events over loopback),
//! alternating, in one process on one engine; optionally the same load against another
//! OpenAI-compatible server (`--compare URL`, e.g. llama-cpp-python's).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use fount_engine::{EngineConfig, Event, Request};
use fount_server::{AppState, ServerConfig};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};

use super::bench_engine::{bench_model, ms, pct};

/// Arguments of `fount bench serve`.
#[derive(Debug, Args)]
pub struct ServeBench {
    /// Model directory; by default the random Qwen2.5-0.5B-shaped model of `fount bench engine`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent streams to measure.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// Prompt tokens per stream.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Rounds of (in-process, HTTP) pairs; figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also measure another OpenAI-compatible server at this base URL (…/v1).
    #[arg(long)]
    pub compare: Option<String>,
    /// The model name to send to `--compare`.
    #[arg(long, default_value = "model")]
    pub compare_model: String,
}

/// One run of `n` streams.
#[derive(Debug, Clone, Copy)]
struct Figures {
    tokens_per_s: f64,
    ttft_p50: Duration,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(10..vocab as u32))
                .collect()
        })
        .collect()
}

/// Streams every prompt on the engine directly.
async fn in_process(state: &Arc<AppState>, prompts: Vec<Vec<u32>>, max: usize) -> Result<Figures> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in prompts {
        let mut s = state.engine().submit(Request::greedy(p, max))?;
        tasks.push(tokio::spawn(async move {
            let (mut first, mut tokens) = (None, 0usize);
            while let Some(e) = s.next().await {
                match e {
                    Event::Token { text, .. } => {
                        tokens += 1;
                        if first.is_none() && !text.is_empty() {
                            first = Some(start.elapsed());
                        }
                    }
                    Event::Finished { text, .. } => {
                        if first.is_none() && !text.is_empty() {
                            first = Some(start.elapsed());
                        }
                    }
                    Event::Error(m) => return Err(anyhow!(m)),
                }
            }
            Ok((first.unwrap_or_else(|| start.elapsed()), tokens))
        }));
    }
    finish(start, tasks).await
}

async fn finish(
    start: Instant,
    tasks: Vec<tokio::task::JoinHandle<Result<(Duration, usize)>>>,
) -> Result<Figures> {
    let (mut ttft, mut tokens) = (Vec::new(), 0);
    for t in tasks {
        let (first, n) = t
            .await
            .map_err(|e| anyhow!("a stream task failed: {e}"))??;
        ttft.push(first);
        tokens += n;
    }
    Ok(Figures {
        tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
        ttft_p50: pct(&mut ttft, 0.5),
    })
}

/// Streams every prompt through an OpenAI-compatible `/v1/completions`.
async fn over_http(
    client: &HttpClient,
    base: &str,
    model: &str,
    prompts: Vec<Vec<u32>>,
    max: usize,
) -> Result<Figures> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in prompts {
        let body = serde_json::json!({
            "model": model, "prompt": p, "max_tokens": max, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        });
        let req = hyper::Request::post(format!("{base}/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let res = client.request(req).await?;
            if !res.status().is_success() {
                let status = res.status();
                let text = res.into_body().collect().await?.to_bytes();
                bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
            }
            let mut body = res.into_body();
            let (mut first, mut tokens, mut buf) = (None, 0usize, String::new());
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                buf.push_str(&String::from_utf8_lossy(&data));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    let Some(payload) = event.trim().strip_prefix("data:").map(str::trim) else {
                        continue;
                    };
                    if payload == "[DONE]" {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(payload)?;
                    let text = v["choices"][0]["text"].as_str().unwrap_or_default();
                    if first.is_none() && !text.is_empty() {
                        first = Some(start.elapsed());
                    }
                    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                        tokens = n as usize;
                    }
                }
            }
            Ok((first.unwrap_or_else(|| start.elapsed()), tokens))
        }));
    }
    finish(start, tasks).await
}

fn median(mut xs: Vec<Figures>) -> Figures {
    xs.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
    let mid = xs[xs.len() / 2];
    let mut t: Vec<Duration> = xs.iter().map(|f| f.ttft_p50).collect();
    Figures {
        tokens_per_s: mid.tokens_per_s,
        ttft_p50: pct(&mut t, 0.5),
    }
}

/// Runs the benchmark.
pub fn bench_serve(a: ServeBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dir = bench_model(a.model.as_deref())?;
    let engine_cfg = EngineConfig {
        kv_bytes: 1 << 30,
        ..Default::default()
    };
    let cfg = ServerConfig {
        model_name: "bench".into(),
        ..Default::default()
    };
    let state = AppState::load(&dir, None, engine_cfg, cfg)
        .with_context(|| format!("loading {}", dir.display()))?;
    let vocab = state.engine().vocab_size().min(30_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}/v1", listener.local_addr()?);
        tokio::spawn(fount_server::serve(
            listener,
            state.clone(),
            std::future::pending(),
        ));
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        println!(
            "model {}, f32, {threads} threads; {} prompt + {} generated tokens per stream, greedy; medians of {} rounds",
            dir.display(),
            a.prompt_tokens,
            a.decode_tokens,
            a.rounds
        );
        println!("| streams | path | streamed tokens/s | TTFT p50 ms |");
        println!("|---|---|---|---|");
        // warm the thread pools, the allocator and the connection pool
        in_process(&state, prompts(2, 8, vocab, 1), 4).await?;
        over_http(&client, &base, "bench", prompts(2, 8, vocab, 2), 4).await?;
        let mut seed = 100;
        for &n in &a.streams {
            let (mut local, mut http, mut other) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..a.rounds {
                // fresh prompts every run: nothing comes from the prefix cache
                let mut next = || {
                    seed += 1;
                    prompts(n, a.prompt_tokens, vocab, seed)
                };
                let (p1, p2) = (next(), next());
                if round % 2 == 0 {
                    local.push(in_process(&state, p1, a.decode_tokens).await?);
                    http.push(over_http(&client, &base, "bench", p2, a.decode_tokens).await?);
                } else {
                    http.push(over_http(&client, &base, "bench", p1, a.decode_tokens).await?);
                    local.push(in_process(&state, p2, a.decode_tokens).await?);
                }
                if let Some(url) = &a.compare {
                    let p = next();
                    other.push(over_http(&client, url, &a.compare_model, p, a.decode_tokens).await?);
                }
            }
            let (l, h) = (median(local), median(http));
            for (label, f) in [("engine in-process", l), ("fount serve (HTTP)", h)] {
                println!(
                    "| {n} | {label} | {:.1} | {:.0} |",
                    f.tokens_per_s,
                    ms(f.ttft_p50)
                );
            }
            if !other.is_empty() {
                let o = median(other);
                println!(
                    "| {n} | {} | {:.1} | {:.0} |",
                    a.compare.as_deref().unwrap_or_default(),
                    o.tokens_per_s,
                    ms(o.ttft_p50)
                );
            }
            println!(
                "| {n} | **HTTP / in-process** | **{:.3}×** ({:+.1} %) | **{:+.1} ms** |",
                h.tokens_per_s / l.tokens_per_s,
                (h.tokens_per_s / l.tokens_per_s - 1.0) * 100.0,
                ms(h.ttft_p50) - ms(l.ttft_p50)
            );
        }
        Ok(())
    })
}
