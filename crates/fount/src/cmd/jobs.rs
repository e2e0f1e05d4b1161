//! `fount jobs`: submit, list, show, cancel, follow and wait for jobs on the compute pool.
//!
//! A job is a `fount train …`, `fount finetune …` or `fount data run …` command line. It is
//! checked at submit the way the command itself would check it (parsed by the same argument
//! parser, its files and configuration read), so a job that would fail at once is refused
//! before anything is queued.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use fount_store::{Ask, Job, JobFilter, JobState, NewJob, Priority, Store};
use serde_json::json;

use super::admin::{tenant_id, StoreArgs};

/// Arguments of `fount jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub command: JobsCommand,
}

/// `fount jobs …`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Queues a job and prints its id: `fount jobs submit -- finetune --base B --data F --out O`.
    Submit(SubmitArgs),
    /// Lists jobs, oldest first.
    List {
        /// One tenant's jobs.
        #[arg(long)]
        tenant: Option<String>,
        /// Jobs in this state (queued, running, preempted, paused, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// One JSON object per job, as `show --json` prints it, in a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Shows a job: its state and why, its attempts, its history.
    Show {
        /// The job's id.
        id: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancels a job; a running one is stopped (SIGTERM, then SIGKILL after the grace period).
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Holds a job until `resume`: a running one stops at a checkpoint, as when preempted.
    Pause {
        /// The job's id.
        id: String,
    },
    /// Lets a paused job wait for a slot again; it resumes from its checkpoint.
    Resume {
        /// The job's id.
        id: String,
    },
    /// Prints a job's log.
    Logs {
        /// The job's id.
        id: String,
        /// Keep printing until the job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Waits for a job to end: exits 0 when it succeeded, 1 otherwise.
    Wait {
        /// The job's id.
        id: String,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
}

/// Arguments of `fount jobs submit`.
#[derive(Debug, Clone, Default, Args)]
pub struct SubmitArgs {
    /// The tenant it runs for (default: the `default` tenant, created on first use).
    #[arg(long)]
    pub tenant: Option<String>,
    /// `low`, `normal` or `high`: a higher class preempts a lower one when no slot is free.
    #[arg(long, default_value = "normal")]
    pub priority: String,
    /// A label.
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds an attempt may run before it is stopped as failed.
    #[arg(long)]
    pub time_limit: Option<i64>,
    /// The command line, after `--`: `train …`, `finetune …` or `data run …`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// What submit learns by checking a command line.
#[derive(Debug)]
pub struct Checked {
    /// `train`, `finetune` or `data`.
    pub kind: &'static str,
    /// The directory it writes.
    pub out: PathBuf,
    /// The file that exists once it finished.
    pub done: PathBuf,
}

fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}

fn has_checkpoints(out: &Path) -> bool {
    fs_err::read_dir(out.join("checkpoints")).is_ok_and(|mut d| d.next().is_some())
}

/// Checks a job's command line as the command would, from `cwd`.
pub fn check(command: &[String], cwd: &Path) -> Result<Checked> {
    use crate::Command;
    let cli = crate::Cli::try_parse_from(
        std::iter::once("fount".to_string()).chain(command.iter().cloned()),
    )
    .map_err(|e| anyhow::anyhow!("the job's command line: {}", e.render().to_string().trim()))?;
    match cli.command {
        Command::Finetune(a) if a.command.is_none() => {
            let (Some(base), Some(data), Some(out)) = (a.base, a.data, a.out) else {
                bail!("fount finetune needs --base, --data and --out");
            };
            // `artifacts:KEY` inputs are fetched by the job wherever it runs
            let stored = |p: &Path| p.to_str().is_some_and(|t| t.starts_with("artifacts:"));
            let (local_base, local_data) = (!stored(&base), !stored(&data));
            let (base, data, out) = (
                absolute(cwd, &base),
                absolute(cwd, &data),
                absolute(cwd, &out),
            );
            if local_base && !base.join("config.json").is_file() {
                bail!(
                    "--base {}: no config.json (not a model directory)",
                    base.display()
                );
            }
            if local_data && !data.is_file() {
                bail!("--data {}: no such file", data.display());
            }
            if let Some(c) = &a.config {
                fount_train::finetune::FinetuneConfig::from_file(&absolute(cwd, c))
                    .with_context(|| format!("--config {}", c.display()))?;
            }
            let done = out.join(fount_model::peft::CONFIG_FILE);
            if done.exists() {
                bail!(
                    "--out {} already holds an adapter; choose another",
                    out.display()
                );
            }
            if has_checkpoints(&out) && !a.resume {
                bail!(
                    "--out {} holds checkpoints of a run; add --resume to continue it, or choose another",
                    out.display()
                );
            }
            Ok(Checked {
                kind: "finetune",
                out,
                done,
            })
        }
        Command::Train(a) => {
            let cfg = fount_train::TrainConfig::from_file(&absolute(cwd, &a.config))
                .with_context(|| format!("--config {}", a.config.display()))?;
            let out = absolute(cwd, &cfg.out);
            let done = out.join("final");
            if done.exists() {
                bail!(
                    "{} already holds a finished run; choose another out",
                    out.display()
                );
            }
            if has_checkpoints(&out) && !a.resume {
                bail!(
                    "{} holds checkpoints of a run; add --resume to continue it, or choose another out",
                    out.display()
                );
            }
            Ok(Checked {
                kind: "train",
                out,
                done,
            })
        }
        Command::Data(super::data::DataCommand::Run(r)) => {
            for i in &r.input {
                if !absolute(cwd, i).exists() {
                    bail!("--input {}: no such file or directory", i.display());
                }
            }
            if let Some(p) = &r.pipeline {
                fount_data::pipeline::PipelineConfig::from_file(&absolute(cwd, p))
                    .with_context(|| format!("--pipeline {}", p.display()))?;
            }
            let out = absolute(cwd, &r.out);
            Ok(Checked {
                kind: "data",
                done: out.join("manifest.json"),
                out,
            })
        }
        _ => bail!(
            "only `train`, `finetune` and `data run` run as jobs, not `{}`",
            command.first().map(String::as_str).unwrap_or("")
        ),
    }
}

/// Runs `fount jobs`.
pub fn run(a: JobsArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let store = Store::open(&a.store.data_dir, a.store.database_url.as_deref())
            .await
            .context("opening the store (--data-dir / --database-url)")?;
        let r = jobs(&store, &a.store, a.command).await;
        store.close().await;
        r
    })
}

async fn jobs(store: &Store, where_: &StoreArgs, command: JobsCommand) -> Result<()> {
    match command {
        JobsCommand::Submit(a) => {
            let job = submit(store, where_, a).await?;
            println!("{}", job.id);
        }
        JobsCommand::List {
            tenant,
            state,
            json,
        } => {
            let tenant_id = match &tenant {
                Some(t) => Some(tenant_id(store, t).await?),
                None => None,
            };
            let states = match &state {
                Some(s) => vec![JobState::parse(s).with_context(|| {
                    format!(
                        "--state {s:?}: queued, running, preempted, paused, succeeded, failed or cancelled"
                    )
                })?],
                None => vec![],
            };
            let list = store
                .jobs(&JobFilter {
                    tenant_id: tenant_id.as_deref(),
                    states: &states,
                })
                .await?;
            if json {
                let mut out = Vec::new();
                for j in &list {
                    out.push(to_json(store, j).await?);
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{:<30} {:<12} {:<10} {:<7} {:>8} {:>9}  reason",
                    "id", "tenant", "state", "prio", "attempts", "slot-s"
                );
                for j in &list {
                    let tenant = tenant_name(store, &j.tenant_id).await?;
                    println!(
                        "{:<30} {:<12} {:<10} {:<7} {:>8} {:>9.1}  {}",
                        j.id,
                        tenant,
                        j.state,
                        j.priority,
                        j.attempts,
                        slot_seconds(j),
                        j.reason
                    );
                }
            }
        }
        JobsCommand::Show { id, json } => {
            let job = find(store, &id).await?;
            let v = to_json(store, &job).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_job(&v);
            }
        }
        JobsCommand::Cancel { id } => ask(store, &id, Ask::Cancel).await?,
        JobsCommand::Pause { id } => ask(store, &id, Ask::Pause).await?,
        JobsCommand::Resume { id } => ask(store, &id, Ask::Resume).await?,
        JobsCommand::Logs { id, follow } => logs(store, &id, follow).await?,
        JobsCommand::Wait { id, timeout } => {
            let started = Instant::now();
            loop {
                let job = find(store, &id).await?;
                if job.state.is_terminal() {
                    eprintln!("{}: {} ({})", job.id, job.state, job.reason);
                    if job.state == JobState::Succeeded {
                        return Ok(());
                    }
                    if let Some(e) = &job.error {
                        eprintln!("{e}");
                    }
                    bail!("{} {}", job.id, job.state);
                }
                if timeout.is_some_and(|t| started.elapsed().as_secs_f64() > t) {
                    bail!(
                        "{} is still {} after {:.0} s",
                        job.id,
                        job.state,
                        timeout.unwrap_or(0.0)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

async fn tenant_name(store: &Store, id: &str) -> Result<String> {
    Ok(store
        .tenant(id)
        .await?
        .map(|t| t.name)
        .unwrap_or_else(|| id.to_string()))
}

async fn find(store: &Store, id: &str) -> Result<Job> {
    store
        .job(id)
        .await?
        .with_context(|| format!("no job {id:?} (fount jobs list)"))
}

/// Checks and queues a job.
pub async fn submit(store: &Store, where_: &StoreArgs, a: SubmitArgs) -> Result<Job> {
    let SubmitArgs {
        tenant,
        priority,
        name,
        time_limit,
        command,
    } = a;
    let priority = Priority::parse(&priority)
        .with_context(|| format!("--priority {priority:?}: low, normal or high"))?;
    let tenant = match tenant {
        Some(t) => store
            .tenant_by_name(&t)
            .await?
            .with_context(|| format!("no tenant named {t:?} (fount admin tenant create {t})"))?,
        None => match store.tenant_by_name("default").await? {
            Some(t) => t,
            None => store.create_tenant("default").await?,
        },
    };
    if time_limit.is_some_and(|t| t <= 0) {
        bail!("--time-limit must be a positive number of seconds");
    }
    let quota = store.job_quota(&tenant.id).await?;
    if let Some(max) = quota.max_priority.filter(|&m| priority > m) {
        bail!(
            "tenant {} may submit jobs of at most {max} priority, not {priority}",
            tenant.name
        );
    }
    for (budget, period) in [
        (quota.slot_seconds_per_day, "day"),
        (quota.slot_seconds_per_month, "month"),
    ] {
        if let Some(b) = budget {
            if b <= 0 || time_limit.is_some_and(|t| t > b) {
                bail!(
                    "this job can never fit: tenant {} has {b} slot-seconds per {period}{}",
                    tenant.name,
                    time_limit
                        .map(|t| format!(" and the job asks for {t}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    if quota.running_jobs == Some(0) {
        bail!(
            "tenant {} may run no jobs (its running-jobs quota is 0)",
            tenant.name
        );
    }
    let cwd = std::env::current_dir().context("the current directory")?;
    let checked = check(&command, &cwd)?;
    let logs = absolute(&cwd, &where_.data_dir).join("jobs");
    let job = store
        .submit_job(&NewJob {
            tenant_id: tenant.id.clone(),
            name,
            priority,
            kind: checked.kind.to_string(),
            command,
            cwd: cwd.display().to_string(),
            out_dir: checked.out.display().to_string(),
            done_marker: checked.done.display().to_string(),
            time_limit_s: time_limit,
            log_path: logs.join("{id}.log").display().to_string(),
        })
        .await?;
    Ok(job)
}

fn slot_seconds(j: &Job) -> f64 {
    let running = match (j.state, j.started_at_ms) {
        (JobState::Running, Some(s)) => (fount_store::now_ms() - s).max(0),
        _ => 0,
    };
    (j.slot_ms + running) as f64 / 1000.0
}

/// `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn iso(ms: i64) -> String {
    let t = ms.rem_euclid(86_400_000);
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        fount_store::utc_day(ms),
        t / 3_600_000,
        t / 60_000 % 60,
        t / 1000 % 60,
        t % 1000
    )
}

/// The job as `show --json` prints it.
pub async fn to_json(store: &Store, j: &Job) -> Result<serde_json::Value> {
    let history: Vec<_> = store
        .job_history(&j.id)
        .await?
        .into_iter()
        .map(|e| json!({"state": e.state.name(), "at": iso(e.at_ms), "reason": e.reason}))
        .collect();
    Ok(json!({
        "id": j.id,
        "name": j.name,
        "tenant": tenant_name(store, &j.tenant_id).await?,
        "state": j.state.name(),
        "reason": j.reason,
        "priority": j.priority.name(),
        "attempts": j.attempts,
        "command": j.command,
        "cwd": j.cwd,
        "out": j.out_dir,
        "log": j.log_path,
        "executor": j.executor,
        "handle": j.handle,
        "stopping": j.stop.map(|(s, _)| s.name()),
        "checkpoint_step": j.checkpoint_step,
        "slot_seconds": slot_seconds(j),
        "time_limit_s": j.time_limit_s,
        "created_at": iso(j.created_at_ms),
        "finished_at": j.finished_at_ms.map(iso),
        "error": j.error,
        "history": history,
    }))
}

fn print_job(v: &serde_json::Value) {
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!("{}  {}  ({})", s("id"), s("state"), s("reason"));
    println!(
        "  tenant {}  priority {}  attempts {}",
        s("tenant"),
        s("priority"),
        s("attempts")
    );
    let cmd: Vec<String> = v["command"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    println!("  command: fount {}", cmd.join(" "));
    println!(
        "  checkpoint step {}  slot-seconds {}  log {}",
        s("checkpoint_step"),
        s("slot_seconds"),
        s("log")
    );
    if let Some(e) = v["error"].as_str() {
        println!("  error: {}", e.replace('\n', "\n    "));
    }
    println!("  history:");
    for h in v["history"].as_array().into_iter().flatten() {
        println!(
            "    {}  {:<10} {}",
            h["at"].as_str().unwrap_or(""),
            h["state"].as_str().unwrap_or(""),
            h["reason"].as_str().unwrap_or("")
        );
    }
}

async fn ask(store: &Store, id: &str, what: Ask) -> Result<()> {
    find(store, id).await?;
    match store.ask_job(id, what).await {
        Ok((job, true)) => eprintln!("{id}: {}", job.state),
        Ok((_, false)) => eprintln!(
            "{id}: stopping (the pool signals it: SIGTERM, a checkpoint, then SIGKILL after its \
             grace period)"
        ),
        Err(fount_store::Error::Conflict(why)) => bail!("{why}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn logs(store: &Store, id: &str, follow: bool) -> Result<()> {
    let job = find(store, id).await?;
    let path = PathBuf::from(&job.log_path);
    let mut pos = 0u64;
    let mut out = std::io::stdout();
    loop {
        if let Ok(mut f) = fs_err::File::open(&path) {
            f.seek(SeekFrom::Start(pos))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            pos += buf.len() as u64;
            out.write_all(&buf)?;
            out.flush()?;
        } else if !follow {
            bail!("{id} has no log yet ({} not written)", path.display());
        }
        if !follow
            || find(store, id).await?.state.is_terminal() && {
                // the last bytes written before the end
                fs_err::metadata(&path).map(|m| m.len()).unwrap_or(0) <= pos
            }
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
