//! The engine: a scheduler thread that runs continuous batching over the paged KV cache.
//!
//! Every step the scheduler (1) takes new requests, (2) admits waiting ones in arrival order
//! while KV blocks last (reusing cached prefix blocks), (3) gives every decoding sequence its one
//! token and fills the rest of the step's token budget with prefill chunks, (4) preempts the
//! newest sequence when blocks run out (its blocks are freed and it is recomputed later, reusing
//! whatever of its prefix is still cached), (5) runs one forward over the packed batch with
//! sequences grouped by adapter, and (6) samples, streams and finishes.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::DType;
use fount_model::sampling::log_softmax;
use fount_model::{
    Batch, Logits, LoraAdapter, LoraBatch, Model, Sampler, SamplingParams, TextOutput,
    TokenHistory, Tokenizer,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::adapters::{AdapterState, AdapterStore};
use crate::blocks::{block_hash, BlockHash, BlockManager};
use crate::error::{EngineError, Result};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::paged::{KvPool, PagedView};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Memory for the KV pool, in bytes (f32 keys and values of every layer).
    pub kv_bytes: usize,
    /// Tokens per forward step (decode tokens first, then prefill chunks).
    pub max_step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests waiting before `submit` refuses more.
    pub max_waiting: usize,
    /// Memory for loaded adapters.
    pub adapter_cache_bytes: usize,
    /// Batch-invariant kernels: a request's tokens do not depend on what it is batched with.
    pub batch_invariant: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            kv_bytes: 256 << 20,
            max_step_tokens: 512,
            max_running: 64,
            max_waiting: 4096,
            adapter_cache_bytes: 1 << 30,
            batch_invariant: true,
        }
    }
}

/// Token counts of one request, kept by the engine as it works: prompt and cached tokens when
/// each prompt's first choice is admitted, one completion token per token generated (stop
/// tokens excluded, as in [`Usage`]). A metering layer gives each request one and learns the
/// final counts from [`RequestMeter::on_final`], which runs exactly once, when the engine and
/// every other holder have let go of it — so no token can be counted after it ran.
pub struct RequestMeter {
    /// Prompt tokens.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: AtomicU64,
    /// Tokens generated, over all choices.
    pub completion_tokens: AtomicU64,
    on_final: Mutex<Option<MeterCallback>>,
}

type MeterCallback = Box<dyn FnOnce(&RequestMeter) + Send>;

impl RequestMeter {
    /// A meter that calls `on_final` with the final counts.
    pub fn on_final(f: impl FnOnce(&RequestMeter) + Send + 'static) -> Arc<RequestMeter> {
        Arc::new(RequestMeter {
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            on_final: Mutex::new(Some(Box::new(f))),
        })
    }

    /// `(prompt, cached, completion)` as counted so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.prompt_tokens.load(Ordering::SeqCst),
            self.cached_tokens.load(Ordering::SeqCst),
            self.completion_tokens.load(Ordering::SeqCst),
        )
    }
}

impl std::fmt::Debug for RequestMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMeter")
            .field("counts", &self.counts())
            .finish()
    }
}

impl Drop for RequestMeter {
    fn drop(&mut self) {
        let f = match self.on_final.get_mut() {
            Ok(f) => f.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(f) = f {
            f(self);
        }
    }
}

/// One generation request (already tokenized and validated by the caller's protocol layer).
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sampling parameters (the seed of choice `i` is `seed + i`).
    pub sampling: SamplingParams,
    /// Tokens to generate at most, per choice.
    pub max_tokens: usize,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end generation (not included); the engine's defaults when empty.
    pub stop_token_ids: Vec<u32>,
    /// Choices generated from the prompt, sharing its KV blocks.
    pub n: usize,
    /// Log-probabilities: `None` for none, `Some(k)` for the chosen token and `k` alternatives.
    pub logprobs: Option<usize>,
    /// Adapter name (`None`: the base model).
    pub adapter: Option<String>,
    /// Prefix-cache salt: prefixes are shared only between requests with the same salt (the
    /// server derives it from the tenant).
    pub cache_salt: String,
    /// Where the engine counts this request's tokens, for metering.
    pub meter: Option<Arc<RequestMeter>>,
}

impl Request {
    /// A greedy request for `max_tokens` tokens of `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
        Request {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            n: 1,
            logprobs: None,
            adapter: None,
            cache_salt: String::new(),
            meter: None,
        }
    }
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
}

/// The log-probability of a sampled token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Log-probability of the sampled token under the model.
    pub logprob: f32,
    /// The `k` most likely tokens and their log-probabilities.
    pub top: Vec<(u32, f32)>,
}

/// Token counts of a finished choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

/// What a stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (may be empty while a character or a
    /// possible stop string is incomplete).
    Token {
        /// The choice (0..n).
        choice: usize,
        /// The token id.
        token: u32,
        /// New text.
        text: String,
        /// Log-probabilities, when asked for.
        logprob: Option<TokenLogprob>,
    },
    /// A choice ended; `text` is what was held back and is now final.
    Finished {
        /// The choice.
        choice: usize,
        /// Why.
        reason: FinishReason,
        /// The last text.
        text: String,
        /// Token counts.
        usage: Usage,
    },
    /// The request failed inside the engine.
    Error(String),
}

/// The events of one request. Dropping it cancels the request and frees its blocks.
#[derive(Debug)]
pub struct Stream {
    rx: UnboundedReceiver<Event>,
    /// The request id.
    pub id: u64,
}

impl Stream {
    /// The next event, waiting for it (outside an async runtime); `None` once every choice has
    /// finished.
    pub fn next_blocking(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// The next event (async).
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

struct Pending {
    id: u64,
    req: Arc<Request>,
    choice: usize,
    adapter: Option<(String, u64)>,
    tx: UnboundedSender<Event>,
    arrival: Instant,
    /// A preempted sequence waiting to be recomputed.
    resume: Option<Box<Seq>>,
}

struct Seq {
    id: u64,
    choice: usize,
    req: Arc<Request>,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    blocks: Vec<usize>,
    hashes: Vec<BlockHash>,
    sampler: Sampler,
    history: TokenHistory,
    text: TextOutput,
    adapter: Option<Arc<LoraAdapter>>,
    /// The pinned adapter `(name, version)`, and the key it gives prefix-cache blocks.
    adapter_id: Option<(String, u64)>,
    adapter_key: String,
    tx: UnboundedSender<Event>,
    cached_tokens: usize,
    generated: usize,
    arrival: Instant,
    last_token: Option<Instant>,
    order: u64,
}

/// What an admission policy sees of a waiting request.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The request id ([`Stream::id`]).
    pub id: u64,
    /// The choice (0..n).
    pub choice: usize,
    /// When it was submitted.
    pub arrival: Instant,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The prefix-cache salt (the server's tenant key).
    pub cache_salt: String,
    /// The adapter it asks for.
    pub adapter: Option<String>,
    /// Whether it was running and was preempted.
    pub preempted: bool,
}

/// Decides in which order waiting requests are offered free KV blocks and batch slots.
pub trait Admission: Send {
    /// Indices into `queue` (arrival order, preempted sequences first), in the order to try.
    /// Indices left out wait for a later step.
    fn order(&mut self, queue: &[Queued]) -> Vec<usize>;

    /// Told when a waiting request starts running (again, when `preempted`).
    fn admitted(&mut self, _queued: &Queued) {}

    /// Told of tokens generated for a running request of `cache_salt`.
    fn generated(&mut self, _cache_salt: &str, _tokens: usize) {}
}

/// First come, first served (preempted sequences first).
#[derive(Debug, Default, Clone, Copy)]
pub struct Fcfs;

impl Admission for Fcfs {
    fn order(&mut self, queue: &[Queued]) -> Vec<usize> {
        (0..queue.len()).collect()
    }
}

enum Command {
    Submit(Box<Pending>),
}

/// The inference engine. Cheap to share behind an `Arc`; dropping it stops the scheduler once
/// running requests are done.
pub struct Engine {
    tx: Sender<Command>,
    adapters: Arc<AdapterStore>,
    metrics: Arc<Mutex<Metrics>>,
    next_id: std::sync::atomic::AtomicU64,
    max_context: usize,
    vocab_size: usize,
    waiting: Arc<Mutex<usize>>,
    max_waiting: usize,
    blocks_total: usize,
    block_size: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("blocks", &self.blocks_total)
            .finish()
    }
}

impl Engine {
    /// Starts the scheduler thread over `model` with first-come-first-served admission.
    /// `stop_ids` end generation unless a request names its own.
    pub fn start(
        model: Model,
        tokenizer: Tokenizer,
        stop_ids: Vec<u32>,
        cfg: EngineConfig,
    ) -> Result<Engine> {
        Engine::start_with(model, tokenizer, stop_ids, cfg, Box::new(Fcfs))
    }

    /// [`Engine::start`] with another admission policy (a weighted fair queue per tenant, …).
    pub fn start_with(
        model: Model,
        tokenizer: Tokenizer,
        stop_ids: Vec<u32>,
        cfg: EngineConfig,
        admission: Box<dyn Admission>,
    ) -> Result<Engine> {
        let mc = model.config().clone();
        let per_block = KvPool::bytes_per_block(
            mc.num_hidden_layers,
            cfg.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
        );
        let blocks = cfg.kv_bytes / per_block.max(1);
        if blocks < 2 || cfg.block_size == 0 {
            return Err(EngineError::Config(format!(
                "a KV budget of {} bytes holds {blocks} blocks of {} tokens; at least 2 are needed",
                cfg.kv_bytes, cfg.block_size
            )));
        }
        let adapters = Arc::new(AdapterStore::new(
            mc.clone(),
            model.dtype(),
            model.device().clone(),
            cfg.adapter_cache_bytes,
        ));
        let metrics = Arc::new(Mutex::new(Metrics::new(blocks)));
        let waiting = Arc::new(Mutex::new(0usize));
        let (tx, rx) = channel();
        let pool = KvPool::new(
            mc.num_hidden_layers,
            blocks,
            cfg.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
            model.dtype(),
            model.device(),
        );
        let mut sched = Scheduler {
            model,
            tokenizer,
            stop_ids,
            cfg: cfg.clone(),
            blocks: BlockManager::new(blocks, cfg.block_size),
            pool,
            running: Vec::new(),
            waiting: VecDeque::new(),
            prefilled: HashSet::new(),
            adapters: adapters.clone(),
            metrics: metrics.clone(),
            waiting_count: waiting.clone(),
            order: 0,
            admission,
        };
        std::thread::Builder::new()
            .name("fount-scheduler".into())
            .spawn(move || sched.run(rx))
            .map_err(|e| EngineError::Config(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine {
            tx,
            adapters,
            metrics,
            next_id: std::sync::atomic::AtomicU64::new(0),
            max_context: mc.max_position_embeddings,
            vocab_size: mc.vocab_size,
            waiting,
            max_waiting: cfg.max_waiting,
            blocks_total: blocks,
            block_size: cfg.block_size,
        })
    }

    /// The adapter store (register adapters here).
    pub fn adapters(&self) -> &AdapterStore {
        &self.adapters
    }

    /// The model's vocabulary size (token ids must be below it).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// KV blocks in the pool.
    pub fn kv_blocks(&self) -> usize {
        self.blocks_total
    }

    /// Checks and enqueues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: Request) -> Result<Stream> {
        if req.prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        if req.prompt.len() >= self.max_context {
            return Err(EngineError::Invalid(format!(
                "the prompt has {} tokens; the model's context is {}",
                req.prompt.len(),
                self.max_context
            )));
        }
        if req.prompt.len() + 1 > self.blocks_total * self.block_size {
            return Err(EngineError::Invalid(
                "the prompt does not fit in the KV cache".into(),
            ));
        }
        if req.n == 0 || req.n > 16 {
            return Err(EngineError::Invalid(format!(
                "n must be between 1 and 16, not {}",
                req.n
            )));
        }
        if req.n > self.max_waiting {
            // it could never be queued: not a matter of retrying later
            return Err(EngineError::Invalid(format!(
                "n = {} exceeds the {} requests the queue holds",
                req.n, self.max_waiting
            )));
        }
        if req.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        req.sampling
            .validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let adapter = match &req.adapter {
            None => None,
            Some(name) => {
                let v = self
                    .adapters
                    .current(name)
                    .ok_or_else(|| EngineError::UnknownAdapter(name.clone()))?;
                // start loading now, off the scheduling path
                let _ = self.adapters.get(name, v);
                Some((name.clone(), v))
            }
        };
        {
            let mut w = self.waiting.lock().map_err(|_| EngineError::Stopped)?;
            if *w + req.n > self.max_waiting {
                return Err(EngineError::QueueFull(self.max_waiting));
            }
            *w += req.n;
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let (etx, erx) = unbounded_channel();
        let req = Arc::new(req);
        let tx = &self.tx;
        for choice in 0..req.n {
            let p = Pending {
                id,
                req: req.clone(),
                choice,
                adapter: adapter.clone(),
                tx: etx.clone(),
                arrival: Instant::now(),
                resume: None,
            };
            tx.send(Command::Submit(Box::new(p)))
                .map_err(|_| EngineError::Stopped)?;
        }
        Ok(Stream { rx: erx, id })
    }

    /// Current metrics.
    pub fn metrics(&self) -> MetricsSnapshot {
        let (resident, bytes) = self.adapters.resident();
        self.metrics
            .lock()
            .map(|m| m.snapshot(resident, bytes))
            .unwrap_or_default()
    }
}

struct Scheduler {
    model: Model,
    tokenizer: Tokenizer,
    stop_ids: Vec<u32>,
    cfg: EngineConfig,
    blocks: BlockManager,
    pool: KvPool,
    running: Vec<Seq>,
    waiting: VecDeque<Pending>,
    /// Requests whose first choice has finished its prompt (later choices wait for it, so they
    /// find the prompt's blocks in the prefix cache).
    prefilled: HashSet<u64>,
    adapters: Arc<AdapterStore>,
    metrics: Arc<Mutex<Metrics>>,
    waiting_count: Arc<Mutex<usize>>,
    order: u64,
    admission: Box<dyn Admission>,
}

enum Admit {
    Admitted,
    NotYet,
    Failed(String),
}

impl Scheduler {
    fn run(&mut self, rx: Receiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => return,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.command(c);
            }
            self.drop_cancelled();
            self.admit();
            if self.running.is_empty() {
                // waiting only on adapter loads or on blocks
                match rx.recv_timeout(Duration::from_millis(1)) {
                    Ok(c) => self.command(c),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if self.waiting.is_empty() => return,
                    Err(RecvTimeoutError::Disconnected) => {}
                }
                continue;
            }
            if let Err(e) = self.step() {
                for s in std::mem::take(&mut self.running) {
                    let _ = s.tx.send(Event::Error(e.to_string()));
                    self.free(s);
                }
                self.publish();
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(p) => self.waiting.push_back(*p),
        }
    }

    fn set_waiting(&self) {
        if let Ok(mut w) = self.waiting_count.lock() {
            *w = self.waiting.len();
        }
        self.publish();
    }

    fn publish(&self) {
        if let Ok(mut m) = self.metrics.lock() {
            m.state(
                self.waiting.len(),
                self.running.len(),
                self.blocks.used(),
                self.blocks.lookups,
                self.blocks.hits,
            );
        }
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|p| !p.tx.is_closed());
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let s = self.running.swap_remove(i);
                self.free(s);
            } else {
                i += 1;
            }
        }
        self.set_waiting();
    }

    fn free(&mut self, s: Seq) {
        for &b in &s.blocks {
            self.blocks.release(b);
        }
    }

    fn admit(&mut self) {
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
    fn preempt_newest(&mut self) -> Option<u64> {
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

    fn step(&mut self) -> Result<()> {
        let bs = self.cfg.block_size;
        // decoding sequences first, then prefill, in admission order
        self.running
            .sort_by_key(|s| (s.tokens.len() - s.computed > 1, s.order));
        let mut budget = self.cfg.max_step_tokens.max(1);
        let mut plan: Vec<(u64, usize)> = Vec::new(); // (order, tokens this step)
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
        if plan.is_empty() {
            return Ok(());
        }
        // group by adapter, so each adapter is one contiguous segment
        let mut idx: Vec<(usize, usize)> = plan
            .iter()
            .filter_map(|(o, c)| {
                self.running
                    .iter()
                    .position(|s| s.order == *o)
                    .map(|p| (p, *c))
            })
            .collect();
        idx.sort_by(|a, b| {
            self.running[a.0]
                .adapter_key
                .cmp(&self.running[b.0].adapter_key)
                .then(self.running[a.0].order.cmp(&self.running[b.0].order))
        });
        let mut batch = Batch::default();
        let mut lora = LoraBatch::none();
        let mut past = Vec::with_capacity(idx.len());
        for &(p, chunk) in &idx {
            let s = &self.running[p];
            let start = batch.len();
            batch.push(&s.tokens[s.computed..s.computed + chunk], s.computed);
            past.push(s.computed);
            if let Some(a) = &s.adapter {
                lora.push(start..batch.len(), a.clone());
            }
        }
        let tables: Vec<&[usize]> = idx
            .iter()
            .map(|&(p, _)| self.running[p].blocks.as_slice())
            .collect();
        let started = Instant::now();
        let out = {
            let mut view = PagedView {
                pool: &mut self.pool,
                tables: &tables,
                past: &past,
            };
            self.model.forward_lora(
                &batch,
                &mut view,
                Logits::Last,
                &lora,
                self.cfg.batch_invariant,
            )?
        };
        let mut logits = out.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let step_time = started.elapsed();
        let mut finished = Vec::new();
        let mut generated = 0;
        for (row, &(p, chunk)) in idx.iter().enumerate() {
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
        if let Ok(mut m) = self.metrics.lock() {
            m.step(batch.len(), generated, step_time);
        }
        self.publish();
        Ok(())
    }
}

/// Samples the next token of `s` from its logits, streams it, and says whether `s` finished.
fn sample_one(
    s: &mut Seq,
    logits: &mut [f32],
    tok: &Tokenizer,
    default_stops: &[u32],
    max_ctx: usize,
) -> bool {
    let logprob_of = |logits: &[f32], k: usize| -> (Vec<f32>, Vec<(u32, f32)>) {
        let mut lp = Vec::new();
        log_softmax(logits, &mut lp);
        let mut order: Vec<u32> = (0..lp.len() as u32).collect();
        let k = k.min(order.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
            order.truncate(k);
            order.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
        } else {
            order.clear();
        }
        let top = order.iter().map(|&t| (t, lp[t as usize])).collect();
        (lp, top)
    };
    let lp = s.req.logprobs.map(|k| logprob_of(logits, k));
    let next = s.sampler.sample(logits, &s.history);
    let stops = if s.req.stop_token_ids.is_empty() {
        default_stops
    } else {
        &s.req.stop_token_ids
    };
    let usage = |s: &Seq| Usage {
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated,
        cached_tokens: s.cached_tokens,
    };
    if stops.contains(&next) {
        let text = flush(s, tok);
        let _ = s.tx.send(Event::Finished {
            choice: s.choice,
            reason: FinishReason::Stop,
            text: text.0,
            usage: usage(s),
        });
        return true;
    }
    s.tokens.push(next);
    s.history.push(next);
    s.generated += 1;
    if let Some(meter) = &s.req.meter {
        meter.completion_tokens.fetch_add(1, Ordering::SeqCst);
    }
    let logprob = lp.map(|(all, top)| TokenLogprob {
        logprob: all.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top,
    });
    let (text, stopped) = match s.text.push(tok, next) {
        Ok(t) => t,
        Err(e) => {
            let _ =
                s.tx.send(Event::Error(format!("decoding token {next}: {e}")));
            return true;
        }
    };
    let _ = s.tx.send(Event::Token {
        choice: s.choice,
        token: next,
        text,
        logprob,
    });
    let length = s.generated >= s.req.max_tokens || s.tokens.len() >= max_ctx;
    if stopped || length {
        let (text, stop_in_flush) = if stopped {
            (String::new(), true)
        } else {
            flush(s, tok)
        };
        let reason = if stopped || stop_in_flush {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let _ = s.tx.send(Event::Finished {
            choice: s.choice,
            reason,
            text,
            usage: usage(s),
        });
        return true;
    }
    false
}

/// The text still held back at the end; whether it completed a stop string.
fn flush(s: &mut Seq, tok: &Tokenizer) -> (String, bool) {
    match s.text.finish(tok) {
        Ok(t) => t,
        Err(e) => {
            let _ =
                s.tx.send(Event::Error(format!("decoding the last tokens: {e}")));
            (String::new(), false)
        }
    }
}
