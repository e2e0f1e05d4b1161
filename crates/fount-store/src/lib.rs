//! `fount-store`: tenants, API keys, quotas, usage records, the pool's jobs, safety
//! policies, suspensions and audit records, and what replicas share (open requests, rate
//! windows, the adapter registry), on an embedded SQLite file (WAL mode) or on
//! PostgreSQL, through `sqlx` with versioned migrations.
//!
//! The same portable SQL runs on both; the server and `fount admin` open the store by data
//! directory or database URL and share it.
//!
//! ```no_run
//! # async fn run() -> fount_store::Result<()> {
//! use fount_store::{Scope, Store};
//! let store = Store::open("data", None).await?;
//! let tenant = store.create_tenant("acme").await?;
//! let (key, info) = store.create_key(&tenant.id, "ci", &[Scope::Inference], None).await?;
//! println!("{} (shown once): {}", info.prefix, key.expose());
//! assert!(store.authenticate(&key).await?.is_some());
//! # Ok(()) }
//! ```

pub mod error;
mod files;
mod finetuning;
pub mod jobs;
pub mod keys;
mod ledger;
mod replicas;
mod safety;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod time;
mod usage;

pub use error::{Error, Result};
pub use files::{FilePage, FileRecord};
pub use finetuning::{ft_id, FtCheckpoint, FtEvent, FtJob, FtModel, FtStatus, FtUpdate};
pub use jobs::{
    Ask, Change, Job, JobEvent, JobFilter, JobQuota, JobState, NewJob, Priority, Stop, Transition,
};
pub use keys::{ApiKey, Scope};
pub use ledger::{LedgerEntry, LedgerTx, NodeId, UsageCommit};
pub use replicas::{AdapterEntry, Admission, Counters, Replica, Wants, ABANDONED_STATUS};
pub use safety::{AuditRecord, SuspendKind, Suspension};
pub use store::{Backend, KeyInfo, Quota, Store, Subject, Tenant};
pub use time::{day_start, day_start_ms, month_start, now_ms, utc_day};
pub use usage::{dollars, Price, UsageKind, UsageRecord, UsageSummary};
