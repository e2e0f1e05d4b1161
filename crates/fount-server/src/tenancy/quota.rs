//! Every quota rule a request is held to, in one place: the models a tenant and a key may use,
//! their maximum context, requests and tokens per minute (and per second, as OpenAI quantises
//! them), concurrent requests, and token budgets per UTC day and month. [`Tenancy::admit`] checks
//! them all before a request reaches the engine and reserves what it may use; the reservation is
//! settled to what it used when its meter's record is written ([`super::metering`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use fount_store::{day_start, month_start, now_ms, utc_day, Counters, Quota, Subject, Wants};

use super::{Caller, Metering, Tenancy, QUOTA_TTL};
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
}

/// Sliding-window counters and budget of one tenant or key.
#[derive(Debug, Default)]
pub(super) struct Window {
    minute: Minute,
    in_flight: i64,
    /// `(day, tokens used, tokens reserved)`.
    day: Option<(String, i64, i64)>,
    /// `(month, tokens used, tokens reserved)`.
    month: Option<(String, i64, i64)>,
    quota: Option<(Instant, Quota)>,
}

/// What a request holds of its tenant's and its key's quotas until it ends.
#[derive(Debug)]
pub struct Reservation {
    /// The windows charged (`t:…`, `k:…`); none when the replicas' shared quotas hold it (the
    /// transaction that writes the usage record settles it).
    windows: Vec<String>,
    tokens: i64,
}

/// The window key of a subject.
fn window_key(who: Subject<'_>) -> String {
    match who {
        Subject::Tenant(id) => format!("t:{id}"),
        Subject::Key(id) => format!("k:{id}"),
    }
}

impl Window {
    /// What [`check`] reads, at `now` (ms).
    fn counters(&self, now: i64) -> Counters {
        Counters {
            minute_requests: self.minute.requests,
            minute_tokens: self.minute.tokens,
            second_requests: self.minute.this_second(now),
            oldest_second: self.minute.seconds.front().map(|s| s.0),
            in_flight: self.in_flight,
            day: self.day.as_ref().map(|d| (d.1, d.2)),
            month: self.month.as_ref().map(|m| (m.1, m.2)),
        }
    }
}

/// Seconds until the oldest charge leaves the minute (at least 1).
fn retry_after(c: &Counters, now: i64) -> u64 {
    let free_at = c.oldest_second.map_or(now, |s| (s + 60) * 1000);
    u64::try_from((free_at - now + 999) / 1000)
        .unwrap_or(1)
        .max(1)
}

/// What an admission reads of a subject with quota `q`.
pub(super) fn wants(q: &Quota) -> Wants {
    Wants {
        minute: q.requests_per_minute.is_some() || q.tokens_per_minute.is_some(),
        concurrent: q.concurrent_requests.is_some(),
        day: q.tokens_per_day.is_some(),
        month: q.tokens_per_month.is_some(),
    }
}

/// A refusal by one subject's counters (the same rules locally and across replicas).
pub(super) fn check(
    c: &Counters,
    q: &Quota,
    now: i64,
    tokens: i64,
    whose: &str,
) -> Result<(), ApiError> {
    let limited = |message: String| ApiError::RateLimited {
        message,
        retry_after: retry_after(c, now),
    };
    if let Some(limit) = q.requests_per_minute {
        if c.minute_requests >= limit {
            return Err(limited(format!(
                "{whose} rate limit of {limit} requests per minute reached"
            )));
        }
        // quantised as OpenAI's are: a limit of 60 or more a minute also holds per second, at
        // a sixtieth of it, so a burst cannot spend the whole minute at once
        if limit >= 60 && c.second_requests >= limit / 60 {
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
        let used = c.minute_tokens;
        if used + tokens > limit {
            return Err(limited(format!(
                "{whose} rate limit of {limit} tokens per minute reached ({used} charged, {tokens} asked for)"
            )));
        }
    }
    if let Some(limit) = q.concurrent_requests {
        if c.in_flight >= limit {
            return Err(ApiError::RateLimited {
                message: format!("{whose} limit of {limit} concurrent requests reached"),
                retry_after: 1,
            });
        }
    }
    for (what, limit, budget) in [
        ("day", q.tokens_per_day, c.day),
        ("month", q.tokens_per_month, c.month),
    ] {
        if let (Some(limit), Some((used, reserved))) = (limit, budget) {
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

    /// Holds a validated request to every rule of its caller's quotas and ties it to its meter:
    /// the models the tenant and the key may use, the key's maximum context, the rate limits and
    /// budgets (reserving the most the request can use: its prompts plus every token it may
    /// generate, settled when its record is written), and the tenant's prefix-cache salt.
    /// Refused requests get 404 (a model the quota hides), 400 (`context_length_exceeded`) or
    /// 429 (`rate_limit_exceeded` with `Retry-After`, `insufficient_quota`, `queue_full`).
    pub async fn admit(
        &self,
        caller: &Caller,
        model: &str,
        requests: &mut [fount_engine::Request],
        metering: &Metering,
    ) -> Result<(), ApiError> {
        let limits = self.limits(caller).await?;
        if !limits.allows(model) {
            return Err(ApiError::model_not_found(model));
        }
        let max_context = limits.max_context();
        let mut tokens = 0i64;
        for r in requests.iter() {
            let most = r.prompt.len() + r.max_tokens;
            if let Some(limit) = max_context {
                if most as i64 > limit {
                    return Err(ApiError::ContextLength {
                        message: format!(
                            "this key's maximum context is {limit} tokens; the request needs {most}"
                        ),
                        param: "max_tokens",
                    });
                }
            }
            tokens += (r.prompt.len() + r.n * r.max_tokens) as i64;
        }
        let reservation = self
            .reserve(caller, &limits, tokens, (metering.request_id(), model))
            .await?;
        metering.hold(
            reservation,
            requests.first().and_then(|r| r.adapter.clone()),
        );
        for r in requests.iter_mut() {
            r.meter = Some(metering.meter().clone());
            // prefixes are shared within a tenant, never across
            r.cache_salt = caller.tenant.id.clone();
        }
        Ok(())
    }

    /// Checks the tenant's and the key's quotas (`limits`) for a request of `tokens` (prompt plus
    /// everything it may generate) and reserves it in both; refused requests get 429
    /// (`rate_limit_exceeded` with `Retry-After`, or `insufficient_quota`). With replicas on
    /// one PostgreSQL ([`Tenancy::share`]) the windows are the store's, shared by all, and the
    /// request (`open`: its id and model) is recorded as open until its usage record is written.
    async fn reserve(
        &self,
        caller: &Caller,
        limits: &Limits,
        tokens: i64,
        open: (&str, &str),
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
        let whose = ["tenant's", "key's"];
        if let Some(replica) = self.replica.get() {
            // replicas on one PostgreSQL: admitted in the store under the tenant's and the
            // key's locks, with the pair's other waiting requests
            self.refresh_prices().await?;
            let (reply, verdict) = tokio::sync::oneshot::channel();
            let w = super::shared::Waiting {
                request_id: open.0.to_string(),
                model: open.1.to_string(),
                tokens,
                now_ms: now,
                quotas: [limits.tenant.clone(), limits.key.clone()],
                reply,
            };
            let pair = (caller.tenant.id.clone(), caller.key.id.clone());
            super::shared::enqueue(&self.admissions, &self.store, replica, pair, w);
            verdict
                .await
                .map_err(|_| ApiError::Internal("the admission was dropped".into()))??;
            return Ok(Reservation {
                windows: Vec::new(),
                tokens,
            });
        }
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
        for ((key, q), whose) in keys.iter().zip(&quotas).zip(whose) {
            let w = windows.entry(key.clone()).or_default();
            w.minute.expire(now);
            check(&w.counters(now), q, now, tokens, whose)?;
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
            windows: keys.to_vec(),
            tokens,
        })
    }

    /// Settles a reservation to the tokens actually used.
    pub(super) fn settle(&self, r: &Reservation, used: i64) {
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
}
