//! The per-request token meter the engine counts into.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Token counts of one request, kept by the engine as it works: prompt and cached tokens when
/// each prompt's first choice is admitted, one completion token per token generated (stop
/// tokens excluded, as in [`Usage`](crate::Usage)). A metering layer gives each request one and learns the
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
