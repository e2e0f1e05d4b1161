//! fount-data: turns raw text into deduplicated, filtered, PII-free token shards, and keeps a
//! record of every document it dropped and why.
//!
//! The flow of `fount data run` ([`pipeline::run`]):
//!
//! 1. [`read`]: JSONL (plain, `.gz`, `.zst`), plain-text files and directories, Parquet —
//!    streamed, one input file at a time.
//! 2. Per document, in parallel ([`stages`]): Unicode clean-up, language id, Gopher repetition,
//!    Gopher quality, C4, FineWeb ([`filters`], computed as datatrove computes them, with jieba
//!    words for Chinese and Japanese), PII redaction ([`pii`]), MinHash signature ([`minhash`]).
//! 3. Over the whole corpus: exact and MinHash-LSH near dedup ([`dedup`]) from sorted on-disk
//!    signature runs, one document kept per cluster.
//! 4. A byte-level BPE tokenizer trained on the kept text ([`tokenize`]) and token shards with a
//!    train/validation split ([`shard`], format in `FORMAT.md`), plus a manifest of every count
//!    ([`manifest`]).

pub mod dedup;
pub mod doc;
pub mod error;
pub mod filters;
pub mod manifest;
pub mod minhash;
pub mod normalize;
pub mod pii;
pub mod pipeline;
pub mod read;
pub mod shard;
pub mod stages;
pub mod synth;
mod tables;
pub mod tokenize;
pub mod words;

pub use error::{Error, Result};
