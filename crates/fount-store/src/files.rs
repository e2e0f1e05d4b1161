//! Files tenants upload: one record per file (its bytes live where the server keeps them),
//! private to its tenant, listed newest first with cursor pagination as OpenAI's Files API does.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::time::now_ms;

/// A stored file's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// `file-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The name it was uploaded with.
    pub filename: String,
    /// What it is for (`fine-tune`).
    pub purpose: String,
    /// Its size.
    pub bytes: i64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
    /// Unix milliseconds (the API shows seconds; milliseconds keep uploads in order).
    pub created_at_ms: i64,
}

/// A page of a tenant's files.
#[derive(Debug, Clone, Default)]
pub struct FilePage<'a> {
    /// Only files of this purpose.
    pub purpose: Option<&'a str>,
    /// Files after this one in list order.
    pub after: Option<&'a str>,
    /// At most this many.
    pub limit: i64,
    /// Oldest first instead of newest first.
    pub ascending: bool,
}

fn record(r: &AnyRow) -> Result<FileRecord> {
    Ok(FileRecord {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        filename: r.try_get("filename")?,
        purpose: r.try_get("purpose")?,
        bytes: r.try_get("bytes")?,
        sha256: r.try_get("sha256")?,
        created_at_ms: r.try_get("created_at_ms")?,
    })
}

const COLUMNS: &str = "id, tenant_id, filename, purpose, bytes, sha256, created_at_ms";

impl Store {
    /// Records a file whose bytes are stored; `id` is the caller's (`file-…`), since the bytes
    /// are written under it first.
    pub async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        if self.tenant(&f.tenant_id).await?.is_none() {
            return Err(Error::NotFound(format!("tenant {:?}", f.tenant_id)));
        }
        sqlx::query(&format!(
            "INSERT INTO files ({COLUMNS}, deleted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)"
        ))
        .bind(&f.id)
        .bind(&f.tenant_id)
        .bind(&f.filename)
        .bind(&f.purpose)
        .bind(f.bytes)
        .bind(&f.sha256)
        .bind(f.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tenant's file `id`, unless deleted (another tenant's is `None`, as a missing one).
    pub async fn file(&self, tenant_id: &str, id: &str) -> Result<Option<FileRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM files WHERE id = $1 AND tenant_id = $2 AND deleted_at IS NULL"
        ))
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    /// A page of the tenant's files, and whether more follow.
    pub async fn files(
        &self,
        tenant_id: &str,
        page: &FilePage<'_>,
    ) -> Result<(Vec<FileRecord>, bool)> {
        let (cmp, order) = if page.ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        // the cursor: the (created_at_ms, id) of the file named by `after`, in this tenant
        let cursor = match page.after {
            Some(after) => match self.file(tenant_id, after).await? {
                Some(f) => Some((f.created_at_ms, f.id)),
                None => return Err(Error::NotFound(format!("file {after:?}"))),
            },
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM files WHERE tenant_id = $1 AND deleted_at IS NULL \
               AND ($2 = '' OR purpose = $2) \
               AND ($3 = 0 OR (created_at_ms, id) {cmp} ($4, $5)) \
             ORDER BY created_at_ms {order}, id {order} LIMIT $6"
        ))
        .bind(tenant_id)
        .bind(page.purpose.unwrap_or(""))
        .bind(i64::from(cursor.is_some()))
        .bind(cursor.as_ref().map_or(0, |c| c.0))
        .bind(cursor.as_ref().map_or("", |c| c.1.as_str()))
        .bind(page.limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut files = rows.iter().map(record).collect::<Result<Vec<_>>>()?;
        let more = files.len() as i64 > page.limit;
        files.truncate(usize::try_from(page.limit).unwrap_or(0));
        Ok((files, more))
    }

    /// Marks the tenant's file deleted; returns whether it existed.
    pub async fn delete_file(&self, tenant_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE files SET deleted_at = $1 WHERE id = $2 AND tenant_id = $3 AND deleted_at IS NULL",
        )
        .bind(now_ms() / 1000)
        .bind(id)
        .bind(tenant_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
