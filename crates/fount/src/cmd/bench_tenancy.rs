//! `fount bench tenancy`: what API keys, quotas and metering cost. Two servers run in one
//! process over the same model, one with tenancy on (a key checked against the store on every
//! request, tenant and key quotas with every limit set, a price, one usage record per request
//! written through the batched writer and committed before the response ends) and one with it
//! off; closed-loop clients send `max_tokens = 1` completions to each in turn, alternating.
//! It runs twice: on the tiny test model, and on a one-layer, 8-wide model whose forward pass
//! costs microseconds, so what is left is the HTTP layer and the engine's bookkeeping.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use fount_engine::EngineConfig;
use fount_model::init::{init_model, preset, InitOptions, Shape};
use fount_model::Arch;
use fount_server::{AppState, ServerConfig};
use fount_store::{Price, Quota, Scope, Store, Subject};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Arguments of `fount bench tenancy`.
#[derive(Debug, Args)]
pub struct TenancyBench {
    /// Clients, each with its own connection, each sending its next request when the last is
    /// answered.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Rounds of (on, off) pairs, alternating which goes first; figures are medians.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Models to run: `tiny`, `minimal`.
    #[arg(long, default_value = "tiny,minimal", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Only this side (`on` or `off`), for profiling one path; no ratio is printed.
    #[arg(long)]
    pub only: Option<String>,
    /// PostgreSQL URL for the store (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database_url: Option<String>,
}

pub(crate) type HttpClient =
    Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The two models: the tiny test model, and the one-layer 8-wide one.
pub(crate) fn models() -> Result<Vec<(&'static str, PathBuf)>> {
    let tiny = preset(Arch::Qwen2, "tiny")?;
    let minimal = Shape {
        name: "minimal",
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        ..tiny.clone()
    };
    let mut out = Vec::new();
    for (label, shape) in [
        ("tiny model (2 layers, 64 wide)", tiny),
        ("minimal model (1 layer, 8 wide)", minimal),
    ] {
        let d = PathBuf::from(format!("target/fount-bench/qwen2-{}", shape.name));
        if !d.join("model.safetensors").exists() {
            init_model(Arch::Qwen2, &shape, &InitOptions::default(), &d)?;
        }
        out.push((label, d));
    }
    Ok(out)
}

/// A server over `dir` on loopback; with `store`, tenancy on with a tenant whose quotas set every
/// limit (high enough never to refuse) and a key. Returns the base URL and the key.
async fn server(dir: &Path, store: Option<Store>) -> Result<(String, Option<String>)> {
    let state = bench_state(dir)?;
    let key = match store {
        None => None,
        Some(store) => {
            let t = store
                .create_tenant(&format!("bench{}", fount_store::now_ms()))
                .await?;
            let (key, info) = store
                .create_key(&t.id, "bench", &[Scope::Inference], None)
                .await?;
            let q = Quota {
                max_context: Some(1_000_000),
                models: Some(vec!["bench".into()]),
                weight: Some(1),
                ..every_limit(None)
            };
            store.set_quota(Subject::Tenant(&t.id), &q).await?;
            store
                .set_quota(Subject::Key(&info.id), &Quota { weight: None, ..q })
                .await?;
            let price = Price {
                input: 150_000,
                cached_input: 75_000,
                output: 600_000,
                training: 0,
            };
            store.set_price("bench", &price).await?;
            state.enable_tenancy(store);
            Some(key.expose().to_string())
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(fount_server::serve(listener, state, std::future::pending()));
    Ok((base, key))
}

/// The served model `bench` over `dir`, with a 64 MiB KV cache.
pub(crate) fn bench_state(dir: &Path) -> Result<Arc<AppState>> {
    let engine = EngineConfig {
        kv_bytes: 64 << 20,
        ..Default::default()
    };
    let cfg = ServerConfig {
        model_name: "bench".into(),
        ..Default::default()
    };
    AppState::load(dir, None, engine, cfg).with_context(|| format!("loading {}", dir.display()))
}

/// A quota that sets every rate and budget, high enough never to refuse (but `rpm` requests a
/// minute, when given), so that each rule is checked on every request.
pub(crate) fn every_limit(rpm: Option<i64>) -> Quota {
    let big = Some(i64::MAX / 4);
    Quota {
        requests_per_minute: Some(rpm.unwrap_or(1_000_000_000)),
        tokens_per_minute: big,
        tokens_per_day: big,
        tokens_per_month: big,
        concurrent_requests: Some(1_000_000),
        ..Quota::default()
    }
}

/// Requests per second and generated tokens per second of `clients` closed loops for
/// `seconds`, client `c` sending to `bases[c % bases.len()]` (an even balancer).
pub(crate) async fn load(
    client: &HttpClient,
    bases: &[String],
    key: Option<&str>,
    clients: usize,
    seconds: f64,
) -> Result<(f64, f64)> {
    let (requests, tokens) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let base = &bases[c % bases.len().max(1)];
        let (client, url) = (client.clone(), format!("{base}/completions"));
        let auth = key.map(|k| format!("Bearer {k}"));
        let (requests, tokens) = (requests.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                // a different prompt each time: nothing comes from the prefix cache
                let body = serde_json::json!({
                    "model": "bench", "prompt": format!("client {c} asks question {i}"),
                    "max_tokens": 1, "temperature": 0,
                });
                let mut req = hyper::Request::post(&url).header("content-type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                let res = client
                    .request(req.body(Full::new(Bytes::from(body.to_string())))?)
                    .await
                    .with_context(|| format!("POST {url}"))?;
                let status = res.status();
                let bytes = res.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
                }
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                requests.fetch_add(1, Ordering::Relaxed);
                tokens.fetch_add(
                    v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
                    Ordering::Relaxed,
                );
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a client task failed")??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((
        requests.load(Ordering::Relaxed) as f64 / secs,
        tokens.load(Ordering::Relaxed) as f64 / secs,
    ))
}

pub(crate) fn median(mut xs: Vec<(f64, f64)>) -> (f64, f64) {
    xs.sort_by(|a, b| a.0.total_cmp(&b.0));
    xs[xs.len() / 2]
}

/// Runs the benchmark.
pub fn bench_tenancy(a: TenancyBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if a.rounds == 0 || a.clients == 0 {
        bail!("--rounds and --clients must be at least 1");
    }
    let scratch = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let store = Store::open(scratch.path(), a.database_url.as_deref())
            .await
            .context("opening the store")?;
        println!(
            "{} clients, max_tokens = 1, {} s per measurement, medians of {} rounds; store: {:?}; {threads} threads",
            a.clients, a.seconds, a.rounds, store.backend()
        );
        println!("| model | tenancy | requests/s | tokens/s |");
        println!("|---|---|---|---|");
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(a.clients)
            .build_http();
        for (label, dir) in models()? {
            if !a.models.iter().any(|m| dir.ends_with(format!("qwen2-{m}"))) {
                continue;
            }
            let (off_url, _) = server(&dir, None).await?;
            let (on_url, key) = server(&dir, Some(store.clone())).await?;
            // warm the connection pool, the allocator and the store
            load(&client, std::slice::from_ref(&off_url), None, a.clients, 0.3).await?;
            load(&client, std::slice::from_ref(&on_url), key.as_deref(), a.clients, 0.3).await?;
            if let Some(side) = &a.only {
                let (url, key) = match side.as_str() {
                    "on" => (&on_url, key.as_deref()),
                    "off" => (&off_url, None),
                    other => bail!("--only {other:?}: on or off"),
                };
                let mut runs = Vec::new();
                for _ in 0..a.rounds {
                    runs.push(load(&client, std::slice::from_ref(url), key, a.clients, a.seconds).await?);
                }
                let m = median(runs);
                println!("| {label} | {side} | {:.0} | {:.0} |", m.0, m.1);
                continue;
            }
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for round in 0..a.rounds {
                if round % 2 == 0 {
                    on.push(load(&client, std::slice::from_ref(&on_url), key.as_deref(), a.clients, a.seconds).await?);
                    off.push(load(&client, std::slice::from_ref(&off_url), None, a.clients, a.seconds).await?);
                } else {
                    off.push(load(&client, std::slice::from_ref(&off_url), None, a.clients, a.seconds).await?);
                    on.push(load(&client, std::slice::from_ref(&on_url), key.as_deref(), a.clients, a.seconds).await?);
                }
            }
            let (on, off) = (median(on), median(off));
            println!("| {label} | off | {:.0} | {:.0} |", off.0, off.1);
            println!("| {label} | on | {:.0} | {:.0} |", on.0, on.1);
            println!(
                "| {label} | **on / off** | **{:.3}×** | **{:.3}×** ({:+.1} %) |",
                on.0 / off.0,
                on.1 / off.1,
                (on.1 / off.1 - 1.0) * 100.0
            );
        }
        store.close().await;
        Ok(())
    })
}
