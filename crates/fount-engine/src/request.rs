//! What a caller hands the engine and what it gets back: requests, streams and their events.

use std::sync::Arc;

use fount_model::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::meter::RequestMeter;

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
    pub(crate) rx: UnboundedReceiver<Event>,
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
