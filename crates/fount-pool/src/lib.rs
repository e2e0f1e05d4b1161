//! `fount-pool`: the compute pool. Tenants submit jobs (a `fount train …`, `fount finetune …` or
//! `fount data run …` command line); the pool decides what runs, holds each tenant to its
//! quotas and its weighted fair share, and when a job of higher priority waits it stops a
//! lower one at a checkpoint and resumes it later, losing nothing.
//!
//! - [`schedule`]: the decision, a pure function (priorities, fair share with decay, budgets,
//!   preemption that cannot ping-pong).
//! - [`pool`]: the loop that follows attempts, ends them, signals them, and acts on decisions;
//!   its order of writes is what makes a `kill -9` of the pool lose nothing.
//! - [`executor`]: local child processes, or Slurm batch jobs.
//!
//! Job records, their states and the one function that changes them live in
//! [`fount_store::jobs`]: the store is where the pool, `fount jobs` and the API meet.
//!
//! ```no_run
//! # async fn run() -> fount_pool::Result<()> {
//! use fount_pool::{executor::Local, Pool, PoolConfig};
//! let store = fount_store::Store::open("data", None).await?;
//! let exec = Box::new(Local::new("/usr/local/bin/fount".into()));
//! let mut pool = Pool::new(store, exec, PoolConfig::default());
//! pool.tick().await?;
//! # Ok(()) }
//! ```

pub mod error;
pub mod executor;
pub mod pool;
pub mod schedule;

pub use error::{Error, Result};
pub use pool::{newest_checkpoint, resume_args, tail, Pool, PoolConfig};
