//! Errors of the engine.

/// What `submit` and the engine report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (empty prompt, bad parameters, too long).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request names an adapter that is not registered.
    #[error("unknown adapter {0:?}")]
    UnknownAdapter(String),
    /// The waiting queue is full.
    #[error("the engine is at capacity ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The engine settings cannot work.
    #[error("engine configuration: {0}")]
    Config(String),
    /// The scheduler has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// The model failed.
    #[error(transparent)]
    Model(#[from] fount_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
