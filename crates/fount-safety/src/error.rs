//! Errors of policies and rules.

/// What can go wrong reading a policy or a rule list.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A category name that is not one of [`crate::Category::ALL`].
    #[error("unknown category {0:?} (docs/safety.md lists the categories)")]
    UnknownCategory(String),
    /// A regular expression that does not compile.
    #[error("invalid pattern {pattern:?}: {reason}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// A file that is not valid TOML or has unknown fields.
    #[error("{0}")]
    Toml(String),
    /// Anything else a policy or rule list gets wrong.
    #[error("{0}")]
    Invalid(String),
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;
