//! The one error type of `fount-train`.

use std::path::PathBuf;

/// Everything that can go wrong in training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A configuration file that does not parse.
    #[error("{path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the line and the field).
        reason: String,
    },
    /// A setting whose value cannot run.
    #[error("{field} {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong with it, as the rest of a sentence (`must be at least 1`).
        reason: String,
    },
    /// A line of an input file that cannot be used.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// The line, 1-based.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// An input (a data file, the shards, the base model) that cannot be used as a whole.
    #[error("{path}: {reason}")]
    Input {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The output directory already holds what a run would write; nothing is overwritten.
    #[error("{dir} already holds {what}")]
    Exists {
        /// The output directory.
        dir: PathBuf,
        /// What it holds, and what to do about it.
        what: &'static str,
    },
    /// A checkpoint that this run cannot continue from.
    #[error("{dir} {reason}")]
    Resume {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Why not.
        reason: String,
    },
    /// A batch, its targets and its mask that do not fit together (a caller's bug, or a model
    /// that is not what the run expects).
    #[error("{0}")]
    Batch(String),
    /// A conversation that cannot be trained on (no assistant turn; a chat template that does
    /// not render conversations as prefixes of each other).
    #[error("{0}")]
    Conversation(String),
    /// The optimizer's state does not fit the parameters it is given.
    #[error("optimizer: {0}")]
    Optimizer(String),
    /// The collective (MPI) failed.
    #[error("collective: {0}")]
    Collective(String),
}

impl Error {
    /// A setting whose value cannot run: `field` and the rest of the sentence, `reason`.
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
