//! Phase 1: each input file read in chunks, every document through the stage chain on all
//! cores (input order kept), the survivors' dedup signatures written as sorted runs, and the
//! part's statistics recorded with a `done.json` marker so that a later invocation skips it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use super::outputs::{part_dir, write_json_line, zst_writer};
use super::{Event, PipelineConfig, RunOptions};
use crate::dedup::{doc_records, RunWriter};
use crate::error::{Error, Result};
use crate::manifest::{InputEntry, StageStats};
use crate::minhash::MinHasher;
use crate::read::{hex, parse_json_line, sha256_file, InputReader, Record};
use crate::stages::run_chain;
use crate::words::Lang;

/// What phase 1 found in one input file (its `stats.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct PartStats {
    pub(super) input: InputEntry,
    pub(super) config_hash: String,
    pub(super) stages: Vec<StageStats>,
    pub(super) drops_by_language: BTreeMap<String, BTreeMap<String, u64>>,
    pub(super) pii: [u64; 4],
    pub(super) passed: u64,
    pub(super) runs: Vec<String>,
}

/// The hash of the settings phase 1 depends on.
pub(super) fn config_hash(cfg: &PipelineConfig) -> Result<String> {
    // Tokenizer and shard settings do not change phase-1 results.
    let key = serde_json::json!({
        "reader": serde_json::to_value(&cfg.reader)?,
        "stages": serde_json::to_value(&cfg.stages)?,
        "dedup": serde_json::to_value(&cfg.dedup)?,
    });
    Ok(hex(&Sha256::digest(key.to_string().as_bytes())))
}

/// Phase 1: filters every input file in turn (a file finished by an earlier invocation with the
/// same pipeline is skipped). Returns `None` when `max_parts` files were done in this invocation
/// and more remain.
pub(super) fn filter_inputs(
    opts: &RunOptions,
    inputs: &[PathBuf],
    cfg_hash: &str,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<Option<Vec<PartStats>>> {
    let total_bytes: u64 = inputs
        .iter()
        .filter_map(|p| fs_err::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    progress(Event::Phase("filter", Some(total_bytes)));
    let mut parts = Vec::with_capacity(inputs.len());
    let mut done_now = 0;
    for (i, input) in inputs.iter().enumerate() {
        if let Some(stats) = finished_part(&opts.out, i, input, cfg_hash)? {
            progress(Event::Skipped(input.clone()));
            progress(Event::Advance(stats.input.records, stats.input.bytes));
            parts.push(stats);
            continue;
        }
        if opts.max_parts.is_some_and(|m| done_now >= m) {
            return Ok(None);
        }
        parts.push(filter_part(i, input, opts, cfg_hash, progress)?);
        done_now += 1;
    }

    Ok(Some(parts))
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
