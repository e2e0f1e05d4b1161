//! Safety and control on the server: moderation policies on what goes in and comes out, the
//! operator's switches, and an audit record of every decision.
//!
//! - here: [`Safety`], the operator's rules and a snapshot of the store's policies and
//!   suspensions, reloaded whenever the store's safety version moves (polled every
//!   [`POLL`]; an admin route reloads at once), and the audit writer;
//! - `check.rs`: a request's input against its policy (before admission), a guard model asked
//!   through the engine, and the output filter each answer runs through;
//! - `routes.rs`: `POST /v1/moderations` and the admin routes for policies and suspensions.
//!
//! A suspension takes effect for new requests at once and for running ones at the next event of
//! their stream: every stream watches [`Safety::subscribe`] and ends with a `suspended` error.

pub mod check;
pub mod routes;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use fount_safety::rules::{RuleFile, DEFAULT_RULES};
use fount_safety::{Hit, Policy, Rules};
use fount_store::{AuditRecord, Store, SuspendKind};
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::tenancy::Caller;

/// How often the store's safety version is read.
pub const POLL: Duration = Duration::from_millis(200);

/// Policies and suspensions as last read from the store.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The store's safety version they were read at.
    pub version: i64,
    /// By subject: `t:{tenant id}`, `k:{key id}`.
    pub policies: HashMap<String, Arc<Policy>>,
    /// Suspended things and why.
    pub suspended: HashMap<(SuspendKind, String), String>,
}

/// The server's safety state.
#[derive(Debug)]
pub struct Safety {
    operator: RwLock<Arc<Rules>>,
    snapshot: RwLock<Arc<Snapshot>>,
    changed: watch::Sender<i64>,
    store: OnceLock<Store>,
    audit: OnceLock<mpsc::UnboundedSender<AuditRecord>>,
}

impl Default for Safety {
    fn default() -> Self {
        Safety::new()
    }
}

impl Safety {
    /// Safety with fount's default rules and no store (no policies, no suspensions).
    pub fn new() -> Safety {
        let rules = RuleFile::parse(DEFAULT_RULES)
            .and_then(|f| Rules::compile(&f.rules))
            .unwrap_or_default();
        Safety {
            operator: RwLock::new(Arc::new(rules)),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            changed: watch::channel(0).0,
            store: OnceLock::new(),
            audit: OnceLock::new(),
        }
    }

    /// Replaces the operator's rules (`fount serve --safety-rules`).
    pub fn set_rules(&self, rules: Rules) {
        if let Ok(mut r) = self.operator.write() {
            *r = Arc::new(rules);
        }
    }

    /// The operator's rules.
    pub fn rules(&self) -> Arc<Rules> {
        self.operator.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Reads policies and suspensions from `store` now and whenever its safety version moves,
    /// and writes audit records to it (tasks on the current runtime; once).
    pub async fn start(self: &Arc<Self>, store: Store) -> Result<(), fount_store::Error> {
        if self.store.set(store.clone()).is_err() {
            return Ok(());
        }
        self.reload().await?;
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let Some(s) = me.upgrade() else { return };
                let current = s.snapshot().version;
                let Some(store) = s.store.get() else { return };
                match store.safety_version().await {
                    Ok(v) if v != current => {
                        if let Err(e) = s.reload().await {
                            tracing::error!(error = %e, "reloading safety policies");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "reading the safety version"),
                }
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<AuditRecord>();
        let _ = self.audit.set(tx);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                }
                // a decision's record is never dropped: retry until the database takes it
                let mut wait = Duration::from_millis(50);
                while let Err(e) = store.record_audit(&batch).await {
                    tracing::error!(error = %e, records = batch.len(), "writing audit records; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                batch.clear();
            }
        });
        Ok(())
    }

    /// Reads policies and suspensions from the store and tells every running stream.
    pub async fn reload(&self) -> Result<(), fount_store::Error> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let version = store.safety_version().await?;
        let mut policies = HashMap::new();
        for (subject, text) in store.policies().await? {
            match Policy::parse(&text) {
                Ok(p) => {
                    policies.insert(subject, Arc::new(p));
                }
                // stored policies were checked when set; one that no longer reads is logged
                Err(e) => tracing::error!(%subject, error = %e, "a stored policy does not read"),
            }
        }
        let suspended = store
            .suspensions()
            .await?
            .into_iter()
            .map(|s| ((s.kind, s.name), s.reason))
            .collect();
        if let Ok(mut snap) = self.snapshot.write() {
            *snap = Arc::new(Snapshot {
                version,
                policies,
                suspended,
            });
        }
        self.changed.send_replace(version);
        Ok(())
    }

    /// The store, when policies are kept.
    pub fn store(&self) -> Option<&Store> {
        self.store.get()
    }

    /// Policies and suspensions now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Told of every reload.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.changed.subscribe()
    }

    /// The policy a caller is held to: its key's, else its tenant's, with the subject it is
    /// stored under.
    pub fn policy(&self, caller: &Caller) -> Option<(String, Arc<Policy>)> {
        let snap = self.snapshot();
        [
            format!("k:{}", caller.key.id),
            format!("t:{}", caller.tenant.id),
        ]
        .into_iter()
        .find_map(|s| snap.policies.get(&s).map(|p| (s, p.clone())))
    }

    /// Why a request of `caller` to `model` (the base model's name) or `adapter` (the engine's
    /// name of an adapter) may not run, if something it uses is suspended.
    pub fn suspension(
        &self,
        caller: Option<&Caller>,
        model: &str,
        adapter: Option<&str>,
    ) -> Option<ApiError> {
        let snap = self.snapshot();
        if snap.suspended.is_empty() {
            return None;
        }
        let mut checks: Vec<(SuspendKind, &str, String)> = Vec::new();
        if let Some(c) = caller {
            checks.push((
                SuspendKind::Tenant,
                &c.tenant.id,
                format!("tenant {:?}", c.tenant.name),
            ));
            checks.push((
                SuspendKind::Key,
                &c.key.id,
                format!("API key {}", c.key.prefix),
            ));
        }
        match adapter {
            // a tenant's private adapter by its engine name, `{tenant id}/{name}`
            Some(a) => checks.push((SuspendKind::Adapter, a, format!("adapter {a:?}"))),
            None => checks.push((SuspendKind::Model, model, format!("model {model:?}"))),
        }
        checks.into_iter().find_map(|(kind, name, what)| {
            snap.suspended.get(&(kind, name.to_string())).map(|reason| {
                ApiError::Suspended(format!("the {what} is suspended by the operator: {reason}"))
            })
        })
    }

    /// The operator's hits and the policy's own in `text`.
    pub fn scan(&self, policy: Option<&Policy>, text: &str, pii: bool) -> Vec<Hit> {
        let mut hits = Vec::new();
        self.rules().scan(text, pii, &mut hits);
        if let Some(p) = policy {
            p.rules.scan(text, false, &mut hits);
        }
        hits
    }

    /// Keeps an audit record (written in the background; logged only without a store).
    pub fn record(&self, record: AuditRecord) {
        tracing::info!(
            stage = %record.stage,
            action = %record.action,
            categories = %record.categories,
            tenant = ?record.tenant_id,
            "safety decision"
        );
        if let Some(tx) = self.audit.get() {
            let _ = tx.send(record);
        }
    }
}
