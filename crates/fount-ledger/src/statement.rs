//! Entries: in-toto Statement v1, with SLSA Provenance v1 as the predicate of runs (curation,
//! training, fine-tuning) and fount's own predicates for the rest.
//!
//! A statement's subjects are files with their SHA-256 digests; a run's inputs are its
//! `resolvedDependencies`, one per file, with `file://` URIs, so a verifier can find them and
//! walk back through the inputs' own provenance to the raw data.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// SLSA Provenance v1.
pub const SLSA_PROVENANCE: &str = "https://slsa.dev/provenance/v1";
/// A model or adapter made available to serve.
pub const MODEL_PREDICATE: &str = "https://fount.dev/ledger/model/v1";
/// What a server serves, written when it starts.
pub const DEPLOYMENT_PREDICATE: &str = "https://fount.dev/ledger/deployment/v1";
/// An administrative act (tenants, keys, quotas, prices).
pub const ADMIN_PREDICATE: &str = "https://fount.dev/ledger/admin/v1";
/// A tenant's usage records of one window, as a Merkle root.
pub const USAGE_PREDICATE: &str = "https://fount.dev/ledger/usage/v1";
/// One hour's audit records of moderation decisions and operator switches, as a Merkle root.
pub const AUDIT_PREDICATE: &str = "https://fount.dev/ledger/audit/v1";
/// The builder id of runs made by fount.
pub const BUILDER: &str = "https://fount.dev/builder/v1";
/// The file an artifact directory's provenance is written to.
pub const PROVENANCE_FILE: &str = "provenance.json";

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file, hex, read in 1 MiB pieces.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut f = fs_err::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// A file and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// The path relative to the artifact directory (`/`-separated), or absolute for an input.
    pub name: String,
    /// SHA-256, hex.
    pub sha256: String,
}

/// The files of an artifact directory (recursively, sorted, its own `provenance.json` left out)
/// with their digests; a file is itself alone.
pub fn artifact_files(path: &Path) -> Result<Vec<FileDigest>> {
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![FileDigest {
            name,
            sha256: file_digest(path)?,
        }]);
    }
    let mut files = Vec::new();
    walk(path, path, &mut files)?;
    files.sort();
    files
        .into_iter()
        .map(|(name, p)| {
            Ok(FileDigest {
                name,
                sha256: file_digest(&p)?,
            })
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for e in fs_err::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let ty = e.file_type()?;
        if ty.is_dir() {
            walk(root, &p, out)?;
        } else if ty.is_file() {
            let rel = p.strip_prefix(root).unwrap_or(&p);
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            if name != PROVENANCE_FILE && !name.ends_with(".tmp") {
                out.push((name, p));
            }
        }
    }
    Ok(())
}

/// Above this many files an input directory is one dependency: the digest of its listing.
pub const LISTED_FILES: usize = 64;

/// The digest of a directory's listing: SHA-256 of `sha256sum`-style lines (`<hex>  <name>\n`,
/// names sorted) over its files.
pub fn listing_digest(files: &[FileDigest]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(format!("{}  {}\n", f.sha256, f.name).as_bytes());
    }
    hex(&h.finalize())
}

/// The inputs of a run: every file of each input (a file or a directory), by absolute path; a
/// directory of more than [`LISTED_FILES`] files is one dependency, `file:///dir/` with the
/// digest of its listing ([`listing_digest`]).
pub fn dependencies(inputs: &[PathBuf]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for input in inputs {
        let abs = fs_err::canonicalize(input)?;
        let base = if abs.is_file() {
            abs.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            abs.clone()
        };
        let files = artifact_files(&abs)?;
        if abs.is_dir() && files.len() > LISTED_FILES {
            out.push(json!({
                "uri": format!("file://{}/", abs.display()),
                "digest": {"sha256": listing_digest(&files)},
                "annotations": {"files": files.len(), "digest": "sha256 of the sha256sum listing"},
            }));
            continue;
        }
        for f in files {
            let path = base.join(&f.name);
            out.push(json!({
                "uri": format!("file://{}", path.display()),
                "digest": {"sha256": f.sha256},
            }));
        }
    }
    Ok(out)
}

/// An in-toto Statement v1 over `subjects`.
pub fn statement(subjects: &[FileDigest], predicate_type: &str, predicate: Value) -> Value {
    let subject: Vec<Value> = subjects
        .iter()
        .map(|s| json!({"name": s.name, "digest": {"sha256": s.sha256}}))
        .collect();
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// A run's details for SLSA Provenance v1.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// `https://fount.dev/data/v1`, `…/train/v1`, `…/finetune/v1`.
    pub build_type: String,
    /// What the user asked for (the command's configuration).
    pub external: Value,
    /// What fount added (version, threads, …).
    pub internal: Value,
    /// The inputs, from [`dependencies`].
    pub dependencies: Vec<Value>,
    /// The pool job attempt or fine-tuning job that ran it, when one did.
    pub invocation_id: Option<String>,
    /// RFC 3339.
    pub started_on: String,
    /// RFC 3339.
    pub finished_on: String,
}

/// The SLSA Provenance v1 predicate of a run.
pub fn slsa(run: &Run) -> Value {
    let mut metadata = Map::new();
    if let Some(id) = &run.invocation_id {
        metadata.insert("invocationId".into(), json!(id));
    }
    metadata.insert("startedOn".into(), json!(run.started_on));
    metadata.insert("finishedOn".into(), json!(run.finished_on));
    json!({
        "buildDefinition": {
            "buildType": run.build_type,
            "externalParameters": run.external,
            "internalParameters": run.internal,
            "resolvedDependencies": run.dependencies,
        },
        "runDetails": {
            "builder": {"id": BUILDER, "version": {"fount": env!("CARGO_PKG_VERSION")}},
            "metadata": Value::Object(metadata),
        },
    })
}

/// Unix milliseconds as RFC 3339 UTC (`2026-12-06T12:00:00.000Z`).
pub fn rfc3339(ms: i64) -> String {
    let rem = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        fount_store::utc_day(ms),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// An administrative act as an entry: the subject is what was acted on (`tenant/…`, `key/…`,
/// `model/…`), its digest that of the act's details.
pub fn admin(act: &str, subject: &str, details: Value) -> Value {
    let predicate = json!({"act": act, "details": details, "at_ms": fount_store::now_ms()});
    let digest = hex(&Sha256::digest(predicate.to_string().as_bytes()));
    statement(
        &[FileDigest {
            name: subject.to_string(),
            sha256: digest,
        }],
        ADMIN_PREDICATE,
        predicate,
    )
}

/// The act of creating tenant `t`: its subject and details.
pub fn tenant_created(t: &fount_store::Tenant) -> (String, Value) {
    (format!("tenant/{}", t.id), json!({"name": t.name}))
}

/// The act of creating a key: its subject and details (its id, prefix and scopes; never the
/// secret).
pub fn key_created(k: &fount_store::KeyInfo) -> (String, Value) {
    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.name()).collect();
    (
        format!("key/{}", k.id),
        json!({"tenant_id": k.tenant_id, "prefix": k.prefix, "name": k.name,
               "scopes": scopes, "expires_at": k.expires_at}),
    )
}

/// A model or adapter made available to serve: its files' digests, and the index of its own
/// provenance entry when it has one.
pub fn model(name: &str, dir: &Path, role: &str) -> Result<Value> {
    let files = artifact_files(dir)?;
    let logged = crate::provenance::read_provenance(dir)
        .ok()
        .map(|p| p.index);
    Ok(statement(
        &files,
        MODEL_PREDICATE,
        json!({
            "name": name,
            "role": role,
            "path": dir.display().to_string(),
            "provenance_index": logged,
            "at_ms": fount_store::now_ms(),
        }),
    ))
}

/// The subjects of a statement: `(name, sha256)`.
pub fn subjects_of(statement: &Value) -> Result<Vec<FileDigest>> {
    let list = statement["subject"]
        .as_array()
        .ok_or_else(|| Error::Entry("the statement has no subject list".into()))?;
    list.iter()
        .map(|s| {
            Ok(FileDigest {
                name: s["name"]
                    .as_str()
                    .ok_or_else(|| Error::Entry("a subject has no name".into()))?
                    .to_string(),
                sha256: s["digest"]["sha256"]
                    .as_str()
                    .ok_or_else(|| Error::Entry("a subject has no sha256 digest".into()))?
                    .to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_558_400_000), "2026-12-06T12:00:00.000Z");
    }
}
