//! A weighted fair queue by tenant: the admission policy a shared server runs.
//!
//! Each tenant (a request's cache salt, which the server derives from the authenticated tenant)
//! has a counter of the service it has received, in weighted tokens: a prompt token counts
//! [`FairQueue::PROMPT_COST`], a generated token [`FairQueue::OUTPUT_COST`], both divided by the
//! tenant's weight. Waiting requests are offered to the engine tenant by tenant, least-served
//! first, so a tenant that floods the queue is served at its share while a tenant sending within
//! its own is admitted at once. A tenant that comes back after an idle spell has its counter
//! lifted to the least-served waiting tenant's, so idleness banks no credit to burst with later.
//! This is the virtual token counter of Sheng et al., "Fairness in Serving Large Language
//! Models" (OSDI 2024), with weights.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::admission::{Admission, Queued};

/// Tenant weights shared between the server (which sets them from quotas) and the queue.
#[derive(Debug, Clone, Default)]
pub struct FairShares(Arc<RwLock<HashMap<String, f64>>>);

impl FairShares {
    /// Sets `tenant`'s weight (a share relative to other tenants; 1 by default). Weights that
    /// are not positive and finite are taken as 1.
    pub fn set(&self, tenant: &str, weight: f64) {
        let w = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            1.0
        };
        if let Ok(mut m) = self.0.write() {
            if m.get(tenant) != Some(&w) {
                m.insert(tenant.to_string(), w);
            }
        }
    }

    /// `tenant`'s weight.
    pub fn get(&self, tenant: &str) -> f64 {
        self.0
            .read()
            .ok()
            .and_then(|m| m.get(tenant).copied())
            .unwrap_or(1.0)
    }
}

/// The weighted fair queue (see the module documentation).
#[derive(Debug, Default)]
pub struct FairQueue {
    shares: FairShares,
    /// Weighted tokens served per tenant.
    served: HashMap<String, f64>,
    /// Tenants that had requests waiting at the last `order`.
    backlogged: HashSet<String>,
}

impl FairQueue {
    /// Weighted cost of one prompt token.
    pub const PROMPT_COST: f64 = 1.0;
    /// Weighted cost of one generated token.
    pub const OUTPUT_COST: f64 = 2.0;

    /// A queue with weights from `shares`.
    pub fn new(shares: FairShares) -> FairQueue {
        FairQueue {
            shares,
            ..FairQueue::default()
        }
    }

    /// Weighted tokens served to `tenant` so far.
    pub fn served(&self, tenant: &str) -> f64 {
        self.served.get(tenant).copied().unwrap_or(0.0)
    }

    fn charge(&mut self, tenant: &str, cost: f64) {
        let w = self.shares.get(tenant);
        match self.served.get_mut(tenant) {
            Some(c) => *c += cost / w,
            None => {
                self.served.insert(tenant.to_string(), cost / w);
            }
        }
    }
}

impl Admission for FairQueue {
    fn order(&mut self, queue: &[Queued]) -> Vec<usize> {
        // per tenant, its waiting requests in queue order
        let mut tenants: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, q) in queue.iter().enumerate() {
            match tenants.iter_mut().find(|(t, _)| *t == q.cache_salt) {
                Some((_, v)) => v.push(i),
                None => tenants.push((q.cache_salt.as_str(), vec![i])),
            }
        }
        // newly backlogged tenants start level with the least-served one already waiting
        let floor = tenants
            .iter()
            .filter(|(t, _)| self.backlogged.contains(*t))
            .map(|(t, _)| self.served(t))
            .fold(f64::INFINITY, f64::min);
        if floor.is_finite() {
            for (t, _) in &tenants {
                if !self.backlogged.contains(*t) && self.served(t) < floor {
                    self.served.insert((*t).to_string(), floor);
                }
            }
        }
        self.backlogged = tenants.iter().map(|(t, _)| (*t).to_string()).collect();

        // preempted sequences first (they hold generated work), then tenant by tenant,
        // least-served first, charging each offered request's prompt tentatively
        let mut out: Vec<usize> = (0..queue.len()).filter(|&i| queue[i].preempted).collect();
        let mut tentative: Vec<(f64, usize)> =
            tenants.iter().map(|(t, _)| (self.served(t), 0)).collect();
        loop {
            let mut best: Option<usize> = None;
            for (k, (_, list)) in tenants.iter().enumerate() {
                let next = list[tentative[k].1..]
                    .iter()
                    .position(|&i| !queue[i].preempted);
                if next.is_none() {
                    continue;
                }
                if best.is_none_or(|b| tentative[k].0 < tentative[b].0) {
                    best = Some(k);
                }
            }
            let Some(k) = best else { break };
            let (tenant, list) = &tenants[k];
            let pos = tentative[k].1
                + list[tentative[k].1..]
                    .iter()
                    .position(|&i| !queue[i].preempted)
                    .unwrap_or(0);
            let i = list[pos];
            out.push(i);
            let q = &queue[i];
            let prompt = if q.choice == 0 { q.prompt_tokens } else { 0 };
            tentative[k].0 += Self::PROMPT_COST * prompt as f64 / self.shares.get(tenant);
            tentative[k].1 = pos + 1;
        }
        out
    }

    fn admitted(&mut self, q: &Queued) {
        // a preempted sequence was charged when first admitted; siblings share the prompt
        if !q.preempted && q.choice == 0 {
            self.charge(&q.cache_salt, Self::PROMPT_COST * q.prompt_tokens as f64);
        }
    }

    fn generated(&mut self, cache_salt: &str, tokens: usize) {
        self.charge(cache_salt, Self::OUTPUT_COST * tokens as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn q(id: u64, tenant: &str, prompt: usize) -> Queued {
        Queued {
            id,
            choice: 0,
            arrival: Instant::now(),
            prompt_tokens: prompt,
            cache_salt: tenant.into(),
            adapter: None,
            preempted: false,
        }
    }

    fn tenants_in(order: &[usize], queue: &[Queued]) -> String {
        order
            .iter()
            .map(|&i| queue[i].cache_salt.as_str())
            .collect()
    }

    #[test]
    fn a_flooding_tenant_does_not_hold_back_another() {
        let mut fq = FairQueue::default();
        let mut queue: Vec<Queued> = (0..8).map(|i| q(i, "a", 10)).collect();
        let order = fq.order(&queue);
        assert_eq!(tenants_in(&order, &queue), "aaaaaaaa");
        // a was served a lot; b arrives behind six of a's requests, starts level with a (it
        // banks nothing for having been away) and is offered second, not seventh
        for q in &queue[..2] {
            fq.admitted(q);
            fq.generated("a", 100);
        }
        queue.drain(..2);
        queue.push(q(100, "b", 10));
        let order = fq.order(&queue);
        assert_eq!(tenants_in(&order, &queue), "abaaaaa");
    }

    #[test]
    fn equal_tenants_interleave_and_weights_scale_shares() {
        let mut fq = FairQueue::default();
        let queue: Vec<Queued> = (0..4)
            .map(|i| q(i, "a", 10))
            .chain((4..8).map(|i| q(i, "b", 10)))
            .collect();
        assert_eq!(tenants_in(&fq.order(&queue), &queue), "abababab");

        let shares = FairShares::default();
        shares.set("a", 3.0);
        let mut fq = FairQueue::new(shares);
        assert_eq!(tenants_in(&fq.order(&queue), &queue), "abaaabbb");
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut fq = FairQueue::default();
        let a: Vec<Queued> = (0..4).map(|i| q(i, "a", 10)).collect();
        fq.order(&a);
        fq.admitted(&a[0]);
        fq.generated("a", 1000);
        // b was never seen: it starts level with a, not 2,010 tokens behind
        let mut queue = a[1..].to_vec();
        queue.push(q(9, "b", 10));
        fq.order(&queue);
        assert_eq!(fq.served("b"), fq.served("a"));
    }

    #[test]
    fn preempted_sequences_come_first_and_are_not_charged_again() {
        let mut fq = FairQueue::default();
        let mut p = q(1, "b", 50);
        p.preempted = true;
        let queue = vec![q(0, "a", 10), p.clone()];
        assert_eq!(fq.order(&queue), vec![1, 0]);
        fq.admitted(&p);
        assert_eq!(fq.served("b"), 0.0);
    }
}
