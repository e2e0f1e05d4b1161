//! fount-engine: serves one base model to many requests and many LoRA adapters at once.
//!
//! - **Continuous batching** ([`Engine`]): requests join and leave the running batch between
//!   forward steps; prompts are prefilled in chunks under a per-step token budget, after every
//!   decoding sequence has its token, so a long prompt never stalls running streams for more than
//!   one step.
//! - **Paged KV cache** ([`paged`], [`blocks`]): fixed-size blocks from a pool sized by a memory
//!   budget; when blocks run out the newest sequence is preempted and recomputed later.
//! - **Prefix cache**: full blocks are keyed by a SHA-256 hash chain over (cache salt, adapter
//!   and version, tokens), shared by reference count and evicted least recently used.
//! - **Adapters per request** ([`adapters`]): one batch mixes sequences on different adapters and
//!   on the bare model; the LoRA delta is computed per adapter segment, never merged into the
//!   base weights. Adapters load in the background and are pinned per request by version.
//! - **Streams** ([`Stream`]): text deltas, token ids, log-probabilities, finish reasons and
//!   usage with cached prompt tokens; dropping a stream cancels its request.
//! - **Fairness** ([`fair`]): admission is a pluggable policy; [`fair::FairQueue`] is a weighted
//!   fair queue by tenant.
//! - **Metrics** ([`MetricsSnapshot`]).
//!
//! With `batch_invariant` on (the default), every token is computed by kernels whose result for
//! one row does not depend on the other rows, so a request's greedy output is the same alone as
//! in any batch, bit for bit.

pub mod adapters;
mod admission;
pub mod blocks;
mod engine;
mod error;
pub mod fair;
mod meter;
mod metrics;
pub mod paged;
mod request;
mod scheduler;

pub use admission::{Admission, Fcfs, Queued};
pub use engine::{Engine, EngineConfig, MAX_N};
pub use error::{Error, Result};
pub use meter::RequestMeter;
pub use metrics::{Metrics, MetricsSnapshot};
pub use request::{Event, FinishReason, Request, Stream, TokenLogprob, Usage};
