//! Errors of the data pipeline.

use std::path::PathBuf;

/// Everything that can go wrong while reading, curating or sharding data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error (the path is in the message, from `fs-err`).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A JSON line that does not parse.
    #[error("{path}:{line}: malformed JSON: {reason}")]
    MalformedJson {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What the parser said.
        reason: String,
    },
    /// A line or file that is not valid UTF-8.
    #[error("{path}:{line}: invalid UTF-8 at byte {offset} of the line")]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// The 1-based line number (1 for whole-file readers).
        line: u64,
        /// Byte offset of the first invalid byte within the line.
        offset: usize,
    },
    /// A record without the configured text field (or with a non-string one).
    #[error("{path}:{line}: no string field `{field}` in the record")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The 1-based line (or row) number.
        line: u64,
        /// The field that was expected.
        field: String,
    },
    /// An input path that does not exist or holds no readable documents.
    #[error("{path}: {reason}")]
    BadInput {
        /// The input.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A Parquet file that cannot be read.
    #[error("{path}: {reason}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What the Parquet reader said.
        reason: String,
    },
    /// A JSON serialisation error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A pipeline file that does not parse or names an unknown stage.
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// Tokenizer training or loading failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Training the tokenizer failed.
    #[error("tokenizer: {0}")]
    TokenizerTraining(#[from] fount_tokenizer::Error),
    /// A shard file that is not in the documented format.
    #[error("{path}: not a fount token shard: {reason}")]
    Shard {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A sampler position that does not belong to this shard set.
    #[error("sampler: {0}")]
    Sampler(String),
    /// A run directory that cannot be resumed or inspected.
    #[error("{path}: {reason}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
