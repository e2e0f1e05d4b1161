//! `fount train`: pretraining from token shards with a progress bar; SIGTERM and SIGINT write a
//! checkpoint and stop, `--resume` continues from the newest complete one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use fount_train::{Observer, StepMetrics, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `fount train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run configuration (TOML; every field and its default: docs/training.md).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest complete checkpoint in the run's `out` directory.
    #[arg(long)]
    pub resume: bool,
    /// Where the final model is logged.
    #[command(flatten)]
    pub ledger: super::ledger::LedgerTarget,
    /// Where `model` and `data` given as `artifacts:KEY` are read from, and the final model
    /// published to.
    #[command(flatten)]
    pub artifacts: super::artifacts::RunArtifacts,
}

/// The error with which `fount train` and `fount finetune` end when a signal stopped them after
/// a checkpoint: the binary exits with `EX_TEMPFAIL` (75), which the compute pool reads as
/// "stopped at a checkpoint; resume me".
#[derive(Debug)]
pub struct Checkpointed(pub String);

impl std::fmt::Display for Checkpointed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by a signal after a checkpoint; {}", self.0)
    }
}

impl std::error::Error for Checkpointed {}

/// Sets `flag` on SIGTERM or SIGINT (a second signal exits at once). Returns the handler's
/// switch: once it is cleared, signals are left to whoever else listens (a server that follows).
pub fn stop_on_signals(flag: Arc<AtomicBool>) -> Result<Arc<AtomicBool>> {
    let armed = Arc::new(AtomicBool::new(true));
    let switch = armed.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("fount-signals".into())
        .spawn(move || {
            runtime.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    if !armed.load(Ordering::SeqCst) {
                        continue;
                    }
                    if flag.swap(true, Ordering::SeqCst) {
                        eprintln!("second signal: exiting without a checkpoint");
                        std::process::exit(130);
                    }
                    eprintln!(
                        "signal received: writing a checkpoint after this step, then stopping"
                    );
                }
            });
        })?;
    Ok(switch)
}

/// A progress bar over the steps.
struct Progress {
    bar: ProgressBar,
}

impl Observer for Progress {
    fn start(&mut self, from: u64, steps: u64) {
        self.bar.set_length(steps);
        self.bar.set_position(from);
    }

    fn step(&mut self, m: &StepMetrics) {
        self.bar.set_position(m.step);
        let val = m
            .val_loss
            .map(|v| format!(" val {v:.3}"))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.3}{val} lr {:.2e} {:.0} tok/s MFU {:.1}%",
            m.loss,
            m.lr,
            m.tokens_per_s,
            m.mfu * 100.0
        ));
    }

    fn checkpoint(&mut self, dir: &Path) {
        self.bar.println(format!("checkpoint {}", dir.display()));
    }
}

/// The processes of the run: every process an MPI launcher started (`mpirun -n N`, `srun
/// --mpi=pmix`), with the `mpi` feature; else this one alone.
fn collective() -> Result<Box<dyn fount_train::Collective>> {
    #[cfg(feature = "mpi")]
    if fount_train::mpi::launched() {
        return Ok(Box::new(
            fount_train::mpi::Mpi::init().context("initialising MPI")?,
        ));
    }
    #[cfg(not(feature = "mpi"))]
    if ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|n| n != "1" && v.ends_with("SIZE")))
    {
        anyhow::bail!(
            "started by an MPI launcher, but this fount was built without MPI: cargo build --release --features mpi"
        );
    }
    Ok(Box::new(fount_train::Single))
}

/// Runs `fount train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let mut cfg = TrainConfig::from_file(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    a.artifacts.localise(
        &a.ledger.data_dir,
        &mut [("model", &mut cfg.model), ("data", &mut cfg.data)],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let resume_hint = format!("fount train --config {} --resume", a.config.display());
    let Some(done) = pretrain(&cfg, a.resume, &stop, &resume_hint, Some(&a.ledger))? else {
        return Err(Checkpointed(format!("continue with: {resume_hint}")).into());
    };
    a.artifacts.publish(&a.ledger.data_dir, &done)
}

/// Trains with a progress bar until done or `stop`; draws the loss curve at the end. Returns the
/// final model's directory, or `None` when stopped early (`resume_hint` says how to continue).
pub fn pretrain(
    cfg: &TrainConfig,
    resume: bool,
    stop: &AtomicBool,
    resume_hint: &str,
    ledger: Option<&super::ledger::LedgerTarget>,
) -> Result<Option<PathBuf>> {
    let started_ms = super::ledger::now_ms();
    let bar = ProgressBar::new(cfg.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let comm = collective()?;
    if comm.rank() != 0 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut progress = Progress { bar };
    let outcome = fount_train::train(cfg, resume, stop, comm.as_ref(), &mut progress)
        .with_context(|| format!("training run {}", cfg.out.display()))?;
    progress.bar.finish();
    if comm.rank() != 0 {
        return Ok(outcome.final_model);
    }
    if outcome.interrupted {
        eprintln!(
            "stopped at step {} of {}; continue with: {resume_hint}",
            outcome.step, cfg.steps,
        );
        return Ok(None);
    }
    let plot = cfg.out.join("loss.png");
    crate::plot::loss_curve(&cfg.out.join("metrics.jsonl"), &plot)
        .with_context(|| format!("drawing {}", plot.display()))?;
    eprintln!(
        "done: {} steps, training loss {:.4}{}; model in {}, loss curve in {}",
        outcome.step,
        outcome.loss,
        outcome
            .val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        outcome
            .final_model
            .as_deref()
            .unwrap_or(Path::new("?"))
            .display(),
        plot.display()
    );
    if let (Some(target), Some(dir)) = (ledger, &outcome.final_model) {
        let external = serde_json::to_value(cfg)?;
        let run = super::ledger::run_of(
            "train",
            external,
            &[cfg.model.clone(), cfg.data.clone()],
            started_ms,
        )?;
        super::ledger::record_run(target, dir, &[], "training", run)?;
    }
    Ok(outcome.final_model)
}
