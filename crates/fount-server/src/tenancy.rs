//! Tenants on the server: API keys checked on every request, per-tenant quotas enforced before
//! admission, and one usage record per request written through a batched writer.
//!
//! Metering is exact by construction: the engine counts a request's tokens in its
//! [`RequestMeter`], whose final callback runs once nothing can count any more (the request
//! finished, failed, or was abandoned and cancelled). The callback settles the quota
//! reservation and hands the record to the writer; a handler waits for its record's commit
//! before the response ends, so a request a client saw complete is on disk. The writer commits
//! records in batches, and its backlog is bounded: past [`BACKLOG_LIMIT`] records waiting, new
//! requests are refused (429 `queue_full`) until the database catches up.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fount_engine::fair::FairShares;
use fount_engine::RequestMeter;
use fount_store::{now_ms, utc_day, KeyInfo, Price, Quota, Store, Subject, Tenant, UsageRecord};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

/// The quotas a request is held to: its tenant's and its key's.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// The tenant's.
    pub tenant: Quota,
    /// The key's (on top of the tenant's).
    pub key: Quota,
}

impl Limits {
    /// Whether both allow `model` (a model or adapter name).
    pub fn allows(&self, model: &str) -> bool {
        [&self.tenant, &self.key].iter().all(|q| {
            q.models
                .as_ref()
                .is_none_or(|m| m.iter().any(|x| x == model))
        })
    }

    /// The smaller of the two maximum contexts.
    pub fn max_context(&self) -> Option<i64> {
        [&self.tenant, &self.key]
            .iter()
            .filter_map(|q| q.max_context)
            .min()
    }
}

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

/// Requests and tokens charged over the last minute, by second: constant memory and work
/// per request at any rate.
#[derive(Debug, Default)]
struct Minute {
    /// `(second, requests, tokens)`, oldest first; at most 60.
    seconds: VecDeque<(i64, i64, i64)>,
    requests: i64,
    tokens: i64,
}

impl Minute {
    /// Drops the seconds that left the minute ending at `now` (ms).
    fn expire(&mut self, now: i64) {
        let second = now.div_euclid(1000);
        while let Some(&(s, r, t)) = self.seconds.front() {
            if s > second - 60 {
                break;
            }
            self.seconds.pop_front();
            self.requests -= r;
            self.tokens -= t;
        }
    }

    fn charge(&mut self, now: i64, tokens: i64) {
        let second = now.div_euclid(1000);
        match self.seconds.back_mut() {
            Some(b) if b.0 == second => {
                b.1 += 1;
                b.2 += tokens;
            }
            _ => self.seconds.push_back((second, 1, tokens)),
        }
        self.requests += 1;
        self.tokens += tokens;
    }

    /// Requests charged in the second of `now`.
    fn this_second(&self, now: i64) -> i64 {
        match self.seconds.back() {
            Some(&(s, r, _)) if s == now.div_euclid(1000) => r,
            _ => 0,
        }
    }

    /// Seconds until the oldest charge leaves the minute (at least 1).
    fn retry_after(&self, now: i64) -> u64 {
        let free_at = self
            .seconds
            .front()
            .map_or(now, |&(s, _, _)| (s + 60) * 1000);
        u64::try_from((free_at - now + 999) / 1000)
            .unwrap_or(1)
            .max(1)
    }
}

/// Sliding-window counters and budget of one tenant or key.
#[derive(Debug, Default)]
struct Window {
    minute: Minute,
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

/// What a request holds of its tenant's and its key's quotas until it ends.
#[derive(Debug)]
pub struct Reservation {
    /// The windows charged (`t:…`, `k:…`).
    windows: [String; 2],
    tokens: i64,
}

/// The window key of a subject.
fn window_key(who: Subject<'_>) -> String {
    match who {
        Subject::Tenant(id) => format!("t:{id}"),
        Subject::Key(id) => format!("k:{id}"),
    }
}

/// A refusal by one window.
fn check(w: &Window, q: &Quota, now: i64, tokens: i64, whose: &str) -> Result<(), ApiError> {
    let limited = |message: String| ApiError::RateLimited {
        message,
        retry_after: w.minute.retry_after(now),
    };
    if let Some(limit) = q.requests_per_minute {
        if w.minute.requests >= limit {
            return Err(limited(format!(
                "{whose} rate limit of {limit} requests per minute reached"
            )));
        }
        // quantised as OpenAI's are: a limit of 60 or more a minute also holds per second, at
        // a sixtieth of it, so a burst cannot spend the whole minute at once
        if limit >= 60 && w.minute.this_second(now) >= limit / 60 {
            return Err(ApiError::RateLimited {
                message: format!(
                    "{whose} rate limit of {limit} requests per minute reached ({} a second)",
                    limit / 60
                ),
                retry_after: 1,
            });
        }
    }
    if let Some(limit) = q.tokens_per_minute {
        let used = w.minute.tokens;
        if used + tokens > limit {
            return Err(limited(format!(
                "{whose} rate limit of {limit} tokens per minute reached ({used} charged, {tokens} asked for)"
            )));
        }
    }
    if let Some(limit) = q.concurrent_requests {
        if w.in_flight >= limit {
            return Err(ApiError::RateLimited {
                message: format!("{whose} limit of {limit} concurrent requests reached"),
                retry_after: 1,
            });
        }
    }
    for (what, limit, budget) in [
        ("day", q.tokens_per_day, &w.day),
        ("month", q.tokens_per_month, &w.month),
    ] {
        if let (Some(limit), Some((_, used, reserved))) = (limit, budget) {
            if used + reserved + tokens > limit {
                return Err(ApiError::InsufficientQuota(format!(
                    "the {whose} token budget of {limit} per {what} is spent ({used} used, {reserved} reserved, {tokens} asked for)"
                )));
            }
        }
    }
    Ok(())
}

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

    /// A tenant's or a key's quota (cached for a second).
    pub async fn quota(&self, who: Subject<'_>) -> Result<Quota, ApiError> {
        let key = window_key(who);
        if let Ok(w) = self.windows.lock() {
            if let Some((at, q)) = w.get(&key).and_then(|w| w.quota.as_ref()) {
                if at.elapsed() < QUOTA_TTL {
                    return Ok(q.clone());
                }
            }
        }
        let q = self
            .store
            .quota(who)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Subject::Tenant(id) = who {
            self.shares.set(id, q.weight.unwrap_or(1) as f64);
        }
        if let Ok(mut w) = self.windows.lock() {
            w.entry(key).or_default().quota = Some((Instant::now(), q.clone()));
        }
        Ok(q)
    }

    /// The caller's tenant quota and key quota (each cached for a second), read once per
    /// request.
    pub async fn limits(&self, caller: &Caller) -> Result<Limits, ApiError> {
        Ok(Limits {
            tenant: self.quota(Subject::Tenant(&caller.tenant.id)).await?,
            key: self.quota(Subject::Key(&caller.key.id)).await?,
        })
    }

    /// Refreshes the price table when it is older than a second.
    async fn refresh_prices(&self) -> Result<(), ApiError> {
        let fresh = self
            .prices
            .lock()
            .is_ok_and(|p| p.0.is_some_and(|at| at.elapsed() < QUOTA_TTL));
        if fresh {
            return Ok(());
        }
        let prices = self
            .store
            .prices()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Ok(mut p) = self.prices.lock() {
            *p = (Some(Instant::now()), prices.into_iter().collect());
        }
        Ok(())
    }

    /// The price of `model`, else of `base` (an adapter without a price of its own costs what
    /// its base model does), else nothing.
    fn price(&self, model: &str, base: &str) -> Price {
        self.prices.lock().map_or(Price::default(), |p| {
            p.1.get(model)
                .or_else(|| p.1.get(base))
                .copied()
                .unwrap_or_default()
        })
    }

    /// Loads a budget's use from the store when the window has none for this day or month.
    async fn load_budgets(&self, who: Subject<'_>, q: &Quota, now: i64) -> Result<(), ApiError> {
        let key = window_key(who);
        let (day, month) = (utc_day(now), utc_day(now)[..7].to_string());
        let current = |f: fn(&Window) -> Option<&String>, period: &String| {
            self.windows
                .lock()
                .is_ok_and(|w| w.get(&key).and_then(f) == Some(period))
        };
        if q.tokens_per_day.is_some() && !current(|w| w.day.as_ref().map(|d| &d.0), &day) {
            let used = self
                .store
                .tokens_used_since(who, day_start(now))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Ok(mut w) = self.windows.lock() {
                w.entry(key.clone()).or_default().day = Some((day, used, 0));
            }
        }
        if q.tokens_per_month.is_some() && !current(|w| w.month.as_ref().map(|m| &m.0), &month) {
            let used = self
                .store
                .tokens_used_since(who, month_start(now))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Ok(mut w) = self.windows.lock() {
                w.entry(key).or_default().month = Some((month, used, 0));
            }
        }
        Ok(())
    }

    /// Checks the tenant's and the key's quotas (`limits`) for a request of `tokens` (prompt plus
    /// everything it may generate) and reserves it in both; refused requests get 429
    /// (`rate_limit_exceeded` with `Retry-After`, or `insufficient_quota`).
    pub async fn admit(
        &self,
        caller: &Caller,
        limits: &Limits,
        tokens: i64,
    ) -> Result<Reservation, ApiError> {
        let waiting = self.backlog();
        if waiting >= self.backlog_limit.load(Ordering::SeqCst) {
            return Err(ApiError::MeteringBacklog(waiting));
        }
        let now = now_ms();
        let subjects = [
            Subject::Tenant(&caller.tenant.id),
            Subject::Key(&caller.key.id),
        ];
        let quotas = [&limits.tenant, &limits.key];
        for (who, q) in subjects.iter().zip(quotas) {
            self.load_budgets(*who, q, now).await?;
        }
        self.refresh_prices().await?;
        let keys = subjects.map(window_key);
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| ApiError::Internal("quota state poisoned".into()))?;
        // check both before charging either
        for ((key, q), whose) in keys.iter().zip(&quotas).zip(["tenant's", "key's"]) {
            let w = windows.entry(key.clone()).or_default();
            w.minute.expire(now);
            check(w, q, now, tokens, whose)?;
        }
        for key in &keys {
            let w = windows.entry(key.clone()).or_default();
            w.minute.charge(now, tokens);
            w.in_flight += 1;
            if let Some(d) = w.day.as_mut() {
                d.2 += tokens;
            }
            if let Some(m) = w.month.as_mut() {
                m.2 += tokens;
            }
        }
        Ok(Reservation {
            windows: keys,
            tokens,
        })
    }

    /// Settles a reservation to the tokens actually used.
    fn settle(&self, r: &Reservation, used: i64) {
        let Ok(mut windows) = self.windows.lock() else {
            return;
        };
        for key in &r.windows {
            let Some(w) = windows.get_mut(key) else {
                continue;
            };
            w.in_flight -= 1;
            for b in [w.day.as_mut(), w.month.as_mut()].into_iter().flatten() {
                b.1 += used;
                b.2 -= r.tokens;
            }
        }
    }

    /// A meter for one request: when its final callback runs, the reservation (if any) is
    /// settled and the usage record, priced at `model`'s price (or `base`'s), goes to the
    /// writer. Returns the meter, the status cell the handler sets, and a receiver told once the
    /// record is committed.
    pub fn meter(
        self: &Arc<Self>,
        caller: &Caller,
        request_id: &str,
        model: &str,
        base: &str,
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
        let (request_id, model, base) =
            (request_id.to_string(), model.to_string(), base.to_string());
        let start = Instant::now();
        let created_at_ms = now_ms();
        let meter = RequestMeter::on_final(move |m| {
            let (prompt, cached, completion) = m.counts();
            let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            if let Some(r) = cell.reservation.lock().ok().and_then(|mut r| r.take()) {
                tenancy.settle(&r, to_i64(prompt + completion));
            }
            let adapter = cell.adapter.lock().ok().and_then(|mut a| a.take());
            let (prompt, cached, completion) = (to_i64(prompt), to_i64(cached), to_i64(completion));
            let cost = tenancy
                .price(&model, &base)
                .cost(prompt, cached, completion);
            let record = UsageRecord {
                request_id,
                tenant_id,
                key_id,
                model,
                adapter,
                prompt_tokens: prompt,
                cached_tokens: cached,
                completion_tokens: completion,
                status: i64::from(cell.status.load(Ordering::SeqCst)),
                latency_ms: i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX),
                created_at_ms,
                cost_picodollars: cost,
            };
            if let Some(f) = tenancy.on_record.get() {
                f(&record);
            }
            tenancy.backlog.fetch_add(1, Ordering::SeqCst);
            if tenancy.writer.send((Some(record), Some(ack_tx))).is_err() {
                tenancy.backlog.fetch_sub(1, Ordering::SeqCst);
            }
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
