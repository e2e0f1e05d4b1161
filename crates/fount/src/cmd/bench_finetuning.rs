//! `fount bench finetuning`: OpenAI's Fine-tuning API end to end on a `fount serve` process.
//!
//! - from `succeeded` to the first answer of the `ft:` model: every tenant's job is polled until
//!   it reads `succeeded`, and the model is called at once (p50 and p99 over the tenants);
//! - a job through the API against `fount finetune` run directly with the job's own settings and
//!   copy of the data (alternating, medians);
//! - every tenant's `ft:` model in one batch against the base alone (alternating rounds of one
//!   stream per tenant, medians): the engine's mixed-adapter figure through the fine-tuning path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::bench_engine::{bench_model, ms, pct};
use super::bench_serve::{prompts, streams, HttpClient, Stream};

/// Arguments of `fount bench finetuning`.
#[derive(Debug, Args)]
pub struct FinetuningBench {
    /// Model directory; by default the random Qwen2.5-0.5B-shaped model of `fount bench engine`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tenants, each with its own fine-tuning job and `ft:` model.
    #[arg(long, default_value_t = 32)]
    pub tenants: usize,
    /// Rounds of the comparisons (API job against direct run; ft models against the base).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Prompt tokens per stream of the throughput comparison.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
}

/// `fount serve` in a child process, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fount() -> Result<Command> {
    Ok(Command::new(
        std::env::current_exe().context("finding the fount binary")?,
    ))
}

fn fount_out(args: &[&str]) -> Result<String> {
    let out = fount()?
        .args(args)
        .output()
        .with_context(|| format!("running fount {args:?}"))?;
    if !out.status.success() {
        bail!(
            "fount {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Ten short conversations, as a tenant would upload them.
fn training_file() -> String {
    (0..10)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("Rewrite the date 19{:02}-0{}-1{} as DD/MM/YYYY.", 40 + i, 1 + i % 9, i % 10)},
                {"role": "assistant", "content": format!("1{}/0{}/19{:02}", i % 10, 1 + i % 9, 40 + i)},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    key: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<Value> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {key}"));
    let bytes = match body {
        Some((ct, b)) => {
            req = req.header("content-type", ct);
            b
        }
        None => Vec::new(),
    };
    let res = client
        .request(req.body(Full::new(Bytes::from(bytes)))?)
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = res.status();
    let text = res.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{method} {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    Ok(serde_json::from_slice(&text)?)
}

async fn upload(client: &HttpClient, base: &str, key: &str, text: &str) -> Result<String> {
    let boundary = "fountbenchboundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{text}\r\n--{boundary}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let v = call(
        client,
        "POST",
        &format!("{base}/files"),
        key,
        Some((&ct, body.into_bytes())),
    )
    .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

/// What one job measured.
struct Measured {
    job: Value,
    /// From creation to reading `succeeded`.
    took: Duration,
    /// From reading `succeeded` to the `ft:` model's answer.
    answer: Duration,
    /// The same request to the base model, right after.
    base_answer: Duration,
}

/// Creates a job and polls it every `poll` until it succeeds, then calls its model and the base.
async fn job(
    client: &HttpClient,
    base: &str,
    key: &str,
    file: &str,
    suffix: &str,
    poll: Duration,
) -> Result<Measured> {
    let body = json!({"model": "bench", "training_file": file, "suffix": suffix, "seed": 1,
        "method": {"type": "supervised", "supervised": {"hyperparameters":
            {"n_epochs": 1, "batch_size": 10}}}});
    let start = Instant::now();
    let created = call(
        client,
        "POST",
        &format!("{base}/fine_tuning/jobs"),
        key,
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    let done = loop {
        let j = call(
            client,
            "GET",
            &format!("{base}/fine_tuning/jobs/{id}"),
            key,
            None,
        )
        .await?;
        match j["status"].as_str() {
            Some("succeeded") => break j,
            Some("failed" | "cancelled") => bail!("{id} did not succeed: {j}"),
            _ => tokio::time::sleep(poll).await,
        }
        if start.elapsed() > Duration::from_secs(1800) {
            bail!("{id} did not finish in 30 minutes");
        }
    };
    let took = start.elapsed();
    let model = done["fine_tuned_model"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut times = Vec::new();
    for m in [model.as_str(), "bench"] {
        let t = Instant::now();
        let chat = json!({"model": m, "max_tokens": 1,
            "messages": [{"role": "user", "content": "Rewrite the date 1999-01-02."}]});
        call(
            client,
            "POST",
            &format!("{base}/chat/completions"),
            key,
            Some(("application/json", chat.to_string().into_bytes())),
        )
        .await
        .with_context(|| format!("the first call of {m}"))?;
        times.push(t.elapsed());
    }
    Ok(Measured {
        job: done,
        took,
        answer: times[0],
        base_answer: times[1],
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark.
pub fn bench_finetuning(a: FinetuningBench, threads: Option<usize>) -> Result<()> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let model = bench_model(a.model.as_deref())?;
    let dir = std::env::temp_dir().join(format!("fount-bench-finetuning-{}", std::process::id()));
    let _ = fs_err::remove_dir_all(&dir);
    fs_err::create_dir_all(&dir)?;
    let data = dir.join("data");
    let d = s(&data);
    let mut keys = Vec::new();
    for t in 0..a.tenants {
        let name = format!("t{t:02}");
        fount_out(&["admin", "--data-dir", &d, "tenant", "create", &name])?;
        keys.push(fount_out(&[
            "admin",
            "--data-dir",
            &d,
            "key",
            "create",
            "--tenant",
            &name,
            "--scopes",
            "files,fine_tuning,inference",
        ])?);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let threads_s = threads.to_string();
    let child = fount()?
        .args([
            "--threads",
            &threads_s,
            "serve",
            "--model",
            &s(&model),
            "--model-name",
            "bench",
        ])
        .args([
            "--data-dir",
            &d,
            "--port",
            &port.to_string(),
            "--kv-memory",
            "2GiB",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            fs_err::File::create(dir.join("serve.log"))?.into_parts().0,
        ))
        .spawn()
        .context("starting fount serve")?;
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}/v1"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&a, &server, &keys, &model, &dir, threads));
    drop(server);
    if result.is_ok() {
        let _ = fs_err::remove_dir_all(&dir);
    } else {
        eprintln!("kept {} (serve.log)", dir.display());
    }
    result
}

async fn run(
    a: &FinetuningBench,
    server: &Server,
    keys: &[String],
    model: &Path,
    dir: &Path,
    threads: usize,
) -> Result<()> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let base = &server.base;
    let health = base.trim_end_matches("/v1").to_string() + "/health";
    let start = Instant::now();
    while call(&client, "GET", &health, "", None).await.is_err() {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("fount serve did not start (serve.log in {})", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "model {}, {threads} threads, {} tenants; each job: 10 examples, 1 epoch, batch 10 (one step)",
        model.display(),
        keys.len()
    );
    // every tenant fine-tunes; each job is polled until `succeeded`, then its model is called
    let text = training_file();
    let mut files = Vec::new();
    let (mut answers, mut base_answers, mut jobs, mut models) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, key) in keys.iter().enumerate() {
        let file = upload(&client, base, key, &text).await?;
        let m = job(
            &client,
            base,
            key,
            &file,
            &format!("t{i:02}"),
            Duration::from_millis(5),
        )
        .await?;
        models.push(
            m.job["fine_tuned_model"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        answers.push(m.answer);
        base_answers.push(m.base_answer);
        jobs.push(m.job);
        files.push(file);
    }
    let (p50, p99) = (pct(&mut answers.clone(), 0.5), pct(&mut answers, 0.99));
    let (b50, b99) = (
        pct(&mut base_answers.clone(), 0.5),
        pct(&mut base_answers, 0.99),
    );
    println!(
        "from succeeded to the ft: model's first answer (one token): p50 {:.1} ms, p99 {:.1} ms \
         over {} jobs; the same request to the base model right after: p50 {:.1} ms, p99 {:.1} ms",
        ms(p50),
        ms(p99),
        keys.len(),
        ms(b50),
        ms(b99)
    );
    // a job through the API against the same run of `fount finetune`, alternating
    let first = &jobs[0];
    let job_dir = dir
        .join("data/fine_tuning")
        .join(first["id"].as_str().unwrap_or_default());
    let (mut api, mut direct) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let out = dir.join(format!("direct-{round}"));
        let run_direct = || -> Result<f64> {
            let t = Instant::now();
            fount_out(&[
                "finetune",
                "--base",
                &s(model),
                "--data",
                &s(&job_dir.join("train.jsonl")),
                "--out",
                &s(&out),
                "--config",
                &s(&job_dir.join("config.toml")),
            ])?;
            Ok(t.elapsed().as_secs_f64())
        };
        if round % 2 == 0 {
            direct.push(run_direct()?);
        }
        // polled every 100 ms here: a tight poll would take CPU from the job it times
        let m = job(
            &client,
            base,
            &keys[0],
            &files[0],
            "again",
            Duration::from_millis(100),
        )
        .await?;
        api.push(m.took.as_secs_f64());
        if round % 2 == 1 {
            direct.push(run_direct()?);
        }
    }
    let (api, direct) = (median(api), median(direct));
    println!(
        "a job through the API: {api:.2} s against {direct:.2} s for fount finetune directly: \
         {:.3}x, +{:.2} s (medians of {} rounds)",
        api / direct,
        api - direct,
        a.rounds
    );
    // every tenant's ft: model in one batch against the base model alone, alternating
    // ids the tokenizer can spell (and the model embeds)
    let vocab = fount_model::Tokenizer::from_file(&model.join("tokenizer.json"))?
        .vocab_size()
        .min(30_000);
    let mut seed = 1000;
    let mut batch = |ft: bool| {
        seed += 1;
        let ps = prompts(keys.len(), a.prompt_tokens, vocab, seed);
        ps.into_iter()
            .enumerate()
            .map(|(i, p)| Stream {
                key: Some(keys[i].clone()),
                model: if ft {
                    models[i].clone()
                } else {
                    "bench".into()
                },
                prompt: json!(p),
            })
            .collect::<Vec<_>>()
    };
    // warm: every adapter loaded once
    streams(&client, base, batch(true), 2, false).await?;
    let (mut with_ft, mut base_only) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let (f, b) = (batch(true), batch(false));
        if round % 2 == 0 {
            with_ft.push(
                streams(&client, base, f, a.decode_tokens, false)
                    .await?
                    .tokens_per_s,
            );
            base_only.push(
                streams(&client, base, b, a.decode_tokens, false)
                    .await?
                    .tokens_per_s,
            );
        } else {
            base_only.push(
                streams(&client, base, b, a.decode_tokens, false)
                    .await?
                    .tokens_per_s,
            );
            with_ft.push(
                streams(&client, base, f, a.decode_tokens, false)
                    .await?
                    .tokens_per_s,
            );
        }
    }
    let (ft, b) = (median(with_ft), median(base_only));
    println!(
        "{} streams, each tenant's own ft: model: {ft:.1} tokens/s against {b:.1} for the base \
         alone: {:.3}x (medians of {} rounds; {} prompt + {} generated tokens per stream)",
        keys.len(),
        ft / b,
        a.rounds,
        a.prompt_tokens,
        a.decode_tokens
    );
    Ok(())
}
