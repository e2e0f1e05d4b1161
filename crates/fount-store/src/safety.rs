//! Safety state: moderation policies per tenant and per key (TOML text that `fount-safety`
//! reads), suspensions an operator throws, a version every change bumps (servers poll it and
//! reload), and the audit records of every decision.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::error::{Error, Result};
use crate::store::{Store, Subject};
use crate::time::now_ms;

/// What can be suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SuspendKind {
    /// A tenant, by id: every key of it.
    Tenant,
    /// A key, by id.
    Key,
    /// The base model, by its served name.
    Model,
    /// An adapter, by its name.
    Adapter,
}

impl SuspendKind {
    /// The kind's name in the store and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SuspendKind::Tenant => "tenant",
            SuspendKind::Key => "key",
            SuspendKind::Model => "model",
            SuspendKind::Adapter => "adapter",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<SuspendKind> {
        [
            SuspendKind::Tenant,
            SuspendKind::Key,
            SuspendKind::Model,
            SuspendKind::Adapter,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// A suspension in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    /// What kind of thing.
    pub kind: SuspendKind,
    /// Which (an id or a name).
    pub name: String,
    /// Why, as the operator said.
    pub reason: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
}

/// One decision, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// `aud-…`.
    pub id: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// The tenant it concerns (none: the operator's own, or no tenancy).
    pub tenant_id: Option<String>,
    /// The key used.
    pub key_id: Option<String>,
    /// The request (`chatcmpl-…`, `modr-…`).
    pub request_id: Option<String>,
    /// `input`, `output`, `moderation` or `operator`.
    pub stage: String,
    /// `allow`, `log`, `block`, `redact`, `suspend`, `resume` or `policy`.
    pub action: String,
    /// The categories, as a JSON array.
    pub categories: String,
    /// The rules or guard verdicts, as a JSON array.
    pub rules: String,
    /// The policy that decided (`t:{id}`, `k:{id}`, or the operator's rules: `operator`).
    pub policy: String,
    /// SHA-256 of the content, hex.
    pub content_sha256: String,
    /// The content, where the policy keeps it.
    pub content: Option<String>,
}

impl AuditRecord {
    /// The record as JSON, keys in this order (its ledger leaf is exactly these bytes).
    pub fn to_json(&self) -> serde_json::Value {
        let list = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
        serde_json::json!({
            "id": self.id, "created_at_ms": self.created_at_ms, "tenant_id": self.tenant_id,
            "key_id": self.key_id, "request_id": self.request_id, "stage": self.stage,
            "action": self.action, "categories": list(&self.categories),
            "rules": list(&self.rules), "policy": self.policy,
            "content_sha256": self.content_sha256, "content": self.content,
        })
    }
}

pub(crate) fn subject_key(s: Subject<'_>) -> String {
    match s {
        Subject::Tenant(id) => format!("t:{id}"),
        Subject::Key(id) => format!("k:{id}"),
    }
}

pub(crate) fn audit_record(r: &AnyRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.try_get("id")?,
        created_at_ms: r.try_get("created_at_ms")?,
        tenant_id: r.try_get("tenant_id")?,
        key_id: r.try_get("key_id")?,
        request_id: r.try_get("request_id")?,
        stage: r.try_get("stage")?,
        action: r.try_get("action")?,
        categories: r.try_get("categories")?,
        rules: r.try_get("rules")?,
        policy: r.try_get("policy")?,
        content_sha256: r.try_get("content_sha256")?,
        content: r.try_get("content")?,
    })
}

pub(crate) const AUDIT_COLUMNS: &str =
    "id, created_at_ms, tenant_id, key_id, request_id, stage, action, \
                             categories, rules, policy, content_sha256, content";

impl Store {
    async fn bump_safety(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
        sqlx::query("UPDATE safety_version SET version = version + 1 WHERE id = 1")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The version of policies and suspensions: it changes whenever either does.
    pub async fn safety_version(&self) -> Result<i64> {
        let row = sqlx::query("SELECT version FROM safety_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("version")?)
    }

    /// Sets the policy of a tenant or key (TOML, checked by the caller), replacing any.
    pub async fn set_policy(&self, who: Subject<'_>, policy: &str) -> Result<()> {
        let exists = match who {
            Subject::Tenant(id) => self.tenant(id).await?.is_some(),
            Subject::Key(id) => self.keys(None).await?.iter().any(|k| k.id == id),
        };
        if !exists {
            return Err(Error::NotFound(subject_key(who)));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM safety_policies WHERE subject = $1")
            .bind(subject_key(who))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO safety_policies (subject, policy, updated_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(subject_key(who))
        .bind(policy)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        self.bump_safety(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes the policy of a tenant or key; returns whether there was one.
    pub async fn clear_policy(&self, who: Subject<'_>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM safety_policies WHERE subject = $1")
            .bind(subject_key(who))
            .execute(&mut *tx)
            .await?;
        self.bump_safety(&mut tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every policy: `(subject, TOML)`, the subject `t:{tenant id}` or `k:{key id}`.
    pub async fn policies(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT subject, policy FROM safety_policies ORDER BY subject")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("subject")?, r.try_get("policy")?)))
            .collect()
    }

    /// Suspends `name` of `kind`; returns false if it already was.
    pub async fn suspend(&self, kind: SuspendKind, name: &str, reason: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let existing = sqlx::query("SELECT name FROM suspensions WHERE kind = $1 AND name = $2")
            .bind(kind.name())
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if existing.is_some() {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO suspensions (kind, name, reason, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(kind.name())
        .bind(name)
        .bind(reason)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        self.bump_safety(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Lifts a suspension; returns whether there was one.
    pub async fn resume(&self, kind: SuspendKind, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM suspensions WHERE kind = $1 AND name = $2")
            .bind(kind.name())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        self.bump_safety(&mut tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every suspension in force.
    pub async fn suspensions(&self) -> Result<Vec<Suspension>> {
        let rows = sqlx::query(
            "SELECT kind, name, reason, created_at_ms FROM suspensions ORDER BY kind, name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(Suspension {
                    kind: SuspendKind::parse(&kind)
                        .ok_or_else(|| Error::Invalid(format!("suspension kind {kind:?}")))?,
                    name: r.try_get("name")?,
                    reason: r.try_get("reason")?,
                    created_at_ms: r.try_get("created_at_ms")?,
                })
            })
            .collect()
    }

    /// Writes audit records in one transaction.
    pub async fn record_audit(&self, records: &[AuditRecord]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for a in records {
            sqlx::query(&format!(
                "INSERT INTO audit_records ({AUDIT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ))
            .bind(&a.id)
            .bind(a.created_at_ms)
            .bind(a.tenant_id.as_deref())
            .bind(a.key_id.as_deref())
            .bind(a.request_id.as_deref())
            .bind(&a.stage)
            .bind(&a.action)
            .bind(&a.categories)
            .bind(&a.rules)
            .bind(&a.policy)
            .bind(&a.content_sha256)
            .bind(a.content.as_deref())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Audit records from `from_ms` (inclusive) to `to_ms` (exclusive), of one tenant or all,
    /// in time order.
    pub async fn audit(
        &self,
        from_ms: i64,
        to_ms: i64,
        tenant_id: Option<&str>,
    ) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_records \
             WHERE created_at_ms >= $1 AND created_at_ms < $2 AND ($3 = '' OR tenant_id = $3) \
             ORDER BY created_at_ms, id"
        ))
        .bind(from_ms)
        .bind(to_ms)
        .bind(tenant_id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_record).collect()
    }
}
