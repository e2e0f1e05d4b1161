//! `fount ledger verify --log`: the whole log against its latest checkpoint, every earlier
//! checkpoint against the latest by consistency proofs, the stored hashes against the entries,
//! and every usage and audit commitment against the records it covers.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::log::{unhex, Ledger};
use crate::merkle::{leaf_hash, verify_consistency, MemoryTree};
use crate::note::Verifier;
use crate::statement::hex;
use crate::usage::usage_root;

/// What a log verification found.
#[derive(Debug, Clone, Default)]
pub struct LogReport {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// Usage commitments checked.
    pub usage_commits: usize,
    /// Records under them.
    pub usage_records: u64,
    /// Audit commitments checked.
    pub audit_commits: usize,
    /// Audit records under them.
    pub audit_records: u64,
}

/// Entries read per query.
const BATCH: u64 = 10_000;

/// Verifies the log in `ledger`'s store against the key `log`.
pub async fn verify_log(ledger: &Ledger, log: &Verifier) -> Result<LogReport> {
    let store = ledger.store();
    let mut report = LogReport::default();
    let checkpoints = store.ledger_checkpoints().await?;
    let Some((_, latest_note)) = checkpoints.last() else {
        return Ok(report);
    };
    let latest = Checkpoint::open(latest_note, log)
        .map_err(|e| Error::Mismatch(format!("the latest checkpoint: {e}")))?;
    let size = latest.size;
    // every entry, in order, against the stored leaf hashes
    let mut tree = MemoryTree::new();
    let mut next = 0u64;
    while next < size {
        let entries = store.ledger_entries(next, BATCH.min(size - next)).await?;
        if entries.is_empty() {
            break;
        }
        let stored = store.ledger_hash_run(0, next, entries.len() as u64).await?;
        for (i, e) in entries.iter().enumerate() {
            if e.index != next {
                return Err(Error::Mismatch(format!(
                    "entry {next} is missing from the log (the checkpoint of size {size} covers it)"
                )));
            }
            let h = leaf_hash(e.body.as_bytes());
            match stored.get(i).and_then(|s| unhex(s)) {
                Some(s) if s == h => {}
                _ => {
                    return Err(Error::Mismatch(format!(
                        "entry {next} was changed after it was logged: it does not hash to the \
                         tree's leaf {next}"
                    )))
                }
            }
            tree.push(h);
            next += 1;
        }
    }
    if next < size {
        return Err(Error::Mismatch(format!(
            "the log has {next} entries, but a checkpoint of size {size} was signed: it was \
             truncated"
        )));
    }
    // an entry past the checkpoint is an append that came while this ran (it commits with a
    // checkpoint of its own), or one written without a checkpoint
    let extra = store.ledger_entries(size, 1).await?;
    let newer = store.ledger_checkpoint(None).await?.map_or(0, |(s, _)| s);
    if !extra.is_empty() && newer <= size {
        return Err(Error::Mismatch(format!(
            "entry {size} exists past the latest checkpoint (size {size}): it was never signed"
        )));
    }
    if tree.root(size) != latest.root {
        return Err(Error::Mismatch(format!(
            "the entries do not hash to the root signed in the checkpoint of size {size}"
        )));
    }
    // the stored interior hashes are the ones the entries make (proofs and tiles come from them)
    let mut level = 1u8;
    while (size >> level) > 0 {
        let count = size >> level;
        let mut at = 0u64;
        while at < count {
            let stored = store
                .ledger_hash_run(level, at, BATCH.min(count - at))
                .await?;
            if stored.is_empty() {
                return Err(Error::Mismatch(format!(
                    "the tree's stored hash at level {level}, index {at} is missing"
                )));
            }
            for (i, s) in stored.iter().enumerate() {
                let k = at + i as u64;
                if unhex(s) != tree.node((level, k)) {
                    return Err(Error::Mismatch(format!(
                        "the tree's stored hash at level {level}, index {k} is not the hash of \
                         its entries"
                    )));
                }
            }
            at += stored.len() as u64;
        }
        level += 1;
    }
    report.entries = size;
    // every checkpoint ever signed is a prefix of this one
    for (s, note) in &checkpoints {
        let c = Checkpoint::open(note, log)
            .map_err(|e| Error::Mismatch(format!("the checkpoint of size {s}: {e}")))?;
        if c.size != *s || c.origin != latest.origin {
            return Err(Error::Mismatch(format!(
                "the checkpoint stored as size {s} says size {} of {:?}",
                c.size, c.origin
            )));
        }
        let proof = tree.consistency(c.size, size);
        verify_consistency(c.size, size, &proof, &c.root, &latest.root).map_err(|e| {
            Error::Mismatch(format!(
                "the checkpoint of size {} is not consistent with the log of size {size}: {e} \
                 (history was rewritten)",
                c.size
            ))
        })?;
        report.checkpoints += 1;
    }
    // every bill against its records
    for commit in store.ledger_usage_commits(None, i64::MIN, i64::MAX).await? {
        let records = store.usage_of_commit(commit.entry_index).await?;
        let root = hex(&usage_root(&records));
        let entry = ledger.entry(commit.entry_index).await?;
        let st: serde_json::Value = serde_json::from_str(&entry.body)?;
        let logged = st["subject"][0]["digest"]["sha256"]
            .as_str()
            .unwrap_or_default();
        if root != logged || root != commit.root {
            return Err(Error::Mismatch(format!(
                "the usage records of tenant {} for the hour from {} no longer match entry {}: \
                 {} records now, {} committed (a record was changed, added or removed after its \
                 hour was committed)",
                commit.tenant_id,
                crate::statement::rfc3339(commit.from_ms),
                commit.entry_index,
                records.len(),
                commit.records
            )));
        }
        report.usage_commits += 1;
        report.usage_records += records.len() as u64;
    }
    // every hour of the audit trail against its records
    for index in store.ledger_entries_of_kind("audit").await? {
        let records = store.audit_of_entry(index).await?;
        let root = hex(&crate::audit::audit_root(&records));
        let entry = ledger.entry(index).await?;
        let st: serde_json::Value = serde_json::from_str(&entry.body)?;
        let logged = st["subject"][0]["digest"]["sha256"]
            .as_str()
            .unwrap_or_default();
        if root != logged {
            return Err(Error::Mismatch(format!(
                "the audit records committed in entry {index} no longer match it: {} records \
                 now, {} committed (a decision's record was changed, added or removed)",
                records.len(),
                st["predicate"]["records"]
            )));
        }
        report.audit_commits += 1;
        report.audit_records += records.len() as u64;
    }
    Ok(report)
}
