//! The local executor: each attempt is a child process in its own process group, with its
//! output appended to the job's log.
//!
//! A handle is `pid:starttime` (the start time in clock ticks from `/proc/PID/stat`), so a
//! restarted pool adopts a process only if it is the very one it started, never a new process
//! that reused the pid. Adopted processes are not the pool's children: their exit status is
//! unknown, and the pool judges the outcome by the job's outputs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use rustix::process::{kill_process_group, Pid, Signal};

use super::{Executor, Launch, Status, JOB_ENV};
use crate::error::{Error, Result};

/// Runs attempts as child processes of the pool.
#[derive(Debug)]
pub struct Local {
    fount: PathBuf,
    children: HashMap<i32, Child>,
    env: Vec<(String, String)>,
}

impl Local {
    /// An executor that runs `fount` (the binary's path) for every attempt.
    pub fn new(fount: PathBuf) -> Local {
        Local {
            fount,
            children: HashMap::new(),
            env: Vec::new(),
        }
    }

    /// Sets these environment variables in every attempt (where the store is, so a job's run
    /// is logged to the ledger it was submitted to).
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Local {
        self.env = env;
        self
    }
}

fn err(message: impl Into<String>) -> Error {
    Error::Executor {
        executor: "local",
        message: message.into(),
    }
}

/// The state letter and start time of process `pid`, from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name is in parentheses and may hold spaces: fields start after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // field 22 of the whole line is the 20th after the name
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Whether the process of `handle` (`pid:starttime`) is alive.
pub fn alive(handle: &str) -> bool {
    let Some((pid, start)) = parse(handle) else {
        return false;
    };
    matches!(proc_stat(pid), Some((state, s)) if s == start && state != 'Z' && state != 'X')
}

fn parse(handle: &str) -> Option<(i32, u64)> {
    let (pid, start) = handle.split_once(':')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// The handle of the running process `pid`.
pub fn handle_of(pid: i32) -> Option<String> {
    proc_stat(pid).map(|(_, start)| format!("{pid}:{start}"))
}

impl Local {
    fn signal(&mut self, handle: &str, sig: Signal) -> Result<()> {
        let (pid, _) = parse(handle).ok_or_else(|| err(format!("bad handle {handle:?}")))?;
        if !alive(handle) {
            return Ok(());
        }
        let Some(pid) = Pid::from_raw(pid) else {
            return Err(err(format!("bad pid in {handle:?}")));
        };
        // the process group: the command and anything it started
        match kill_process_group(pid, sig) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(err(format!("signalling {handle}: {e}"))),
        }
    }
}

impl Executor for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn start(&mut self, launch: &Launch) -> Result<String> {
        if let Some(dir) = launch.log.parent() {
            fs_err::create_dir_all(dir)?;
        }
        let log = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)?;
        let log2 = log.try_clone()?;
        use std::os::unix::process::CommandExt;
        let child = Command::new(&self.fount)
            .args(&launch.args)
            .current_dir(&launch.cwd)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(JOB_ENV, format!("{}.{}", launch.job_id, launch.attempt))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.into_parts().0))
            .stderr(Stdio::from(log2.into_parts().0))
            .process_group(0)
            .spawn()
            .map_err(|e| err(format!("starting {}: {e}", self.fount.display())))?;
        let pid = i32::try_from(child.id()).map_err(|_| err("pid out of range"))?;
        self.children.insert(pid, child);
        handle_of(pid).ok_or_else(|| err(format!("process {pid} vanished at start")))
    }

    fn status(&mut self, handle: &str) -> Result<Status> {
        let (pid, _) = parse(handle).ok_or_else(|| err(format!("bad handle {handle:?}")))?;
        if let Some(child) = self.children.get_mut(&pid) {
            return match child.try_wait()? {
                None => Ok(Status::Running),
                Some(st) => {
                    self.children.remove(&pid);
                    Ok(Status::Exited(st.code()))
                }
            };
        }
        Ok(if alive(handle) {
            Status::Running
        } else {
            Status::Exited(None)
        })
    }

    fn terminate(&mut self, handle: &str) -> Result<()> {
        self.signal(handle, Signal::TERM)
    }

    fn kill(&mut self, handle: &str) -> Result<()> {
        self.signal(handle, Signal::KILL)
    }

    fn find(&mut self, job_id: &str, attempt: i64) -> Result<Option<String>> {
        let want = format!("{JOB_ENV}={job_id}.{attempt}");
        let Ok(entries) = fs_err::read_dir("/proc") else {
            return Ok(None);
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = fs_err::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                if let Some(h) = handle_of(pid).filter(|h| alive(h)) {
                    return Ok(Some(h));
                }
            }
        }
        Ok(None)
    }
}
