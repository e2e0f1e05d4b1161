//! `fount model …`: create model directories.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fount_model::init::{init_model, preset, presets, InitOptions};
use fount_model::Arch;

/// `fount model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a randomly initialised model in Hugging Face format.
    Init(InitArgs),
    /// List the presets of each architecture.
    Presets,
}

/// Arguments of `fount model init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Architecture: llama, qwen2, mistral, mixtral.
    #[arg(long, value_parser = parse_arch)]
    pub arch: Arch,
    /// Shape preset (see `fount model presets`), e.g. tiny, qwen2.5-0.5b, llama-3.2-1b.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Output directory (created; existing model files are refused unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Storage dtype of the weights: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Standard deviation of the random weights (norms are ones). Larger values give a model
    /// whose predictions are confident, as a trained model's are (for agreement tests).
    #[arg(long, default_value_t = 0.02)]
    pub std: f32,
    /// Overwrite an existing model in --out.
    #[arg(long)]
    pub force: bool,
    /// Use this `tokenizer.json` (e.g. the one `fount data` wrote) instead of training a small
    /// one; the vocabulary grows to fit it.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    Arch::from_short(s)
        .ok_or_else(|| format!("unknown architecture {s:?} (llama, qwen2, mistral, mixtral)"))
}

/// Runs a `fount model` subcommand.
pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Init(a) => {
            let shape = preset(a.arch, &a.preset)?;
            if a.out.join("config.json").exists() && !a.force {
                anyhow::bail!(
                    "{} already holds a model (config.json); pass --force to overwrite it",
                    a.out.display()
                );
            }
            let opts = InitOptions {
                seed: a.seed,
                dtype: super::parse_dtype(&a.dtype)?,
                tokenizer: a.tokenizer.clone(),
                std: a.std,
            };
            init_model(a.arch, &shape, &opts, &a.out)
                .with_context(|| format!("writing {} model to {}", a.preset, a.out.display()))?;
            eprintln!(
                "wrote {} {} ({} parameters, {}) to {}",
                a.arch.hf_names().1,
                a.preset,
                human_count(
                    fount_model::ModelFiles::open(&a.out)?
                        .config()?
                        .num_parameters()
                ),
                a.dtype,
                a.out.display()
            );
            Ok(())
        }
        ModelCommand::Presets => {
            for arch in [Arch::Llama, Arch::Qwen2, Arch::Mistral, Arch::Mixtral] {
                let names: Vec<&str> = presets(arch).iter().map(|p| p.name).collect();
                println!("{:8} {}", arch.hf_names().1, names.join(", "));
            }
            Ok(())
        }
    }
}

/// `123456789` → `123.5M`.
pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
