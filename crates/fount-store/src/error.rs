//! The one error type of `fount-store`.

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed an operation.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A file or directory could not be used.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A database URL fount cannot use.
    #[error("unsupported database URL {0:?} (sqlite://… or postgres://…)")]
    Url(String),
    /// A name or value that cannot be stored.
    #[error("{0}")]
    Invalid(String),
    /// A change that the record's current state does not allow (or that another writer made
    /// first).
    #[error("{0}")]
    Conflict(String),
    /// The tenant, key or record does not exist.
    #[error("{0} not found")]
    NotFound(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
