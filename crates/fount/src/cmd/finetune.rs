//! `fount finetune`: LoRA fine-tuning on chat JSONL into a PEFT adapter, and `fount finetune
//! merge`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_model::peft::merge;
use fount_train::finetune::{finetune, FinetuneConfig, FinetuneOutcome};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `fount finetune`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FinetuneArgs {
    #[command(subcommand)]
    pub command: Option<FinetuneCommand>,
    /// The base model directory (it must have a chat template).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// OpenAI chat JSONL: one `{"messages": [...]}` per line.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where to write the PEFT adapter.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Settings (TOML; every field and its default: docs/training.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cut examples longer than the maximum length instead of refusing the file.
    #[arg(long)]
    pub truncate: bool,
    /// Continue from the newest complete checkpoint in `OUT/checkpoints`.
    #[arg(long)]
    pub resume: bool,
    /// Append each step's figures to this CSV, in the columns of OpenAI's results files
    /// (`step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`); a resumed run
    /// appends again from its checkpoint's step, so a reader keeps the last row of each step.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Where the adapter is logged.
    #[command(flatten)]
    pub ledger: super::ledger::LedgerTarget,
    /// Where `--base`, `--data` and the configuration's `validation_file` given as
    /// `artifacts:KEY` are read from, and the adapter published to.
    #[command(flatten)]
    pub artifacts: super::artifacts::RunArtifacts,
}

/// `fount finetune …` subcommands.
#[derive(Debug, Subcommand)]
pub enum FinetuneCommand {
    /// Folds an adapter into the base model's weights and writes the merged model.
    Merge {
        /// The base model directory.
        #[arg(long)]
        base: PathBuf,
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `fount finetune`.
pub fn run(a: FinetuneArgs) -> Result<()> {
    if let Some(FinetuneCommand::Merge { base, adapter, out }) = a.command {
        merge(&base, &adapter, &out)
            .with_context(|| format!("merging {} into {}", adapter.display(), base.display()))?;
        eprintln!("merged model written to {}", out.display());
        return Ok(());
    }
    let (Some(mut base), Some(mut data), Some(out)) = (a.base, a.data, a.out) else {
        bail!("fount finetune needs --base, --data and --out (or the merge subcommand)");
    };
    let mut cfg = match &a.config {
        Some(p) => {
            FinetuneConfig::from_file(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => FinetuneConfig::default(),
    };
    let mut valid = cfg.validation_file.take().unwrap_or_default();
    a.artifacts.localise(
        &a.ledger.data_dir,
        &mut [
            ("--base", &mut base),
            ("--data", &mut data),
            ("validation_file", &mut valid),
        ],
    )?;
    cfg.validation_file = (!valid.as_os_str().is_empty()).then_some(valid);
    cfg.truncate |= a.truncate;
    let stop = Arc::new(AtomicBool::new(false));
    super::train::stop_on_signals(stop.clone())?;
    let mut metrics = match &a.metrics {
        Some(p) => Some(MetricsCsv::open(p)?),
        None => None,
    };
    let started_ms = super::ledger::now_ms();
    let outcome = fine_tune(&base, &data, &out, &cfg, a.resume, &stop, metrics.as_mut())?;
    if outcome.interrupted {
        return Err(super::train::Checkpointed("continue with --resume".into()).into());
    }
    record_adapter(&a.ledger, &base, &data, &outcome.adapter, &cfg, started_ms)?;
    a.artifacts.publish(&a.ledger.data_dir, &outcome.adapter)
}

/// Logs a finished adapter: the base model's and the data's digests are its inputs.
pub fn record_adapter(
    target: &super::ledger::LedgerTarget,
    base: &Path,
    data: &Path,
    adapter: &Path,
    cfg: &FinetuneConfig,
    started_ms: i64,
) -> Result<()> {
    let mut inputs = vec![base.to_path_buf(), data.to_path_buf()];
    inputs.extend(cfg.validation_file.iter().cloned());
    let external = serde_json::json!({
        "base": base.display().to_string(),
        "data": data.display().to_string(),
        "config": serde_json::to_value(cfg)?,
    });
    let run = super::ledger::run_of("finetune", external, &inputs, started_ms)?;
    super::ledger::record_run(
        target,
        adapter,
        &["adapter_config.json", "adapter_model.safetensors"],
        "finetuning",
        run,
    )
}

/// Fine-tunes with a progress bar and reports the held-out figures.
pub fn fine_tune(
    base: &Path,
    data: &Path,
    out: &Path,
    cfg: &FinetuneConfig,
    resume: bool,
    stop: &AtomicBool,
    mut metrics: Option<&mut MetricsCsv>,
) -> Result<FinetuneOutcome> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last = None;
    let mut failed_write = None;
    let outcome = finetune(base, data, out, cfg, resume, stop, &mut |s| {
        bar.set_length(s.steps);
        bar.set_position(s.step);
        bar.set_message(format!("loss {:.3} lr {:.2e}", s.loss, s.lr));
        if let Some(m) = metrics.as_deref_mut() {
            // the last step's row waits for the final validation figures
            if s.step == s.steps {
                last = Some((s.step, s.loss, s.accuracy));
            } else if let Err(e) = m.row(s.step, s.loss, s.accuracy, s.eval) {
                failed_write.get_or_insert(e);
            }
        }
    })
    .with_context(|| format!("fine-tuning {} on {}", base.display(), data.display()))?;
    bar.finish();
    if let (Some(m), Some((step, loss, acc))) = (metrics, last) {
        m.row(step, loss, acc, outcome.eval)?;
    }
    if let Some(e) = failed_write {
        return Err(e);
    }
    let d = &outcome.data;
    eprintln!(
        "{} examples ({} truncated, {} assistant tokens), {} held out; {} steps{}",
        d.examples,
        d.truncated,
        d.trained_tokens,
        outcome.held_out,
        outcome.steps,
        if outcome.interrupted {
            " (stopped by a signal)"
        } else {
            ""
        }
    );
    if let (Some((bl, ba)), Some((l, acc))) = (outcome.base_eval, outcome.eval) {
        eprintln!(
            "held-out loss {bl:.4} -> {l:.4}, token accuracy {:.1}% -> {:.1}%",
            ba * 100.0,
            acc * 100.0
        );
    }
    if outcome.interrupted {
        eprintln!(
            "checkpoint written to {}; continue with --resume",
            outcome.adapter.parent().unwrap_or(out).display()
        );
    } else {
        eprintln!("adapter written to {}", outcome.adapter.display());
    }
    Ok(outcome)
}

/// The per-step figures of a fine-tuning run as CSV, in the columns of OpenAI's results files.
#[derive(Debug)]
pub struct MetricsCsv {
    file: fs_err::File,
}

impl MetricsCsv {
    /// The header of the file.
    pub const HEADER: &'static str =
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy";

    /// Opens `path` for appending, writing the header when it is new.
    pub fn open(path: &Path) -> Result<MetricsCsv> {
        use std::io::Write;
        let new = !path.exists();
        let mut file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if new {
            writeln!(file, "{}", Self::HEADER)?;
        }
        Ok(MetricsCsv { file })
    }

    /// Appends one step's row (the validation columns empty when not measured).
    pub fn row(&mut self, step: u64, loss: f64, acc: f64, eval: Option<(f64, f64)>) -> Result<()> {
        use std::io::Write;
        let (vl, va) = match eval {
            Some((l, a)) => (format!("{l:.6}"), format!("{a:.6}")),
            None => (String::new(), String::new()),
        };
        writeln!(self.file, "{step},{loss:.6},{acc:.6},{vl},{va}")?;
        self.file.flush()?;
        Ok(())
    }
}
