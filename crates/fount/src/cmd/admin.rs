//! `fount admin`: tenants, keys, quotas and usage, on the data directory or database that
//! `fount serve` uses.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_store::{Quota, Scope, Store};

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
    /// Usage records.
    #[command(subcommand)]
    Usage(UsageCommand),
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
    /// Sets a tenant's quota (unset limits are unlimited).
    Set {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
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
    },
    /// Shows a tenant's quota.
    Show {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
    },
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

/// Unix milliseconds of 00:00 UTC of `YYYY-MM-DD`.
pub fn day_start_ms(day: &str) -> Result<i64> {
    let parts: Vec<&str> = day.split('-').collect();
    let bad = || format!("{day:?} is not a date such as 2026-11-29");
    let [y, m, d] = parts.as_slice() else {
        bail!(bad());
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().with_context(bad)?,
        m.parse().with_context(bad)?,
        d.parse().with_context(bad)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        bail!(bad());
    }
    // civil date to days since 1970-01-01 (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400_000)
}

async fn tenant_id(store: &Store, name: &str) -> Result<String> {
    Ok(store
        .tenant_by_name(name)
        .await?
        .with_context(|| format!("no tenant named {name:?} (fount admin tenant list)"))?
        .id)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
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
        match a.command {
            AdminCommand::Tenant(TenantCommand::Create { name }) => {
                let t = store.create_tenant(&name).await?;
                println!("{}\t{}", t.id, t.name);
            }
            AdminCommand::Tenant(TenantCommand::List) => {
                for t in store.tenants().await? {
                    println!("{}\t{}\t{}", t.id, t.name, t.created_at);
                }
            }
            AdminCommand::Key(KeyCommand::Create {
                tenant,
                name,
                scopes,
                expires_in_days,
            }) => {
                let id = tenant_id(&store, &tenant).await?;
                let scopes = scopes
                    .iter()
                    .map(|s| {
                        Scope::parse(s).with_context(|| {
                            format!("unknown scope {s:?} (inference, admin, files, fine_tuning)")
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let expires = expires_in_days
                    .map(|d| fount_store::now_ms() / 1000 + i64::from(d) * 86_400);
                let (key, info) = store.create_key(&id, &name, &scopes, expires).await?;
                eprintln!(
                    "key {} for tenant {tenant} (shown once; store it now):",
                    info.prefix
                );
                println!("{}", key.expose());
            }
            AdminCommand::Key(KeyCommand::List { tenant }) => {
                let id = match tenant {
                    Some(t) => Some(tenant_id(&store, &t).await?),
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
            AdminCommand::Key(KeyCommand::Revoke { key }) => {
                if !store.revoke_key(&key).await? {
                    bail!("no active key {key:?}");
                }
                eprintln!("revoked {key}");
            }
            AdminCommand::Quota(QuotaCommand::Set {
                tenant,
                requests_per_minute,
                tokens_per_minute,
                tokens_per_day,
                tokens_per_month,
                concurrent_requests,
                max_context,
                models,
            }) => {
                let id = tenant_id(&store, &tenant).await?;
                let q = Quota {
                    requests_per_minute,
                    tokens_per_minute,
                    tokens_per_day,
                    tokens_per_month,
                    concurrent_requests,
                    max_context,
                    models,
                };
                store.set_quota(&id, &q).await?;
                eprintln!("quota of {tenant} set");
            }
            AdminCommand::Quota(QuotaCommand::Show { tenant }) => {
                let id = tenant_id(&store, &tenant).await?;
                println!("{:#?}", store.quota(&id).await?);
            }
            AdminCommand::Usage(UsageCommand::Export {
                format,
                from,
                to,
                tenant,
            }) => {
                let from_ms = from.as_deref().map(day_start_ms).transpose()?.unwrap_or(0);
                let to_ms = match to.as_deref() {
                    Some(d) => day_start_ms(d)? + 86_400_000,
                    None => i64::MAX,
                };
                let id = match tenant {
                    Some(t) => Some(tenant_id(&store, &t).await?),
                    None => None,
                };
                let records = store.usage(id.as_deref(), from_ms, to_ms).await?;
                match format.as_str() {
                    "csv" => {
                        println!("request_id,tenant_id,key_id,model,adapter,prompt_tokens,cached_tokens,completion_tokens,status,latency_ms,created_at_ms");
                        for r in records {
                            println!(
                                "{},{},{},{},{},{},{},{},{},{},{}",
                                csv_field(&r.request_id),
                                csv_field(&r.tenant_id),
                                csv_field(&r.key_id),
                                csv_field(&r.model),
                                csv_field(r.adapter.as_deref().unwrap_or("")),
                                r.prompt_tokens,
                                r.cached_tokens,
                                r.completion_tokens,
                                r.status,
                                r.latency_ms,
                                r.created_at_ms
                            );
                        }
                    }
                    "json" => {
                        for r in records {
                            println!(
                                "{}",
                                serde_json::json!({
                                    "request_id": r.request_id, "tenant_id": r.tenant_id,
                                    "key_id": r.key_id, "model": r.model, "adapter": r.adapter,
                                    "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
                                    "completion_tokens": r.completion_tokens, "status": r.status,
                                    "latency_ms": r.latency_ms, "created_at_ms": r.created_at_ms,
                                })
                            );
                        }
                    }
                    other => bail!("unknown --format {other:?} (csv, json)"),
                }
            }
        }
        store.close().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::day_start_ms;

    #[test]
    fn days_parse() {
        assert_eq!(day_start_ms("1970-01-01").ok(), Some(0));
        assert_eq!(day_start_ms("2026-11-29").ok(), Some(1_795_910_400_000));
        assert_eq!(day_start_ms("2000-03-01").ok(), Some(951_868_800_000));
        assert!(day_start_ms("2026-13-01").is_err());
        assert!(day_start_ms("yesterday").is_err());
    }
}
