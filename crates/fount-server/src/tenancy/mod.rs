//! Tenants on the server: API keys checked on every request, per-tenant quotas enforced before
//! admission, and one usage record per request written through a batched writer.
//!
//! - here: [`Tenancy`] (the store, the caches, the usage writer) and authentication ([`Caller`]);
//! - `quota.rs`: every quota rule a request is held to, in one place ([`Tenancy::admit`]);
//! - `metering.rs`: one request's meter and its usage record ([`Metering`]);
//! - `prices.rs`: the price table, cached.
//!
//! Metering is exact by construction: the engine counts a request's tokens in its
//! [`fount_engine::RequestMeter`], whose final callback runs once nothing can count any more (the request
//! finished, failed, or was abandoned and cancelled). The callback settles the quota
//! reservation and hands the record to the writer; a handler waits for its record's commit
//! before the response ends, so a request a client saw complete is on disk. The writer commits
//! records in batches, and its backlog is bounded: past [`BACKLOG_LIMIT`] records waiting, new
//! requests are refused (429 `queue_full`) until the database catches up.

mod metering;
mod prices;
mod quota;
mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fount_engine::fair::FairShares;
use fount_store::{KeyInfo, Price, Store, Tenant, UsageRecord};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

pub use metering::Metering;
use quota::Window;
pub use quota::{Limits, Reservation};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant.
    pub tenant: Tenant,
    /// The key used.
    pub key: KeyInfo,
}

impl Caller {
    /// Whether the key may administer every tenant.
    pub fn is_admin(&self) -> bool {
        self.key.scopes.contains(&fount_store::Scope::Admin)
    }
}

/// Told of each usage record.
type RecordHook = Box<dyn Fn(&UsageRecord) + Send + Sync>;

/// A record (or, with none, a flush marker) and, when someone waits for its commit, whom to
/// tell.
type Pending = (Option<UsageRecord>, Option<oneshot::Sender<()>>);

/// Tenancy over a store.
pub struct Tenancy {
    store: Store,
    /// Told of every record as it goes to the writer (the billed-token counters).
    on_record: std::sync::OnceLock<RecordHook>,
    writer: mpsc::UnboundedSender<Pending>,
    /// Windows by subject: `t:{tenant id}` and `k:{key id}`.
    windows: Mutex<HashMap<String, Window>>,
    /// Prices by model name, and when they were read.
    prices: Mutex<(Option<Instant>, HashMap<String, Price>)>,
    /// Tenant weights for the engine's fair queue.
    shares: FairShares,
    /// Records handed to the writer and not yet committed.
    backlog: Arc<AtomicUsize>,
    /// Past this backlog new requests are refused (the writer's bound).
    backlog_limit: AtomicUsize,
    /// This replica's id, when replicas share quotas through the store ([`Tenancy::share`]).
    replica: std::sync::OnceLock<String>,
    /// Requests waiting for admission against the shared quotas.
    admissions: Arc<shared::Queues>,
}

/// Records that may wait for the writer before new requests are refused.
pub const BACKLOG_LIMIT: usize = 65_536;

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// How long quotas and prices are cached (changes take effect within this).
const QUOTA_TTL: Duration = Duration::from_secs(1);

/// Records written per transaction at most.
const BATCH: usize = 256;

impl Tenancy {
    /// Starts the usage writer (a task on the current runtime) over `store`; tenants' weights
    /// go to `shares` (the engine's fair queue).
    pub fn start(store: Store, shares: FairShares) -> Arc<Tenancy> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        let writer_store = store.clone();
        let backlog = Arc::new(AtomicUsize::new(0));
        let written = backlog.clone();
        tokio::spawn(async move {
            let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let records: Vec<UsageRecord> =
                    batch.iter().filter_map(|(r, _)| r.clone()).collect();
                // a record is never dropped: retry until the database takes it
                let mut wait = Duration::from_millis(50);
                while !records.is_empty() {
                    let Err(e) = writer_store.record_usage(&records).await else {
                        break;
                    };
                    tracing::error!(error = %e, records = records.len(), "writing usage records; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                written.fetch_sub(records.len(), Ordering::SeqCst);
                for (_, ack) in batch.drain(..) {
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
            }
        });
        Arc::new(Tenancy {
            store,
            on_record: std::sync::OnceLock::new(),
            writer: tx,
            windows: Mutex::new(HashMap::new()),
            prices: Mutex::new((None, HashMap::new())),
            shares,
            backlog,
            backlog_limit: AtomicUsize::new(BACKLOG_LIMIT),
            replica: std::sync::OnceLock::new(),
            admissions: Arc::default(),
        })
    }

    /// Sets how many records may wait for the writer before new requests are refused with 429
    /// `queue_full` ([`BACKLOG_LIMIT`] by default).
    pub fn set_backlog_limit(&self, limit: usize) {
        self.backlog_limit.store(limit, Ordering::SeqCst);
    }

    /// Records handed to the writer and not yet committed.
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::SeqCst)
    }

    /// Holds requests to quotas shared with every replica on the same PostgreSQL, as replica
    /// `id` (once; later calls are ignored): rate windows, concurrent requests and budgets are
    /// the store's, and each admitted request is open there until its usage record is written.
    pub fn share(&self, id: &str) {
        let _ = self.replica.set(id.to_string());
    }

    /// This replica's id, when quotas are shared.
    pub fn replica(&self) -> Option<&str> {
        self.replica.get().map(String::as_str)
    }

    /// Calls `f` with every usage record (once; later calls are ignored).
    pub fn on_record(&self, f: impl Fn(&UsageRecord) + Send + Sync + 'static) {
        let _ = self.on_record.set(Box::new(f));
    }

    /// Waits until every record handed to the writer so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send((None, Some(tx))).is_ok() {
            let _ = rx.await;
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The caller behind an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let secret = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let key = fount_store::ApiKey::from_secret(secret);
        match self.store.authenticate(&key).await {
            Ok(Some((key, tenant))) => Ok(Caller { tenant, key }),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
}
