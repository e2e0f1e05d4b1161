//! Jobs of the compute pool: their records, their history, and the one function that owns every
//! change of state.
//!
//! A job's state changes only through
//! [`Store::transition_job`](crate::Store::transition_job), which applies [`next`] and writes the
//! new state with a compare-and-set on the state and the attempt number read before:
//! a change computed from a stale record matches no row and is refused, so two writers (the pool
//! and `fount jobs cancel`) can never both move one job. Every change appends a row to
//! `job_events` in the same transaction, and an attempt that ends writes its usage record
//! (`kind = 'training'`, id `job-….N`) there too: exactly once, by the record's primary key.
//!
//! ```text
//! queued ──start──▶ running ──succeed──▶ succeeded
//!   ▲                 │ │ └──fail──────▶ failed
//!   │                 │ └────cancel────▶ cancelled ◀──cancel── queued, preempted, paused
//!   └──requeue── preempted ◀──preempt──┘
//!   ▲                 │
//!   │                 └──pause──▶ paused ◀──pause── queued, preempted
//!   └──────────resume───────────────┘
//! ```

//!
//! - this file: the states, the transitions and [`next`], and the types of a job;
//! - `records.rs`: submitting, reading and changing jobs;
//! - `pool.rs`: what the pool reads and holds besides jobs: quotas, slot usage, its lease.

use std::fmt;

mod pool;
mod records;

pub use records::Ask;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Waiting for a slot (the record's `reason` says why it has none yet).
    Queued,
    /// An attempt is running on an executor.
    Running,
    /// Its attempt was stopped to make room (or its process was lost); it is requeued next.
    Preempted,
    /// Held by its owner (at a checkpoint when it was running) until resumed.
    Paused,
    /// The command exited 0.
    Succeeded,
    /// The command failed; the record carries the error and the last lines of its log.
    Failed,
    /// Cancelled by its owner or an operator.
    Cancelled,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Preempted,
        JobState::Paused,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The lower-case name, as stored and printed.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Preempted => "preempted",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses [`JobState::name`].
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.name() == s)
    }

    /// Whether nothing can happen to the job any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// An attempt starts (a new attempt number).
    Start,
    /// The attempt exited 0.
    Succeed,
    /// The attempt failed.
    Fail,
    /// The attempt was stopped to make room, or its process was lost.
    Preempt,
    /// A preempted job waits for a slot again.
    Requeue,
    /// The owner cancelled it.
    Cancel,
    /// The owner holds it (a running attempt ends at a checkpoint first).
    Pause,
    /// The owner lets a paused job wait for a slot again.
    Resume,
}

impl Transition {
    /// Every transition.
    pub const ALL: [Transition; 8] = [
        Transition::Start,
        Transition::Succeed,
        Transition::Fail,
        Transition::Preempt,
        Transition::Requeue,
        Transition::Cancel,
        Transition::Pause,
        Transition::Resume,
    ];
}

/// The state after `t` from `from`, or `None` when `t` cannot happen in `from`. The only place
/// that decides which changes are legal.
pub fn next(from: JobState, t: Transition) -> Option<JobState> {
    use JobState::*;
    use Transition::*;
    match (from, t) {
        (Queued, Start) => Some(Running),
        (Running, Succeed) => Some(Succeeded),
        (Running, Fail) => Some(Failed),
        (Running, Preempt) => Some(Preempted),
        (Preempted, Requeue) => Some(Queued),
        (Queued | Running | Preempted | Paused, Cancel) => Some(Cancelled),
        (Queued | Running | Preempted, Pause) => Some(Paused),
        (Paused, Resume) => Some(Queued),
        _ => None,
    }
}

/// A job's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Runs when nothing else waits; preempted first.
    Low,
    /// The default.
    Normal,
    /// Preempts lower classes when no slot is free.
    High,
}

impl Priority {
    /// Every class, lowest first.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// Parses [`Priority::name`].
    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.name() == s)
    }

    fn rank(self) -> i64 {
        self as i64
    }

    fn from_rank(r: i64) -> Priority {
        match r {
            i64::MIN..=0 => Priority::Low,
            1 => Priority::Normal,
            _ => Priority::High,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stop {
    /// To make room for a job of higher priority: it checkpoints and is requeued.
    Preempt,
    /// Its tenant's slot-second budget ran out: it checkpoints and waits for the next period.
    Budget,
    /// Its owner cancelled it.
    Cancel,
    /// It ran past its time limit: it fails.
    TimeLimit,
    /// Its owner paused it: it checkpoints and waits, held, until resumed.
    Pause,
}

impl Stop {
    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Preempt => "preempt",
            Stop::Budget => "budget",
            Stop::Cancel => "cancel",
            Stop::TimeLimit => "time_limit",
            Stop::Pause => "pause",
        }
    }

    fn parse(s: &str) -> Option<Stop> {
        [
            Stop::Preempt,
            Stop::Budget,
            Stop::Cancel,
            Stop::TimeLimit,
            Stop::Pause,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// A job as submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// The tenant it runs for.
    pub tenant_id: String,
    /// A label.
    pub name: Option<String>,
    /// Its class.
    pub priority: Priority,
    /// `train`, `finetune` or `data`.
    pub kind: String,
    /// The `fount` command line, without `fount`.
    pub command: Vec<String>,
    /// The working directory it runs in (relative paths in `command` are relative to it).
    pub cwd: String,
    /// The directory it writes (absolute): no two live jobs may share one.
    pub out_dir: String,
    /// A file that exists once the command has finished its work.
    pub done_marker: String,
    /// Slot seconds after which an attempt is stopped as failed.
    pub time_limit_s: Option<i64>,
    /// Where the job's log goes; `{id}` is replaced by the job's id.
    pub log_path: String,
}

/// A job's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// `job-…`.
    pub id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// A label.
    pub name: Option<String>,
    /// Its class.
    pub priority: Priority,
    /// `train`, `finetune` or `data`.
    pub kind: String,
    /// The `fount` command line, without `fount`.
    pub command: Vec<String>,
    /// The working directory it runs in.
    pub cwd: String,
    /// The directory it writes.
    pub out_dir: String,
    /// The file that exists once the command has finished its work.
    pub done_marker: String,
    /// Slot seconds after which an attempt fails.
    pub time_limit_s: Option<i64>,
    /// Its state.
    pub state: JobState,
    /// Why it is in that state (for a queued job: what it waits for).
    pub reason: String,
    /// Attempts started so far (the fencing number of the current one).
    pub attempts: i64,
    /// A stop asked of the running attempt, and when its signal was sent (Unix ms; `None`
    /// until the pool sends it).
    pub stop: Option<(Stop, Option<i64>)>,
    /// The executor of the current or last attempt (`local`, `slurm`).
    pub executor: Option<String>,
    /// How that executor finds the attempt (`pid:starttime`, a Slurm job id).
    pub handle: Option<String>,
    /// The job's log file.
    pub log_path: String,
    /// The step of the newest complete checkpoint seen.
    pub checkpoint_step: Option<i64>,
    /// Slot time of the attempts that ended, in milliseconds.
    pub slot_ms: i64,
    /// When the current attempt started (Unix ms).
    pub started_at_ms: Option<i64>,
    /// When it was submitted (Unix ms).
    pub created_at_ms: i64,
    /// When it reached a final state (Unix ms).
    pub finished_at_ms: Option<i64>,
    /// Why it failed, with the last lines of its log.
    pub error: Option<String>,
}

/// One entry of a job's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The state entered.
    pub state: JobState,
    /// When (Unix ms).
    pub at_ms: i64,
    /// Why.
    pub reason: String,
}

/// A tenant's limits on the pool; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuota {
    /// Jobs running at once.
    pub running_jobs: Option<i64>,
    /// Slot seconds per UTC day.
    pub slot_seconds_per_day: Option<i64>,
    /// Slot seconds per UTC month.
    pub slot_seconds_per_month: Option<i64>,
    /// The highest priority its jobs may ask for.
    pub max_priority: Option<Priority>,
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter<'a> {
    /// One tenant's jobs.
    pub tenant_id: Option<&'a str>,
    /// Jobs in these states (all when empty).
    pub states: &'a [JobState],
}

/// A change of state with what it records.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// What happens.
    pub transition: Transition,
    /// Why (shown in the history and as the job's reason).
    pub reason: &'a str,
    /// For [`Transition::Start`]: the executor.
    pub executor: Option<&'a str>,
    /// For [`Transition::Fail`]: the error and the log's tail.
    pub error: Option<&'a str>,
    /// For a change that ends an attempt: the process's exit status.
    pub exit_status: Option<i64>,
    /// When it happened (Unix ms); now when `None`. An attempt found dead after a restart ends
    /// when its log was last written.
    pub at_ms: Option<i64>,
}

impl<'a> Change<'a> {
    /// `transition` for `reason`.
    pub fn new(transition: Transition, reason: &'a str) -> Change<'a> {
        Change {
            transition,
            reason,
            executor: None,
            error: None,
            exit_status: None,
            at_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sequence of transitions up to length 6 from `queued`: each step is legal exactly
    /// when [`next`] says so, terminal states accept nothing, and the only ways back to
    /// `queued` pass through `preempted` (requeued) or `paused` (resumed).
    #[test]
    fn every_sequence_follows_the_machine() {
        fn walk(state: JobState, depth: usize, path: &mut Vec<Transition>, seen: &mut usize) {
            *seen += 1;
            if depth == 0 {
                return;
            }
            for t in Transition::ALL {
                match next(state, t) {
                    Some(to) => {
                        assert!(!state.is_terminal(), "{path:?}: {state} -> {to}");
                        if to == JobState::Queued {
                            assert!(
                                matches!(
                                    (state, t),
                                    (JobState::Preempted, Transition::Requeue)
                                        | (JobState::Paused, Transition::Resume)
                                ),
                                "{path:?}"
                            );
                        }
                        if to == JobState::Running {
                            assert_eq!((state, t), (JobState::Queued, Transition::Start));
                        }
                        path.push(t);
                        walk(to, depth - 1, path, seen);
                        path.pop();
                    }
                    None => assert!(
                        state.is_terminal()
                            || !matches!(
                                (state, t),
                                (JobState::Queued, Transition::Start)
                                    | (JobState::Running, Transition::Succeed)
                                    | (JobState::Running, Transition::Fail)
                                    | (JobState::Running, Transition::Preempt)
                                    | (JobState::Preempted, Transition::Requeue)
                                    | (JobState::Paused, Transition::Resume)
                                    | (_, Transition::Cancel)
                                    | (
                                        JobState::Queued | JobState::Running | JobState::Preempted,
                                        Transition::Pause
                                    )
                            ),
                        "{path:?}: {state} refused {t:?}"
                    ),
                }
            }
        }
        let mut seen = 0;
        walk(JobState::Queued, 6, &mut Vec::new(), &mut seen);
        assert!(seen > 10, "{seen}");
        let legal: usize = JobState::ALL
            .iter()
            .map(|&s| {
                Transition::ALL
                    .iter()
                    .filter(|&&t| next(s, t).is_some())
                    .count()
            })
            .sum();
        assert_eq!(legal, 13);
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.name()), Some(s));
        }
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.name()), Some(p));
            assert_eq!(Priority::from_rank(p.rank()), p);
        }
        assert_eq!(JobState::parse("held"), None);
    }
}
