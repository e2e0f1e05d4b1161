//! The scheduling decision: a pure function from what the pool sees to what it does, so every
//! rule is tested without processes or a database.
//!
//! The rules, in order:
//!
//! 1. **Budgets are hard.** A tenant whose slot time this UTC day or month (ended attempts plus
//!    the running ones) reached its budget starts nothing, and its running jobs are stopped at
//!    a checkpoint ([`Stop::Budget`]) to wait for the next period, losing nothing.
//! 2. **Priority first.** A free slot goes to the highest priority class that has an eligible
//!    job (Determined's rule: while a higher class waits, no lower one starts).
//! 3. **Weighted fair share within a class.** Among tenants with eligible jobs of that class,
//!    the slot goes to the lowest share: usage decayed with a half-life (Slurm's
//!    `PriorityDecayHalfLife`, Kueue's `usageHalfLifeTime`), plus an entry penalty for every
//!    running job (Kueue's admission penalty: a burst of submissions cannot slip in before
//!    its usage shows), divided by the tenant's weight. Within a tenant, oldest first.
//! 4. **Preemption only downwards.** A job that finds no free slot stops a running job of a
//!    strictly lower class ([`Stop::Preempt`]): the lowest class first, and within it the one
//!    that started last (the least work since its start). Since a job can only preempt a lower
//!    class, two jobs can never preempt each other back and forth. Slots already being freed
//!    by stopping jobs are counted before anything more is preempted.
//! 5. **Per-tenant limits.** A tenant never runs more jobs at once than its `running_jobs`.

use std::collections::HashMap;

use fount_store::{JobQuota, Priority, Stop};

/// A queued job, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its class.
    pub priority: Priority,
    /// When it was submitted (Unix ms): ties go to the oldest.
    pub created_at_ms: i64,
}

/// A running job, as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Active {
    /// Its id.
    pub id: String,
    /// The attempt running.
    pub attempt: i64,
    /// Its tenant.
    pub tenant: String,
    /// Its class.
    pub priority: Priority,
    /// When the attempt started (Unix ms).
    pub started_at_ms: i64,
    /// Whether it has been asked to stop already (it still holds its slot until it exits).
    pub stopping: bool,
}

/// What the scheduler knows of a tenant.
#[derive(Debug, Clone, Default)]
pub struct TenantView {
    /// Its limits.
    pub quota: JobQuota,
    /// Its share of the pool relative to others (1 when unset).
    pub weight: i64,
    /// Slot time of ended attempts that started this UTC day / month (ms).
    pub day_ms: i64,
    /// See `day_ms`.
    pub month_ms: i64,
    /// Slot time with age decay (ms), ended attempts only.
    pub decayed_ms: f64,
}

/// Everything one decision looks at.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Jobs that may run at once.
    pub slots: usize,
    /// Now (Unix ms).
    pub now_ms: i64,
    /// Queued jobs.
    pub waiting: Vec<Waiting>,
    /// Running jobs.
    pub active: Vec<Active>,
    /// Tenants by id (a tenant missing here gets the defaults: no limits, weight 1).
    pub tenants: HashMap<String, TenantView>,
    /// Slot time charged per running job when ranking shares (ms).
    pub entry_penalty_ms: f64,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start the job now.
    Start(String),
    /// Ask the running attempt to stop.
    Stop {
        /// The job.
        id: String,
        /// Its attempt.
        attempt: i64,
        /// Why.
        why: Stop,
    },
    /// The job keeps waiting, for this reason.
    Wait {
        /// The job.
        id: String,
        /// Why it does not start, as `fount jobs show` prints it.
        reason: String,
    },
}

/// The tenant's budget state: `Some(reason)` when it may start nothing more.
fn over_budget(t: &TenantView, running_ms: i64) -> Option<String> {
    let check = |limit: Option<i64>, used: i64, period: &str| {
        limit
            .filter(|&l| used + running_ms >= l.saturating_mul(1000))
            .map(|l| {
                format!(
                    "its tenant used {} of its {l} slot-seconds this {period}",
                    (used + running_ms) / 1000
                )
            })
    };
    check(t.quota.slot_seconds_per_day, t.day_ms, "UTC day")
        .or_else(|| check(t.quota.slot_seconds_per_month, t.month_ms, "UTC month"))
}

/// Decides what to start, stop and leave waiting.
pub fn decide(s: &Snapshot) -> Vec<Decision> {
    let default_view = TenantView {
        weight: 1,
        ..TenantView::default()
    };
    let view = |t: &str| s.tenants.get(t).unwrap_or(&default_view);
    let mut out = Vec::new();

    // running jobs and running slot time per tenant
    let mut running: HashMap<&str, usize> = HashMap::new();
    let mut running_ms: HashMap<&str, i64> = HashMap::new();
    for a in &s.active {
        *running.entry(&a.tenant).or_default() += 1;
        *running_ms.entry(&a.tenant).or_default() += (s.now_ms - a.started_at_ms).max(0);
    }

    // 1. budgets: stop the running jobs of tenants over budget
    let mut blocked: HashMap<&str, String> = HashMap::new();
    for tenant in s
        .waiting
        .iter()
        .map(|w| w.tenant.as_str())
        .chain(s.active.iter().map(|a| a.tenant.as_str()))
    {
        if blocked.contains_key(tenant) {
            continue;
        }
        let used = running_ms.get(tenant).copied().unwrap_or(0);
        if let Some(reason) = over_budget(view(tenant), used) {
            blocked.insert(tenant, reason);
        }
    }
    let mut stopping = 0;
    for a in &s.active {
        if a.stopping {
            stopping += 1;
        } else if blocked.contains_key(a.tenant.as_str()) {
            stopping += 1;
            out.push(Decision::Stop {
                id: a.id.clone(),
                attempt: a.attempt,
                why: Stop::Budget,
            });
        }
    }

    // queued jobs per tenant and class, oldest first
    let mut queues: HashMap<(&str, Priority), Vec<&Waiting>> = HashMap::new();
    for w in &s.waiting {
        if let Some(reason) = blocked.get(w.tenant.as_str()) {
            out.push(Decision::Wait {
                id: w.id.clone(),
                reason: format!("over budget: {reason}"),
            });
            continue;
        }
        queues.entry((&w.tenant, w.priority)).or_default().push(w);
    }
    for q in queues.values_mut() {
        q.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        q.reverse(); // pop() takes the oldest
    }
    let share = |tenant: &str, running: &HashMap<&str, usize>| {
        let v = view(tenant);
        let n = running.get(tenant).copied().unwrap_or(0) as f64;
        let used = v.decayed_ms
            + running_ms.get(tenant).copied().unwrap_or(0) as f64
            + n * s.entry_penalty_ms;
        used / v.weight.max(1) as f64
    };

    // 2-4. hand out slots, class by class
    let mut free = s.slots.saturating_sub(s.active.len());
    // running jobs that may be preempted, the first victims last
    let mut victims: Vec<&Active> = s
        .active
        .iter()
        .filter(|a| !a.stopping && !blocked.contains_key(a.tenant.as_str()))
        .collect();
    victims.sort_by(|a, b| {
        (b.priority, a.started_at_ms, &a.id).cmp(&(a.priority, b.started_at_ms, &b.id))
    });
    for class in Priority::ALL.into_iter().rev() {
        loop {
            // the tenant with the lowest share among those with an eligible job of this class
            let mut best: Option<(&str, f64)> = None;
            for (&(tenant, p), q) in &queues {
                if p != class || q.is_empty() {
                    continue;
                }
                let limit = view(tenant).quota.running_jobs;
                let n = running.get(tenant).copied().unwrap_or(0);
                if limit.is_some_and(|l| n as i64 >= l) {
                    continue;
                }
                let sh = share(tenant, &running);
                if best.is_none_or(|(bt, bs)| sh < bs || (sh == bs && tenant < bt)) {
                    best = Some((tenant, sh));
                }
            }
            let Some((tenant, _)) = best else { break };
            let Some(job) = queues.get_mut(&(tenant, class)).and_then(Vec::pop) else {
                break;
            };
            if free > 0 {
                free -= 1;
                *running.entry(tenant).or_default() += 1;
                out.push(Decision::Start(job.id.clone()));
            } else if stopping > 0 {
                // a slot is being freed by a stopping job: it goes to this one
                stopping -= 1;
                out.push(Decision::Wait {
                    id: job.id.clone(),
                    reason: "next: waiting for a stopping job to checkpoint and exit".into(),
                });
            } else if victims.last().is_some_and(|v| v.priority < class) {
                if let Some(v) = victims.pop() {
                    out.push(Decision::Stop {
                        id: v.id.clone(),
                        attempt: v.attempt,
                        why: Stop::Preempt,
                    });
                    out.push(Decision::Wait {
                        id: job.id.clone(),
                        reason: format!("next: preempting {} ({} priority)", v.id, v.priority),
                    });
                }
            } else {
                out.push(Decision::Wait {
                    id: job.id.clone(),
                    reason: format!("no free slot ({} of {} in use)", s.active.len(), s.slots),
                });
            }
        }
    }
    // what is left waits on its tenant's limit
    for ((tenant, _), q) in queues {
        for job in q {
            let limit = view(tenant).quota.running_jobs.unwrap_or(0);
            out.push(Decision::Wait {
                id: job.id.clone(),
                reason: format!("its tenant runs {limit} jobs at once, its limit"),
            });
        }
    }
    out
}

/// Decays `slot_ms` that started at `at_ms` to `now_ms` with `half_life_ms`.
pub fn decayed(slot_ms: i64, at_ms: i64, now_ms: i64, half_life_ms: i64) -> f64 {
    let age = (now_ms - at_ms).max(0) as f64;
    slot_ms as f64 * 0.5f64.powf(age / half_life_ms.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(id: &str, tenant: &str, p: Priority, at: i64) -> Waiting {
        Waiting {
            id: id.into(),
            tenant: tenant.into(),
            priority: p,
            created_at_ms: at,
        }
    }

    fn active(id: &str, tenant: &str, p: Priority, at: i64) -> Active {
        Active {
            id: id.into(),
            attempt: 1,
            tenant: tenant.into(),
            priority: p,
            started_at_ms: at,
            stopping: false,
        }
    }

    fn snapshot(slots: usize, waiting: Vec<Waiting>, active: Vec<Active>) -> Snapshot {
        Snapshot {
            slots,
            now_ms: 1_000_000,
            waiting,
            active,
            tenants: HashMap::new(),
            entry_penalty_ms: 60_000.0,
        }
    }

    fn starts(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Start(id) => Some(id.as_str()),
                _ => None,
            })
            .collect()
    }

    fn stops(d: &[Decision]) -> Vec<(&str, Stop)> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Stop { id, why, .. } => Some((id.as_str(), *why)),
                _ => None,
            })
            .collect()
    }

    fn reason<'a>(d: &'a [Decision], job: &str) -> &'a str {
        d.iter()
            .find_map(|d| match d {
                Decision::Wait { id, reason } if id == job => Some(reason.as_str()),
                _ => None,
            })
            .unwrap_or("")
    }

    #[test]
    fn higher_classes_start_first_then_the_oldest() {
        use Priority::*;
        let s = snapshot(
            2,
            vec![
                waiting("a", "t", Low, 1),
                waiting("b", "t", Normal, 2),
                waiting("c", "t", High, 3),
                waiting("d", "t", Normal, 0),
            ],
            vec![],
        );
        let d = decide(&s);
        assert_eq!(starts(&d), ["c", "d"]);
        assert!(reason(&d, "a").starts_with("no free slot"), "{d:?}");
    }

    #[test]
    fn a_higher_class_preempts_the_lowest_newest_job_once() {
        use Priority::*;
        let s = snapshot(
            2,
            vec![waiting("h", "t", High, 5)],
            vec![active("n", "t", Normal, 1), active("l1", "t", Low, 1), {
                active("l2", "t", Low, 2)
            }],
        );
        let d = decide(&s);
        assert_eq!(stops(&d), [("l2", Stop::Preempt)]);
        assert!(reason(&d, "h").contains("preempting l2"), "{d:?}");

        // once l2 is stopping, h waits for it and nothing more is preempted
        let mut s2 = s.clone();
        s2.active[2].stopping = true;
        let d = decide(&s2);
        assert!(stops(&d).is_empty(), "{d:?}");
        assert!(reason(&d, "h").contains("stopping job"), "{d:?}");
    }

    #[test]
    fn equal_classes_never_preempt_each_other() {
        use Priority::*;
        for p in Priority::ALL {
            let s = snapshot(
                1,
                vec![waiting("w", "a", p, 9)],
                vec![active("r", "b", p, 1)],
            );
            assert!(stops(&decide(&s)).is_empty());
        }
        // a chain: high preempts normal; the preempted normal job cannot preempt back
        let s = snapshot(
            1,
            vec![waiting("n", "a", Normal, 9)],
            vec![active("h", "b", High, 1)],
        );
        assert!(stops(&decide(&s)).is_empty());
    }

    #[test]
    fn fair_share_follows_weights_and_decayed_usage() {
        use Priority::*;
        let mut s = snapshot(
            1,
            vec![waiting("a1", "a", Normal, 1), waiting("b1", "b", Normal, 2)],
            vec![],
        );
        s.tenants.insert(
            "a".into(),
            TenantView {
                weight: 1,
                decayed_ms: 100_000.0,
                ..TenantView::default()
            },
        );
        s.tenants.insert(
            "b".into(),
            TenantView {
                weight: 1,
                decayed_ms: 200_000.0,
                ..TenantView::default()
            },
        );
        assert_eq!(starts(&decide(&s)), ["a1"]);
        // with three times the weight, b's share is the smaller
        s.tenants.get_mut("b").unwrap().weight = 3;
        assert_eq!(starts(&decide(&s)), ["b1"]);
    }

    #[test]
    fn a_burst_cannot_hold_the_pool() {
        use Priority::*;
        // tenant a queued 50 jobs before b queued 2: with 4 slots, b gets 2 of them
        let mut w: Vec<Waiting> = (0..50)
            .map(|i| waiting(&format!("a{i:02}"), "a", Normal, i))
            .collect();
        w.push(waiting("b0", "b", Normal, 100));
        w.push(waiting("b1", "b", Normal, 101));
        let d = decide(&snapshot(4, w, vec![]));
        let st = starts(&d);
        assert_eq!(st.len(), 4);
        assert_eq!(
            st.iter().filter(|j| j.starts_with('b')).count(),
            2,
            "{st:?}"
        );
    }

    #[test]
    fn limits_and_budgets_hold_jobs_with_their_reason() {
        use Priority::*;
        let mut s = snapshot(
            4,
            vec![waiting("a2", "a", Normal, 3), waiting("b1", "b", Normal, 4)],
            vec![active("a1", "a", Normal, 999_000)],
        );
        s.tenants.insert(
            "a".into(),
            TenantView {
                weight: 1,
                quota: JobQuota {
                    running_jobs: Some(1),
                    ..JobQuota::default()
                },
                ..TenantView::default()
            },
        );
        s.tenants.insert(
            "b".into(),
            TenantView {
                weight: 1,
                quota: JobQuota {
                    slot_seconds_per_day: Some(60),
                    ..JobQuota::default()
                },
                day_ms: 60_000,
                ..TenantView::default()
            },
        );
        let d = decide(&s);
        assert!(starts(&d).is_empty(), "{d:?}");
        assert!(reason(&d, "a2").contains("1 jobs at once"), "{d:?}");
        assert!(
            reason(&d, "b1").contains("used 60 of its 60 slot-seconds this UTC day"),
            "{d:?}"
        );

        // a running job that crosses its tenant's budget is stopped at a checkpoint
        let mut s = snapshot(2, vec![], vec![active("b0", "b", Normal, 990_000)]);
        s.tenants.insert(
            "b".into(),
            TenantView {
                weight: 1,
                quota: JobQuota {
                    slot_seconds_per_month: Some(100),
                    ..JobQuota::default()
                },
                month_ms: 95_000,
                ..TenantView::default()
            },
        );
        assert_eq!(stops(&decide(&s)), [("b0", Stop::Budget)]);
    }

    #[test]
    fn usage_halves_every_half_life() {
        assert_eq!(decayed(1000, 0, 0, 10), 1000.0);
        assert!((decayed(1000, 0, 10, 10) - 500.0).abs() < 1e-9);
        assert!((decayed(1000, 0, 30, 10) - 125.0).abs() < 1e-9);
    }
}
