//! Integration tests of the `fount` binary, run as a user runs it.
#![allow(missing_docs, clippy::disallowed_methods)]

/// `fount model init` and `fount generate` from the command line.
mod cli;

/// `fount demo`: the whole flow, a real client, a second run.
mod demo;

/// `fount data` from the command line.
mod data_cli;

/// `fount serve` with real clients: the `openai` package, overload, schema fuzzing, SIGTERM.
mod serve;

/// The ledger through `fount serve` and `fount ledger`: witnesses, Go's verifier, bills,
/// tampering, kill -9.
mod ledger;

/// The crate graph: every internal dependency is one `docs/architecture.md` allows, and the
/// compute crates never link the database or the HTTP stack.
mod layers;

/// The compute pool: preemption to bit-identical weights, kill -9 soak, quotas and budgets,
/// refusals, `fount serve` with the pool, and Slurm end to end.
mod pool;

/// GGUF: `fount quantize` writes files llama.cpp runs, and fount agrees with llama.cpp on them at
/// every type (a trained model, llama-cpp-python built from source).
mod gguf;

/// SentencePiece GGUF vocabularies tokenize as llama.cpp tokenizes them.
mod gguf_vocab;

/// `fount train`: learning on curated shards, SIGKILL and exact resumption, bad configs.
mod train_cli;

/// Three `fount serve` replicas behind HAProxy, on PostgreSQL and an S3-compatible object store.
mod replicas;

mod util;
