//! The one error type of `fount-model`.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written (the message names the path: files are opened
    /// through `fs-err`).
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// A file that must exist in the model directory is absent.
    #[error("{path} not found: a model directory needs {what}")]
    MissingFile {
        /// The expected path.
        path: PathBuf,
        /// What the file is for.
        what: &'static str,
    },

    /// A JSON file did not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The parser's message (names the line and column).
        source: serde_json::Error,
    },

    /// `config.json` names an architecture fount does not implement.
    #[error("unsupported architecture {found:?} in config.json (supported: {supported})")]
    UnknownArchitecture {
        /// What the file says.
        found: String,
        /// The architectures fount knows.
        supported: &'static str,
    },

    /// `config.json` lacks a field this architecture needs, or has a value fount cannot use.
    #[error("config.json: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it is unusable.
        reason: String,
    },

    /// A safetensors file is malformed (truncated, bad header, offsets out of range).
    #[error("{path}: not a valid safetensors file: {source}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        source: safetensors::SafeTensorError,
    },

    /// A tensor holds a data type fount cannot read there.
    #[error("tensor {name:?} in {path} has data type {dtype}, expected F32, F16, BF16 or F64")]
    TensorDtype {
        /// The checkpoint name of the tensor.
        name: String,
        /// The file.
        path: PathBuf,
        /// The data type in the file.
        dtype: String,
    },

    /// A tensor the architecture needs is not in the weight files.
    #[error("tensor {name:?} is missing from the weights in {dir}")]
    MissingTensor {
        /// The checkpoint name of the tensor.
        name: String,
        /// The model directory.
        dir: PathBuf,
    },

    /// A tensor has a shape that does not match the configuration.
    #[error("tensor {name:?} has shape {actual:?}, but config.json implies {expected:?}")]
    TensorShape {
        /// The checkpoint name of the tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },

    /// A prompt (plus what is to be generated) does not fit the model's context.
    #[error(
        "{tokens} tokens exceed the model's context of {max} tokens (max_position_embeddings)"
    )]
    ContextLength {
        /// Tokens needed.
        tokens: usize,
        /// The model's limit.
        max: usize,
    },

    /// An empty prompt: there is nothing to condition on.
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,

    /// A batch whose parts disagree (token count, positions, sequences).
    #[error("invalid batch: {0}")]
    Batch(String),

    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template failed to load or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// An invalid sampling parameter.
    #[error("sampling parameter {param}: {reason}")]
    Sampling {
        /// The parameter's name as the API spells it.
        param: &'static str,
        /// What is wrong with the value.
        reason: String,
    },

    /// An unknown preset for `fount model init`.
    #[error("unknown preset {found:?} for {arch} (available: {available})")]
    UnknownPreset {
        /// What was asked for.
        found: String,
        /// The architecture.
        arch: String,
        /// The presets there are.
        available: String,
    },

    /// An output path already holds what would be written there; nothing is overwritten.
    #[error("{path} already holds {what}")]
    Exists {
        /// The output path.
        path: PathBuf,
        /// What it holds.
        what: &'static str,
    },

    /// An adapter that cannot be applied (merged) to the base it is given.
    #[error("{path}: {reason}")]
    Adapter {
        /// The adapter directory.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },

    /// The destination of a finished output is a directory with something in it.
    #[error("{path} is not empty; the finished output is in {staged}")]
    NotEmpty {
        /// The destination.
        path: PathBuf,
        /// Where the output was left.
        staged: PathBuf,
    },

    /// A GGUF file is malformed, or holds what fount cannot run (the reason names the tensor or
    /// metadata key).
    #[error("{path}: {reason}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
