//! `fount admin`: tenants, keys, quotas and usage, on the data directory or database that
//! `fount serve` uses.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_ledger::statement;
use fount_store::{day_start_ms, Price, Quota, Scope, Store, Subject, UsageRecord};
use serde_json::json;

/// Where the store is.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Data directory (holds `fount.db` when no database URL is given).
    #[arg(
        long,
        env = "FOUNT_DATA_DIR",
        default_value = "fount-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (`postgres://user@host/db`) instead of the SQLite file.
    #[arg(long, env = "FOUNT_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
}

/// `fount admin` subcommands.
#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// What to administer.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Quotas.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Prices per model.
    #[command(subcommand)]
    Price(PriceCommand),
    /// Usage records.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// Moderation policies of tenants and keys.
    #[command(subcommand)]
    Policy(super::admin_safety::PolicyCommand),
    /// Suspends a tenant, key, model or adapter on every server sharing the store.
    Suspend(super::admin_safety::SuspendArgs),
    /// Lifts a suspension.
    Resume(super::admin_safety::Switch),
    /// The audit trail of moderation decisions and operator acts.
    #[command(subcommand)]
    Audit(super::admin_safety::AuditCommand),
    /// The `fount serve` replicas on this store (PostgreSQL): where each listens, its last
    /// heartbeat, the requests it has open.
    Replicas,
}

/// Whose quota: a tenant's or one key's.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct QuotaSubject {
    /// The tenant's name.
    #[arg(long)]
    tenant: Option<String>,
    /// A key (`key_…` or its `fk-…` prefix); its quota applies on top of its tenant's.
    #[arg(long)]
    key: Option<String>,
}

impl QuotaSubject {
    /// A key, by id or prefix.
    pub fn key(key: &str) -> QuotaSubject {
        QuotaSubject {
            tenant: None,
            key: Some(key.to_string()),
        }
    }
}

/// `fount admin price …`
#[derive(Debug, Subcommand)]
pub enum PriceCommand {
    /// Sets a model's (or adapter's) prices, in dollars per million tokens; a price not given
    /// keeps its value (0 for a model without prices).
    Set {
        /// The model or adapter name clients pass (an adapter without a price costs what its
        /// base model does).
        #[arg(long)]
        model: String,
        /// Per million prompt tokens, e.g. `0.15`.
        #[arg(long)]
        input: Option<String>,
        /// Per million prompt tokens served from the prefix cache (default: as `--input`).
        #[arg(long)]
        cached_input: Option<String>,
        /// Per million generated tokens.
        #[arg(long)]
        output: Option<String>,
        /// Per million trained tokens of a fine-tuning job on this base model (the training
        /// file's tokens times the epochs, as OpenAI bills them).
        #[arg(long)]
        training: Option<String>,
    },
    /// Lists prices.
    List,
}

/// `fount admin tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Creates a tenant.
    Create {
        /// A unique name.
        name: String,
    },
    /// Lists tenants.
    List,
}

/// `fount admin key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Creates a key and prints it once.
    Create {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// A label for the key.
        #[arg(long, default_value = "default")]
        name: String,
        /// Scopes, comma-separated: inference, admin, files, fine_tuning.
        #[arg(long, default_value = "inference", value_delimiter = ',')]
        scopes: Vec<String>,
        /// Days until it expires (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Lists keys (prefixes, never secrets).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes a key by id or prefix.
    Revoke {
        /// `key_…` or `fk-…` prefix.
        key: String,
    },
}

/// `fount admin quota …`
#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Sets a tenant's or a key's quota (unset limits are unlimited).
    Set {
        #[command(flatten)]
        who: QuotaSubject,
        #[command(flatten)]
        limits: QuotaLimits,
    },
    /// Shows a tenant's or a key's quota.
    Show {
        #[command(flatten)]
        who: QuotaSubject,
    },
    /// Sets a tenant's limits on the compute pool (unset limits are unlimited; the tenant's
    /// `--weight` is its fair share of the pool too).
    Jobs {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// Jobs running at once.
        #[arg(long)]
        running_jobs: Option<i64>,
        /// Slot-seconds per UTC day (a hard budget: jobs wait, running ones stop at a
        /// checkpoint).
        #[arg(long)]
        slot_seconds_per_day: Option<i64>,
        /// Slot-seconds per UTC month.
        #[arg(long)]
        slot_seconds_per_month: Option<i64>,
        /// The highest priority its jobs may ask for (low, normal, high).
        #[arg(long)]
        max_priority: Option<String>,
    },
}

/// The limits of `fount admin quota set`.
#[derive(Debug, Args)]
pub struct QuotaLimits {
    /// Requests per minute.
    #[arg(long)]
    requests_per_minute: Option<i64>,
    /// Tokens per minute.
    #[arg(long)]
    tokens_per_minute: Option<i64>,
    /// Tokens per UTC day.
    #[arg(long)]
    tokens_per_day: Option<i64>,
    /// Tokens per UTC month.
    #[arg(long)]
    tokens_per_month: Option<i64>,
    /// Requests running at once.
    #[arg(long)]
    concurrent_requests: Option<i64>,
    /// Largest prompt plus completion.
    #[arg(long)]
    max_context: Option<i64>,
    /// Models and adapters it may use, comma-separated (default: all it can see).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// The tenant's share of the engine when tenants contend for it (default 1; tenants
    /// only).
    #[arg(long)]
    weight: Option<i64>,
}

impl From<QuotaLimits> for Quota {
    fn from(l: QuotaLimits) -> Quota {
        Quota {
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            tokens_per_day: l.tokens_per_day,
            tokens_per_month: l.tokens_per_month,
            concurrent_requests: l.concurrent_requests,
            max_context: l.max_context,
            models: l.models,
            weight: l.weight,
        }
    }
}

/// `fount admin usage …`
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Writes usage records as CSV or JSON lines to stdout.
    Export {
        /// `csv` or `json`.
        #[arg(long, default_value = "csv")]
        format: String,
        /// First day, `YYYY-MM-DD` (UTC), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Last day, `YYYY-MM-DD` (UTC), inclusive.
        #[arg(long)]
        to: Option<String>,
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// The store's id of a quota subject: `("t", tenant id)` or `("k", key id)`.
pub(super) async fn subject_id(store: &Store, who: &QuotaSubject) -> Result<(bool, String)> {
    match (&who.tenant, &who.key) {
        (Some(t), _) => Ok((true, tenant_id(store, t).await?)),
        (None, Some(k)) => {
            let found = store
                .keys(None)
                .await?
                .into_iter()
                .find(|i| &i.id == k || &i.prefix == k)
                .with_context(|| format!("no key {k:?} (fount admin key list)"))?;
            Ok((false, found.id))
        }
        (None, None) => bail!("--tenant or --key is needed"),
    }
}

/// The quota subject of a [`subject_id`] answer.
fn subject_of(is_tenant: bool, id: &str) -> Subject<'_> {
    if is_tenant {
        Subject::Tenant(id)
    } else {
        Subject::Key(id)
    }
}

fn price_arg(flag: &str, v: &str) -> Result<i64> {
    Price::parse_dollars(v).with_context(|| {
        format!("--{flag} {v:?} is not a price in dollars per million tokens, such as 0.15")
    })
}

/// The id of the tenant named `name`, or an error that says how to list them.
pub async fn tenant_id(store: &Store, name: &str) -> Result<String> {
    Ok(store
        .tenant_by_name(name)
        .await?
        .with_context(|| format!("no tenant named {name:?} (fount admin tenant list)"))?
        .id)
}

/// Prints the replicas on the store, one per line.
async fn replicas(store: &Store) -> Result<()> {
    let now = fount_store::now_ms();
    let all = store.replicas(0).await?;
    if all.is_empty() {
        println!("no replicas (they join on PostgreSQL only)");
    }
    for r in all {
        let silent = (now - r.heartbeat_ms).max(0);
        let state = if silent > 5_000 { "silent" } else { "alive" };
        println!(
            "{}\t{}\t{state} (heartbeat {:.1} s ago)\tup {:.0} s\t{} open",
            r.id,
            r.address,
            silent as f64 / 1000.0,
            (now - r.started_at_ms).max(0) as f64 / 1000.0,
            r.open_requests
        );
    }
    Ok(())
}

/// Runs `fount admin`.
pub fn run(a: AdminArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let store = Store::open(&a.store.data_dir, a.store.database_url.as_deref())
            .await
            .context("opening the store")?;
        let acts = Acts {
            store: store.clone(),
            dir: a.store.data_dir.clone(),
        };
        match a.command {
            AdminCommand::Tenant(c) => tenants(&store, c, &acts).await?,
            AdminCommand::Key(c) => keys(&store, c, &acts).await?,
            AdminCommand::Quota(c) => quotas(&store, c, &acts).await?,
            AdminCommand::Price(c) => prices(&store, c, &acts).await?,
            AdminCommand::Usage(c) => usage(&store, c).await?,
            AdminCommand::Policy(c) => super::admin_safety::policy(&store, c, &acts).await?,
            AdminCommand::Suspend(a) => super::admin_safety::suspend(&store, a, &acts).await?,
            AdminCommand::Resume(w) => super::admin_safety::resume(&store, w, &acts).await?,
            AdminCommand::Audit(c) => super::admin_safety::audit(&store, c).await?,
            AdminCommand::Replicas => replicas(&store).await?,
        }
        store.close().await;
        Ok(())
    })
}

/// Where administrative acts are logged: the store's ledger.
pub(super) struct Acts {
    store: Store,
    dir: PathBuf,
}

impl Acts {
    pub(super) async fn log(&self, act: &str, what: (String, serde_json::Value)) -> Result<()> {
        super::ledger::log_act(&self.store, &self.dir, act, what).await
    }
}

/// `fount admin tenant …`: create and list tenants.
async fn tenants(store: &Store, command: TenantCommand, acts: &Acts) -> Result<()> {
    match command {
        TenantCommand::Create { name } => {
            let t = store.create_tenant(&name).await?;
            acts.log("tenant.create", statement::tenant_created(&t))
                .await?;
            println!("{}\t{}", t.id, t.name);
        }
        TenantCommand::List => {
            for t in store.tenants().await? {
                println!("{}\t{}\t{}", t.id, t.name, t.created_at);
            }
        }
    }
    Ok(())
}

/// `fount admin key …`: create (shown once), list and revoke API keys.
async fn keys(store: &Store, command: KeyCommand, acts: &Acts) -> Result<()> {
    match command {
        KeyCommand::Create {
            tenant,
            name,
            scopes,
            expires_in_days,
        } => {
            let id = tenant_id(store, &tenant).await?;
            let scopes = scopes
                .iter()
                .map(|s| {
                    Scope::parse(s).with_context(|| {
                        format!("unknown scope {s:?} (inference, admin, files, fine_tuning)")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let expires =
                expires_in_days.map(|d| fount_store::now_ms() / 1000 + i64::from(d) * 86_400);
            let (key, info) = store.create_key(&id, &name, &scopes, expires).await?;
            acts.log("key.create", statement::key_created(&info))
                .await?;
            eprintln!(
                "key {} for tenant {tenant} (shown once; store it now):",
                info.prefix
            );
            println!("{}", key.expose());
        }
        KeyCommand::List { tenant } => {
            let id = match tenant {
                Some(t) => Some(tenant_id(store, &t).await?),
                None => None,
            };
            for k in store.keys(id.as_deref()).await? {
                let scopes: Vec<&str> = k.scopes.iter().map(|s| s.name()).collect();
                let state = match (k.revoked_at, k.expires_at) {
                    (Some(_), _) => "revoked",
                    (None, Some(e)) if e <= fount_store::now_ms() / 1000 => "expired",
                    _ => "active",
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{state}",
                    k.id,
                    k.prefix,
                    k.tenant_id,
                    k.name,
                    scopes.join(",")
                );
            }
        }
        KeyCommand::Revoke { key } => {
            if !store.revoke_key(&key).await? {
                bail!("no active key {key:?}");
            }
            acts.log("key.revoke", (format!("key/{key}"), json!({})))
                .await?;
            eprintln!("revoked {key}");
        }
    }
    Ok(())
}

/// `fount admin quota …`: set and show a tenant's or a key's quota.
async fn quotas(store: &Store, command: QuotaCommand, acts: &Acts) -> Result<()> {
    match command {
        QuotaCommand::Set { who, limits } => {
            let (is_tenant, id) = subject_id(store, &who).await?;
            if limits.weight.is_some() && !is_tenant {
                bail!("--weight is a tenant's share; a key has none");
            }
            if limits.weight.is_some_and(|w| w < 1) {
                bail!("--weight must be at least 1");
            }
            let q = Quota::from(limits);
            let subject = subject_of(is_tenant, &id);
            store.set_quota(subject, &q).await?;
            acts.log(
                "quota.set",
                (
                    format!("{}/{id}", if is_tenant { "tenant" } else { "key" }),
                    json!({"quota": format!("{q:?}")}),
                ),
            )
            .await?;
            eprintln!("quota of {id} set");
        }
        QuotaCommand::Show { who } => {
            let (is_tenant, id) = subject_id(store, &who).await?;
            let subject = subject_of(is_tenant, &id);
            println!("{:#?}", store.quota(subject).await?);
            if is_tenant {
                println!("{:#?}", store.job_quota(&id).await?);
            }
        }
        QuotaCommand::Jobs {
            tenant,
            running_jobs,
            slot_seconds_per_day,
            slot_seconds_per_month,
            max_priority,
        } => {
            let id = tenant_id(store, &tenant).await?;
            let max_priority = match max_priority.as_deref() {
                Some(p) => Some(
                    fount_store::Priority::parse(p)
                        .with_context(|| format!("--max-priority {p:?}: low, normal or high"))?,
                ),
                None => None,
            };
            for (flag, v) in [
                ("running-jobs", running_jobs),
                ("slot-seconds-per-day", slot_seconds_per_day),
                ("slot-seconds-per-month", slot_seconds_per_month),
            ] {
                if v.is_some_and(|v| v < 0) {
                    bail!("--{flag} cannot be negative");
                }
            }
            let q = fount_store::JobQuota {
                running_jobs,
                slot_seconds_per_day,
                slot_seconds_per_month,
                max_priority,
            };
            store.set_job_quota(&id, &q).await?;
            acts.log(
                "job_quota.set",
                (format!("tenant/{id}"), json!({"quota": format!("{q:?}")})),
            )
            .await?;
            eprintln!("pool quota of {tenant} set");
        }
    }
    Ok(())
}

/// `fount admin price …`: set and list prices per model.
async fn prices(store: &Store, command: PriceCommand, acts: &Acts) -> Result<()> {
    match command {
        PriceCommand::Set {
            model,
            input,
            cached_input,
            output,
            training,
        } => {
            if [&input, &cached_input, &output, &training]
                .iter()
                .all(|v| v.is_none())
            {
                bail!("give at least one of --input, --cached-input, --output, --training");
            }
            let old = store
                .prices()
                .await?
                .into_iter()
                .find(|(m, _)| *m == model)
                .map(|(_, p)| p)
                .unwrap_or_default();
            let get = |flag: &str, v: Option<String>, old: i64| match v {
                Some(v) => price_arg(flag, &v),
                None => Ok(old),
            };
            let new_input = get("input", input.clone(), old.input)?;
            let price = Price {
                input: new_input,
                cached_input: match (cached_input, input) {
                    (Some(c), _) => price_arg("cached-input", &c)?,
                    (None, Some(_)) => new_input,
                    (None, None) => old.cached_input,
                },
                output: get("output", output, old.output)?,
                training: get("training", training, old.training)?,
            };
            store.set_price(&model, &price).await?;
            acts.log(
                "price.set",
                (
                    format!("model/{model}"),
                    json!({"price": format!("{price:?}")}),
                ),
            )
            .await?;
            eprintln!("price of {model} set");
        }
        PriceCommand::List => {
            println!("model\tinput\tcached_input\toutput\ttraining (dollars per million tokens)");
            for (model, p) in store.prices().await? {
                let d = |micro: i64| fount_store::dollars(i128::from(micro) * 1_000_000, 6);
                println!(
                    "{model}\t{}\t{}\t{}\t{}",
                    d(p.input),
                    d(p.cached_input),
                    d(p.output),
                    d(p.training)
                );
            }
        }
    }
    Ok(())
}

/// `fount admin usage export`: usage records as CSV or JSON lines.
async fn usage(store: &Store, command: UsageCommand) -> Result<()> {
    match command {
        UsageCommand::Export {
            format,
            from,
            to,
            tenant,
        } => {
            let from_ms = from.as_deref().map(day_start_ms).transpose()?.unwrap_or(0);
            let to_ms = match to.as_deref() {
                Some(d) => day_start_ms(d)? + 86_400_000,
                None => i64::MAX,
            };
            let id = match tenant {
                Some(t) => Some(tenant_id(store, &t).await?),
                None => None,
            };
            let records = store.usage(id.as_deref(), from_ms, to_ms).await?;
            match format.as_str() {
                "csv" => {
                    println!("{}", UsageRecord::CSV_HEADER);
                    for r in records {
                        println!("{}", r.csv_row());
                    }
                }
                "json" => {
                    for r in records {
                        println!("{}", r.to_json());
                    }
                }
                other => bail!("unknown --format {other:?} (csv, json)"),
            }
        }
    }
    Ok(())
}
