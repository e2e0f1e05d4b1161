//! One module per subcommand.

pub mod admin;
pub mod admin_safety;
pub mod artifacts;
pub mod bench;
pub mod bench_data;
pub mod bench_engine;
pub mod bench_finetuning;
pub mod bench_ledger;
pub mod bench_pool;
pub mod bench_replicas;
pub mod bench_safety;
pub mod bench_serve;
pub mod bench_tenancy;
pub mod bench_train;
pub mod data;
pub mod demo;
pub mod finetune;
pub mod generate;
pub mod jobs;
pub mod ledger;
pub mod model;
pub mod pool;
pub mod quantize;
pub mod serve;
pub mod train;

use anyhow::{bail, Result};
use candle_core::DType;

/// Logs to stderr at the level of `FOUNT_LOG` (default `info`), for the long-running commands.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FOUNT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Parses a dtype name as the command line spells it.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype {other:?} (f32, f16, bf16)"),
    })
}
