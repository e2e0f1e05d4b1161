//! The manifest of a `fount data run`: what went in, what every stage did, what came out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest format name written in [`Manifest::format`].
pub const FORMAT: &str = "fount-data-manifest/1";

/// `DIR/manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Every input file.
    pub inputs: Vec<InputEntry>,
    /// Every stage in order, dedup included: documents and bytes in and out, drops per reason.
    pub stages: Vec<StageStats>,
    /// Drops per language (as identified; `unknown` before or without identification) and reason.
    pub drops_by_language: BTreeMap<String, BTreeMap<String, u64>>,
    /// Kept documents per language.
    pub kept_by_language: BTreeMap<String, u64>,
    /// PII replacements per kind.
    pub pii: BTreeMap<String, u64>,
    /// Dedup summary.
    pub dedup: DedupStats,
    /// The tokenizer used.
    pub tokenizer: TokenizerEntry,
    /// Token counts per split.
    pub tokens: TokenStats,
    /// Every output file with its hash (paths relative to the run directory).
    pub outputs: Vec<OutputEntry>,
    /// The pipeline that ran (TOML text).
    pub pipeline: String,
}

/// One input file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputEntry {
    /// The path as given.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Records read (lines, rows or files).
    pub records: u64,
    /// Records that could not be read (skipped under `on_error = "skip"`).
    pub unreadable: u64,
}

/// What one stage did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStats {
    /// The stage name.
    pub name: String,
    /// Documents in.
    pub docs_in: u64,
    /// Text bytes in.
    pub bytes_in: u64,
    /// Documents out.
    pub docs_out: u64,
    /// Text bytes out.
    pub bytes_out: u64,
    /// Documents dropped, per reason.
    pub dropped: BTreeMap<String, u64>,
}

impl StageStats {
    /// Adds another part's counts.
    pub fn merge(&mut self, other: &StageStats) {
        self.docs_in += other.docs_in;
        self.bytes_in += other.bytes_in;
        self.docs_out += other.docs_out;
        self.bytes_out += other.bytes_out;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
    }
}

/// Dedup summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupStats {
    /// Documents that reached dedup.
    pub candidates: u64,
    /// Removed as exact duplicates.
    pub exact_duplicates: u64,
    /// Removed as MinHash near duplicates.
    pub near_duplicates: u64,
    /// Clusters with more than one document.
    pub clusters: u64,
}

/// The tokenizer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerEntry {
    /// Trained in this run (else given).
    pub trained: bool,
    /// Where it came from (given) or `tokenizer.json`.
    pub source: String,
    /// Vocabulary size, special tokens included.
    pub vocab_size: u64,
    /// The EOS id separating documents.
    pub eos_id: u32,
}

/// Token counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStats {
    /// Documents in the train split.
    pub train_docs: u64,
    /// Tokens in the train split (EOS included).
    pub train_tokens: u64,
    /// Documents in the validation split.
    pub validation_docs: u64,
    /// Tokens in the validation split.
    pub validation_tokens: u64,
}

/// One output file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEntry {
    /// Path relative to the run directory.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256.
    pub sha256: String,
}
