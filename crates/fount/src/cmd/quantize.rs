//! `fount quantize`: a Hugging Face model directory to a GGUF file (llama.cpp's format).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use fount_model::quantize::{quantize, QuantType};

/// Arguments of `fount quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Hugging Face model directory (a pretrained or merged fount model included).
    #[arg(long)]
    pub model: PathBuf,
    /// The GGUF file to write (it must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor types: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k.
    #[arg(long = "type", default_value = "q8_0", value_parser = parse_type)]
    pub qtype: QuantType,
}

fn parse_type(s: &str) -> std::result::Result<QuantType, String> {
    QuantType::parse(s).ok_or_else(|| format!("unknown type {s:?} (one of {})", QuantType::NAMES))
}

/// Runs `fount quantize`.
pub fn run(a: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let n = quantize(&a.model, &a.out, a.qtype)
        .with_context(|| format!("quantizing {} to {}", a.model.display(), a.out.display()))?;
    let size = fs_err::metadata(&a.out)?.len();
    eprintln!(
        "wrote {} ({n} tensors, {:.1} MB, {:?}) in {:.1}s",
        a.out.display(),
        size as f64 / 1e6,
        a.qtype,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
