//! Where attempts run: local child processes ([`Local`]) or a Slurm cluster ([`Slurm`]).
//!
//! An executor starts one attempt of a job as a `fount …` command line, says whether it still
//! runs and how it ended, signals it, and finds it again after the pool restarted. It keeps no
//! state that the pool cannot rebuild: the handle it returns is stored with the job before the
//! pool relies on it, and [`Executor::find`] recovers an attempt whose handle was never stored.

pub mod local;
pub mod slurm;

use std::path::PathBuf;

pub use local::Local;
pub use slurm::Slurm;

use crate::error::Result;

/// One attempt to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job's id.
    pub job_id: String,
    /// The attempt number (1, 2, …).
    pub attempt: i64,
    /// The `fount` command line, without `fount` (with `--resume` added for a resumed attempt).
    pub args: Vec<String>,
    /// The job's log file (appended to).
    pub log: PathBuf,
    /// The working directory.
    pub cwd: PathBuf,
}

/// How an attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Still running (or, on Slurm, waiting in Slurm's own queue).
    Running,
    /// It ended: its exit status, `None` when it was killed by a signal or the status cannot be
    /// known (a process adopted after a restart is not the pool's child).
    Exited(Option<i32>),
}

/// The exit status with which `fount train` and `fount finetune` report that they stopped on
/// a signal after writing a checkpoint (`EX_TEMPFAIL`: "try again later").
pub const EXIT_CHECKPOINTED: i32 = 75;

/// Starts, follows and signals attempts.
pub trait Executor: Send {
    /// `local` or `slurm`.
    fn name(&self) -> &'static str;
    /// Starts an attempt; returns its handle.
    fn start(&mut self, launch: &Launch) -> Result<String>;
    /// How the attempt behind `handle` stands.
    fn status(&mut self, handle: &str) -> Result<Status>;
    /// Asks it to stop: SIGTERM, on which fount's commands checkpoint and exit.
    fn terminate(&mut self, handle: &str) -> Result<()>;
    /// Kills it (SIGKILL), when the grace period is over.
    fn kill(&mut self, handle: &str) -> Result<()>;
    /// The handle of attempt `attempt` of `job_id` if it runs, found without a stored handle.
    fn find(&mut self, job_id: &str, attempt: i64) -> Result<Option<String>>;
}

/// The environment variable naming the job and attempt (`job-….N`) of a process the pool
/// started.
pub const JOB_ENV: &str = "FOUNT_JOB";
