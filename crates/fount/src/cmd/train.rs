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
}

/// Sets `flag` on SIGTERM or SIGINT (a second signal exits at once).
pub fn stop_on_signals(flag: Arc<AtomicBool>) -> Result<()> {
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
    Ok(())
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

/// Runs `fount train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = TrainConfig::from_file(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(stop.clone())?;
    let bar = ProgressBar::new(cfg.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = Progress { bar };
    let outcome = fount_train::train(&cfg, a.resume, &stop, &fount_train::Single, &mut progress)
        .with_context(|| format!("training run {}", cfg.out.display()))?;
    progress.bar.finish();
    if outcome.interrupted {
        eprintln!(
            "stopped at step {} of {}; continue with: fount train --config {} --resume",
            outcome.step,
            cfg.steps,
            a.config.display()
        );
        return Ok(());
    }
    let plot = cfg.out.join("loss.png");
    fount_train::plot::loss_curve(&cfg.out.join("metrics.jsonl"), &plot)
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
    Ok(())
}
