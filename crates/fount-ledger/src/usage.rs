//! Bills: a tenant's usage records committed to the log, one entry per tenant and hour, so a
//! later change to a record is detectable.
//!
//! A record's leaf is its JSON ([`fount_store::UsageRecord::to_json`], keys in that order, no
//! spaces); an entry's subject digest is the RFC 6962 root of its records' leaves in
//! (created_at_ms, request_id) order. Records that arrive late for an hour already committed
//! get an entry of their own.

use std::collections::BTreeMap;

use fount_store::{UsageCommit, UsageRecord};
use serde_json::json;

use crate::error::Result;
use crate::log::Ledger;
use crate::merkle::{leaf_hash, Hash, MemoryTree};
use crate::statement::{hex, statement, FileDigest, USAGE_PREDICATE};

const HOUR_MS: i64 = 3_600_000;

/// A record's leaf: the exact bytes hashed.
pub fn usage_leaf(r: &UsageRecord) -> String {
    r.to_json().to_string()
}

/// The Merkle root of records, in the order given.
pub fn usage_root(records: &[UsageRecord]) -> Hash {
    let mut t = MemoryTree::new();
    for r in records {
        t.push(leaf_hash(usage_leaf(r).as_bytes()));
    }
    t.root(t.size())
}

/// The subject name of a tenant's hour.
pub fn usage_subject(tenant_id: &str, from_ms: i64) -> String {
    format!("usage/{tenant_id}/{from_ms}")
}

/// Commits every record that arrived before `before_ms` and is not yet committed: one entry per
/// tenant and hour, all in one append. Returns the entries written.
pub async fn commit_usage(ledger: &Ledger, before_ms: i64) -> Result<usize> {
    let mut a = ledger.begin().await?;
    let records = a.tx().uncommitted_usage(before_ms).await?;
    let mut groups: BTreeMap<(String, i64), Vec<UsageRecord>> = BTreeMap::new();
    for r in records {
        let hour = r.created_at_ms.div_euclid(HOUR_MS) * HOUR_MS;
        groups
            .entry((r.tenant_id.clone(), hour))
            .or_default()
            .push(r);
    }
    let mut written = 0;
    for ((tenant, from), mut recs) in groups {
        recs.sort_by(|x, y| {
            (x.created_at_ms, &x.request_id).cmp(&(y.created_at_ms, &y.request_id))
        });
        let root = hex(&usage_root(&recs));
        let sum = |f: fn(&UsageRecord) -> i64| recs.iter().map(f).sum::<i64>();
        let predicate = json!({
            "tenant_id": tenant,
            "from_ms": from,
            "to_ms": from + HOUR_MS,
            "records": recs.len(),
            "prompt_tokens": sum(|r| r.prompt_tokens),
            "completion_tokens": sum(|r| r.completion_tokens),
            "slot_ms": sum(|r| r.slot_ms),
            "cost_picodollars": sum(|r| r.cost_picodollars),
        });
        let subject = FileDigest {
            name: usage_subject(&tenant, from),
            sha256: root.clone(),
        };
        let body = serde_json::to_string(&statement(&[subject], USAGE_PREDICATE, predicate))?;
        let index = a.push(body, "usage")?;
        let commit = UsageCommit {
            tenant_id: tenant,
            from_ms: from,
            to_ms: from + HOUR_MS,
            records: recs.len() as i64,
            root,
            entry_index: index,
        };
        let ids: Vec<String> = recs.into_iter().map(|r| r.request_id).collect();
        a.tx().commit_usage(&commit, &ids).await?;
        written += 1;
    }
    if written > 0 {
        a.finish().await?;
    }
    Ok(written)
}

/// The start of the hour holding `ms`.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// One hour's length in milliseconds.
pub const HOUR: i64 = HOUR_MS;
