//! The one error type of `fount-pool`.

/// Everything that can go wrong in the pool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store refused or failed an operation.
    #[error(transparent)]
    Store(#[from] fount_store::Error),
    /// A file, a process or a pipe could not be used.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The executor could not start, follow or signal an attempt.
    #[error("{executor} executor: {message}")]
    Executor {
        /// `local` or `slurm`.
        executor: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A job the pool cannot accept.
    #[error("{0}")]
    Refused(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
