//! `provenance.json`: what an artifact directory carries so anyone can check where it came from
//! without asking the operator: its logged entry (the exact bytes, base64, and the statement
//! they hold), and a C2SP `tlog-proof` of that entry's inclusion under a signed checkpoint.
//!
//! [`verify_artifact`] recomputes the directory's digests, checks the entry, the proof and the
//! signature, then walks the run's inputs back: an input inside a directory that has provenance
//! of its own is checked against that directory's entry (recursively), any other input is raw
//! data whose digest is recomputed. The first thing that does not match is named.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::log::{parse_tlog_proof, Ledger};
use crate::merkle::{leaf_hash, verify_inclusion};
use crate::note::Verifier;
use crate::statement::{
    artifact_files, file_digest, listing_digest, statement, subjects_of, PROVENANCE_FILE,
};

/// The contents of `provenance.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    /// The log's verifier key (a hint: trust the key you were given, not this one).
    pub log: String,
    /// The entry's index.
    pub index: u64,
    /// The entry's exact bytes, base64.
    pub leaf: String,
    /// The entry, readable.
    pub statement: Value,
    /// A C2SP `tlog-proof` of the entry's inclusion.
    pub proof: String,
}

/// Logs the artifact directory `dir` and writes its `provenance.json`; the subjects are its
/// files, or those under the names or folders (`shards/`) in `only` when it is not empty.
/// Returns the entry's index.
pub async fn record_artifact(
    ledger: &Ledger,
    dir: &Path,
    only: &[&str],
    kind: &str,
    predicate_type: &str,
    predicate: Value,
) -> Result<u64> {
    let subjects: Vec<_> = artifact_files(dir)?
        .into_iter()
        .filter(|f| {
            only.is_empty()
                || only
                    .iter()
                    .any(|o| f.name == *o || (o.ends_with('/') && f.name.starts_with(o)))
        })
        .collect();
    let st = statement(&subjects, predicate_type, predicate);
    let body = serde_json::to_string(&st)?;
    let appended = ledger.append(&[(body.clone(), kind)]).await?;
    let index = appended.first;
    let p = Provenance {
        log: ledger.verifier_key(),
        index,
        leaf: B64.encode(body.as_bytes()),
        statement: st,
        proof: ledger.proof_at(index, &appended.checkpoint).await?,
    };
    write_provenance(dir, &p)?;
    Ok(index)
}

/// Writes `dir/provenance.json` whole or not at all.
pub fn write_provenance(dir: &Path, p: &Provenance) -> Result<()> {
    let path = dir.join(PROVENANCE_FILE);
    let tmp = dir.join(format!("{PROVENANCE_FILE}.{}.tmp", std::process::id()));
    fs_err::write(&tmp, serde_json::to_vec_pretty(p)?)?;
    fs_err::rename(&tmp, &path)?;
    Ok(())
}

/// Reads `dir/provenance.json`.
pub fn read_provenance(dir: &Path) -> Result<Provenance> {
    let path = dir.join(PROVENANCE_FILE);
    let bytes = fs_err::read(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::Mismatch(format!(
            "{}: not a fount provenance file: {e}",
            path.display()
        ))
    })
}

/// What a verification checked, one line per artifact or input.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Human-readable lines, in the order checked.
    pub lines: Vec<String>,
    /// Artifact directories whose entries were verified, with their entry indices.
    pub artifacts: Vec<(PathBuf, u64)>,
    /// Raw input files (no provenance of their own) whose digests were recomputed.
    pub raw_inputs: Vec<PathBuf>,
}

/// Checks one provenance file's entry and proof (not the files): the leaf is the statement, the
/// checkpoint is signed by `log`, the proof leads from the leaf to its root. Returns the
/// statement and the checkpoint.
pub fn check_entry(p: &Provenance, log: &Verifier, what: &str) -> Result<(Value, Checkpoint)> {
    let leaf = B64
        .decode(&p.leaf)
        .map_err(|_| Error::Mismatch(format!("{what}: the leaf is not base64")))?;
    let logged: Value = serde_json::from_slice(&leaf)
        .map_err(|_| Error::Mismatch(format!("{what}: the logged entry is not JSON")))?;
    if logged != p.statement {
        return Err(Error::Mismatch(format!(
            "{what}: the statement differs from the entry that was logged"
        )));
    }
    let proof = parse_tlog_proof(&p.proof)?;
    if proof.index != p.index {
        return Err(Error::Mismatch(format!(
            "{what}: the proof is for entry {}, not {}",
            proof.index, p.index
        )));
    }
    let c = Checkpoint::open(&proof.checkpoint, log)
        .map_err(|e| Error::Mismatch(format!("{what}: the checkpoint: {e}")))?;
    verify_inclusion(&leaf_hash(&leaf), p.index, c.size, &proof.path, &c.root).map_err(|e| {
        Error::Mismatch(format!(
            "{what}: entry {} is not proven in the checkpoint of size {}: {e}",
            p.index, c.size
        ))
    })?;
    Ok((logged, c))
}

/// Verifies the artifact directory `dir` and, through its inputs, everything it was made from.
pub fn verify_artifact(dir: &Path, log: &Verifier) -> Result<Report> {
    let mut report = Report::default();
    let mut seen = HashSet::new();
    verify_dir(dir, log, &mut report, &mut seen)?;
    Ok(report)
}

fn verify_dir(
    dir: &Path,
    log: &Verifier,
    report: &mut Report,
    seen: &mut HashSet<PathBuf>,
) -> Result<()> {
    let dir = fs_err::canonicalize(dir)?;
    if !seen.insert(dir.clone()) {
        return Ok(());
    }
    let what = dir.display().to_string();
    if !dir.join(PROVENANCE_FILE).exists() {
        return Err(Error::Mismatch(format!(
            "{what}: no {PROVENANCE_FILE} (the artifact was not logged)"
        )));
    }
    let p = read_provenance(&dir)?;
    let (st, c) = check_entry(&p, log, &what)?;
    let logged = subjects_of(&st)?;
    let now = artifact_files(&dir)?;
    for s in &logged {
        match now.iter().find(|f| f.name == s.name) {
            None => {
                return Err(Error::Mismatch(format!(
                    "{what}/{}: missing (logged in entry {})",
                    s.name, p.index
                )))
            }
            Some(f) if f.sha256 != s.sha256 => {
                return Err(Error::Mismatch(format!(
                    "{what}/{}: its sha256 is {}, entry {} logged {}",
                    s.name, f.sha256, p.index, s.sha256
                )))
            }
            Some(_) => {}
        }
    }
    // a file added beside logged ones (a folder of the artifact's own) is a change; files in
    // folders the entry does not cover (work files of a run) are not the artifact
    let folder = |name: &str| name.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    let covered: HashSet<String> = logged.iter().map(|s| folder(&s.name)).collect();
    if let Some(extra) = now
        .iter()
        .find(|f| covered.contains(&folder(&f.name)) && !logged.iter().any(|s| s.name == f.name))
    {
        return Err(Error::Mismatch(format!(
            "{what}/{}: not in entry {} (added after the artifact was logged)",
            extra.name, p.index
        )));
    }
    report.lines.push(format!(
        "ok  {what}: {} files match entry {} ({}), proven in checkpoint {} of {}",
        logged.len(),
        p.index,
        st["predicateType"].as_str().unwrap_or("?"),
        c.size,
        c.origin
    ));
    report.artifacts.push((dir.clone(), p.index));
    let deps = st["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for d in deps {
        let Some(path) = d["uri"].as_str().and_then(|u| u.strip_prefix("file://")) else {
            continue;
        };
        let want = d["digest"]["sha256"].as_str().unwrap_or_default();
        let path = PathBuf::from(path);
        verify_input(&path, want, &what, p.index, log, report, seen)?;
    }
    Ok(())
}

/// The nearest directory above `file` with a provenance file whose entry lists it, and the
/// file's name there.
fn provenance_home(file: &Path) -> Option<(PathBuf, String)> {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d.join(PROVENANCE_FILE).exists() {
            let rel = file.strip_prefix(d).ok()?;
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            return Some((d.to_path_buf(), name));
        }
        dir = d.parent();
    }
    None
}

fn verify_input(
    path: &Path,
    want: &str,
    user: &str,
    index: u64,
    log: &Verifier,
    report: &mut Report,
    seen: &mut HashSet<PathBuf>,
) -> Result<()> {
    if path.is_dir() {
        // a large input directory, logged as the digest of its listing
        let files = artifact_files(path)?;
        let got = listing_digest(&files);
        if got != want {
            return Err(Error::Mismatch(format!(
                "{}: its {} files' listing hashes to {got}, entry {index} ({user}) used {want} (a file was changed, added or removed)",
                path.display(),
                files.len()
            )));
        }
        // inside an artifact: that artifact's entry is checked next, and through it its inputs
        if let Some((home, _)) = provenance_home(&path.join(PROVENANCE_FILE)) {
            return verify_dir(&home, log, report, seen);
        }
        report.raw_inputs.push(path.to_path_buf());
        report.lines.push(format!(
            "ok  {}/: raw input, {} files match entry {index}",
            path.display(),
            files.len()
        ));
        return Ok(());
    }
    if !path.is_file() {
        return Err(Error::Mismatch(format!(
            "{}: missing (an input of {user}, entry {index})",
            path.display()
        )));
    }
    if let Some((home, name)) = provenance_home(path) {
        let p = read_provenance(&home)?;
        let logged = subjects_of(&p.statement)?;
        if let Some(s) = logged.iter().find(|s| s.name == name) {
            if s.sha256 != want {
                return Err(Error::Mismatch(format!(
                    "{}: entry {index} ({user}) used sha256 {want}, but {}'s entry {} logged {}",
                    path.display(),
                    home.display(),
                    p.index,
                    s.sha256
                )));
            }
            return verify_dir(&home, log, report, seen);
        }
    }
    let got = file_digest(path)?;
    if got != want {
        return Err(Error::Mismatch(format!(
            "{}: its sha256 is {got}, entry {index} ({user}) used {want}",
            path.display()
        )));
    }
    if !report.raw_inputs.iter().any(|p| p == path) {
        report.raw_inputs.push(path.to_path_buf());
        report.lines.push(format!(
            "ok  {}: raw input, sha256 matches entry {index}",
            path.display()
        ));
    }
    Ok(())
}
