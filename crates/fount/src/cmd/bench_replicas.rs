//! `fount bench replicas`: what several replicas on one PostgreSQL cost and how fast they agree.
//! Replicas run in one process (each with its own store connections, engine and listener) over
//! the one-layer, 8-wide model, so what is measured is the HTTP layer, admission and metering.
//!
//! - requests/s of `max_tokens = 1` completions from closed-loop clients spread evenly over 1, 2
//!   and 3 replicas on PostgreSQL (shared quotas: every admission a transaction under the
//!   tenant's and the key's locks), against one replica on SQLite (the embedded default, quota
//!   windows in memory) in the same run;
//! - the quota error: bursts at a tenant limited to 50 requests a minute, spread over three
//!   replicas;
//! - registry propagation: an adapter registered on one replica until it answers on another;
//! - the store alone, for the capacity model: admissions/s over many tenants and over one, and
//!   usage records/s.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use fount_store::{Admission, Scope, Store, Subject, UsageKind, UsageRecord, Wants};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::bench_tenancy::{bench_state, every_limit, load, median, models, HttpClient};

/// Arguments of `fount bench replicas`.
#[derive(Debug, Args)]
pub struct ReplicasBench {
    /// The PostgreSQL the replicas share.
    #[arg(long, env = "FOUNT_DATABASE_URL")]
    pub database_url: String,
    /// Closed-loop clients, spread evenly over the replicas.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Rounds over every setup (in rotating order); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Adapter registrations timed from one replica to another.
    #[arg(long, default_value_t = 20)]
    pub propagations: usize,
}

/// A running replica: its base URL and the signal that stops it.
struct Replica {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A replica over `model` with its own connections to the store at `url` (SQLite in `dir` when
/// `url` is `None`).
async fn replica(model: &Path, dir: &Path, url: Option<&str>) -> Result<Replica> {
    let state = bench_state(model)?;
    let store = Store::open(dir, url).await?;
    state.enable_tenancy(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    state.enable_replicas(&addr.to_string()).await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(fount_server::serve(listener, state, async {
        let _ = rx.await;
    }));
    Ok(Replica {
        base: format!("http://{addr}/v1"),
        stop: Some(tx),
    })
}

/// A tenant with every limit set (high enough never to refuse, unless `rpm`) and an admin key.
async fn tenant(store: &Store, name: &str, rpm: Option<i64>) -> Result<String> {
    let t = store.create_tenant(name).await?;
    let (key, info) = store
        .create_key(&t.id, "bench", &[Scope::Inference, Scope::Admin], None)
        .await?;
    let q = every_limit(rpm);
    store.set_quota(Subject::Tenant(&t.id), &q).await?;
    store.set_quota(Subject::Key(&info.id), &q).await?;
    Ok(key.expose().to_string())
}

async fn post(client: &HttpClient, url: &str, key: &str, body: serde_json::Value) -> Result<u16> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(body.to_string())))?;
    let res = client
        .request(req)
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = res.status().as_u16();
    res.into_body().collect().await?;
    Ok(status)
}

/// Transactions per second of `tasks` loops of `f` for `seconds`.
async fn rate<F, Fut>(tasks: usize, seconds: f64, f: F) -> Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64>> + Send,
{
    let f = Arc::new(f);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (f, done) = (f.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                done.fetch_add(f(t, i).await?, Ordering::Relaxed);
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn record(id: String, tenant: &str, key: &str) -> UsageRecord {
    UsageRecord {
        request_id: id,
        tenant_id: tenant.into(),
        key_id: key.into(),
        model: "bench".into(),
        adapter: None,
        prompt_tokens: 7,
        cached_tokens: 0,
        completion_tokens: 1,
        status: 200,
        latency_ms: 1,
        created_at_ms: fount_store::now_ms(),
        cost_picodollars: 0,
        kind: UsageKind::Inference,
        slot_ms: 0,
    }
}

/// CPU seconds used so far by every process named `postgres` on this machine (user plus
/// system, from `/proc`), or `None` where there is none to read.
fn postgres_cpu() -> Option<f64> {
    let mut ticks = 0u64;
    let mut found = false;
    for e in fs_err::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = fs_err::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(") ") else {
            continue;
        };
        if !name.ends_with("(postgres") {
            continue;
        }
        found = true;
        // after the name: utime and stime are the 12th and 13th fields
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    // the kernel's USER_HZ is 100 on Linux
    found.then_some(ticks as f64 / 100.0)
}

/// PostgreSQL's CPU microseconds per operation since `cpu0`, at `rate` operations a second
/// for `seconds`.
fn cpu_per(cpu0: Option<f64>, rate: f64, seconds: f64) -> Option<f64> {
    let used = postgres_cpu()? - cpu0?;
    Some(used * 1e6 / (rate * seconds).max(1.0))
}

/// The store alone: admissions/s over `tenants` tenants (one task each) and usage records/s,
/// with PostgreSQL's CPU time per operation when it runs on this machine.
async fn store_rates(
    url: &str,
    tasks: usize,
    seconds: f64,
    run: &str,
) -> Result<Vec<(String, f64, Option<f64>)>> {
    let store = Arc::new(Store::connect(url).await?);
    // a replica alive, so no sweep takes its open requests for a dead one's
    store
        .join_replica("bench", "-", fount_store::now_ms())
        .await?;
    let mut ids = Vec::new();
    for i in 0..tasks {
        let t = store.create_tenant(&format!("store{run}x{i}")).await?;
        let (_, k) = store
            .create_key(&t.id, "bench", &[Scope::Inference], None)
            .await?;
        ids.push((t.id, k.id));
    }
    let ids = Arc::new(ids);
    let wants = [
        Wants {
            minute: true,
            concurrent: true,
            day: true,
            month: false,
        },
        Wants {
            minute: true,
            concurrent: true,
            day: false,
            month: false,
        },
    ];
    let mut out = Vec::new();
    for (label, shared) in [
        (format!("admissions/s, {tasks} tenants at once"), false),
        (format!("admissions/s, one tenant from {tasks} tasks"), true),
    ] {
        let (s, ids, run) = (store.clone(), ids.clone(), format!("{run}{shared}"));
        let cpu0 = postgres_cpu();
        let r = rate(tasks, seconds, move |t, i| {
            let (s, ids, run) = (s.clone(), ids.clone(), run.clone());
            async move {
                let (tenant, key) = &ids[if shared { 0 } else { t }];
                let id = format!("adm-{run}-{t}-{i}");
                let a = Admission {
                    request_id: &id,
                    replica_id: "bench",
                    tenant_id: tenant,
                    key_id: key,
                    model: "bench",
                    tokens: 8,
                    now_ms: fount_store::now_ms(),
                    wants,
                };
                s.admit_shared(&a, |_| Ok::<(), ()>(())).await?.ok();
                // closed at once, as its usage record would close it
                s.record_usage(&[record(id, tenant, key)]).await?;
                Ok(1)
            }
        })
        .await?;
        let per = cpu_per(cpu0, r, seconds);
        out.push((format!("{label} (each with its usage record)"), r, per));
    }
    let (s, ids, run) = (store.clone(), ids.clone(), run.to_string());
    let cpu0 = postgres_cpu();
    let r = rate(tasks.min(4), seconds, move |t, i| {
        let (s, ids, run) = (s.clone(), ids.clone(), run.clone());
        async move {
            let (tenant, key) = &ids[t];
            let batch: Vec<UsageRecord> = (0..256)
                .map(|j| record(format!("rec-{run}-{t}-{i}-{j}"), tenant, key))
                .collect();
            Ok(s.record_usage(&batch).await?)
        }
    })
    .await?;
    let per = cpu_per(cpu0, r, seconds);
    out.push(("usage records/s, batches of 256".into(), r, per));
    Ok(out)
}

/// Runs the benchmark.
pub fn bench_replicas(a: ReplicasBench, threads: Option<usize>) -> Result<()> {
    if a.rounds == 0 || a.clients == 0 {
        bail!("--rounds and --clients must be at least 1");
    }
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (_, model) = models()?.into_iter().nth(1).context("the minimal model")?;
    let scratch = tempfile::tempdir()?;
    let adapter = scratch.path().join("adapter");
    let cfg = fount_model::HfConfig::from_file(&model.join("config.json"))?.resolve()?;
    fount_model::init::init_lora(&cfg, 4, 0.3, 7, &adapter)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let url = a.database_url.as_str();
        let run = fount_store::now_ms();
        let pg = Store::connect(url).await.context("--database-url")?;
        let sqlite_dir = scratch.path().join("sqlite");
        let sqlite = Store::open(&sqlite_dir, None).await?;
        let pg_key = tenant(&pg, &format!("bench{run}"), None).await?;
        let lite_key = tenant(&sqlite, &format!("bench{run}"), None).await?;
        println!(
            "{} clients, max_tokens = 1 on the minimal model, {} s per measurement, medians of {} rounds; {threads} threads; PostgreSQL on this machine",
            a.clients, a.seconds, a.rounds
        );
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(a.clients)
            .build_http();
        let mut setups: Vec<(String, Vec<Replica>, &str)> = Vec::new();
        setups.push((
            "1 replica, SQLite (embedded)".into(),
            vec![replica(&model, &sqlite_dir, None).await?],
            &lite_key,
        ));
        for n in 1..=3 {
            let mut rs = Vec::new();
            for i in 0..n {
                rs.push(replica(&model, &scratch.path().join(format!("r{n}-{i}")), Some(url)).await?);
            }
            setups.push((
                format!("{n} replica{}, PostgreSQL", if n > 1 { "s" } else { "" }),
                rs,
                &pg_key,
            ));
        }
        let bases: Vec<Vec<String>> = setups
            .iter()
            .map(|(_, rs, _)| rs.iter().map(|r| r.base.clone()).collect())
            .collect();
        for (b, (_, _, key)) in bases.iter().zip(&setups) {
            load(&client, b, Some(key), a.clients, 0.3).await?;
        }
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); setups.len()];
        // PostgreSQL's CPU seconds and the requests served, by setup
        let mut pg_cpu = vec![(0.0f64, 0.0f64); setups.len()];
        for round in 0..a.rounds {
            for k in 0..setups.len() {
                let i = (k + round) % setups.len();
                let cpu0 = postgres_cpu();
                let r = load(&client, &bases[i], Some(setups[i].2), a.clients, a.seconds).await?;
                if let (Some(c0), Some(c1)) = (cpu0, postgres_cpu()) {
                    pg_cpu[i].0 += c1 - c0;
                    pg_cpu[i].1 += r.0 * a.seconds;
                }
                runs[i].push(r);
            }
        }
        println!("| setup | requests/s | vs 1 replica on SQLite | PostgreSQL CPU per request |");
        println!("|---|---|---|---|");
        let base = median(runs[0].clone()).0;
        for (i, (label, _, _)) in setups.iter().enumerate() {
            let m = median(runs[i].clone()).0;
            let cpu = if i == 0 || pg_cpu[i].1 == 0.0 {
                "-".to_string()
            } else {
                format!("{:.0} µs", pg_cpu[i].0 * 1e6 / pg_cpu[i].1)
            };
            println!("| {label} | {m:.0} | {:.3}× | {cpu} |", m / base);
        }

        // the quota error: bursts at 50 a minute over three replicas
        let three = &bases[setups.len() - 1];
        let mut errors = Vec::new();
        for b in 0..3 {
            let key = tenant(&pg, &format!("burst{run}x{b}"), Some(50)).await?;
            let mut tasks = Vec::new();
            for i in 0..150 {
                let (client, url, key) = (client.clone(), format!("{}/completions", three[i % 3]), key.clone());
                tasks.push(tokio::spawn(async move {
                    post(&client, &url, &key, serde_json::json!({"model": "bench", "prompt": "q", "max_tokens": 1})).await
                }));
            }
            let mut ok = 0i64;
            for t in tasks {
                ok += i64::from(t.await?? == 200);
            }
            errors.push(ok - 50);
        }
        println!("\nquota error, 150 requests at once at a limit of 50 a minute over 3 replicas, 3 bursts: admitted − limit = {errors:?}");

        // registry propagation: registered on replica 0 until it answers on replica 1
        let mut took = Vec::new();
        for p in 0..a.propagations {
            let name = format!("prop{run}x{p}");
            let status = post(&client, &format!("{}/adapters", three[0]), &pg_key,
                serde_json::json!({"name": name, "path": adapter.display().to_string()})).await?;
            if status != 200 {
                bail!("registering an adapter: HTTP {status}");
            }
            let t0 = Instant::now();
            loop {
                let s = post(&client, &format!("{}/completions", three[1]), &pg_key,
                    serde_json::json!({"model": name, "prompt": "q", "max_tokens": 1})).await?;
                if s == 200 {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("adapter {name} never answered on another replica");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            took.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        println!(
            "registry propagation over {} registrations: median {:.0} ms, max {:.0} ms (poll every {} ms)",
            took.len(),
            took[took.len() / 2],
            took[took.len() - 1],
            fount_server::replicas::REGISTRY_POLL.as_millis()
        );
        drop(setups);

        println!(
            "\n| the store alone (PostgreSQL on this machine) | per second | PostgreSQL CPU per operation |"
        );
        println!("|---|---|---|");
        for (label, r, cpu) in store_rates(url, 16, a.seconds, &run.to_string()).await? {
            let cpu = cpu.map_or("-".to_string(), |c| format!("{c:.0} µs"));
            println!("| {label} | {r:.0} | {cpu} |");
        }
        Ok(())
    })
}
