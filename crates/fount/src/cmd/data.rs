//! `fount data`: synthesise, curate and inspect corpora.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fount_data::synth::{synth_corpus, SynthOptions};
use indicatif::{ProgressBar, ProgressStyle};

/// `fount data …`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write a deterministic synthetic corpus (English and Chinese web-like text with planted
    /// duplicates, boilerplate, junk and PII) and a small chat dataset with a held-out split.
    Synth(SynthArgs),
    /// Curate inputs into `DIR/kept/`, `DIR/dropped/`, `DIR/tokenizer.json`, `DIR/shards/` and
    /// `DIR/manifest.json`. Running it again on the same directory resumes: finished input files
    /// are not redone.
    Run(RunArgs),
    /// Summarise a run directory, and show dropped documents.
    Inspect(InspectArgs),
    /// Print the built-in pipeline as TOML (a starting point for `--pipeline`).
    Pipeline,
}

/// Arguments of `fount data run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Input files (.jsonl, .jsonl.gz, .jsonl.zst, .txt, .md, .parquet) and directories.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// The run directory.
    #[arg(long)]
    pub out: PathBuf,
    /// A pipeline file (TOML); the built-in FineWeb-style pipeline when absent.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Use this tokenizer.json instead of training one.
    #[arg(long, conflicts_with = "vocab_size")]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained tokenizer.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// JSON field holding the text.
    #[arg(long)]
    pub text_field: Option<String>,
    /// Skip unreadable records (recorded in dropped/ as `unreadable`) instead of stopping.
    #[arg(long)]
    pub skip_bad_records: bool,
    /// Finish at most this many input files in this invocation; run again to continue.
    #[arg(long)]
    pub max_files: Option<usize>,
    /// Where the finished dataset is logged.
    #[command(flatten)]
    pub ledger: super::ledger::LedgerTarget,
}

/// Arguments of `fount data inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The run directory.
    pub dir: PathBuf,
    /// Show dropped documents with this reason (e.g. `gopher_short_doc`, `minhash_duplicate`).
    #[arg(long)]
    pub reason: Option<String>,
    /// How many dropped documents to show.
    #[arg(long, default_value_t = 3)]
    pub show: usize,
}

/// Arguments of `fount data synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (`corpus/part-NNNNN.jsonl`, `chat/train.jsonl`, `chat/test.jsonl`).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of documents.
    #[arg(long, default_value_t = 2000)]
    pub docs: usize,
    /// Seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Documents per corpus file.
    #[arg(long, default_value_t = 500)]
    pub docs_per_file: usize,
    /// Fraction of Chinese documents.
    #[arg(long, default_value_t = 0.12)]
    pub chinese_fraction: f64,
    /// Chat examples (train and held-out together).
    #[arg(long, default_value_t = 1200)]
    pub chat_examples: usize,
}

/// Runs a `fount data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Synth(a) => {
            let opts = SynthOptions {
                docs: a.docs,
                seed: a.seed,
                docs_per_file: a.docs_per_file,
                chinese_fraction: a.chinese_fraction,
                chat_examples: a.chat_examples,
            };
            let s = synth_corpus(&a.out, &opts)
                .with_context(|| format!("writing {}", a.out.display()))?;
            println!(
                "wrote {} documents ({:.1} MB of text) in {} files under {}",
                a.docs,
                s.text_bytes as f64 / 1e6,
                s.corpus_files.len(),
                a.out.join("corpus").display()
            );
            println!(
                "chat task: {} and {}",
                s.chat_train.display(),
                s.chat_test.display()
            );
            Ok(())
        }
        DataCommand::Run(a) => run_pipeline(a),
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Pipeline => {
            print!(
                "{}",
                fount_data::pipeline::PipelineConfig::default().to_toml()?
            );
            Ok(())
        }
    }
}

fn run_pipeline(a: RunArgs) -> Result<()> {
    use fount_data::pipeline::{run, Event, PipelineConfig, RunOptions, TokenizerSource};
    let mut config = match &a.pipeline {
        Some(p) => PipelineConfig::from_file(p)?,
        None => PipelineConfig::default(),
    };
    if let Some(v) = a.vocab_size {
        config.tokenizer.vocab_size = v;
    }
    if let Some(f) = &a.text_field {
        config.reader.text_field = f.clone();
    }
    if a.skip_bad_records {
        config.reader.on_error = fount_data::read::OnError::Skip;
    }
    let opts = RunOptions {
        inputs: a.input.clone(),
        out: a.out.clone(),
        config,
        tokenizer: a
            .tokenizer
            .clone()
            .map_or(TokenizerSource::Train, TokenizerSource::File),
        max_parts: a.max_files,
    };
    let bar = std::sync::Mutex::new(None::<ProgressBar>);
    let start = std::time::Instant::now();
    let started_ms = super::ledger::now_ms();
    let phases = std::sync::Mutex::new(Vec::<(&'static str, std::time::Instant)>::new());
    let filtered_docs = std::sync::atomic::AtomicU64::new(0);
    let progress = |e: Event| {
        let Ok(mut slot) = bar.lock() else { return };
        match e {
            Event::Phase(name, total) => {
                if let Ok(mut p) = phases.lock() {
                    p.push((name, std::time::Instant::now()));
                }
                if let Some(b) = slot.take() {
                    b.finish();
                }
                let b = match total {
                    Some(t) if name == "filter" => ProgressBar::new(t).with_style(style(
                        "{msg:>16} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {prefix} eta {eta}",
                    )),
                    Some(t) => ProgressBar::new(t).with_style(style("{msg:>16} [{bar:30}] {pos}/{len} docs {per_sec}")),
                    None => ProgressBar::new_spinner().with_style(style("{msg:>16} {spinner} {elapsed}")),
                };
                b.set_message(name);
                *slot = Some(b);
            }
            Event::Advance(docs, bytes) => {
                if let Some(b) = slot.as_ref() {
                    if bytes > 0 && b.message() == "filter" {
                        b.inc(bytes);
                        let n = filtered_docs.fetch_add(docs, std::sync::atomic::Ordering::Relaxed)
                            + docs;
                        let rate = n as f64 / b.elapsed().as_secs_f64().max(1e-3);
                        b.set_prefix(format!("{n} docs {rate:.0} docs/s"));
                    } else {
                        b.inc(docs);
                    }
                }
            }
            Event::Skipped(p) => {
                if let Some(b) = slot.as_ref() {
                    b.println(format!("already done: {}", p.display()));
                }
            }
        }
    };
    let result = run(&opts, &progress);
    if let Ok(mut slot) = bar.lock() {
        if let Some(b) = slot.take() {
            b.finish();
        }
    }
    let Some(m) = result.with_context(|| format!("curating into {}", a.out.display()))? else {
        println!(
            "stopped after {} input file(s); run the same command again to continue",
            a.max_files.unwrap_or(0)
        );
        return Ok(());
    };
    let secs = start.elapsed().as_secs_f64();
    let docs_in: u64 = m.inputs.iter().map(|i| i.records).sum();
    let kept: u64 = m.kept_by_language.values().sum();
    println!(
        "{docs_in} documents in, {kept} kept ({:.1}%), {} train + {} validation tokens, {:.1}s",
        100.0 * kept as f64 / docs_in.max(1) as f64,
        m.tokens.train_tokens,
        m.tokens.validation_tokens,
        secs
    );
    if let Ok(p) = phases.lock() {
        let end = std::time::Instant::now();
        let times: Vec<String> = p
            .iter()
            .enumerate()
            .map(|(i, (name, t))| {
                let next = p.get(i + 1).map_or(end, |x| x.1);
                format!("{name} {:.1}s", (next - *t).as_secs_f64())
            })
            .collect();
        println!("time: {}", times.join(", "));
    }
    println!("manifest: {}", a.out.join("manifest.json").display());
    // the dataset: its manifest, tokenizer, pipeline and shards, from the inputs as they are now
    let mut inputs = a.input.clone();
    inputs.extend(a.pipeline.iter().cloned());
    inputs.extend(a.tokenizer.iter().cloned());
    let external = serde_json::json!({
        "inputs": a.input.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "pipeline": serde_json::to_value(&opts.config)?,
        "text_field": a.text_field,
        "vocab_size": a.vocab_size,
    });
    let run = super::ledger::run_of("data", external, &inputs, started_ms)?;
    super::ledger::record_run(
        &a.ledger,
        &a.out,
        &[
            "manifest.json",
            "tokenizer.json",
            "pipeline.toml",
            "shards/",
        ],
        "dataset",
        run,
    )?;
    if let Some(mb) = peak_memory_mb() {
        println!("peak memory: {mb:.0} MB");
    }
    Ok(())
}

/// Writes `text` to stdout; a reader that went away (`fount data inspect … | head`) is not an
/// error.
fn print_all(text: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_memory_mb() -> Option<f64> {
    let status = fs_err::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn style(t: &str) -> ProgressStyle {
    ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn inspect(a: InspectArgs) -> Result<()> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let m = fount_data::pipeline::load_manifest(&a.dir)?;
    let docs_in: u64 = m.inputs.iter().map(|i| i.records).sum();
    let bytes_in: u64 = m.inputs.iter().map(|i| i.bytes).sum();
    writeln!(
        out,
        "{} input file(s), {docs_in} records, {:.1} MB",
        m.inputs.len(),
        bytes_in as f64 / 1e6
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<18} {:>9} {:>9} {:>11} {:>11}  drops",
        "stage", "docs in", "docs out", "MB in", "MB out"
    )?;
    for s in &m.stages {
        let mut drops: Vec<_> = s.dropped.iter().collect();
        drops.sort_by(|a, b| b.1.cmp(a.1));
        let drops: Vec<String> = drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(
            out,
            "{:<18} {:>9} {:>9} {:>11.2} {:>11.2}  {}",
            s.name,
            s.docs_in,
            s.docs_out,
            s.bytes_in as f64 / 1e6,
            s.bytes_out as f64 / 1e6,
            drops.join(", ")
        )?;
    }
    writeln!(out)?;
    let kept: Vec<String> = m
        .kept_by_language
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    writeln!(out, "kept by language: {}", kept.join(", "))?;
    for (lang, reasons) in &m.drops_by_language {
        let total: u64 = reasons.values().sum();
        writeln!(out, "dropped ({lang}): {total}")?;
    }
    let pii: Vec<String> = m.pii.iter().map(|(k, v)| format!("{k} {v}")).collect();
    writeln!(out, "PII redacted: {}", pii.join(", "))?;
    writeln!(
        out,
        "dedup: {} candidates, {} exact and {} near duplicates removed, {} clusters",
        m.dedup.candidates, m.dedup.exact_duplicates, m.dedup.near_duplicates, m.dedup.clusters
    )?;
    writeln!(
        out,
        "tokenizer: {} ({} entries, EOS {}); tokens: train {} in {} docs, validation {} in {} docs",
        if m.tokenizer.trained {
            "trained"
        } else {
            &m.tokenizer.source
        },
        m.tokenizer.vocab_size,
        m.tokenizer.eos_id,
        m.tokens.train_tokens,
        m.tokens.train_docs,
        m.tokens.validation_tokens,
        m.tokens.validation_docs
    )?;
    if let Some(reason) = &a.reason {
        writeln!(out)?;
        let docs = fount_data::pipeline::dropped_docs(&a.dir, Some(reason), a.show)?;
        if docs.is_empty() {
            writeln!(out, "no dropped documents with reason {reason:?}")?;
        }
        for d in docs {
            let id = d.get("id").and_then(|v| v.as_str()).unwrap_or("?");
            let stage = d.get("stage").and_then(|v| v.as_str()).unwrap_or("?");
            let text = d.get("text").and_then(|v| v.as_str()).unwrap_or("");
            let short: String = text.chars().take(400).collect();
            writeln!(out, "--- {id} ({stage}: {reason})")?;
            writeln!(
                out,
                "{short}{}",
                if text.chars().count() > 400 {
                    " …"
                } else {
                    ""
                }
            )?;
        }
    }
    print_all(&out)
}
