//! Engine metrics: queue, running sequences, KV blocks, prefix-cache hit rate, adapters,
//! throughput, time to first token and inter-token latency.

use std::collections::VecDeque;
use std::time::Duration;

const SAMPLES: usize = 4096;

/// What the scheduler records.
#[derive(Debug)]
pub struct Metrics {
    blocks_total: usize,
    waiting: usize,
    running: usize,
    blocks_used: usize,
    lookups: u64,
    hits: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: u64,
    steps: u64,
    step_tokens: u64,
    generated: u64,
    busy: Duration,
    ttft: VecDeque<Duration>,
    itl: VecDeque<Duration>,
}

/// A copy of the metrics at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Requests waiting.
    pub waiting: usize,
    /// Sequences running.
    pub running: usize,
    /// KV blocks in use.
    pub blocks_used: usize,
    /// KV blocks free (or holding only evictable cached prefixes).
    pub blocks_free: usize,
    /// Prefix-cache block hits / lookups.
    pub prefix_hit_rate: f64,
    /// Prompt tokens served from the prefix cache, and all prompt tokens admitted.
    pub cached_prompt_tokens: u64,
    /// See `cached_prompt_tokens`.
    pub prompt_tokens: u64,
    /// Adapters loaded, and their bytes.
    pub adapters_resident: usize,
    /// See `adapters_resident`.
    pub adapter_bytes: usize,
    /// Sequences preempted so far.
    pub preemptions: u64,
    /// Forward steps run.
    pub steps: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Generated tokens per second of forward time.
    pub tokens_per_second: f64,
    /// Time to first token, p50 and p99 of the recent requests.
    pub ttft_p50: Duration,
    /// See `ttft_p50`.
    pub ttft_p99: Duration,
    /// Inter-token latency, p50 and p99 of the recent tokens.
    pub itl_p50: Duration,
    /// See `itl_p50`.
    pub itl_p99: Duration,
}

fn push(q: &mut VecDeque<Duration>, d: Duration) {
    if q.len() == SAMPLES {
        q.pop_front();
    }
    q.push_back(d);
}

/// The `p` quantile (0..=1) of `xs`.
pub fn quantile(xs: &VecDeque<Duration>, p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let mut v: Vec<Duration> = xs.iter().copied().collect();
    v.sort();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

impl Metrics {
    /// Empty metrics for a pool of `blocks_total` blocks.
    pub fn new(blocks_total: usize) -> Metrics {
        Metrics {
            blocks_total,
            waiting: 0,
            running: 0,
            blocks_used: 0,
            lookups: 0,
            hits: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
            preemptions: 0,
            steps: 0,
            step_tokens: 0,
            generated: 0,
            busy: Duration::ZERO,
            ttft: VecDeque::new(),
            itl: VecDeque::new(),
        }
    }

    pub(crate) fn prefix_tokens(&mut self, prompt: usize, cached: usize) {
        self.prompt_tokens += prompt as u64;
        self.cached_tokens += cached as u64;
    }

    pub(crate) fn ttft(&mut self, d: Duration) {
        push(&mut self.ttft, d);
    }

    pub(crate) fn itl(&mut self, d: Duration) {
        push(&mut self.itl, d);
    }

    pub(crate) fn step(&mut self, tokens: usize, generated: usize, time: Duration) {
        self.steps += 1;
        self.step_tokens += tokens as u64;
        self.generated += generated as u64;
        self.busy += time;
    }

    pub(crate) fn state(
        &mut self,
        waiting: usize,
        running: usize,
        used: usize,
        lookups: u64,
        hits: u64,
    ) {
        self.waiting = waiting;
        self.running = running;
        self.blocks_used = used;
        self.lookups = lookups;
        self.hits = hits;
    }

    /// A snapshot, with the adapter figures from the store.
    pub fn snapshot(&self, adapters: usize, adapter_bytes: usize) -> MetricsSnapshot {
        MetricsSnapshot {
            waiting: self.waiting,
            running: self.running,
            blocks_used: self.blocks_used,
            blocks_free: self.blocks_total - self.blocks_used,
            prefix_hit_rate: if self.lookups == 0 {
                0.0
            } else {
                self.hits as f64 / self.lookups as f64
            },
            cached_prompt_tokens: self.cached_tokens,
            prompt_tokens: self.prompt_tokens,
            adapters_resident: adapters,
            adapter_bytes,
            preemptions: self.preemptions,
            steps: self.steps,
            generated_tokens: self.generated,
            tokens_per_second: self.generated as f64 / self.busy.as_secs_f64().max(1e-9),
            ttft_p50: quantile(&self.ttft, 0.5),
            ttft_p99: quantile(&self.ttft, 0.99),
            itl_p50: quantile(&self.itl, 0.5),
            itl_p99: quantile(&self.itl, 0.99),
        }
    }
}
