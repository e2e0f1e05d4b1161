//! `fount bench pool`: what the compute pool costs and how fast it acts.
//!
//! 1. Scheduling: the decision over 10,000 queued jobs of 100 tenants (priorities, weights,
//!    decayed usage, running limits), alone and as a whole pool tick on the store (reading the
//!    jobs, writing the reasons that changed).
//! 2. Submit to start on an idle local pool.
//! 3. Overhead: a fine-tune run as a job against the same command run directly.
//! 4. Preemption: from a high-priority submit to its start while a low-priority fine-tune must
//!    checkpoint first, the steps lost, and whether the preempted run's adapter equals the
//!    direct one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use fount_pool::schedule::{decide, Active, Snapshot, TenantView, Waiting};
use fount_store::{Change, JobQuota, JobState, NewJob, Priority, Store, Transition};
use rand::{Rng, SeedableRng};

use super::admin::StoreArgs;
use super::pool::{PoolArgs, PoolThread};

/// Arguments of `fount bench pool`.
#[derive(Debug, Args)]
pub struct PoolBench {
    /// Queued jobs in the scheduling measurement.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Tenants they belong to.
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// Submit-to-start samples.
    #[arg(long, default_value_t = 10)]
    pub starts: usize,
    /// Fine-tuning epochs of the overhead and preemption runs (the tiny model; about 0.6 s
    /// per epoch on one core).
    #[arg(long, default_value_t = 25)]
    pub epochs: usize,
    /// Where to work (default: `target/fount-bench/pool`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn fount(args: &[&str]) -> Result<()> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe).args(args).output()?;
    if !out.status.success() {
        bail!(
            "fount {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `fount bench pool`.
pub fn bench_pool(a: PoolBench, threads: Option<usize>) -> Result<()> {
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/fount-bench/pool"));
    if dir.exists() {
        fs_err::remove_dir_all(&dir)?;
    }
    fs_err::create_dir_all(&dir)?;
    let dir = fs_err::canonicalize(&dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "machine: {} cores; fount threads per job: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads.map_or("all".into(), |t| t.to_string())
    );
    scheduling(&a, &dir, &runtime)?;
    jobs_on_a_pool(&a, &dir, &runtime)
}

/// A queue of `n` jobs over `tenants` tenants, 4 slots all taken.
fn snapshot(n: usize, tenants: usize) -> Snapshot {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let prio = |r: u32| match r {
        0 => Priority::Low,
        1 => Priority::Normal,
        _ => Priority::High,
    };
    let mut views = HashMap::new();
    for t in 0..tenants {
        views.insert(
            format!("ten-{t}"),
            TenantView {
                quota: JobQuota {
                    running_jobs: (t % 3 == 0).then_some(2),
                    slot_seconds_per_day: (t % 5 == 0).then_some(1_000_000),
                    ..JobQuota::default()
                },
                weight: 1 + (t % 4) as i64,
                decayed_ms: rng.random_range(0.0..1e7),
                ..TenantView::default()
            },
        );
    }
    Snapshot {
        slots: 4,
        now_ms: 1_000_000_000,
        waiting: (0..n)
            .map(|i| Waiting {
                id: format!("job-{i}"),
                tenant: format!("ten-{}", rng.random_range(0..tenants)),
                priority: prio(rng.random_range(0..3)),
                created_at_ms: i as i64,
            })
            .collect(),
        active: (0..4)
            .map(|i| Active {
                id: format!("run-{i}"),
                attempt: 1,
                tenant: format!("ten-{i}"),
                priority: Priority::High,
                started_at_ms: 999_000_000,
                stopping: false,
            })
            .collect(),
        tenants: views,
        entry_penalty_ms: 60_000.0,
    }
}

fn scheduling(a: &PoolBench, dir: &Path, runtime: &tokio::runtime::Runtime) -> Result<()> {
    println!(
        "\n== scheduling: {} queued jobs, {} tenants, 4 slots",
        a.jobs, a.tenants
    );
    let snap = snapshot(a.jobs, a.tenants);
    let mut passes = 0u32;
    let start = Instant::now();
    let mut decided = 0;
    while start.elapsed() < Duration::from_secs(2) {
        let d = decide(&snap);
        decided = d.len();
        passes += 1;
    }
    let per_pass = start.elapsed().as_secs_f64() / f64::from(passes);
    let waits = decided;
    println!(
        "decide(): {:.2} ms per pass over every queued job ({waits} decisions): {:.0} decisions/s ({:.0}x the 1,000/s target)",
        per_pass * 1e3,
        waits as f64 / per_pass,
        waits as f64 / per_pass / 1000.0
    );

    // the same queue in the store, behind a whole pool tick
    runtime.block_on(async {
        let store = Store::open(dir.join("sched"), None).await?;
        let mut ids = HashMap::new();
        for t in 0..a.tenants {
            let tenant = store.create_tenant(&format!("ten-{t}")).await?;
            if let Some(v) = snap.tenants.get(&format!("ten-{t}")) {
                store.set_job_quota(&tenant.id, &v.quota).await?;
            }
            ids.insert(format!("ten-{t}"), tenant.id);
        }
        let fill = Instant::now();
        let me = fount_pool::executor::local::handle_of(std::process::id() as i32)
            .context("this process's handle")?;
        for (i, w) in snap.waiting.iter().enumerate() {
            let job = store
                .submit_job(&NewJob {
                    tenant_id: ids[&w.tenant].clone(),
                    name: None,
                    priority: w.priority,
                    kind: "finetune".into(),
                    command: vec!["finetune".into()],
                    cwd: s(dir),
                    out_dir: format!("{}/sched/out-{i}", s(dir)),
                    done_marker: format!("{}/sched/out-{i}/done", s(dir)),
                    time_limit_s: None,
                    log_path: format!("{}/sched/{{id}}.log", s(dir)),
                })
                .await?;
            // four of them hold the slots (as this very process, alive while it measures)
            if i < 4 {
                let r = store
                    .transition_job(
                        &job,
                        &Change {
                            executor: Some("local"),
                            ..Change::new(Transition::Start, "started")
                        },
                    )
                    .await?;
                store.set_job_handle(&r.id, r.attempts, &me).await?;
            }
        }
        println!(
            "store: {} jobs submitted in {:.1} s ({:.0} submits/s, SQLite)",
            a.jobs,
            fill.elapsed().as_secs_f64(),
            a.jobs as f64 / fill.elapsed().as_secs_f64()
        );
        let exe = std::env::current_exe()?;
        let mut pool = fount_pool::Pool::new(
            store.clone(),
            Box::new(fount_pool::executor::Local::new(exe)),
            fount_pool::PoolConfig {
                slots: 4,
                ..fount_pool::PoolConfig::default()
            },
        );
        let t = Instant::now();
        pool.tick().await?;
        let first = t.elapsed().as_secs_f64();
        let mut ticks = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            pool.tick().await?;
            ticks.push(t.elapsed().as_secs_f64());
        }
        ticks.sort_by(f64::total_cmp);
        let steady = ticks[ticks.len() / 2];
        println!(
            "pool tick: first {:.0} ms (writes every job's reason), then {:.0} ms: {:.0} decisions/s ({:.0}x the target)",
            first * 1e3,
            steady * 1e3,
            a.jobs as f64 / steady,
            a.jobs as f64 / steady / 1000.0
        );
        let running = store
            .jobs(&fount_store::JobFilter {
                tenant_id: None,
                states: &[JobState::Running],
            })
            .await?;
        if running.len() != 4 {
            bail!("{} running after the ticks, not 4", running.len());
        }
        store.close().await;
        Ok::<(), anyhow::Error>(())
    })
}

fn jobs_on_a_pool(a: &PoolBench, dir: &Path, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let base = dir.join("base");
    fount(&[
        "model",
        "init",
        "--arch",
        "qwen2",
        "--preset",
        "tiny",
        "--out",
        &s(&base),
    ])?;
    fount(&[
        "data",
        "synth",
        "--out",
        &s(&dir.join("synth")),
        "--docs",
        "10",
        "--chat-examples",
        "200",
    ])?;
    let data = dir.join("synth/chat/train.jsonl");
    let cfg = dir.join("ft.toml");
    // checkpoints far apart: without the checkpoint on SIGTERM, a preemption would lose
    // everything since the last one
    fs_err::write(
        &cfg,
        format!(
            "epochs = {}\ntokens_per_step = 256\ncheckpoint_every = 400\nkeep_checkpoints = 2\n",
            a.epochs
        ),
    )?;
    let short = dir.join("short.toml");
    fs_err::write(&short, "epochs = 1\ntokens_per_step = 256\n")?;
    let finetune = |out: &Path, cfg: &Path| -> Vec<String> {
        [
            "finetune",
            "--base",
            &s(&base),
            "--data",
            &s(&data),
            "--out",
            &s(out),
            "--config",
            &s(cfg),
        ]
        .map(str::to_string)
        .to_vec()
    };

    // the direct run
    let t = Instant::now();
    let direct_out = dir.join("direct");
    let args = finetune(&direct_out, &cfg);
    fount(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let direct = t.elapsed().as_secs_f64();

    let store_args = StoreArgs {
        data_dir: dir.join("store"),
        database_url: None,
    };
    let pool_args = PoolArgs {
        preempt_grace: 60.0,
        ..PoolArgs::default()
    };
    let pool = PoolThread::spawn(&store_args, &pool_args)?;
    let result = runtime.block_on(async {
        let store = Store::open(&store_args.data_dir, None).await?;
        let submit = |priority: &str, command: Vec<String>| {
            let a = super::jobs::SubmitArgs {
                priority: priority.into(),
                command,
                ..Default::default()
            };
            super::jobs::submit(&store, &store_args, a)
        };
        let until = |id: String, what: fn(&fount_store::Job) -> bool| {
            let store = store.clone();
            async move {
                let start = Instant::now();
                loop {
                    let j = store.job(&id).await?.context("job vanished")?;
                    if what(&j) {
                        return Ok::<_, anyhow::Error>(j);
                    }
                    if j.state.is_terminal() && !what(&j) {
                        bail!("{id} ended {}: {:?}", j.state, j.error);
                    }
                    if start.elapsed() > Duration::from_secs(600) {
                        bail!("{id}: timed out");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };

        println!("\n== submit to start, idle local pool ({} jobs)", a.starts);
        let mut waits = Vec::new();
        for i in 0..a.starts {
            let job = submit("normal", finetune(&dir.join(format!("start-{i}")), &short)).await?;
            let r = until(job.id.clone(), |j| j.started_at_ms.is_some()).await?;
            waits.push((r.started_at_ms.unwrap_or(0) - r.created_at_ms) as f64 / 1e3);
            until(job.id, |j| j.state == JobState::Succeeded).await?;
        }
        waits.sort_by(f64::total_cmp);
        println!(
            "submit -> running: median {:.3} s, max {:.3} s (target 1 s: {:.2}x of it at the max)",
            waits[waits.len() / 2],
            waits[waits.len() - 1],
            waits[waits.len() - 1]
        );

        println!("\n== overhead: the fine-tune as a job against the same command run directly");
        let job = submit("normal", finetune(&dir.join("as-job"), &cfg)).await?;
        let r = until(job.id, |j| j.state == JobState::Succeeded).await?;
        let as_job = (r.finished_at_ms.unwrap_or(0) - r.created_at_ms) as f64 / 1e3;
        let same = fs_err::read(dir.join("as-job/adapter_model.safetensors"))?
            == fs_err::read(direct_out.join("adapter_model.safetensors"))?;
        println!(
            "direct {direct:.2} s, as a job {as_job:.2} s (submit to succeeded): {:.3}x, {:+.2} s (target: <= 3 % + 1 s = {:.2} s); adapters identical: {same}",
            as_job / direct,
            as_job - direct,
            direct * 1.03 + 1.0
        );

        println!("\n== preemption: a high-priority job arrives while a low-priority fine-tune runs");
        let low = submit("low", finetune(&dir.join("low"), &cfg)).await?;
        until(low.id.clone(), |j| j.state == JobState::Running).await?;
        tokio::time::sleep(Duration::from_secs_f64(direct / 3.0)).await;
        let high = submit("high", finetune(&dir.join("high"), &short)).await?;
        let h = until(high.id.clone(), |j| j.started_at_ms.is_some()).await?;
        let latency = (h.started_at_ms.unwrap_or(0) - h.created_at_ms) as f64 / 1e3;
        // the checkpoint the low job will resume from, as the pool saw it when it ended
        let resumed = store.job(&low.id).await?.and_then(|j| j.checkpoint_step);
        until(high.id, |j| j.state == JobState::Succeeded).await?;
        let l = until(low.id.clone(), |j| j.state == JobState::Succeeded).await?;
        let log = fs_err::read_to_string(&l.log_path)?;
        // the step the signal's checkpoint holds, and the step the second attempt resumed from
        let stopped_at = log
            .split("checkpoint written to ")
            .nth(1)
            .and_then(|r| r.split("step-").nth(1))
            .and_then(|r| r.get(..8))
            .and_then(|n| n.parse::<i64>().ok());
        let same = fs_err::read(dir.join("low/adapter_model.safetensors"))?
            == fs_err::read(direct_out.join("adapter_model.safetensors"))?;
        println!(
            "high submit -> high running: {latency:.2} s (the low job checkpointed at step {} and exited; grace {:.0} s); attempts of the low job: {}",
            stopped_at.map_or("?".into(), |s| s.to_string()),
            pool_args.preempt_grace,
            l.attempts
        );
        println!(
            "steps lost: {} (the signal's checkpoint is the step reached; periodic checkpoints every 400 steps would have lost {}); preempted adapter identical to the direct run: {same}",
            match (stopped_at, resumed) {
                (Some(a), Some(b)) => (a - b).to_string(),
                _ => "?".into(),
            },
            stopped_at.map_or("?".into(), |s| (s % 400).to_string()),
        );
        store.close().await;
        Ok::<(), anyhow::Error>(())
    });
    pool.stop()?;
    result
}
