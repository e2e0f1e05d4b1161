//! `fount bench safety`: what moderation costs. One server with tenancy in this process, over a
//! small Qwen2 (`--preset`), four tenants in turn:
//!
//! - no policy (the baseline);
//! - a policy with the rule classifiers on input only (the operator's rules, a tenant rule, PII
//!   logged);
//! - the same on input and output (output blocking, so streams hold back the longest term);
//! - and with personal data redacted on output (streams also hold back a trailing run that may be
//!   personal data);
//!
//! each measured with closed-loop streaming chat clients: generated tokens per second and the
//! time to the first content chunk. Then the moderation endpoint on rules alone against
//! `GET /v1/models` (the same authentication and HTTP path), and a guard model's share of a
//! request (the served model itself asked in the Llama Guard 3 format before each request).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use fount_engine::EngineConfig;
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::Arch;
use fount_server::{AppState, ServerConfig};
use fount_store::{Scope, Store, Subject};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Arguments of `fount bench safety`.
#[derive(Debug, Args)]
pub struct SafetyBench {
    /// Streaming clients, each sending its next request when the last is answered.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Rounds over the four tenants (the order rotates); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// The Qwen2 preset to serve: `tiny` (the test model: the HTTP stream dominates) or `small`
    /// (the model's compute dominates).
    #[arg(long, default_value = "small")]
    pub preset: String,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

const INPUT_ONLY: &str =
    "[input]\nblock = [\"illicit\", \"sexual/minors\"]\nlog = [\"pii\", \"violence\"]\n\
    [[rules]]\ncategory = \"illicit\"\nterms = [\"counterfeit banknotes\", \"假钞\"]\n";
const BOTH: &str =
    "hold_chars = 1\n[input]\nblock = [\"illicit\", \"sexual/minors\"]\nlog = [\"pii\", \"violence\"]\n\
    [output]\nblock = [\"illicit\", \"sexual/minors\"]\nlog = [\"violence\"]\n\
    [[rules]]\ncategory = \"illicit\"\nterms = [\"counterfeit banknotes\", \"假钞\"]\n";
const REDACT: &str =
    "[input]\nblock = [\"illicit\", \"sexual/minors\"]\nlog = [\"pii\", \"violence\"]\n\
    [output]\nblock = [\"illicit\", \"sexual/minors\"]\nlog = [\"violence\"]\nredact_pii = true\n\
    [[rules]]\ncategory = \"illicit\"\nterms = [\"counterfeit banknotes\", \"假钞\"]\n";

/// A moderation input of about 300 characters: English, Chinese and an e-mail address.
const SAMPLE: &str = "The village well is open on Sundays, and the market sells bread, cheese and \
    apples until noon. Write to the council at council@example.org with questions about the \
    schedule. 村里的井星期天开放，集市中午之前卖面包、奶酪和苹果。如有问题请写信给村委会。 \
    Children play by the river in the afternoon while their parents talk about the harvest.";

/// A streamed answer: time to its first content chunk and the tokens it generated.
async fn stream_once(
    client: &HttpClient,
    url: &str,
    key: &str,
    body: &str,
) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))?;
    let res = client
        .request(req)
        .await
        .with_context(|| format!("POST {url}"))?;
    if !res.status().is_success() {
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
    }
    let mut body = res.into_body();
    let (mut first, mut tokens, mut pending) = (None, 0u64, String::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(json) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
                continue;
            };
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if first.is_none() && !content.is_empty() {
                first = Some(start.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
    }
    Ok((first.unwrap_or_else(|| start.elapsed()), tokens))
}

/// Generated tokens per second and the median time to first content of `clients` closed
/// loops of streamed chats for `seconds`.
async fn streams(
    client: &HttpClient,
    base: &str,
    key: &str,
    a: &SafetyBench,
    bias: &serde_json::Value,
) -> Result<(f64, f64)> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (client, url, key, bias) = (
            client.clone(),
            format!("{base}/chat/completions"),
            key.to_string(),
            bias.clone(),
        );
        let max_tokens = a.max_tokens;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                // a different prompt each time: nothing comes from the prefix cache
                let body = serde_json::json!({
                    "model": "bench", "max_tokens": max_tokens, "temperature": 1, "seed": i,
                    "messages": [{"role": "user", "content": format!("Client {c} asks question {i}: write to me at c{c}@example.org")}],
                    "stream": true, "stream_options": {"include_usage": true}, "logit_bias": bias,
                });
                out.push(stream_once(&client, &url, &key, &body.to_string()).await?);
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("a client task failed")??);
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens: u64 = all.iter().map(|(_, n)| n).sum();
    let mut ttft: Vec<f64> = all.iter().map(|(t, _)| t.as_secs_f64() * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    Ok((
        tokens as f64 / secs,
        ttft.get(ttft.len() / 2).copied().unwrap_or(0.0),
    ))
}

/// Requests per second of `clients` closed loops of `method path` with `body`.
async fn requests(
    client: &HttpClient,
    url: &str,
    key: &str,
    body: Option<&str>,
    clients: usize,
    seconds: f64,
) -> Result<f64> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, key, body) = (
            client.clone(),
            url.to_string(),
            key.to_string(),
            body.map(str::to_string),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                send(&client, &url, &key, body.as_deref()).await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.context("a client task failed")??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// A Qwen2 of `name`'s preset, written once under `target/fount-bench`.
fn model(name: &str) -> Result<PathBuf> {
    let d = PathBuf::from(format!("target/fount-bench/qwen2-{name}"));
    if !d.join("model.safetensors").exists() {
        init_model(
            Arch::Qwen2,
            &preset(Arch::Qwen2, name)?,
            &InitOptions::default(),
            &d,
        )?;
    }
    Ok(d)
}

/// `logit_bias` keeping the model at `dir` from ending an answer early.
fn no_eos(dir: &Path) -> Result<serde_json::Value> {
    let cfg: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(dir.join("generation_config.json"))?)?;
    let ids: Vec<u64> = match &cfg["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
        v => v.as_u64().into_iter().collect(),
    };
    Ok(serde_json::Value::Object(
        ids.iter()
            .map(|id| (id.to_string(), (-100).into()))
            .collect(),
    ))
}

/// Runs the benchmark.
pub fn bench_safety(a: SafetyBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if a.rounds == 0 || a.clients == 0 {
        bail!("--rounds and --clients must be at least 1");
    }
    let scratch = tempfile::tempdir()?;
    let dir = model(&a.preset)?;
    let bias = no_eos(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let store = Store::open(scratch.path(), None).await.context("opening the store")?;
        let engine = EngineConfig { kv_bytes: 64 << 20, ..Default::default() };
        let cfg = ServerConfig { model_name: "bench".into(), ..Default::default() };
        let state: Arc<AppState> = AppState::load(&dir, None, engine, cfg)?;
        let mut keys = Vec::new();
        for (name, policy) in [
            ("none", None),
            ("input", Some(INPUT_ONLY)),
            ("both", Some(BOTH)),
            ("redact", Some(REDACT)),
            ("guard", Some("guard = \"bench\"\n[input]\nblock = [\"illicit\"]\n")),
        ] {
            let t = store.create_tenant(name).await?;
            let (key, _) = store.create_key(&t.id, "bench", &[Scope::Inference], None).await?;
            if let Some(p) = policy {
                fount_safety::Policy::parse(p)?;
                store.set_policy(Subject::Tenant(&t.id), p).await?;
            }
            keys.push(key.expose().to_string());
        }
        state.enable_tenancy(store.clone());
        state.enable_safety().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}/v1", listener.local_addr()?);
        tokio::spawn(fount_server::serve(listener, state.clone(), std::future::pending()));
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(a.clients.max(8))
            .build_http();

        // the classifiers alone, in this thread: what a policy adds per request and per token
        let policy = fount_safety::Policy::parse(REDACT)?;
        let safety = state.safety();
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(safety.scan(Some(&policy), std::hint::black_box(SAMPLE), true));
        }
        let per_text = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        let pieces: Vec<String> = SAMPLE.chars().collect::<Vec<_>>().chunks(4).map(|c| c.iter().collect()).collect();
        let operator = safety.rules();
        let scan = fount_safety::filter::RuleMatcher {
            rules: vec![&operator, &policy.rules],
            pii: true,
        };
        let t = Instant::now();
        for _ in 0..20 {
            let mut f = fount_safety::OutputFilter::new(policy.hold_chars.max(safety.rules().longest_term()));
            for p in &pieces {
                std::hint::black_box(f.push(p, &policy.output, &scan));
            }
            std::hint::black_box(f.finish(&policy.output, &scan));
        }
        let per_piece = t.elapsed().as_secs_f64() / (20 * pieces.len()) as f64 * 1e6;
        println!("| classifier, one thread | µs |");
        println!("|---|---|");
        println!("| input: operator's and tenant's rules and PII over {} characters | {per_text:.1} |", SAMPLE.chars().count());
        println!("| output: the filter per 4-character piece (rules, PII, redaction) | {per_piece:.1} |\n");

        println!(
            "qwen2 {} model, {} streaming clients, {} tokens per answer, {} s per measurement, medians of {} rounds; {threads} threads",
            a.preset, a.clients, a.max_tokens, a.seconds, a.rounds
        );
        let warm = SafetyBench { seconds: 0.5, preset: a.preset.clone(), ..a };
        streams(&client, &base, &keys[0], &warm, &bias).await?;
        let labels = [
            "no policy",
            "rules on input",
            "rules on input and output (held back: an end that may begin a term)",
            "… and PII redacted on output (held back: a run that may be personal data)",
        ];
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); labels.len()];
        for round in 0..a.rounds {
            for k in 0..labels.len() {
                let which = (k + round) % labels.len();
                runs[which].push(streams(&client, &base, &keys[which], &a, &bias).await?);
            }
        }
        let med: Vec<(f64, f64)> = runs
            .into_iter()
            .map(|r| (median(r.iter().map(|x| x.0).collect()), median(r.iter().map(|x| x.1).collect())))
            .collect();
        println!("| policy | tokens/s | vs none | TTFT p50 (ms) | vs none |");
        println!("|---|---|---|---|---|");
        for (label, (tps, ttft)) in labels.iter().zip(&med) {
            println!(
                "| {label} | {tps:.0} | {:.3}× | {ttft:.1} | {:+.1} ms |",
                tps / med[0].0,
                ttft - med[0].1
            );
        }

        // the moderation endpoint on rules alone, against the cheapest authenticated route
        let body = serde_json::json!({"input": SAMPLE}).to_string();
        let (mut moderations, mut models) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            moderations.push(requests(&client, &format!("{base}/moderations"), &keys[0], Some(&body), a.clients, a.seconds).await?);
            models.push(requests(&client, &format!("{base}/models"), &keys[0], None, a.clients, a.seconds).await?);
        }
        let (m, g) = (median(moderations), median(models));
        println!("\n| route | requests/s | vs GET /v1/models |");
        println!("|---|---|---|");
        println!("| GET /v1/models | {g:.0} | 1 |");
        println!("| POST /v1/moderations (rules, {} characters) | {m:.0} | {:.3}× |", SAMPLE.chars().count(), m / g);

        // a guard model's share: one client, non-streamed, the guard the served model itself
        let mut lat = [Vec::new(), Vec::new()];
        for i in 0..(a.rounds * 6) {
            for (j, key) in [&keys[0], &keys[4]].into_iter().enumerate() {
                let body = serde_json::json!({
                    "model": "bench", "max_tokens": 16, "temperature": 1, "seed": i, "logit_bias": bias,
                    "messages": [{"role": "user", "content": format!("Question {i}: tell me about the village")}],
                }).to_string();
                let t = Instant::now();
                send(&client, &format!("{base}/chat/completions"), key, Some(&body)).await?;
                lat[j].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (plain, guarded) = (median(lat[0].clone()), median(lat[1].clone()));
        println!("\n| request (16 tokens) | latency p50 (ms) |");
        println!("|---|---|");
        println!("| no guard | {plain:.1} |");
        println!("| guard asked first (the same model, Llama Guard 3 prompt) | {guarded:.1} |");
        println!("| **guard's share of the request** | **{:.0} %** |", (guarded - plain) / guarded * 100.0);
        Ok(())
    })
}

/// One request, `POST` with `body` or `GET` without, answered with a success status.
async fn send(client: &HttpClient, url: &str, key: &str, body: Option<&str>) -> Result<()> {
    let req = match body {
        Some(b) => hyper::Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(b.to_string()))),
        None => hyper::Request::get(url).body(Full::new(Bytes::new())),
    };
    let mut req = req?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    let res = client.request(req).await?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(())
}
