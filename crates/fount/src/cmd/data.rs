//! `fount data`: synthesise, curate and inspect corpora.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fount_data::synth::{synth_corpus, SynthOptions};

/// `fount data …`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write a deterministic synthetic corpus (English and Chinese web-like text with planted
    /// duplicates, boilerplate, junk and PII) and a small chat dataset with a held-out split.
    Synth(SynthArgs),
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
            let s = synth_corpus(&a.out, &opts).with_context(|| format!("writing {}", a.out.display()))?;
            println!(
                "wrote {} documents ({:.1} MB of text) in {} files under {}",
                a.docs,
                s.text_bytes as f64 / 1e6,
                s.corpus_files.len(),
                a.out.join("corpus").display()
            );
            println!("chat task: {} and {}", s.chat_train.display(), s.chat_test.display());
            Ok(())
        }
    }
}
