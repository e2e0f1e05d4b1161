//! The ledger's rows. `fount-ledger` gives them meaning (RFC 6962 hashing, signed checkpoints);
//! here they are only stored, read and appended under one lock.
//!
//! An append is one transaction whose first statement writes the head row, so appenders in
//! different processes take turns (SQLite's writer lock, PostgreSQL's row lock) and the entries,
//! the hashes and the checkpoint signed over them commit together or not at all.

use sqlx::{Any, AnyPool, Row, Transaction};

use crate::error::{Error, Result};
use crate::safety::{audit_record, AuditRecord, AUDIT_COLUMNS};
use crate::store::Store;
use crate::time::now_ms;
use crate::usage::{placeholders, usage_row, UsageRecord, USAGE_COLUMNS};

/// A node of the tree: the hash of leaves `index * 2^level .. (index + 1) * 2^level`.
pub type NodeId = (u8, u64);

/// One entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Its index in the log.
    pub index: u64,
    /// The exact bytes that were hashed (an in-toto Statement, JSON).
    pub body: String,
    /// What it records (`dataset`, `training`, `deployment`, …).
    pub kind: String,
    /// Unix milliseconds it was appended.
    pub created_at_ms: i64,
}

/// A tenant's usage records of one hour, committed to the log in one entry (records that arrive
/// late for an hour already committed get an entry of their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCommit {
    /// The tenant.
    pub tenant_id: String,
    /// The hour's start, Unix milliseconds (inclusive).
    pub from_ms: i64,
    /// The hour's end, Unix milliseconds (exclusive).
    pub to_ms: i64,
    /// How many records the root covers.
    pub records: i64,
    /// The Merkle root of the records, hex.
    pub root: String,
    /// The entry that holds it.
    pub entry_index: u64,
}

/// An append in progress: the head is locked until [`LedgerTx::commit`] (or drop, which rolls
/// back).
#[derive(Debug)]
pub struct LedgerTx {
    tx: Transaction<'static, Any>,
    size: u64,
}

fn u64_of(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Invalid(format!("negative {what} in the ledger: {v}")))
}

fn i64_of(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("ledger index {v} is out of range")))
}

/// Rows per INSERT: well under SQLite's 32,766 bound variables.
const CHUNK: usize = 1000;

async fn read_hashes<'e, E>(ex: E, nodes: &[NodeId]) -> Result<Vec<Option<String>>>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    // one lookup of the primary key by row value, on both databases
    let sql = format!(
        "SELECT level, idx, hash FROM ledger_hashes WHERE (level, idx) IN (VALUES {})",
        placeholders(nodes.len(), 2)
    );
    let mut q = sqlx::query(&sql);
    for &(level, idx) in nodes {
        q = q.bind(i32::from(level)).bind(i64_of(idx)?);
    }
    let rows = q.fetch_all(ex).await?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        let level: i32 = r.try_get("level")?;
        let idx: i64 = r.try_get("idx")?;
        found.insert((level, idx), r.try_get::<String, _>("hash")?);
    }
    nodes
        .iter()
        .map(|&(l, i)| Ok(found.remove(&(i32::from(l), i64_of(i)?))))
        .collect()
}

impl LedgerTx {
    /// The tree size when the lock was taken.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Stored hashes (hex) of `nodes`, `None` where absent.
    pub async fn hashes(&mut self, nodes: &[NodeId]) -> Result<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(nodes.len());
        for chunk in nodes.chunks(400) {
            out.extend(read_hashes(&mut *self.tx, chunk).await?);
        }
        Ok(out)
    }

    /// Appends entries `size..size + entries.len()` with the hashes they complete and the
    /// checkpoint signed over the new size, and moves the head.
    pub async fn append(
        &mut self,
        entries: &[(&str, &str)],
        hashes: &[(NodeId, String)],
        checkpoint: &str,
    ) -> Result<u64> {
        let now = now_ms();
        let start = self.size;
        for (c, chunk) in entries.chunks(CHUNK).enumerate() {
            let sql = format!(
                "INSERT INTO ledger_entries (idx, body, kind, created_at_ms) VALUES {}",
                placeholders(chunk.len(), 4)
            );
            let base = start + (c * CHUNK) as u64;
            let mut q = sqlx::query(&sql);
            for (i, (body, kind)) in chunk.iter().enumerate() {
                q = q
                    .bind(i64_of(base + i as u64)?)
                    .bind(*body)
                    .bind(*kind)
                    .bind(now);
            }
            q.execute(&mut *self.tx).await?;
        }
        for chunk in hashes.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO ledger_hashes (level, idx, hash) VALUES {}",
                placeholders(chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for ((level, idx), hash) in chunk {
                q = q
                    .bind(i32::from(*level))
                    .bind(i64_of(*idx)?)
                    .bind(hash.as_str());
            }
            q.execute(&mut *self.tx).await?;
        }
        let size = start + entries.len() as u64;
        sqlx::query(
            "INSERT INTO ledger_checkpoints (size, note, created_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(i64_of(size)?)
        .bind(checkpoint)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("UPDATE ledger_head SET size = $1 WHERE id = 1")
            .bind(i64_of(size)?)
            .execute(&mut *self.tx)
            .await?;
        self.size = size;
        Ok(size)
    }

    /// Usage records not yet committed to the log that arrived before `before_ms`, in
    /// (tenant, created_at_ms, request_id) order.
    pub async fn uncommitted_usage(&mut self, before_ms: i64) -> Result<Vec<UsageRecord>> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records \
             WHERE ledger_entry IS NULL AND created_at_ms < $1 \
             ORDER BY tenant_id, created_at_ms, request_id"
        );
        let rows = sqlx::query(&sql)
            .bind(before_ms)
            .fetch_all(&mut *self.tx)
            .await?;
        rows.iter().map(usage_row).collect()
    }

    /// Records that `request_ids` (of `commit.tenant_id`) are committed in entry
    /// `commit.entry_index`, appended in this same transaction.
    pub async fn commit_usage(
        &mut self,
        commit: &UsageCommit,
        request_ids: &[String],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger_usage_commits \
             (entry_idx, tenant_id, from_ms, to_ms, records, root) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(i64_of(commit.entry_index)?)
        .bind(&commit.tenant_id)
        .bind(commit.from_ms)
        .bind(commit.to_ms)
        .bind(commit.records)
        .bind(&commit.root)
        .execute(&mut *self.tx)
        .await?;
        for chunk in request_ids.chunks(500) {
            let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
            let sql = format!(
                "UPDATE usage_records SET ledger_entry = $1 \
                 WHERE ledger_entry IS NULL AND tenant_id = $2 AND request_id IN ({})",
                list.join(", ")
            );
            let mut q = sqlx::query(&sql)
                .bind(i64_of(commit.entry_index)?)
                .bind(&commit.tenant_id);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    /// Audit records created before `before_ms` that no entry commits yet, in
    /// (created_at_ms, id) order.
    pub async fn uncommitted_audit(&mut self, before_ms: i64) -> Result<Vec<AuditRecord>> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_records \
             WHERE ledger_entry IS NULL AND created_at_ms < $1 ORDER BY created_at_ms, id"
        );
        let rows = sqlx::query(&sql)
            .bind(before_ms)
            .fetch_all(&mut *self.tx)
            .await?;
        rows.iter().map(audit_record).collect()
    }

    /// Records that audit records `ids` are committed in entry `entry_index`, appended in this
    /// same transaction.
    pub async fn commit_audit(&mut self, entry_index: u64, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(500) {
            let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "UPDATE audit_records SET ledger_entry = $1 \
                 WHERE ledger_entry IS NULL AND id IN ({})",
                list.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(i64_of(entry_index)?);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    /// Makes the append durable and releases the lock.
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

fn entry(r: &sqlx::any::AnyRow) -> Result<LedgerEntry> {
    Ok(LedgerEntry {
        index: u64_of(r.try_get("idx")?, "index")?,
        body: r.try_get("body")?,
        kind: r.try_get("kind")?,
        created_at_ms: r.try_get("created_at_ms")?,
    })
}

fn usage_commit(r: &sqlx::any::AnyRow) -> Result<UsageCommit> {
    Ok(UsageCommit {
        tenant_id: r.try_get("tenant_id")?,
        from_ms: r.try_get("from_ms")?,
        to_ms: r.try_get("to_ms")?,
        records: r.try_get("records")?,
        root: r.try_get("root")?,
        entry_index: u64_of(r.try_get("entry_idx")?, "index")?,
    })
}

impl Store {
    fn ledger_pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Locks the ledger's head for an append.
    pub async fn ledger_begin(&self) -> Result<LedgerTx> {
        let mut tx = self.ledger_pool().begin().await?;
        // the first statement writes: a transaction that read first could not be upgraded to
        // SQLite's writer lock without failing at once when another holds it
        sqlx::query("UPDATE ledger_head SET size = size WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let size: i64 = sqlx::query("SELECT size FROM ledger_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get("size")?;
        Ok(LedgerTx {
            tx,
            size: u64_of(size, "size")?,
        })
    }

    /// The number of entries.
    pub async fn ledger_size(&self) -> Result<u64> {
        let size: i64 = sqlx::query("SELECT size FROM ledger_head WHERE id = 1")
            .fetch_one(self.ledger_pool())
            .await?
            .try_get("size")?;
        u64_of(size, "size")
    }

    /// Stored hashes (hex) of `nodes`, `None` where absent.
    pub async fn ledger_hashes(&self, nodes: &[NodeId]) -> Result<Vec<Option<String>>> {
        let mut out = Vec::with_capacity(nodes.len());
        for chunk in nodes.chunks(400) {
            out.extend(read_hashes(self.ledger_pool(), chunk).await?);
        }
        Ok(out)
    }

    /// The stored hashes of level `level`, indices `start..start + count`, in order; stops at
    /// the first one missing.
    pub async fn ledger_hash_run(&self, level: u8, start: u64, count: u64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT idx, hash FROM ledger_hashes WHERE level = $1 AND idx >= $2 AND idx < $3 \
             ORDER BY idx",
        )
        .bind(i32::from(level))
        .bind(i64_of(start)?)
        .bind(i64_of(start.saturating_add(count))?)
        .fetch_all(self.ledger_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            if r.try_get::<i64, _>("idx")? != i64_of(start + i as u64)? {
                break;
            }
            out.push(r.try_get("hash")?);
        }
        Ok(out)
    }

    /// Entries `start..start + count` (fewer where the log is shorter), in order.
    pub async fn ledger_entries(&self, start: u64, count: u64) -> Result<Vec<LedgerEntry>> {
        let rows = sqlx::query(
            "SELECT idx, body, kind, created_at_ms FROM ledger_entries \
             WHERE idx >= $1 AND idx < $2 ORDER BY idx",
        )
        .bind(i64_of(start)?)
        .bind(i64_of(start.saturating_add(count))?)
        .fetch_all(self.ledger_pool())
        .await?;
        rows.iter().map(entry).collect()
    }

    /// The checkpoint signed at `size`, or the latest one when `size` is `None`.
    pub async fn ledger_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, String)>> {
        let q = match size {
            Some(s) => sqlx::query("SELECT size, note FROM ledger_checkpoints WHERE size = $1")
                .bind(i64_of(s)?),
            None => {
                sqlx::query("SELECT size, note FROM ledger_checkpoints ORDER BY size DESC LIMIT 1")
            }
        };
        let Some(r) = q.fetch_optional(self.ledger_pool()).await? else {
            return Ok(None);
        };
        Ok(Some((
            u64_of(r.try_get("size")?, "size")?,
            r.try_get("note")?,
        )))
    }

    /// Every checkpoint ever signed, smallest first.
    pub async fn ledger_checkpoints(&self) -> Result<Vec<(u64, String)>> {
        let rows = sqlx::query("SELECT size, note FROM ledger_checkpoints ORDER BY size")
            .fetch_all(self.ledger_pool())
            .await?;
        rows.iter()
            .map(|r| Ok((u64_of(r.try_get("size")?, "size")?, r.try_get("note")?)))
            .collect()
    }

    /// Replaces the checkpoint at `size` with the same checkpoint carrying more signatures
    /// (witnesses' cosignatures).
    pub async fn ledger_cosigned(&self, size: u64, note: &str) -> Result<()> {
        sqlx::query("UPDATE ledger_checkpoints SET note = $1 WHERE size = $2")
            .bind(note)
            .bind(i64_of(size)?)
            .execute(self.ledger_pool())
            .await?;
        Ok(())
    }

    /// Usage commitments overlapping `[from_ms, to_ms)`, oldest first; one tenant's, or every
    /// tenant's when `tenant_id` is `None`.
    pub async fn ledger_usage_commits(
        &self,
        tenant_id: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageCommit>> {
        let rows = sqlx::query(
            "SELECT tenant_id, from_ms, to_ms, records, root, entry_idx FROM ledger_usage_commits \
             WHERE ($1 = '' OR tenant_id = $1) AND to_ms > $2 AND from_ms < $3 \
             ORDER BY entry_idx",
        )
        .bind(tenant_id.unwrap_or(""))
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(self.ledger_pool())
        .await?;
        rows.iter().map(usage_commit).collect()
    }

    /// The audit records committed in entry `entry_index`, in the order they were hashed.
    pub async fn audit_of_entry(&self, entry_index: u64) -> Result<Vec<AuditRecord>> {
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_records WHERE ledger_entry = $1 \
             ORDER BY created_at_ms, id"
        );
        let rows = sqlx::query(&sql)
            .bind(i64_of(entry_index)?)
            .fetch_all(self.ledger_pool())
            .await?;
        rows.iter().map(audit_record).collect()
    }

    /// The indices of the log's entries of `kind`, in order.
    pub async fn ledger_entries_of_kind(&self, kind: &str) -> Result<Vec<u64>> {
        let rows = sqlx::query("SELECT idx FROM ledger_entries WHERE kind = $1 ORDER BY idx")
            .bind(kind)
            .fetch_all(self.ledger_pool())
            .await?;
        rows.iter()
            .map(|r| u64_of(r.try_get("idx")?, "index"))
            .collect()
    }

    /// The usage records committed in entry `entry_index`, in the order they were hashed.
    pub async fn usage_of_commit(&self, entry_index: u64) -> Result<Vec<UsageRecord>> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records WHERE ledger_entry = $1 \
             ORDER BY created_at_ms, request_id"
        );
        let rows = sqlx::query(&sql)
            .bind(i64_of(entry_index)?)
            .fetch_all(self.ledger_pool())
            .await?;
        rows.iter().map(usage_row).collect()
    }
}
