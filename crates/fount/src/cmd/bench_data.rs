//! `fount bench data`: the curation pipeline beside datatrove on the same documents.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use fount_data::doc::Document;
use fount_data::filters::{FineWeb, GopherQuality, GopherRepetition, C4};
use fount_data::minhash::MinHasher;
use fount_data::read::{parse_json_line, InputReader, ReaderConfig, Record};
use fount_data::stages::{run_chain, Stage};
use fount_data::synth::{synth_corpus, SynthOptions};
use fount_data::words::Lang;
use rayon::prelude::*;

/// Arguments of `fount bench data`.
#[derive(Debug, Args)]
pub struct DataBench {
    /// Size of the generated English corpus in MB of text.
    #[arg(long, default_value_t = 500)]
    pub mb: u64,
    /// Work directory (the corpus is generated once and reused).
    #[arg(long, default_value = "target/fount-bench/data")]
    pub work: PathBuf,
    /// Documents datatrove processes (from the start of the same corpus).
    #[arg(long, default_value_t = 2000)]
    pub reference_docs: usize,
    /// Reference to measure beside fount: `datatrove` or `none`.
    #[arg(long, default_value = "datatrove")]
    pub reference: String,
    /// The reference script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/bench/datatrove_data.py"))]
    pub reference_script: PathBuf,
}

struct Figure {
    docs: u64,
    bytes: u64,
    secs: f64,
}

impl Figure {
    fn per_core(&self, cores: usize) -> (f64, f64) {
        let core_secs = self.secs * cores as f64;
        (
            self.docs as f64 / core_secs,
            self.bytes as f64 / 1e6 / core_secs,
        )
    }
}

/// FineWeb's filter chain, as `fount data run` runs it (words split once and shared).
fn filter_stages() -> Vec<Stage> {
    vec![
        Stage::GopherRepetition(GopherRepetition::default()),
        Stage::GopherQuality(GopherQuality::default()),
        Stage::C4(C4::default()),
        Stage::FineWeb(FineWeb::default()),
    ]
}

/// Times `f` over every document of the corpus (parsing untimed), on all threads.
fn time_docs(files: &[PathBuf], f: impl Fn(&str) + Sync) -> Result<Figure> {
    let cfg = ReaderConfig::default();
    let mut fig = Figure {
        docs: 0,
        bytes: 0,
        secs: 0.0,
    };
    for path in files {
        let mut reader = InputReader::open(path, &cfg)?;
        loop {
            let mut texts = Vec::with_capacity(8192);
            for rec in reader.by_ref().take(8192) {
                if let Record::JsonLine(line, bytes) = rec? {
                    texts.push(parse_json_line(path, line, &bytes, &cfg)?.text);
                }
            }
            if texts.is_empty() {
                break;
            }
            let t = Instant::now();
            texts.par_iter().for_each(|t| f(t));
            fig.secs += t.elapsed().as_secs_f64();
            fig.docs += texts.len() as u64;
            fig.bytes += texts.iter().map(|t| t.len() as u64).sum::<u64>();
        }
    }
    Ok(fig)
}

/// Runs `fount data run` as a child process; returns its wall time, peak memory (MB) and the
/// time it spent in each phase.
fn run_pipeline(inputs: &[PathBuf], out: &Path, threads: usize) -> Result<(f64, f64, String)> {
    if out.exists() {
        fs_err::remove_dir_all(out)?;
    }
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    let res = Command::new(exe)
        .args(["--threads", &threads.to_string(), "data", "run", "--out"])
        .arg(out)
        .arg("--input")
        .args(inputs)
        .output()
        .context("running fount data run")?;
    let secs = t.elapsed().as_secs_f64();
    if !res.status.success() {
        bail!(
            "fount data run failed: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&res.stdout);
    let peak = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak memory: "))
        .and_then(|l| l.trim_end_matches(" MB").parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let phases = stdout
        .lines()
        .find_map(|l| l.strip_prefix("time: "))
        .unwrap_or_default()
        .to_string();
    Ok((secs, peak, phases))
}

/// Runs the benchmark.
pub fn bench_data(a: DataBench, threads: Option<usize>) -> Result<()> {
    let cores =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let corpus = a.work.join(format!("english-{}mb", a.mb));
    if !corpus.join("corpus").exists() {
        eprintln!(
            "generating a {} MB English corpus in {} …",
            a.mb,
            corpus.display()
        );
        let docs = (a.mb * 1_000_000 / 880).max(1000) as usize;
        let opts = SynthOptions {
            docs,
            seed: 2026,
            docs_per_file: (docs / 10).max(1000),
            chinese_fraction: 0.0,
            chat_examples: 10,
        };
        synth_corpus(&corpus, &opts)?;
    }
    let mut files: Vec<PathBuf> = fs_err::read_dir(corpus.join("corpus"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{} holds no corpus files; remove it to regenerate",
            corpus.join("corpus").display()
        );
    }

    eprintln!("filter chain …");
    let stages = filter_stages();
    let filters = time_docs(&files, |t| {
        std::hint::black_box(run_chain(Document::new("", t), &stages));
    })?;
    eprintln!("MinHash signatures …");
    let hasher = MinHasher;
    let minhash = time_docs(&files, |t| {
        std::hint::black_box(hasher.signature(t, Lang::Latin));
    })?;
    eprintln!("whole pipeline on one file, then on all {} …", files.len());
    let (_, peak_small, _) = run_pipeline(&files[..1], &a.work.join("run-one-file"), cores)?;
    let (secs, peak_full, phases) = run_pipeline(&files, &a.work.join("run"), cores)?;
    let pipeline = Figure {
        docs: filters.docs,
        bytes: filters.bytes,
        secs,
    };

    let reference = if a.reference == "none" {
        None
    } else {
        eprintln!("datatrove on the first {} documents …", a.reference_docs);
        let out = Command::new("python3")
            .arg(&a.reference_script)
            .arg(corpus.join("corpus"))
            .args(["--docs", &a.reference_docs.to_string()])
            .arg("--tokenizer")
            .arg(a.work.join("run").join("tokenizer.json"))
            .output()
            .with_context(|| format!("running python3 {}", a.reference_script.display()))?;
        if !out.status.success() {
            bail!(
                "the reference failed: {}\n(install it with `pip install \"datatrove[processing]\" spacy`, or pass --reference none)",
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())?;
        let (docs, bytes) = (
            v["docs"].as_u64().unwrap_or(0),
            v["bytes"].as_u64().unwrap_or(0),
        );
        let fig = |k: &str| Figure {
            docs,
            bytes,
            secs: v[k].as_f64().unwrap_or(f64::NAN),
        };
        Some((fig("filters_s"), fig("minhash_s"), fig("pipeline_s")))
    };

    println!(
        "corpus: {} documents, {:.1} MB of English text; fount on {cores} thread(s), datatrove on 1 process; figures per core",
        filters.docs,
        filters.bytes as f64 / 1e6
    );
    println!(
        "{:<22} {:>12} {:>10} {:>14} {:>10} {:>8}",
        "stage", "fount doc/s", "MB/s", "datatrove doc/s", "MB/s", "ratio"
    );
    let rows = [
        ("filter chain", &filters),
        ("MinHash signatures", &minhash),
        ("whole pipeline", &pipeline),
    ];
    for (k, (name, f)) in rows.iter().enumerate() {
        let (d, m) = f.per_core(cores);
        match &reference {
            Some(r) => {
                let rf = [&r.0, &r.1, &r.2][k];
                let (rd, rm) = rf.per_core(1);
                println!(
                    "{name:<22} {d:>12.0} {m:>10.2} {rd:>14.1} {rm:>10.3} {:>7.1}×",
                    m / rm
                );
            }
            None => println!("{name:<22} {d:>12.0} {m:>10.2}"),
        }
    }
    println!("whole pipeline phases (wall): {phases}");
    println!(
        "peak memory of `fount data run`: {peak_small:.0} MB on one file ({:.0} MB), {peak_full:.0} MB on all ({:.0} MB)",
        fs_err::metadata(&files[0])?.len() as f64 / 1e6,
        files.iter().filter_map(|f| fs_err::metadata(f).ok()).map(|m| m.len()).sum::<u64>() as f64 / 1e6
    );
    Ok(())
}
