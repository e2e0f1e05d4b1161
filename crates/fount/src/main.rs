//! `fount`: the command line of the fount platform.
//!
//! Each subcommand is one step of the flow in `docs/architecture.md`; this binary parses arguments, adds
//! context to errors, and prints the error chain with a non-zero exit code.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod plot;

// Decoding allocates and frees the same large buffers every step; glibc returns them to the
// kernel each time (page faults on every reuse), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Large language models as a public utility.
#[derive(Debug, Parser)]
#[command(name = "fount", version, about, propagate_version = true)]
struct Cli {
    /// Worker threads for tensor math (default: all cores).
    #[arg(long, global = true, env = "FOUNT_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole platform on one machine: curate a corpus, pretrain a model, fine-tune a LoRA
    /// adapter, and serve both as a metered API.
    Demo(cmd::demo::DemoArgs),
    /// Create and inspect model directories.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Curate raw text into filtered, deduplicated token shards.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Generate text from a model, streaming it to stdout.
    Generate(cmd::generate::GenerateArgs),
    /// Write a model directory as a GGUF file, quantised or in half precision.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Pretrain a model (dense or MoE) on token shards.
    Train(cmd::train::TrainArgs),
    /// Fine-tune a LoRA adapter on chat data; merge one into its base.
    Finetune(cmd::finetune::FinetuneArgs),
    /// Serve the OpenAI-compatible HTTP API over a model and its adapters.
    Serve(Box<cmd::serve::ServeArgs>),
    /// Tenants, API keys, quotas and usage.
    Admin(cmd::admin::AdminArgs),
    /// The ledger: verifier key, checkpoints, entries, verification, a witness.
    Ledger(cmd::ledger::LedgerArgs),
    /// Jobs on the compute pool: submit, list, show, cancel, logs, wait.
    Jobs(cmd::jobs::JobsArgs),
    /// The compute pool on its own (`fount serve` runs one inside by default).
    #[command(subcommand)]
    Pool(cmd::pool::PoolCommand),
    /// Put models, adapters and shards into the object store replicas share, list and fetch
    /// them.
    Artifacts(cmd::artifacts::ArtifactsArgs),
    /// Measure speed against reference implementations.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

/// mimalloc's `mi_option_purge_delay` (the same position in the option enums of mimalloc 2
/// and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped instead of returning it to the kernel after mimalloc's default
/// 10 ms. A training step frees and reallocates the same few hundred megabytes of activations
/// and gradients; returned, every reuse is first zeroed by the kernel page by page, a fifth of
/// the step. Long-running servers keep the default and give memory back.
fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores an option value; any value is valid for this option.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Demo(_) | Command::Train(_) | Command::Finetune(_) | Command::Bench(_)
    ) {
        keep_freed_memory();
    }
    // candle's CPU kernels size their thread pools from this variable on first use; unset,
    // candle counts physical cores, which leaves a logical CPU idle where they are shared
    // (2 vCPUs on one core: GGUF decoding ran at 0.87× with one candle worker).
    let threads = cli.threads.or_else(|| {
        std::env::var_os("RAYON_NUM_THREADS")
            .is_none()
            .then(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Model(c) => cmd::model::run(c),
        Command::Data(c) => cmd::data::run(c),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Finetune(a) => cmd::finetune::run(a),
        Command::Serve(a) => cmd::serve::run(*a),
        Command::Admin(a) => cmd::admin::run(a),
        Command::Jobs(a) => cmd::jobs::run(a),
        Command::Ledger(a) => cmd::ledger::run(a),
        Command::Pool(c) => cmd::pool::run(c),
        Command::Artifacts(a) => cmd::artifacts::run(a),
        Command::Bench(c) => cmd::bench::run(c, cli.threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // stopped by a signal after writing a checkpoint: the pool resumes it
        Err(e) if e.is::<cmd::train::Checkpointed>() => {
            eprintln!("{e}");
            ExitCode::from(fount_pool::executor::EXIT_CHECKPOINTED as u8)
        }
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
