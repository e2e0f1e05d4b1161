//! The one error type of `fount-train`.

use std::path::PathBuf;

/// Everything that can go wrong in training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model could not be read or run.
    #[error(transparent)]
    Model(#[from] fount_model::Error),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A safetensors file is malformed.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration or input that cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
