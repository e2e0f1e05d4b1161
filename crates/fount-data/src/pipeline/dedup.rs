//! Phases 2 and 3: duplicates clustered from every part's signature runs, then each part's
//! filtered documents split into `kept/` and `dropped/dedup-*` with the dedup stages' counts.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde_json::Value;

use super::filter::PartStats;
use super::outputs::{
    part_dir, part_number, read_zst_jsonl, remove_stale, write_json_line, zst_writer,
};
use super::{Event, RunOptions};
use crate::dedup::{cluster_runs, Clusters, DupKind};
use crate::error::{Error, Result};
use crate::manifest::{DedupStats, StageStats};

/// What dedup leaves for the later phases and the manifest.
pub(super) struct Deduped {
    /// `kept/part-NNNNN.jsonl.zst`, one per part.
    pub(super) kept_files: Vec<PathBuf>,
    /// The exact-dedup stage's counts.
    pub(super) exact_stage: StageStats,
    /// The MinHash stage's counts.
    pub(super) near_stage: StageStats,
    /// Duplicates and clusters.
    pub(super) dedup: DedupStats,
    /// Documents dropped as duplicates, by language and reason.
    pub(super) drops_by_language: BTreeMap<String, BTreeMap<String, u64>>,
    /// Documents kept, by language.
    pub(super) kept_by_language: BTreeMap<String, u64>,
}

/// Phase 2 (cluster duplicates over all parts) and phase 3 (write the kept documents).
pub(super) fn dedup_and_keep(
    opts: &RunOptions,
    parts: &[PartStats],
    progress: &(dyn Fn(Event) + Sync),
) -> Result<Deduped> {
    let cfg = &opts.config;
    let mut offsets = Vec::with_capacity(parts.len());
    let mut total = 0u64;
    for p in parts {
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

    // Outputs of an earlier run over other inputs go first, so that `kept/` and `dropped/` hold
    // exactly this run's files.
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
    let mut out = Deduped {
        kept_files: Vec::new(),
        exact_stage: StageStats {
            name: "exact_dedup".into(),
            ..Default::default()
        },
        near_stage: StageStats {
            name: "minhash_dedup".into(),
            ..Default::default()
        },
        dedup: DedupStats {
            candidates: total,
            ..Default::default()
        },
        drops_by_language: BTreeMap::new(),
        kept_by_language: BTreeMap::new(),
    };
    let mut cluster_roots = HashSet::new();
    for (i, &offset) in offsets.iter().enumerate() {
        let n = write_kept_part(opts, i, offset, &mut clusters, &mut out, &mut cluster_roots)?;
        progress(Event::Advance(n, 0));
    }
    out.dedup.clusters = cluster_roots.len() as u64;
    Ok(out)
}

/// Splits part `i`'s filtered documents (global ids from `offset`) into its kept file and its
/// dedup drops, counting them into `out`; returns the documents read.
fn write_kept_part(
    opts: &RunOptions,
    i: usize,
    offset: u64,
    clusters: &mut Clusters,
    out: &mut Deduped,
    cluster_roots: &mut HashSet<u32>,
) -> Result<u64> {
    let cfg = &opts.config;
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
        let gid = (offset + index as u64) as u32;
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
            (
                &mut out.exact_stage,
                cfg.dedup.exact,
                kind == DupKind::Exact,
            ),
            (
                &mut out.near_stage,
                cfg.dedup.minhash,
                kind == DupKind::Near,
            ),
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
                *out.kept_by_language.entry(lang).or_default() += 1;
                write_json_line(&mut kept, &rec)?;
            }
            DupKind::Exact | DupKind::Near => {
                let (reason, stage) = if kind == DupKind::Exact {
                    out.dedup.exact_duplicates += 1;
                    cluster_roots.insert(clusters.exact.find(gid));
                    ("exact_duplicate", "exact_dedup")
                } else {
                    out.dedup.near_duplicates += 1;
                    cluster_roots.insert(clusters.near.find(gid));
                    ("minhash_duplicate", "minhash_dedup")
                };
                *out.drops_by_language
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
    out.kept_files.push(kept_path);
    Ok(n)
}
