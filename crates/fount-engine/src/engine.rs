//! The engine handle: its settings, starting the scheduler thread, and checking requests at
//! the door.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fount_model::{Model, Tokenizer};
use tokio::sync::mpsc::unbounded_channel;

use crate::adapters::AdapterStore;
use crate::admission::{Admission, Fcfs};
use crate::blocks::BlockManager;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::paged::KvPool;
use crate::request::{Request, Stream};
use crate::scheduler::{Pending, Scheduler};

/// The most choices (`n`) one request may ask for; the server refuses more before submitting.
pub const MAX_N: usize = 16;

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

pub(crate) enum Command {
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
            return Err(Error::Config(format!(
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
            .map_err(|e| Error::Config(format!("cannot start the scheduler thread: {e}")))?;
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
            return Err(Error::Invalid("the prompt is empty".into()));
        }
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        if req.prompt.len() >= self.max_context {
            return Err(Error::Invalid(format!(
                "the prompt has {} tokens; the model's context is {}",
                req.prompt.len(),
                self.max_context
            )));
        }
        if req.prompt.len() + 1 > self.blocks_total * self.block_size {
            return Err(Error::Invalid(
                "the prompt does not fit in the KV cache".into(),
            ));
        }
        if req.n == 0 || req.n > MAX_N {
            return Err(Error::Invalid(format!(
                "n must be between 1 and {MAX_N}, not {}",
                req.n
            )));
        }
        if req.n > self.max_waiting {
            // it could never be queued: not a matter of retrying later
            return Err(Error::Invalid(format!(
                "n = {} exceeds the {} requests the queue holds",
                req.n, self.max_waiting
            )));
        }
        if req.max_tokens == 0 {
            return Err(Error::Invalid("max_tokens must be at least 1".into()));
        }
        req.sampling
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let adapter = match &req.adapter {
            None => None,
            Some(name) => {
                let v = self
                    .adapters
                    .current(name)
                    .ok_or_else(|| Error::UnknownAdapter(name.clone()))?;
                // start loading now, off the scheduling path
                let _ = self.adapters.get(name, v);
                Some((name.clone(), v))
            }
        };
        {
            let mut w = self.waiting.lock().map_err(|_| Error::Stopped)?;
            if *w + req.n > self.max_waiting {
                return Err(Error::QueueFull(self.max_waiting));
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
                .map_err(|_| Error::Stopped)?;
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
