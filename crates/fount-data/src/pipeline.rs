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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::dedup::{cluster_runs, doc_records, DupKind, RunWriter};
use crate::error::{Error, Result};
use crate::manifest::{
    DedupStats, InputEntry, Manifest, OutputEntry, StageStats, TokenStats, TokenizerEntry, FORMAT,
};
use crate::minhash::MinHasher;
use crate::pii::PiiKind;
use crate::read::{
    expand_inputs, hex, parse_json_line, sha256_file, InputReader, ReaderConfig, Record,
};
use crate::shard::ShardWriter;
use crate::stages::{default_stages, run_chain, Stage};
use crate::tokenize::{self, TokenizerConfig};
use crate::words::Lang;

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PartStats {
    input: InputEntry,
    config_hash: String,
    stages: Vec<StageStats>,
    drops_by_language: BTreeMap<String, BTreeMap<String, u64>>,
    pii: [u64; 4],
    passed: u64,
    runs: Vec<String>,
}

fn part_dir(out: &Path, i: usize) -> PathBuf {
    out.join("work").join("parts").join(format!("{i:05}"))
}

fn zst_writer(
    path: &Path,
) -> Result<zstd::stream::AutoFinishEncoder<'static, BufWriter<fs_err::File>>> {
    let w = BufWriter::with_capacity(1 << 20, fs_err::File::create(path)?);
    Ok(zstd::stream::Encoder::new(w, 3)?.auto_finish())
}

fn write_json_line(w: &mut impl Write, v: &Value) -> Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")?;
    Ok(())
}

/// Reads a `.jsonl.zst` file written by the pipeline.
pub fn read_zst_jsonl(path: &Path) -> Result<impl Iterator<Item = Result<Value>>> {
    let file = fs_err::File::open(path)?;
    let r = BufReader::with_capacity(1 << 20, zstd::stream::read::Decoder::new(file)?);
    let path = path.to_path_buf();
    Ok(r.lines().enumerate().map(move |(i, line)| {
        let line = line?;
        serde_json::from_str(&line).map_err(|e| Error::MalformedJson {
            path: path.clone(),
            line: i as u64 + 1,
            reason: e.to_string(),
        })
    }))
}

enum Processed {
    Doc(
        Box<crate::stages::Outcome>,
        Option<Box<crate::minhash::Signature>>,
        u128,
        u64,
    ),
    Unreadable(String, String, u64),
    Fatal(Error),
}

fn process_record(
    rec: Record,
    path: &Path,
    cfg: &PipelineConfig,
    hasher: &MinHasher,
    stop_on_error: bool,
) -> Processed {
    let doc = match rec {
        Record::Doc(d) => d,
        Record::JsonLine(line, bytes) => match parse_json_line(path, line, &bytes, &cfg.reader) {
            Ok(d) => d,
            Err(e) if stop_on_error => return Processed::Fatal(e),
            Err(e) => {
                let stem = path
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                return Processed::Unreadable(
                    format!("{stem}:{line}"),
                    e.to_string(),
                    bytes.len() as u64,
                );
            }
        },
        Record::Unreadable(e) => {
            return Processed::Unreadable(path.display().to_string(), e.to_string(), 0)
        }
    };
    let in_bytes = doc.text.len() as u64;
    let outcome = run_chain(doc, &cfg.stages);
    if outcome.dropped.is_some() {
        return Processed::Doc(Box::new(outcome), None, 0, in_bytes);
    }
    let lang = Lang::from_code(outcome.doc.lang.as_deref());
    let sig = if cfg.dedup.minhash {
        hasher.signature(&outcome.doc.text, lang)
    } else {
        None
    };
    let content = xxh3_128(outcome.doc.text.as_bytes());
    Processed::Doc(Box::new(outcome), sig, content, in_bytes)
}

fn config_hash(cfg: &PipelineConfig) -> Result<String> {
    // Tokenizer and shard settings do not change phase-1 results.
    let key = serde_json::json!({
        "reader": serde_json::to_value(&cfg.reader)?,
        "stages": serde_json::to_value(&cfg.stages)?,
        "dedup": serde_json::to_value(&cfg.dedup)?,
    });
    Ok(hex(&Sha256::digest(key.to_string().as_bytes())))
}

/// Phase 1 for one input file.
fn filter_part(
    i: usize,
    input: &Path,
    opts: &RunOptions,
    cfg_hash: &str,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<PartStats> {
    let cfg = &opts.config;
    let dir = part_dir(&opts.out, i);
    if dir.exists() {
        fs_err::remove_dir_all(&dir)?;
    }
    fs_err::create_dir_all(&dir)?;
    let dropped_path = opts
        .out
        .join("dropped")
        .join(format!("filter-{i:05}.jsonl.zst"));
    let mut filtered = zst_writer(&dir.join("filtered.jsonl.zst"))?;
    let mut dropped = zst_writer(&dropped_path.with_extension("zst.partial"))?;
    let mut runs = RunWriter::new(&dir, "sigs", cfg.dedup.run_records);
    let mut stats = PartStats {
        config_hash: cfg_hash.to_string(),
        stages: cfg
            .stages
            .iter()
            .map(|s| StageStats {
                name: s.name().into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let hasher = MinHasher;
    let stop_on_error = cfg.reader.on_error == crate::read::OnError::Stop;
    let mut reader = InputReader::open(input, &cfg.reader)?;
    let mut records = Vec::with_capacity(cfg.chunk_docs);
    loop {
        records.clear();
        for rec in reader.by_ref() {
            records.push(rec?);
            if records.len() >= cfg.chunk_docs.max(1) {
                break;
            }
        }
        if records.is_empty() {
            break;
        }
        let results: Vec<Processed> = std::mem::take(&mut records)
            .into_par_iter()
            .map(|r| process_record(r, input, cfg, &hasher, stop_on_error))
            .collect();
        let mut chunk_bytes = 0;
        let chunk_docs = results.len() as u64;
        for p in results {
            stats.input.records += 1;
            match p {
                Processed::Fatal(e) => return Err(e),
                Processed::Unreadable(id, reason, bytes) => {
                    stats.input.unreadable += 1;
                    chunk_bytes += bytes;
                    let rec = serde_json::json!({ "id": id, "stage": "read", "reason": "unreadable", "error": reason });
                    write_json_line(&mut dropped, &rec)?;
                    *stats
                        .drops_by_language
                        .entry("unknown".into())
                        .or_default()
                        .entry("unreadable".into())
                        .or_default() += 1;
                }
                Processed::Doc(outcome, sig, content, in_bytes) => {
                    chunk_bytes += in_bytes;
                    for (k, (bin, bout)) in outcome.trace.iter().enumerate() {
                        let s = &mut stats.stages[k];
                        s.docs_in += 1;
                        s.bytes_in += bin;
                        match outcome.dropped {
                            Some((at, reason)) if at == k => {
                                *s.dropped.entry(reason.into()).or_default() += 1;
                            }
                            _ => {
                                s.docs_out += 1;
                                s.bytes_out += bout;
                            }
                        }
                    }
                    for (k, n) in outcome.pii.iter().enumerate() {
                        stats.pii[k] += n;
                    }
                    let lang = outcome.doc.lang.clone().unwrap_or_else(|| "unknown".into());
                    if let Some((at, reason)) = outcome.dropped {
                        *stats
                            .drops_by_language
                            .entry(lang)
                            .or_default()
                            .entry(reason.into())
                            .or_default() += 1;
                        write_json_line(
                            &mut dropped,
                            &outcome.doc.to_record(Some((cfg.stages[at].name(), reason))),
                        )?;
                    } else {
                        let index = stats.passed as u32;
                        stats.passed += 1;
                        runs.extend(doc_records(i as u32, index, sig.as_deref(), content))?;
                        write_json_line(&mut filtered, &outcome.doc.to_record(None))?;
                    }
                }
            }
        }
        progress(Event::Advance(chunk_docs, chunk_bytes));
    }
    if stats.input.records == 0 {
        return Err(Error::BadInput {
            path: input.to_path_buf(),
            reason: "no documents in the file".into(),
        });
    }
    let digest = reader.digest()?;
    stats.input.path = input.display().to_string();
    stats.input.bytes = digest.bytes;
    stats.input.sha256 = digest.sha256;
    drop(filtered);
    drop(dropped);
    fs_err::rename(dropped_path.with_extension("zst.partial"), &dropped_path)?;
    stats.runs = runs
        .finish()?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .collect();
    fs_err::write(dir.join("stats.json"), serde_json::to_vec(&stats)?)?;
    // the marker goes last: a part without it is redone
    let tmp = dir.join("done.json.partial");
    fs_err::write(
        &tmp,
        serde_json::to_vec(&serde_json::json!({ "config_hash": cfg_hash }))?,
    )?;
    fs_err::rename(&tmp, dir.join("done.json"))?;
    Ok(stats)
}

/// Loads a finished part if it matches the input and pipeline.
fn finished_part(out: &Path, i: usize, input: &Path, cfg_hash: &str) -> Result<Option<PartStats>> {
    let dir = part_dir(out, i);
    if !dir.join("done.json").exists() || !dir.join("stats.json").exists() {
        return Ok(None);
    }
    let stats: PartStats = match serde_json::from_slice(&fs_err::read(dir.join("stats.json"))?) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    if stats.config_hash != cfg_hash || stats.input.path != input.display().to_string() {
        return Ok(None);
    }
    let digest = sha256_file(input)?;
    if digest.sha256 != stats.input.sha256 {
        return Ok(None);
    }
    Ok(Some(stats))
}

fn output_entry(out: &Path, path: &Path) -> Result<OutputEntry> {
    let d = sha256_file(path)?;
    Ok(OutputEntry {
        path: path.strip_prefix(out).unwrap_or(path).display().to_string(),
        bytes: d.bytes,
        sha256: d.sha256,
    })
}

/// Runs the pipeline. Returns `None` when `max_parts` stopped it before the end.
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
    let cfg_hash = config_hash(cfg)?;

    // Phase 1: filter, one input file at a time.
    let total_bytes: u64 = inputs
        .iter()
        .filter_map(|p| fs_err::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    progress(Event::Phase("filter", Some(total_bytes)));
    let mut parts = Vec::with_capacity(inputs.len());
    let mut done_now = 0;
    for (i, input) in inputs.iter().enumerate() {
        if let Some(stats) = finished_part(&opts.out, i, input, &cfg_hash)? {
            progress(Event::Skipped(input.clone()));
            progress(Event::Advance(stats.input.records, stats.input.bytes));
            parts.push(stats);
            continue;
        }
        if opts.max_parts.is_some_and(|m| done_now >= m) {
            return Ok(None);
        }
        parts.push(filter_part(i, input, opts, &cfg_hash, progress)?);
        done_now += 1;
    }

    // Phase 2: cluster duplicates.
    let mut offsets = Vec::with_capacity(parts.len());
    let mut total = 0u64;
    for p in &parts {
        offsets.push(total);
        total += p.passed;
    }
    if total > u64::from(u32::MAX) {
        return Err(Error::Pipeline(format!(
            "{total} documents passed the filters; dedup handles up to 2^32 per run"
        )));
    }
    progress(Event::Phase("dedup", Some(total)));
    let runs: Vec<PathBuf> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.runs.iter().map(move |r| part_dir(&opts.out, i).join(r)))
        .collect();
    let mut clusters = cluster_runs(
        &runs,
        &offsets,
        total as usize,
        cfg.dedup.exact,
        cfg.dedup.minhash,
    )?;

    // Phase 3: kept documents. Outputs of an earlier run over other inputs go first, so that
    // `kept/` and `dropped/` hold exactly this run's files.
    progress(Event::Phase("write kept", Some(total)));
    remove_stale(&opts.out.join("kept"), |name| {
        name.strip_prefix("part-")
            .and_then(|r| r.strip_suffix(".jsonl.zst"))
            .is_some_and(|n| part_number(n) >= parts.len())
    })?;
    remove_stale(&opts.out.join("dropped"), |name| {
        let n = name
            .strip_prefix("filter-")
            .or_else(|| name.strip_prefix("dedup-"))
            .and_then(|r| r.strip_suffix(".jsonl.zst"));
        n.is_some_and(|n| part_number(n) >= parts.len()) || name.ends_with(".partial")
    })?;
    let mut exact_stage = StageStats {
        name: "exact_dedup".into(),
        ..Default::default()
    };
    let mut near_stage = StageStats {
        name: "minhash_dedup".into(),
        ..Default::default()
    };
    let mut dedup = DedupStats {
        candidates: total,
        ..Default::default()
    };
    let mut drops_by_language: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut kept_by_language: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept_files = Vec::new();
    let mut cluster_roots = std::collections::HashSet::new();
    for (i, _) in parts.iter().enumerate() {
        let kept_path = opts.out.join("kept").join(format!("part-{i:05}.jsonl.zst"));
        let dropped_path = opts
            .out
            .join("dropped")
            .join(format!("dedup-{i:05}.jsonl.zst"));
        let mut kept = zst_writer(&kept_path)?;
        let mut dropped = zst_writer(&dropped_path)?;
        let mut n = 0u64;
        for (index, rec) in
            read_zst_jsonl(&part_dir(&opts.out, i).join("filtered.jsonl.zst"))?.enumerate()
        {
            let rec = rec?;
            let gid = (offsets[i] + index as u64) as u32;
            let bytes = rec
                .get("text")
                .and_then(Value::as_str)
                .map_or(0, |t| t.len() as u64);
            let lang = rec
                .get("lang")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
            let kind = clusters.kind(gid);
            let mut alive = true;
            for (stage, active, removed) in [
                (&mut exact_stage, cfg.dedup.exact, kind == DupKind::Exact),
                (&mut near_stage, cfg.dedup.minhash, kind == DupKind::Near),
            ] {
                if !active || !alive {
                    continue;
                }
                stage.docs_in += 1;
                stage.bytes_in += bytes;
                if removed {
                    let reason = if kind == DupKind::Exact {
                        "exact_duplicate"
                    } else {
                        "minhash_duplicate"
                    };
                    *stage.dropped.entry(reason.into()).or_default() += 1;
                    alive = false;
                } else {
                    stage.docs_out += 1;
                    stage.bytes_out += bytes;
                }
            }
            match kind {
                DupKind::Unique => {
                    *kept_by_language.entry(lang).or_default() += 1;
                    write_json_line(&mut kept, &rec)?;
                }
                DupKind::Exact | DupKind::Near => {
                    let (reason, stage) = if kind == DupKind::Exact {
                        dedup.exact_duplicates += 1;
                        cluster_roots.insert(clusters.exact.find(gid));
                        ("exact_duplicate", "exact_dedup")
                    } else {
                        dedup.near_duplicates += 1;
                        cluster_roots.insert(clusters.near.find(gid));
                        ("minhash_duplicate", "minhash_dedup")
                    };
                    *drops_by_language
                        .entry(lang)
                        .or_default()
                        .entry(reason.into())
                        .or_default() += 1;
                    let mut rec = rec;
                    if let Value::Object(m) = &mut rec {
                        m.insert("stage".into(), stage.into());
                        m.insert("reason".into(), reason.into());
                    }
                    write_json_line(&mut dropped, &rec)?;
                }
            }
            n += 1;
        }
        drop(kept);
        drop(dropped);
        progress(Event::Advance(n, 0));
        kept_files.push(kept_path);
    }
    dedup.clusters = cluster_roots.len() as u64;

    // Phase 4: tokenizer.
    let tok_path = opts.out.join("tokenizer.json");
    let (tok, tok_entry) = match &opts.tokenizer {
        TokenizerSource::File(p) => {
            let tok = tokenize::load(p)?;
            let entry = TokenizerEntry {
                trained: false,
                source: p.display().to_string(),
                vocab_size: tok.get_vocab_size(true) as u64,
                eos_id: tokenize::eos_id(&tok, &cfg.tokenizer.special_tokens)?,
            };
            fs_err::copy(p, &tok_path)?;
            (tok, entry)
        }
        TokenizerSource::Train => {
            progress(Event::Phase("train tokenizer", None));
            let texts = kept_texts(&kept_files);
            let tok = tokenize::train(texts, &cfg.tokenizer)?;
            tok.save(&tok_path, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let entry = TokenizerEntry {
                trained: true,
                source: "tokenizer.json".into(),
                vocab_size: tok.get_vocab_size(true) as u64,
                eos_id: tokenize::eos_id(&tok, &cfg.tokenizer.special_tokens)?,
            };
            (tok, entry)
        }
    };

    // Phase 5: shards.
    let kept_total: u64 = kept_by_language.values().sum();
    progress(Event::Phase("tokenize", Some(kept_total)));
    let shard_dir = opts.out.join("shards");
    for e in fs_err::read_dir(&shard_dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "bin" || x == "partial") {
            fs_err::remove_file(p)?;
        }
    }
    let vocab = tok.get_vocab_size(true) as u32;
    let max_tokens = cfg.shards.max_tokens_per_shard;
    let mut train = ShardWriter::new(&shard_dir, "train", vocab, tok_entry.eos_id, max_tokens)?;
    let mut val = ShardWriter::new(
        &shard_dir,
        "validation",
        vocab,
        tok_entry.eos_id,
        max_tokens,
    )?;
    let val_cut = (cfg.shards.validation_fraction.clamp(0.0, 1.0) * 1_000_000.0) as u64;
    for path in &kept_files {
        let mut it = read_zst_jsonl(path)?;
        loop {
            let chunk: Vec<Value> = it
                .by_ref()
                .take(cfg.chunk_docs.max(1))
                .collect::<Result<_>>()?;
            if chunk.is_empty() {
                break;
            }
            let encoded: Vec<(bool, Vec<u32>)> = chunk
                .par_iter()
                .map(|rec| {
                    let field = |k: &str| rec.get(k).and_then(Value::as_str).unwrap_or_default();
                    let is_val = xxh3_64(field("id").as_bytes()) % 1_000_000 < val_cut;
                    tokenize::encode(&tok, field("text")).map(|ids| (is_val, ids))
                })
                .collect::<Result<_>>()?;
            for (is_val, ids) in &encoded {
                if *is_val {
                    val.push(ids)?;
                } else {
                    train.push(ids)?;
                }
            }
            progress(Event::Advance(encoded.len() as u64, 0));
        }
    }
    let tokens = TokenStats {
        train_docs: train.docs,
        train_tokens: train.tokens,
        validation_docs: val.docs,
        validation_tokens: val.tokens,
    };
    let mut shard_files = train.finish()?;
    shard_files.extend(val.finish()?);

    // Manifest.
    let mut stages: Vec<StageStats> = cfg
        .stages
        .iter()
        .map(|s| StageStats {
            name: s.name().into(),
            ..Default::default()
        })
        .collect();
    let mut pii = [0u64; 4];
    for p in &parts {
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
    let mut outputs = Vec::new();
    for f in kept_files
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
    let manifest = Manifest {
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
        tokenizer: tok_entry,
        tokens,
        outputs,
        pipeline: toml_text,
    };
    let tmp = opts.out.join("manifest.json.partial");
    fs_err::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    fs_err::rename(&tmp, opts.out.join("manifest.json"))?;
    Ok(Some(manifest))
}

fn part_number(digits: &str) -> usize {
    digits.parse().unwrap_or(usize::MAX)
}

/// Removes the files of `dir` whose names `stale` accepts.
fn remove_stale(dir: &Path, stale: impl Fn(&str) -> bool) -> Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(&stale)
        {
            fs_err::remove_file(path)?;
        }
    }
    Ok(())
}

/// The texts of the kept files, streamed (unreadable lines are skipped: the pipeline wrote them).
fn kept_texts(files: &[PathBuf]) -> impl Iterator<Item = String> + Send + '_ {
    files.iter().flat_map(|f| {
        let it: Box<dyn Iterator<Item = String> + Send> = match read_zst_jsonl(f) {
            Ok(it) => Box::new(
                it.filter_map(|r| r.ok())
                    .filter_map(|v| v.get("text").and_then(Value::as_str).map(str::to_string)),
            ),
            Err(_) => Box::new(std::iter::empty()),
        };
        it
    })
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
