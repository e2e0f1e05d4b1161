//! Admission: waiting requests become running sequences while KV blocks last (reusing cached
//! prefix blocks), and the newest sequence is preempted when they run out.

use std::sync::atomic::Ordering;

use fount_model::{Sampler, TextOutput, TokenHistory};

use crate::adapters::AdapterState;
use crate::admission::Queued;
use crate::blocks::block_hash;
use crate::request::{Event, FinishReason, Usage};

use super::sample::flush;
use super::{Admit, Pending, Scheduler, Seq};

impl Scheduler {
    pub(super) fn admit(&mut self) {
        let queue: Vec<Queued> = self
            .waiting
            .iter()
            .map(|p| Queued {
                id: p.id,
                choice: p.choice,
                arrival: p.arrival,
                prompt_tokens: p.req.prompt.len(),
                cache_salt: p.req.cache_salt.clone(),
                adapter: p.req.adapter.clone(),
                preempted: p.resume.is_some(),
            })
            .collect();
        let order: Vec<usize> = self
            .admission
            .order(&queue)
            .into_iter()
            .filter(|&i| i < queue.len())
            .collect();
        for qi in order {
            let (id, choice) = (queue[qi].id, queue[qi].choice);
            if self.running.len() >= self.cfg.max_running {
                break;
            }
            let Some(i) = self
                .waiting
                .iter()
                .position(|p| p.id == id && p.choice == choice)
            else {
                continue;
            };
            match self.try_admit(i) {
                Admit::Admitted => self.admission.admitted(&queue[qi]),
                Admit::NotYet => {
                    // a request that cannot start for lack of blocks holds the line; ones
                    // waiting for an adapter or a sibling's prompt do not
                    let p = &self.waiting[i];
                    if p.choice == 0 && self.adapter_ready(p) {
                        break;
                    }
                }
                Admit::Failed(msg) => {
                    if let Some(p) = self.waiting.remove(i) {
                        let _ = p.tx.send(Event::Error(msg));
                    }
                }
            }
        }
        self.set_waiting();
    }

    fn adapter_ready(&self, p: &Pending) -> bool {
        match &p.adapter {
            None => true,
            Some((name, v)) => matches!(self.adapters.get(name, *v), AdapterState::Ready(_)),
        }
    }

    fn try_admit(&mut self, i: usize) -> Admit {
        let p = &self.waiting[i];
        if p.choice > 0 && p.resume.is_none() && !self.prefilled.contains(&p.id) {
            return Admit::NotYet;
        }
        let adapter = match &p.adapter {
            None => None,
            Some((name, v)) => match self.adapters.get(name, *v) {
                AdapterState::Ready(a) => Some(a),
                AdapterState::Loading => return Admit::NotYet,
                AdapterState::Failed(e) => {
                    return Admit::Failed(format!("adapter {name} v{v}: {e}"))
                }
                AdapterState::Unknown => {
                    return Admit::Failed(format!("adapter {name} v{v} is not registered"))
                }
            },
        };
        let adapter_key = p
            .adapter
            .as_ref()
            .map_or(String::new(), |(n, v)| format!("{n}@{v}"));
        let bs = self.cfg.block_size;
        let tokens: Vec<u32> = match &p.resume {
            Some(s) => s.tokens.clone(),
            None => p.req.prompt.clone(),
        };
        // reuse cached full blocks, keeping at least one token to compute
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let reusable = (tokens.len() - 1) / bs;
        for k in 0..reusable {
            let h = block_hash(
                hashes.last(),
                &p.req.cache_salt,
                &adapter_key,
                &tokens[k * bs..(k + 1) * bs],
            );
            match self.blocks.lookup(&h) {
                Some(b) => {
                    blocks.push(b);
                    hashes.push(h);
                }
                None => break,
            }
        }
        let needed = tokens.len().div_ceil(bs) - blocks.len();
        if self.blocks.available() < needed + 1 {
            for b in blocks {
                self.blocks.release(b);
            }
            // a sequence that has outgrown the whole pool can never run again: it ends here
            if tokens.len().div_ceil(bs) + 1 > self.blocks.total() && self.running.is_empty() {
                if let Some(p) = self.waiting.remove(i) {
                    if let Some(mut s) = p.resume {
                        let (text, _) = flush(&mut s, &self.tokenizer);
                        let _ = s.tx.send(Event::Finished {
                            choice: s.choice,
                            reason: FinishReason::Length,
                            text,
                            usage: Usage {
                                prompt_tokens: s.prompt_len,
                                completion_tokens: s.generated,
                                cached_tokens: s.cached_tokens,
                            },
                        });
                    }
                }
                return Admit::Admitted;
            }
            return Admit::NotYet;
        }
        let Some(p) = self.waiting.remove(i) else {
            return Admit::NotYet;
        };
        if p.choice > 0
            && !self
                .waiting
                .iter()
                .any(|q| q.id == p.id && q.resume.is_none())
        {
            // the last sibling is in: nothing waits on this request's prompt any more
            self.prefilled.remove(&p.id);
        }
        let computed = blocks.len() * bs;
        self.order += 1;
        // a preempted sequence coming back was counted when first admitted
        let fresh = p.resume.is_none();
        let seq = match p.resume {
            Some(mut s) => {
                s.blocks = blocks;
                s.hashes = hashes;
                s.computed = computed;
                s.order = self.order;
                *s
            }
            None => {
                let mut sampling = p.req.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(p.choice as u64);
                let Ok(sampler) = Sampler::new(sampling) else {
                    let _ =
                        p.tx.send(Event::Error("invalid sampling parameters".into()));
                    return Admit::Admitted;
                };
                Seq {
                    id: p.id,
                    choice: p.choice,
                    tokens: tokens.clone(),
                    prompt_len: tokens.len(),
                    computed,
                    blocks,
                    hashes,
                    sampler,
                    history: TokenHistory::new(&tokens),
                    text: TextOutput::new(&p.req.stop),
                    adapter,
                    adapter_key,
                    adapter_id: p.adapter.clone(),
                    tx: p.tx,
                    cached_tokens: computed,
                    generated: 0,
                    arrival: p.arrival,
                    last_token: None,
                    order: self.order,
                    req: p.req,
                }
            }
        };
        if let Ok(mut m) = self.metrics.lock() {
            m.prefix_tokens(seq.prompt_len, seq.cached_tokens);
        }
        if let (Some(meter), true, 0) = (&seq.req.meter, fresh, seq.choice) {
            meter
                .prompt_tokens
                .fetch_add(seq.prompt_len as u64, Ordering::SeqCst);
            meter
                .cached_tokens
                .fetch_add(seq.cached_tokens as u64, Ordering::SeqCst);
        }
        self.running.push(seq);
        Admit::Admitted
    }

    /// Preempts the most recently admitted running sequence: frees its blocks and puts it at the
    /// front of the queue to be recomputed.
    pub(super) fn preempt_newest(&mut self) -> Option<u64> {
        let (idx, _) = self
            .running
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.order)?;
        let mut s = self.running.swap_remove(idx);
        for &b in &s.blocks {
            self.blocks.release(b);
        }
        s.blocks.clear();
        s.hashes.clear();
        s.computed = 0;
        let order = s.order;
        self.waiting.push_front(Pending {
            id: s.id,
            req: s.req.clone(),
            choice: s.choice,
            adapter: s.adapter_id.clone(),
            tx: s.tx.clone(),
            arrival: s.arrival,
            resume: Some(Box::new(s)),
        });
        if let Ok(mut m) = self.metrics.lock() {
            m.preemptions += 1;
        }
        Some(order)
    }
}
