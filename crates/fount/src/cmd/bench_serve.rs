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
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// Pairs of one-token requests (in-process, then HTTP) timed for the TTFT difference, where
    /// the run-to-run spread of a long prefill does not hide it.
    #[arg(long, default_value_t = 40)]
    pub ttft_pairs: usize,
    /// Also measure another OpenAI-compatible server at this base URL (…/v1).
    #[arg(long)]
    pub compare: Option<String>,
    /// The model name to send to `--compare`.
    #[arg(long, default_value = "model")]
    pub compare_model: String,
}

/// One run of `n` streams.
#[derive(Debug, Clone, Copy)]
pub(super) struct Figures {
    pub(super) tokens_per_s: f64,
    pub(super) ttft_p50: Duration,
}

pub(super) type HttpClient =
    Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub(super) fn prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
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
        let mut req = Request::greedy(p, max);
        req.logprobs = Some(0);
        let mut s = state.engine().submit(req)?;
        tasks.push(tokio::spawn(async move {
            let (mut first, mut tokens) = (None, 0usize);
            while let Some(e) = s.next().await {
                match e {
                    Event::Token { .. } => {
                        tokens += 1;
                        first.get_or_insert_with(|| start.elapsed());
                    }
                    Event::Finished { .. } => {}
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
    prompts: Vec<serde_json::Value>,
    max: usize,
    logprobs: bool,
) -> Result<Figures> {
    let reqs = prompts
        .into_iter()
        .map(|p| Stream {
            key: None,
            model: model.to_string(),
            prompt: p,
        })
        .collect();
    streams(client, base, reqs, max, logprobs).await
}

/// One stream of [`streams`]: its API key, its model, its prompt.
#[derive(Debug, Clone)]
pub(super) struct Stream {
    pub(super) key: Option<String>,
    pub(super) model: String,
    pub(super) prompt: serde_json::Value,
}

/// Streams every request at once through an OpenAI-compatible `/v1/completions`.
pub(super) async fn streams(
    client: &HttpClient,
    base: &str,
    reqs: Vec<Stream>,
    max: usize,
    logprobs: bool,
) -> Result<Figures> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for Stream {
        key,
        model,
        prompt: p,
    } in reqs
    {
        let mut body = serde_json::json!({
            "model": model, "prompt": p, "max_tokens": max, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        });
        if logprobs {
            // a chunk for every token, also one whose text is held back (an incomplete
            // character), so the first chunk is the first token
            body["logprobs"] = 0.into();
        }
        let mut req = hyper::Request::post(format!("{base}/completions"))
            .header("content-type", "application/json");
        if let Some(k) = &key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = req.body(Full::new(Bytes::from(body.to_string())))?;
        let client = client.clone();
        let url = format!("{base}/completions");
        tasks.push(tokio::spawn(async move {
            let res = client
                .request(req)
                .await
                .with_context(|| format!("POST {url}"))?;
            if !res.status().is_success() {
                let status = res.status();
                let text = res.into_body().collect().await?.to_bytes();
                bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
            }
            let mut body = res.into_body();
            let (mut first, mut buf) = (None, String::new());
            // the usage chunk's count where the server sends one, else one token per chunk
            let (mut usage, mut chunks) = (None, 0usize);
            while let Some(frame) = body.frame().await {
                let frame = frame.with_context(|| format!("reading the stream of {url}"))?;
                let Ok(data) = frame.into_data() else {
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
                    if v["choices"][0]["text"].is_string() {
                        chunks += 1;
                        first.get_or_insert_with(|| start.elapsed());
                    }
                    if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                        usage = Some(n as usize);
                    }
                }
            }
            Ok((
                first.unwrap_or_else(|| start.elapsed()),
                usage.unwrap_or(chunks),
            ))
        }));
    }
    finish(start, tasks).await
}

fn ids(prompts: Vec<Vec<u32>>) -> Vec<serde_json::Value> {
    prompts.into_iter().map(|p| serde_json::json!(p)).collect()
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
    let tokenizer = fount_model::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    // ids the tokenizer can spell, so the text prompts of --compare carry them all
    let vocab = state
        .engine()
        .vocab_size()
        .min(tokenizer.vocab_size())
        .min(30_000);
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
        over_http(&client, &base, "bench", ids(prompts(2, 8, vocab, 2)), 4, true).await?;
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
                    http.push(over_http(&client, &base, "bench", ids(p2), a.decode_tokens, true).await?);
                } else {
                    http.push(over_http(&client, &base, "bench", ids(p1), a.decode_tokens, true).await?);
                    local.push(in_process(&state, p2, a.decode_tokens).await?);
                }
                if let Some(url) = &a.compare {
                    // as text: not every server takes token ids
                    let texts = next()
                        .iter()
                        .map(|p| tokenizer.decode(p, false).map(serde_json::Value::from))
                        .collect::<Result<Vec<_>, _>>()?;
                    match over_http(&client, url, &a.compare_model, texts, a.decode_tokens, false).await
                    {
                        Ok(f) => other.push(f),
                        Err(e) => println!("| {n} | {url} | failed: {e:#} | |"),
                    }
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
        // the cost HTTP adds to the first token, where prefill is one token and varies little
        let (mut local, mut http, mut diff) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..a.ttft_pairs {
            seed += 1;
            let p = prompts(2, 1, vocab, seed);
            let l = in_process(&state, vec![p[0].clone()], 1).await?.ttft_p50;
            let h = over_http(&client, &base, "bench", ids(vec![p[1].clone()]), 1, true)
                .await?
                .ttft_p50;
            local.push(l);
            http.push(h);
            diff.push(h.as_secs_f64() - l.as_secs_f64());
        }
        diff.sort_by(f64::total_cmp);
        if !diff.is_empty() {
            println!(
                "\nTTFT of a one-token prompt, {} pairs: in-process p50 {:.2} ms, HTTP p50 {:.2} ms; HTTP − in-process per pair: **p50 {:+.2} ms** (p10 {:+.2}, p90 {:+.2})",
                a.ttft_pairs,
                ms(pct(&mut local, 0.5)),
                ms(pct(&mut http, 0.5)),
                diff[diff.len() / 2] * 1e3,
                diff[diff.len() / 10] * 1e3,
                diff[diff.len() * 9 / 10] * 1e3,
            );
        }
        Ok(())
    })
}
