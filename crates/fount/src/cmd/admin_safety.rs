//! `fount admin policy|suspend|resume|audit`: moderation policies, the operator's switches and
//! the audit trail, on the store `fount serve` reads (servers pick changes up within 200 ms).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_store::{day_start_ms, AuditRecord, Store, Subject, SuspendKind};
use serde_json::json;

use super::admin::{subject_id, Acts, QuotaSubject};

/// `fount admin policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Sets a tenant's or key's policy from a TOML file (checked first: the old policy stays in
    /// force if it is refused). A key's policy replaces its tenant's for that key.
    Set {
        #[command(flatten)]
        who: QuotaSubject,
        /// The policy (docs/safety.md).
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Prints a tenant's or key's policy.
    Show {
        #[command(flatten)]
        who: QuotaSubject,
    },
    /// Removes a tenant's or key's policy.
    Clear {
        #[command(flatten)]
        who: QuotaSubject,
    },
}

/// What to suspend or resume: exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Switch {
    /// A tenant, by name: every key of it.
    #[arg(long)]
    tenant: Option<String>,
    /// A key (`key_…` or its `fk-…` prefix).
    #[arg(long)]
    key: Option<String>,
    /// The base model, by its served name.
    #[arg(long)]
    model: Option<String>,
    /// An adapter, by its name (`{tenant id}/{name}` for a tenant's own).
    #[arg(long)]
    adapter: Option<String>,
}

/// `fount admin suspend …`
#[derive(Debug, Args)]
pub struct SuspendArgs {
    #[command(flatten)]
    what: Switch,
    /// Why (shown to the callers refused).
    #[arg(long, default_value = "no reason given")]
    reason: String,
}

/// `fount admin audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records as JSON lines, oldest first.
    Export {
        /// First UTC day (`YYYY-MM-DD`), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Last UTC day, inclusive.
        #[arg(long)]
        to: Option<String>,
        /// Only this tenant's (by name).
        #[arg(long)]
        tenant: Option<String>,
    },
}

async fn switch(store: &Store, s: &Switch) -> Result<(SuspendKind, String)> {
    Ok(match (&s.tenant, &s.key, &s.model, &s.adapter) {
        (Some(t), ..) => (
            SuspendKind::Tenant,
            super::admin::tenant_id(store, t).await?,
        ),
        (_, Some(k), ..) => {
            let who = QuotaSubject::key(k);
            (SuspendKind::Key, subject_id(store, &who).await?.1)
        }
        (_, _, Some(m), _) => (SuspendKind::Model, m.clone()),
        (_, _, _, Some(a)) => (SuspendKind::Adapter, a.clone()),
        _ => bail!("--tenant, --key, --model or --adapter is needed"),
    })
}

/// An operator's act, as an audit record.
fn operator_record(action: &str, kind: SuspendKind, name: &str, content: &str) -> AuditRecord {
    AuditRecord {
        id: format!("aud-{:032x}", rand::random::<u128>()),
        created_at_ms: fount_store::now_ms(),
        tenant_id: (kind == SuspendKind::Tenant).then(|| name.to_string()),
        key_id: (kind == SuspendKind::Key).then(|| name.to_string()),
        request_id: Some(format!("{}/{name}", kind.name())),
        stage: "operator".into(),
        action: action.into(),
        categories: "[]".into(),
        rules: "[]".into(),
        policy: "operator".into(),
        content_sha256: fount_safety::content_hash(content),
        content: Some(content.to_string()),
    }
}

/// The store's subject of a tenant's or key's id, and its name (`t:…`, `k:…`).
fn subject(is_tenant: bool, id: &str) -> (Subject<'_>, String) {
    match is_tenant {
        true => (Subject::Tenant(id), format!("t:{id}")),
        false => (Subject::Key(id), format!("k:{id}")),
    }
}

/// `fount admin policy …`
pub(super) async fn policy(store: &Store, command: PolicyCommand, acts: &Acts) -> Result<()> {
    match command {
        PolicyCommand::Set { who, file } => {
            let text = fs_err::read_to_string(&file).context("--file")?;
            fount_safety::Policy::parse(&text)
                .with_context(|| format!("{}: the policy was not changed", file.display()))?;
            let (is_tenant, id) = subject_id(store, &who).await?;
            let (s, name) = subject(is_tenant, &id);
            store.set_policy(s, &text).await?;
            acts.log("policy.set", (name.clone(), json!({ "policy": text })))
                .await?;
            println!("{name}\tpolicy set");
        }
        PolicyCommand::Show { who } => {
            let (is_tenant, id) = subject_id(store, &who).await?;
            let (_, name) = subject(is_tenant, &id);
            match store
                .policies()
                .await?
                .into_iter()
                .find(|(s, _)| *s == name)
            {
                Some((_, text)) => print!("{text}"),
                None => bail!("{name} has no policy"),
            }
        }
        PolicyCommand::Clear { who } => {
            let (is_tenant, id) = subject_id(store, &who).await?;
            let (s, name) = subject(is_tenant, &id);
            if !store.clear_policy(s).await? {
                bail!("{name} has no policy");
            }
            acts.log("policy.clear", (name.clone(), json!({}))).await?;
            println!("{name}\tpolicy cleared");
        }
    }
    Ok(())
}

/// `fount admin suspend …`
pub(super) async fn suspend(store: &Store, a: SuspendArgs, acts: &Acts) -> Result<()> {
    let (kind, name) = switch(store, &a.what).await?;
    if !store.suspend(kind, &name, &a.reason).await? {
        bail!("{} {name:?} is already suspended", kind.name());
    }
    store
        .record_audit(&[operator_record("suspend", kind, &name, &a.reason)])
        .await?;
    acts.log(
        "suspend",
        (
            format!("{}/{name}", kind.name()),
            json!({ "reason": a.reason }),
        ),
    )
    .await?;
    println!("{}\t{name}\tsuspended", kind.name());
    Ok(())
}

/// `fount admin resume …`
pub(super) async fn resume(store: &Store, what: Switch, acts: &Acts) -> Result<()> {
    let (kind, name) = switch(store, &what).await?;
    if !store.resume(kind, &name).await? {
        bail!("{} {name:?} is not suspended", kind.name());
    }
    store
        .record_audit(&[operator_record("resume", kind, &name, "")])
        .await?;
    acts.log("resume", (format!("{}/{name}", kind.name()), json!({})))
        .await?;
    println!("{}\t{name}\tresumed", kind.name());
    Ok(())
}

/// `fount admin audit export`
pub async fn audit(store: &Store, command: AuditCommand) -> Result<()> {
    let AuditCommand::Export { from, to, tenant } = command;
    let from_ms = from.as_deref().map(day_start_ms).transpose()?.unwrap_or(0);
    let to_ms = match to.as_deref() {
        Some(d) => day_start_ms(d)? + 86_400_000,
        None => i64::MAX,
    };
    let id = match tenant {
        Some(t) => Some(super::admin::tenant_id(store, &t).await?),
        None => None,
    };
    for r in store.audit(from_ms, to_ms, id.as_deref()).await? {
        let list = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
        println!(
            "{}",
            json!({
                "id": r.id, "created_at_ms": r.created_at_ms, "tenant_id": r.tenant_id,
                "key_id": r.key_id, "request_id": r.request_id, "stage": r.stage,
                "action": r.action, "categories": list(&r.categories), "rules": list(&r.rules),
                "policy": r.policy, "content_sha256": r.content_sha256, "content": r.content,
            })
        );
    }
    Ok(())
}
