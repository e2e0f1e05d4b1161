//! `fount-ledger`: a transparency log of where every dataset, model, adapter, deployment and bill
//! came from, kept in the store (SQLite or PostgreSQL) and checkable by tools nobody here wrote.
//!
//! The formats are the standards': RFC 6962 hashing and proofs ([`merkle`]); checkpoints per
//! C2SP `tlog-checkpoint` ([`checkpoint`]) signed as C2SP `signed-note` with Ed25519 ([`note`]);
//! the log served as C2SP `tlog-tiles` ([`tiles`]); entries are in-toto Statement v1 JSON, with
//! SLSA Provenance v1 for runs ([`statement`]); witnesses per C2SP `tlog-witness` and
//! `tlog-cosignature` ([`witness`]); offline proofs per C2SP `tlog-proof` in each artifact's
//! `provenance.json` ([`provenance`]).
//!
//! ```no_run
//! # async fn run() -> fount_ledger::Result<()> {
//! use fount_ledger::{statement, Ledger};
//! let store = fount_store::Store::open("data", None).await?;
//! let ledger = Ledger::open(store, "data".as_ref())?;
//! let st = statement::statement(&[], statement::ADMIN_PREDICATE, serde_json::json!({"act": "hello"}));
//! let index = ledger.log("admin", &st).await?;
//! println!("entry {index}; {}", ledger.checkpoint().await?);
//! # Ok(()) }
//! ```

pub mod audit;
pub mod checkpoint;
pub mod error;
pub mod log;
pub mod merkle;
pub mod note;
pub mod provenance;
pub mod statement;
pub mod tiles;
pub mod usage;
pub mod verify;
pub mod witness;

pub use error::{Error, Result};
pub use log::{Appended, Appender, Ledger};
