//! One module per subcommand.

pub mod admin;
pub mod bench;
pub mod bench_data;
pub mod bench_engine;
pub mod bench_pool;
pub mod bench_serve;
pub mod bench_tenancy;
pub mod bench_train;
pub mod data;
pub mod demo;
pub mod finetune;
pub mod generate;
pub mod jobs;
pub mod model;
pub mod pool;
pub mod serve;
pub mod train;

use anyhow::{bail, Result};
use candle_core::DType;

/// Parses a dtype name as the command line spells it.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype {other:?} (f32, f16, bf16)"),
    })
}
