//! One step: plan the tokens each sequence computes, run one forward over the packed batch
//! grouped by adapter, and sample, stream and finish.

use std::time::Instant;

use candle_core::DType;
use fount_model::{Batch, Logits, LoraBatch};

use crate::blocks::block_hash;
use crate::error::Result;
use crate::paged::PagedView;

use super::sample::sample_one;
use super::Scheduler;

impl Scheduler {
    /// One step: plan, forward, sample.
    pub(super) fn step(&mut self) -> Result<()> {
        let plan = self.plan();
        if plan.is_empty() {
            return Ok(());
        }
        let rows = self.group_by_adapter(&plan);
        let started = Instant::now();
        let logits = self.forward(&rows)?;
        let step_time = started.elapsed();
        let generated = self.emit(&rows, logits);
        if let Ok(mut m) = self.metrics.lock() {
            let tokens = rows.iter().map(|&(_, chunk)| chunk).sum();
            m.step(tokens, generated, step_time);
        }
        self.publish();
        Ok(())
    }

    /// How many tokens each running sequence computes this step, as `(order, tokens)`: decoding
    /// sequences first, then prefill chunks, in admission order, within the step's token budget;
    /// blocks are allocated here, preempting the newest sequence when they run out.
    fn plan(&mut self) -> Vec<(u64, usize)> {
        let bs = self.cfg.block_size;
        self.running
            .sort_by_key(|s| (s.tokens.len() - s.computed > 1, s.order));
        let mut budget = self.cfg.max_step_tokens.max(1);
        let mut plan: Vec<(u64, usize)> = Vec::new();
        // a snapshot of the order: preemption below reorders `running`
        let orders: Vec<u64> = self.running.iter().map(|s| s.order).collect();
        for order in orders {
            if budget == 0 {
                break;
            }
            // preempted earlier in this loop
            let Some(s) = self.running.iter().find(|s| s.order == order) else {
                continue;
            };
            let chunk = (s.tokens.len() - s.computed).min(budget);
            let need = (s.computed + chunk).div_ceil(bs);
            let mut ok = true;
            while self
                .running
                .iter()
                .find(|s| s.order == order)
                .is_some_and(|s| s.blocks.len() < need)
            {
                match self.blocks.allocate() {
                    Some(b) => {
                        if let Some(s) = self.running.iter_mut().find(|s| s.order == order) {
                            s.blocks.push(b);
                        }
                    }
                    None => {
                        let victim = self.preempt_newest();
                        if let Some(&(_, c)) = plan.iter().find(|(o, _)| Some(*o) == victim) {
                            budget += c;
                        }
                        plan.retain(|(o, _)| Some(*o) != victim);
                        if victim == Some(order) || victim.is_none() {
                            ok = false;
                            break;
                        }
                    }
                }
            }
            if ok {
                plan.push((order, chunk));
                budget -= chunk;
            }
        }
        plan
    }

    /// The plan as `(index into running, tokens)`, grouped by adapter so that each adapter is one
    /// contiguous segment of the batch.
    fn group_by_adapter(&self, plan: &[(u64, usize)]) -> Vec<(usize, usize)> {
        let mut rows: Vec<(usize, usize)> = plan
            .iter()
            .filter_map(|(o, c)| {
                self.running
                    .iter()
                    .position(|s| s.order == *o)
                    .map(|p| (p, *c))
            })
            .collect();
        rows.sort_by(|a, b| {
            self.running[a.0]
                .adapter_key
                .cmp(&self.running[b.0].adapter_key)
                .then(self.running[a.0].order.cmp(&self.running[b.0].order))
        });
        rows
    }

    /// One forward over the packed batch of `rows`, through the paged cache: the last logits of
    /// each row.
    fn forward(&mut self, rows: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let mut batch = Batch::default();
        let mut lora = LoraBatch::none();
        let mut past = Vec::with_capacity(rows.len());
        for &(p, chunk) in rows {
            let s = &self.running[p];
            let start = batch.len();
            batch.push(&s.tokens[s.computed..s.computed + chunk], s.computed);
            past.push(s.computed);
            if let Some(a) = &s.adapter {
                lora.push(start..batch.len(), a.clone());
            }
        }
        let tables: Vec<&[usize]> = rows
            .iter()
            .map(|&(p, _)| self.running[p].blocks.as_slice())
            .collect();
        let mut view = PagedView {
            pool: &mut self.pool,
            tables: &tables,
            past: &past,
        };
        let out = self.model.forward_lora(
            &batch,
            &mut view,
            Logits::Last,
            &lora,
            self.cfg.batch_invariant,
        )?;
        Ok(out.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    /// Advances each row's sequence past the tokens computed, registers blocks that became full
    /// in the prefix cache, samples the next token of every sequence done with its prompt, and
    /// frees the finished ones. Returns the tokens generated.
    fn emit(&mut self, rows: &[(usize, usize)], mut logits: Vec<Vec<f32>>) -> usize {
        let bs = self.cfg.block_size;
        let mut finished = Vec::new();
        let mut generated = 0;
        for (row, &(p, chunk)) in rows.iter().enumerate() {
            let s = &mut self.running[p];
            s.computed += chunk;
            // register blocks that became full
            while s.hashes.len() < s.computed / bs {
                let k = s.hashes.len();
                let h = block_hash(
                    s.hashes.last(),
                    &s.req.cache_salt,
                    &s.adapter_key,
                    &s.tokens[k * bs..(k + 1) * bs],
                );
                self.blocks.register(s.blocks[k], h);
                s.hashes.push(h);
            }
            if s.computed < s.tokens.len() {
                continue; // mid-prefill
            }
            if s.computed == s.prompt_len && s.choice == 0 && s.req.n > 1 {
                self.prefilled.insert(s.id);
            }
            let mut row_logits = std::mem::take(&mut logits[row]);
            let done = sample_one(
                s,
                &mut row_logits,
                &self.tokenizer,
                &self.stop_ids,
                self.model.config().max_position_embeddings,
            );
            generated += 1;
            self.admission.generated(&s.req.cache_salt, 1);
            if let Ok(mut m) = self.metrics.lock() {
                let now = Instant::now();
                match s.last_token {
                    None => m.ttft(now - s.arrival),
                    Some(t) => m.itl(now - t),
                }
                s.last_token = Some(now);
            }
            if done {
                finished.push(s.order);
            }
        }
        for order in finished {
            if let Some(p) = self.running.iter().position(|s| s.order == order) {
                let s = self.running.swap_remove(p);
                self.free(s);
            }
        }
        generated
    }
}
