//! `fount pool run`: the compute pool on its own, for deployments that keep API replicas and
//! the pool apart (the store is how they meet); and the pool that `fount serve` runs inside.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_pool::executor::{Executor, Local, Slurm};
use fount_pool::{Pool, PoolConfig};

use super::admin::StoreArgs;

/// How the pool runs jobs; shared by `fount pool run` and `fount serve`.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Jobs running at once.
    #[arg(long, env = "FOUNT_POOL_SLOTS", default_value_t = 1)]
    pub pool_slots: usize,
    /// Where jobs run: `local` child processes, or `slurm` batch jobs (through sbatch, squeue,
    /// scontrol and scancel; SLURM_CONF as for any Slurm client).
    #[arg(long, env = "FOUNT_POOL_EXECUTOR", default_value = "local", value_parser = ["local", "slurm"])]
    pub pool_executor: String,
    /// Seconds a preempted job may take to checkpoint and exit before it is killed (it then
    /// resumes from its last complete checkpoint).
    #[arg(long, env = "FOUNT_PREEMPT_GRACE", default_value_t = 60.0)]
    pub preempt_grace: f64,
    /// The half-life, in hours, of past usage in fair sharing between tenants.
    #[arg(long, env = "FOUNT_FAIR_HALF_LIFE", default_value_t = 168.0)]
    pub fair_half_life: f64,
    /// Slurm: the partition (Slurm's default when absent).
    #[arg(long, env = "FOUNT_SLURM_PARTITION")]
    pub slurm_partition: Option<String>,
    /// Slurm: the path of `fount` on the nodes (default: this binary's path).
    #[arg(long, env = "FOUNT_SLURM_FOUNT")]
    pub slurm_fount: Option<PathBuf>,
    /// Slurm: further `sbatch` options for every job, space-separated (e.g. `--cpus-per-task=8
    /// --gres=gpu:1`).
    #[arg(long, env = "FOUNT_SLURM_SBATCH", allow_hyphen_values = true)]
    pub slurm_sbatch: Option<String>,
}

impl Default for PoolArgs {
    fn default() -> PoolArgs {
        PoolArgs {
            pool_slots: 1,
            pool_executor: "local".into(),
            preempt_grace: 60.0,
            fair_half_life: 168.0,
            slurm_partition: None,
            slurm_fount: None,
            slurm_sbatch: None,
        }
    }
}

/// `fount pool …`
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Runs the pool until SIGTERM or Ctrl-C (running jobs keep running; the next pool adopts
    /// them).
    Run {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        pool: PoolArgs,
    },
}

impl PoolArgs {
    fn config(&self) -> Result<PoolConfig> {
        if self.pool_slots == 0 {
            bail!("--pool-slots must be at least 1 (--no-pool turns the pool off)");
        }
        if !(self.preempt_grace >= 0.0 && self.preempt_grace.is_finite()) {
            bail!("--preempt-grace must be a number of seconds");
        }
        if !(self.fair_half_life > 0.0 && self.fair_half_life.is_finite()) {
            bail!("--fair-half-life must be a positive number of hours");
        }
        Ok(PoolConfig {
            slots: self.pool_slots,
            grace: Duration::from_secs_f64(self.preempt_grace),
            half_life: Duration::from_secs_f64(self.fair_half_life * 3600.0),
            ..PoolConfig::default()
        })
    }

    fn executor(&self, store: &StoreArgs) -> Result<Box<dyn Executor>> {
        let fount = std::env::current_exe().context("finding this binary's path")?;
        // jobs log their runs to this store's ledger
        let cwd = std::env::current_dir().context("the working directory")?;
        let mut env = vec![(
            "FOUNT_DATA_DIR".to_string(),
            cwd.join(&store.data_dir).display().to_string(),
        )];
        if let Some(url) = &store.database_url {
            env.push(("FOUNT_DATABASE_URL".into(), url.clone()));
        }
        Ok(match self.pool_executor.as_str() {
            "slurm" => Box::new(
                Slurm::new(
                    self.slurm_fount.clone().unwrap_or(fount),
                    self.slurm_partition.clone(),
                    self.slurm_sbatch
                        .as_deref()
                        .unwrap_or("")
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                )
                .with_env(env),
            ),
            _ => Box::new(Local::new(fount).with_env(env)),
        })
    }
}

/// A pool running on a thread of its own.
pub struct PoolThread {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<()>>,
}

impl PoolThread {
    /// Starts the pool on the store at `store` (opened on the pool's own runtime).
    pub fn spawn(store: &StoreArgs, args: &PoolArgs) -> Result<PoolThread> {
        let cfg = args.config()?;
        let exec = args.executor(store)?;
        let (dir, url) = (store.data_dir.clone(), store.database_url.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("fount-pool".into())
            .spawn(move || {
                let r = runtime.block_on(async move {
                    let store = fount_store::Store::open(&dir, url.as_deref())
                        .await
                        .context("opening the store (--data-dir / --database-url)")?;
                    tracing::info!(
                        slots = cfg.slots,
                        executor = exec.name(),
                        "compute pool running"
                    );
                    let mut pool = Pool::new(store.clone(), exec, cfg);
                    pool.run(&flag).await?;
                    store.close().await;
                    Ok(())
                });
                // a server goes on serving without its pool: say so when it happens
                if let Err(e) = &r {
                    tracing::error!("the compute pool stopped: {e:#}");
                }
                r
            })?;
        Ok(PoolThread { stop, thread })
    }

    /// Stops the pool after its current tick and waits for it.
    pub fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => bail!("the pool's thread panicked"),
        }
    }
}

/// Runs `fount pool`.
pub fn run(c: PoolCommand) -> Result<()> {
    let PoolCommand::Run { store, pool } = c;
    super::init_tracing();
    let stop = Arc::new(AtomicBool::new(false));
    super::train::stop_on_signals(stop.clone())?;
    let thread = PoolThread::spawn(&store, &pool)?;
    eprintln!(
        "pool running: {} slot(s) on the {} executor; stop with Ctrl-C",
        pool.pool_slots, pool.pool_executor
    );
    while !stop.load(Ordering::SeqCst) && !thread.thread.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    thread.stop()
}
