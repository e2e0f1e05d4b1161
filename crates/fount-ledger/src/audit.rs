//! The audit trail committed to the log: each hour's audit records (moderation decisions and
//! operator switches) in one entry, as bills are, so a record removed or changed afterwards is
//! detectable.
//!
//! A record's leaf is its JSON ([`fount_store::AuditRecord::to_json`], keys in that order, no
//! spaces); an entry's subject digest is the RFC 6962 root of its records' leaves in
//! (created_at_ms, id) order. Records that arrive late for an hour already committed get an
//! entry of their own.

use std::collections::BTreeMap;

use fount_store::AuditRecord;
use serde_json::json;

use crate::error::Result;
use crate::log::Ledger;
use crate::merkle::{leaf_hash, Hash, MemoryTree};
use crate::statement::{hex, statement, FileDigest, AUDIT_PREDICATE};
use crate::usage::{hour_of, HOUR};

/// A record's leaf: the exact bytes hashed.
pub fn audit_leaf(r: &AuditRecord) -> String {
    r.to_json().to_string()
}

/// The Merkle root of records, in the order given.
pub fn audit_root(records: &[AuditRecord]) -> Hash {
    let mut t = MemoryTree::new();
    for r in records {
        t.push(leaf_hash(audit_leaf(r).as_bytes()));
    }
    t.root(t.size())
}

/// Commits every audit record created before `before_ms` and not yet committed: one entry per
/// hour, all in one append. Returns the entries written.
pub async fn commit_audit(ledger: &Ledger, before_ms: i64) -> Result<usize> {
    let mut a = ledger.begin().await?;
    let records = a.tx().uncommitted_audit(before_ms).await?;
    let mut hours: BTreeMap<i64, Vec<AuditRecord>> = BTreeMap::new();
    for r in records {
        hours.entry(hour_of(r.created_at_ms)).or_default().push(r);
    }
    let mut written = 0;
    for (from, recs) in hours {
        let mut actions: BTreeMap<String, usize> = BTreeMap::new();
        for r in &recs {
            *actions
                .entry(format!("{}/{}", r.stage, r.action))
                .or_default() += 1;
        }
        let root = hex(&audit_root(&recs));
        let predicate = json!({
            "from_ms": from,
            "to_ms": from + HOUR,
            "records": recs.len(),
            "actions": actions,
        });
        let subject = FileDigest {
            name: format!("audit/{from}"),
            sha256: root,
        };
        let body = serde_json::to_string(&statement(&[subject], AUDIT_PREDICATE, predicate))?;
        let index = a.push(body, "audit")?;
        let ids: Vec<String> = recs.into_iter().map(|r| r.id).collect();
        a.tx().commit_audit(index, &ids).await?;
        written += 1;
    }
    if written > 0 {
        a.finish().await?;
    }
    Ok(written)
}
