//! The scheduler: one thread that runs continuous batching over the paged KV cache.
//!
//! Every step the scheduler (1) takes new requests, (2) admits waiting ones in arrival order
//! while KV blocks last (reusing cached prefix blocks), (3) gives every decoding sequence its one
//! token and fills the rest of the step's token budget with prefill chunks, (4) preempts the
//! newest sequence when blocks run out (its blocks are freed and it is recomputed later, reusing
//! whatever of its prefix is still cached), (5) runs one forward over the packed batch with
//! sequences grouped by adapter, and (6) samples, streams and finishes.

mod admit;
mod sample;
mod step;

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fount_model::{LoraAdapter, Model, Sampler, TextOutput, TokenHistory, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::adapters::AdapterStore;
use crate::admission::Admission;
use crate::blocks::{BlockHash, BlockManager};
use crate::engine::{Command, EngineConfig};
use crate::metrics::Metrics;
use crate::paged::KvPool;
use crate::request::{Event, Request};

pub(crate) struct Pending {
    pub(crate) id: u64,
    pub(crate) req: Arc<Request>,
    pub(crate) choice: usize,
    pub(crate) adapter: Option<(String, u64)>,
    pub(crate) tx: UnboundedSender<Event>,
    pub(crate) arrival: Instant,
    /// A preempted sequence waiting to be recomputed.
    pub(crate) resume: Option<Box<Seq>>,
}

pub(crate) struct Seq {
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

pub(crate) struct Scheduler {
    pub(crate) model: Model,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) stop_ids: Vec<u32>,
    pub(crate) cfg: EngineConfig,
    pub(crate) blocks: BlockManager,
    pub(crate) pool: KvPool,
    pub(crate) running: Vec<Seq>,
    pub(crate) waiting: VecDeque<Pending>,
    /// Requests whose first choice has finished its prompt (later choices wait for it, so they
    /// find the prompt's blocks in the prefix cache).
    pub(crate) prefilled: HashSet<u64>,
    pub(crate) adapters: Arc<AdapterStore>,
    pub(crate) metrics: Arc<Mutex<Metrics>>,
    pub(crate) waiting_count: Arc<Mutex<usize>>,
    pub(crate) order: u64,
    pub(crate) admission: Box<dyn Admission>,
}

enum Admit {
    Admitted,
    NotYet,
    Failed(String),
}

impl Scheduler {
    pub(crate) fn run(&mut self, rx: Receiver<Command>) {
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
}
