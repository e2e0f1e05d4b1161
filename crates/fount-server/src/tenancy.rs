//! Tenants on the server: API keys checked on every request, per-tenant quotas enforced before
//! admission, and one usage record per request written through a batched writer.
//!
//! Metering is exact by construction: the engine counts a request's tokens in its
//! [`RequestMeter`], whose final callback runs once nothing can count any more (the request
//! finished, failed, or was abandoned and cancelled). The callback settles the quota
//! reservation and hands the record to the writer; a handler waits for its record's commit
//! before the response ends, so a request a client saw complete is on disk.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fount_engine::RequestMeter;
use fount_store::{now_ms, utc_day, KeyInfo, Quota, Store, Tenant, UsageRecord};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

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

/// Sliding-window counters and budget of one tenant.
#[derive(Debug, Default)]
struct Window {
    /// Arrival times (ms) of the requests of the last minute.
    requests: VecDeque<i64>,
    /// (time ms, tokens) charged in the last minute.
    tokens: VecDeque<(i64, i64)>,
    in_flight: i64,
    /// `(day, tokens used, tokens reserved)`.
    day: Option<(String, i64, i64)>,
    /// `(month, tokens used, tokens reserved)`.
    month: Option<(String, i64, i64)>,
    quota: Option<(Instant, Quota)>,
}

/// Tenancy over a store.
pub struct Tenancy {
    store: Store,
    /// Told of every record as it goes to the writer (the billed-token counters).
    on_record: std::sync::OnceLock<RecordHook>,
    writer: mpsc::UnboundedSender<Pending>,
    windows: Mutex<HashMap<String, Window>>,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// How long a tenant's quota is cached (changes take effect within this).
const QUOTA_TTL: Duration = Duration::from_secs(1);

/// Records written per transaction at most.
const BATCH: usize = 256;

/// What a request holds of its tenant's quota until it ends.
#[derive(Debug)]
pub struct Reservation {
    tenant_id: String,
    tokens: i64,
}

impl Tenancy {
    /// Starts the usage writer (a task on the current runtime) over `store`.
    pub fn start(store: Store) -> Arc<Tenancy> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        let writer_store = store.clone();
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
        })
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

    /// The tenant's quota (cached for a second).
    pub async fn quota(&self, tenant_id: &str) -> Result<Quota, ApiError> {
        if let Ok(w) = self.windows.lock() {
            if let Some((at, q)) = w.get(tenant_id).and_then(|w| w.quota.as_ref()) {
                if at.elapsed() < QUOTA_TTL {
                    return Ok(q.clone());
                }
            }
        }
        let q = self
            .store
            .quota(tenant_id)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Ok(mut w) = self.windows.lock() {
            w.entry(tenant_id.to_string()).or_default().quota = Some((Instant::now(), q.clone()));
        }
        Ok(q)
    }

    /// Tokens the tenant used (recorded) since `from_ms`.
    async fn used_since(&self, tenant_id: &str, from_ms: i64) -> Result<i64, ApiError> {
        let records = self
            .store
            .usage(Some(tenant_id), from_ms, i64::MAX)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(records
            .iter()
            .map(|r| r.prompt_tokens + r.completion_tokens)
            .sum())
    }

    /// Checks the quota for a request of `tokens` (prompt plus everything it may generate) and
    /// reserves it; refused requests get 429 (`rate_limit_exceeded` with `Retry-After`, or
    /// `insufficient_quota`).
    pub async fn admit(&self, caller: &Caller, tokens: i64) -> Result<Reservation, ApiError> {
        let q = self.quota(&caller.tenant.id).await?;
        let t = &caller.tenant.id;
        let now = now_ms();
        let (day, month) = (utc_day(now), utc_day(now)[..7].to_string());
        // budgets count what is recorded: load them once per day or month
        let need_day = q.tokens_per_day.is_some()
            && self.windows.lock().map_or(true, |w| {
                w.get(t).and_then(|w| w.day.as_ref()).map(|d| &d.0) != Some(&day)
            });
        let day_used = if need_day {
            Some(self.used_since(t, day_start(now)).await?)
        } else {
            None
        };
        let need_month = q.tokens_per_month.is_some()
            && self.windows.lock().map_or(true, |w| {
                w.get(t).and_then(|w| w.month.as_ref()).map(|m| &m.0) != Some(&month)
            });
        let month_used = if need_month {
            Some(self.used_since(t, month_start(now)).await?)
        } else {
            None
        };
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| ApiError::Internal("quota state poisoned".into()))?;
        let w = windows.entry(t.clone()).or_default();
        if let Some(used) = day_used {
            w.day = Some((day.clone(), used, 0));
        }
        if let Some(used) = month_used {
            w.month = Some((month.clone(), used, 0));
        }
        while w.requests.front().is_some_and(|&a| a <= now - 60_000) {
            w.requests.pop_front();
        }
        while w.tokens.front().is_some_and(|&(a, _)| a <= now - 60_000) {
            w.tokens.pop_front();
        }
        let limited = |oldest: Option<i64>, message: String| {
            let secs = oldest.map_or(1, |a| ((a + 60_000 - now) / 1000).max(1));
            ApiError::RateLimited {
                message,
                retry_after: u64::try_from(secs).unwrap_or(1),
            }
        };
        if let Some(limit) = q.requests_per_minute {
            if w.requests.len() as i64 >= limit {
                return Err(limited(
                    w.requests.front().copied(),
                    format!("rate limit of {limit} requests per minute reached"),
                ));
            }
        }
        if let Some(limit) = q.tokens_per_minute {
            let used: i64 = w.tokens.iter().map(|(_, n)| n).sum();
            if used + tokens > limit {
                return Err(limited(
                    w.tokens.front().map(|(a, _)| *a),
                    format!(
                        "rate limit of {limit} tokens per minute reached ({used} charged, {tokens} asked for)"
                    ),
                ));
            }
        }
        if let Some(limit) = q.concurrent_requests {
            if w.in_flight >= limit {
                return Err(limited(None, format!("{limit} requests already running")));
            }
        }
        for (what, limit, budget) in [
            ("day", q.tokens_per_day, &w.day),
            ("month", q.tokens_per_month, &w.month),
        ] {
            if let (Some(limit), Some((_, used, reserved))) = (limit, budget) {
                if used + reserved + tokens > limit {
                    return Err(ApiError::InsufficientQuota(format!(
                        "the token budget of {limit} per {what} is spent ({used} used, {reserved} reserved, {tokens} asked for)"
                    )));
                }
            }
        }
        w.requests.push_back(now);
        w.tokens.push_back((now, tokens));
        w.in_flight += 1;
        if let Some(d) = w.day.as_mut() {
            d.2 += tokens;
        }
        if let Some(m) = w.month.as_mut() {
            m.2 += tokens;
        }
        Ok(Reservation {
            tenant_id: t.clone(),
            tokens,
        })
    }

    /// Settles a reservation to the tokens actually used.
    fn settle(&self, r: &Reservation, used: i64) {
        let Ok(mut windows) = self.windows.lock() else {
            return;
        };
        let Some(w) = windows.get_mut(&r.tenant_id) else {
            return;
        };
        w.in_flight -= 1;
        for b in [w.day.as_mut(), w.month.as_mut()].into_iter().flatten() {
            b.1 += used;
            b.2 -= r.tokens;
        }
    }

    /// A meter for one request: when its final callback runs, the reservation (if any) is
    /// settled and the usage record goes to the writer. Returns the meter, the status cell the
    /// handler sets, and a receiver told once the record is committed.
    pub fn meter(
        self: &Arc<Self>,
        caller: &Caller,
        request_id: &str,
        model: &str,
        adapter: Option<String>,
    ) -> (Arc<RequestMeter>, Arc<Metered>, oneshot::Receiver<()>) {
        let (ack_tx, ack_rx) = oneshot::channel();
        let metered = Arc::new(Metered {
            status: AtomicU16::new(200),
            reservation: Mutex::new(None),
            adapter: Mutex::new(adapter),
        });
        let (tenancy, cell) = (self.clone(), metered.clone());
        let (tenant_id, key_id) = (caller.tenant.id.clone(), caller.key.id.clone());
        let (request_id, model) = (request_id.to_string(), model.to_string());
        let start = Instant::now();
        let created_at_ms = now_ms();
        let meter = RequestMeter::on_final(move |m| {
            let (prompt, cached, completion) = m.counts();
            let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            if let Some(r) = cell.reservation.lock().ok().and_then(|mut r| r.take()) {
                tenancy.settle(&r, to_i64(prompt + completion));
            }
            let adapter = cell.adapter.lock().ok().and_then(|mut a| a.take());
            let record = UsageRecord {
                request_id,
                tenant_id,
                key_id,
                model,
                adapter,
                prompt_tokens: to_i64(prompt),
                cached_tokens: to_i64(cached),
                completion_tokens: to_i64(completion),
                status: i64::from(cell.status.load(Ordering::SeqCst)),
                latency_ms: i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX),
                created_at_ms,
            };
            if let Some(f) = tenancy.on_record.get() {
                f(&record);
            }
            let _ = tenancy.writer.send((Some(record), Some(ack_tx)));
        });
        (meter, metered, ack_rx)
    }
}

/// What the handler tells the meter of a request.
#[derive(Debug)]
pub struct Metered {
    /// The HTTP status answered (499 when the client went away).
    pub status: AtomicU16,
    /// The quota reservation to settle.
    pub reservation: Mutex<Option<Reservation>>,
    /// The adapter the model resolved to.
    pub adapter: Mutex<Option<String>>,
}

/// Unix milliseconds of 00:00 UTC of the day of `ms`.
pub(crate) fn day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(86_400_000)
}

/// Unix milliseconds of 00:00 UTC on the first of the month of `ms`.
fn month_start(ms: i64) -> i64 {
    let day = utc_day(ms);
    let dom: i64 = day[8..].parse().unwrap_or(1);
    day_start(ms) - (dom - 1) * 86_400_000
}
