//! The admission seam: which waiting request is offered blocks and a batch slot next.

use std::time::Instant;

/// What an admission policy sees of a waiting request.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The request id ([`Stream::id`](crate::Stream::id)).
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
