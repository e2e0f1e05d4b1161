//! `fount data run`: the whole curation run, resumable, with a manifest.
//!
//! Layout of a run directory:
//!
//! ```text
//! DIR/pipeline.toml              the pipeline that ran
//! DIR/work/parts/NNNNN/          per input file: filtered documents, signature runs, stats,
//!                                and `done.json` once the file is finished (resume skips it)
//! DIR/dropped/filter-NNNNN.jsonl.zst  documents dropped by a stage, with `stage` and `reason`
//! DIR/dropped/dedup-NNNNN.jsonl.zst   documents removed as duplicates
//! DIR/kept/part-NNNNN.jsonl.zst       kept documents with their metadata
//! DIR/tokenizer.json
//! DIR/shards/{train,validation}-NNNNN.bin
//! DIR/manifest.json
//! ```
//!
//! Phase 1 reads one input file at a time and runs the per-document stages on all cores, chunk by
//! chunk, keeping input order. Phase 2 clusters duplicates from the signature runs. Phase 3 writes
//! the kept documents; phase 4 trains (or loads) the tokenizer; phase 5 writes shards. Every phase
//! is deterministic, so a run killed at any point and started again with the same arguments
//! produces the same bytes as an uninterrupted run.

mod dedup;
mod filter;
mod outputs;
mod shards;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::manifest::{Manifest, OutputEntry, StageStats, TokenStats, TokenizerEntry, FORMAT};
use crate::pii::PiiKind;
use crate::read::{expand_inputs, ReaderConfig};
use crate::stages::{default_stages, Stage};
use crate::tokenize::TokenizerConfig;

use outputs::output_entry;
pub use outputs::read_zst_jsonl;

/// Dedup settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Remove documents whose text equals an earlier one.
    pub exact: bool,
    /// Remove MinHash near duplicates (5-grams, 14 bands × 8 hashes).
    pub minhash: bool,
    /// Signature records buffered before a sorted run is written (25 bytes each).
    pub run_records: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            exact: true,
            minhash: true,
            run_records: 4 << 20,
        }
    }
}

/// Shard settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardConfig {
    /// Fraction of documents in the validation split (chosen by a hash of the id, so stable).
    pub validation_fraction: f64,
    /// A new shard starts past this many tokens.
    pub max_tokens_per_shard: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            validation_fraction: 0.02,
            max_tokens_per_shard: 256 << 20,
        }
    }
}

/// A pipeline file (`--pipeline FILE`, TOML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// How records are read.
    pub reader: ReaderConfig,
    /// Per-document stages, in order.
    pub stages: Vec<Stage>,
    /// Dedup.
    pub dedup: DedupConfig,
    /// Tokenizer training.
    pub tokenizer: TokenizerConfig,
    /// Shards.
    pub shards: ShardConfig,
    /// Documents handed to the worker threads at a time.
    pub chunk_docs: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            reader: ReaderConfig::default(),
            stages: default_stages(),
            dedup: DedupConfig::default(),
            tokenizer: TokenizerConfig::default(),
            shards: ShardConfig::default(),
            chunk_docs: 4096,
        }
    }
}

impl PipelineConfig {
    /// Parses a pipeline file.
    pub fn from_toml(text: &str) -> Result<PipelineConfig> {
        toml::from_str(text).map_err(|e| Error::Pipeline(e.to_string()))
    }

    /// Reads a pipeline file.
    pub fn from_file(path: &Path) -> Result<PipelineConfig> {
        let text = fs_err::read_to_string(path)?;
        Self::from_toml(&text).map_err(|e| Error::Pipeline(format!("{}: {e}", path.display())))
    }

    /// The pipeline as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Pipeline(e.to_string()))
    }
}

/// Where the tokenizer comes from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// Train one on the kept text.
    Train,
    /// Use a `tokenizer.json`.
    File(PathBuf),
}

/// A run's arguments.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Input files and directories.
    pub inputs: Vec<PathBuf>,
    /// The run directory.
    pub out: PathBuf,
    /// The pipeline.
    pub config: PipelineConfig,
    /// The tokenizer.
    pub tokenizer: TokenizerSource,
    /// Stop after finishing this many input files in this invocation (incremental runs); the
    /// next invocation continues.
    pub max_parts: Option<usize>,
}

/// Progress reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A phase starts; `total` is its work in its own unit (bytes for filtering, documents
    /// after), when known.
    Phase(&'static str, Option<u64>),
    /// Work done in the current phase since the last report (documents, bytes).
    Advance(u64, u64),
    /// An input file was already finished by an earlier invocation.
    Skipped(PathBuf),
}

/// Runs the pipeline. Returns `None` when `max_parts` stopped it before the end.
///
/// The phases, each in its own module: `filter.rs` (1), `dedup.rs` (2 and 3), `shards.rs` (4 and
/// 5), then the manifest, written last.
pub fn run(opts: &RunOptions, progress: &(dyn Fn(Event) + Sync)) -> Result<Option<Manifest>> {
    let cfg = &opts.config;
    if cfg.stages.is_empty() && !cfg.dedup.exact && !cfg.dedup.minhash {
        return Err(Error::Pipeline(
            "the pipeline has no stages and no dedup".into(),
        ));
    }
    let inputs = expand_inputs(&opts.inputs)?;
    for sub in ["dropped", "kept", "shards", "work/parts"] {
        fs_err::create_dir_all(opts.out.join(sub))?;
    }
    let toml_text = cfg.to_toml()?;
    fs_err::write(opts.out.join("pipeline.toml"), &toml_text)?;
    let cfg_hash = filter::config_hash(cfg)?;
    let Some(parts) = filter::filter_inputs(opts, &inputs, &cfg_hash, progress)? else {
        return Ok(None);
    };
    let deduped = dedup::dedup_and_keep(opts, &parts, progress)?;
    let tok_path = opts.out.join("tokenizer.json");
    let (tok, tok_entry) = shards::tokenizer(opts, &deduped.kept_files, &tok_path, progress)?;
    let kept_total: u64 = deduped.kept_by_language.values().sum();
    let (tokens, shard_files) = shards::write_shards(
        opts,
        &deduped.kept_files,
        &tok,
        tok_entry.eos_id,
        kept_total,
        progress,
    )?;
    let mut outputs = Vec::new();
    for f in deduped
        .kept_files
        .iter()
        .chain(&shard_files)
        .chain(std::iter::once(&tok_path))
    {
        outputs.push(output_entry(&opts.out, f)?);
    }
    for i in 0..parts.len() {
        for name in [
            format!("filter-{i:05}.jsonl.zst"),
            format!("dedup-{i:05}.jsonl.zst"),
        ] {
            outputs.push(output_entry(
                &opts.out,
                &opts.out.join("dropped").join(name),
            )?);
        }
    }
    let manifest = manifest_of(cfg, &parts, deduped, tok_entry, tokens, outputs, toml_text);
    let tmp = opts.out.join("manifest.json.partial");
    fs_err::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    fs_err::rename(&tmp, opts.out.join("manifest.json"))?;
    Ok(Some(manifest))
}

/// The manifest: every stage's counts (the parts' summed, then dedup's), drops and PII by kind,
/// and the outputs with their digests.
fn manifest_of(
    cfg: &PipelineConfig,
    parts: &[filter::PartStats],
    deduped: dedup::Deduped,
    tokenizer: TokenizerEntry,
    tokens: TokenStats,
    outputs: Vec<OutputEntry>,
    pipeline: String,
) -> Manifest {
    let dedup::Deduped {
        exact_stage,
        near_stage,
        dedup,
        mut drops_by_language,
        kept_by_language,
        ..
    } = deduped;
    let mut stages: Vec<StageStats> = cfg
        .stages
        .iter()
        .map(|s| StageStats {
            name: s.name().into(),
            ..Default::default()
        })
        .collect();
    let mut pii = [0u64; 4];
    for p in parts {
        for (s, ps) in stages.iter_mut().zip(&p.stages) {
            s.merge(ps);
        }
        for (k, n) in p.pii.iter().enumerate() {
            pii[k] += n;
        }
        for (lang, reasons) in &p.drops_by_language {
            for (r, n) in reasons {
                *drops_by_language
                    .entry(lang.clone())
                    .or_default()
                    .entry(r.clone())
                    .or_default() += n;
            }
        }
    }
    if cfg.dedup.exact {
        stages.push(exact_stage);
    }
    if cfg.dedup.minhash {
        stages.push(near_stage);
    }
    Manifest {
        format: FORMAT.into(),
        inputs: parts.iter().map(|p| p.input.clone()).collect(),
        stages,
        drops_by_language,
        kept_by_language,
        pii: PiiKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), pii[*k as usize]))
            .collect(),
        dedup,
        tokenizer,
        tokens,
        outputs,
        pipeline,
    }
}

/// Reads the manifest of a run directory.
pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    if !path.exists() {
        return Err(Error::RunDir {
            path: dir.to_path_buf(),
            reason: "no manifest.json (not a finished `fount data run` directory)".into(),
        });
    }
    let m: Manifest = serde_json::from_slice(&fs_err::read(&path)?).map_err(|e| Error::RunDir {
        path: path.clone(),
        reason: format!("unreadable manifest: {e}"),
    })?;
    if m.format != FORMAT {
        return Err(Error::RunDir {
            path,
            reason: format!("manifest format {:?}, expected {FORMAT:?}", m.format),
        });
    }
    Ok(m)
}

/// Dropped documents of a run, optionally only those with `reason`, at most `limit`.
pub fn dropped_docs(dir: &Path, reason: Option<&str>, limit: usize) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = fs_err::read_dir(dir.join("dropped"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.zst"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for rec in read_zst_jsonl(&f)? {
            let rec = rec?;
            if reason.is_none_or(|r| rec.get("reason").and_then(Value::as_str) == Some(r)) {
                out.push(rec);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}
