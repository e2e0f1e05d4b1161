//! The one error type of `fount-ledger`.

use crate::merkle::ProofError;

/// Everything that can go wrong in the ledger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store refused or failed an operation.
    #[error(transparent)]
    Store(#[from] fount_store::Error),
    /// A file could not be read or written (the message names it).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A key that cannot be used.
    #[error("ledger key: {0}")]
    Key(String),
    /// A note that is malformed or whose signature does not verify.
    #[error("{0}")]
    Note(String),
    /// A checkpoint that is malformed.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A proof that does not verify.
    #[error(transparent)]
    Proof(#[from] ProofError),
    /// An entry that cannot be logged or read.
    #[error("entry: {0}")]
    Entry(String),
    /// Something that was checked does not match what the log says.
    #[error("{0}")]
    Mismatch(String),
    /// JSON that cannot be read.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
