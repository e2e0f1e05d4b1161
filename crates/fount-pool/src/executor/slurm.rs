//! The Slurm executor: each attempt is one Slurm batch job, submitted with `sbatch`, followed
//! with `scontrol show job` (and `sacct` once slurmctld has forgotten it; `squeue` finds an
//! attempt by name), stopped with `scancel --signal=TERM --batch` and
//! killed with `scancel`.
//!
//! The batch script `exec`s `fount`, so the batch step *is* the command and Slurm's signal
//! reaches it. Each attempt is a new Slurm job named `job-….N`: the pool, not Slurm, decides
//! when a preempted job runs again (it resumes with `--resume`), and the name finds an attempt
//! whose Slurm id was never stored. The pool needs Slurm's clients on `PATH` and, like any
//! client, `SLURM_CONF` or a configless setup; the nodes need `fount` at the same path and the
//! job's files on a shared file system.

use std::path::PathBuf;
use std::process::Command;

use super::{Executor, Launch, Status, JOB_ENV};
use crate::error::{Error, Result};

/// Runs attempts as Slurm batch jobs.
#[derive(Debug, Clone)]
pub struct Slurm {
    fount: PathBuf,
    partition: Option<String>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

fn err(message: impl Into<String>) -> Error {
    Error::Executor {
        executor: "slurm",
        message: message.into(),
    }
}

/// Quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs a Slurm client command; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        err(format!(
            "running {program}: {e} (is Slurm's client installed?)"
        ))
    })?;
    if !out.status.success() {
        return Err(err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Slurm job's state and exit status, from `scontrol -o show job` output.
pub fn parse_show_job(line: &str) -> Option<(String, Option<i32>)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let state = field("JobState")?.to_string();
    // ExitCode=status:signal
    let exit = field("ExitCode").and_then(|e| {
        let (code, sig) = e.split_once(':')?;
        let (code, sig): (i32, i32) = (code.parse().ok()?, sig.parse().ok()?);
        (sig == 0).then_some(code)
    });
    Some((state, exit))
}

/// A job's state and exit status from `sacct -n -P -X -o State,ExitCode` output
/// (`FAILED|75:0`; a state may carry a reason: `CANCELLED by 0`).
pub fn parse_sacct(out: &str) -> Option<(String, Option<i32>)> {
    let line = out.lines().find(|l| !l.trim().is_empty())?;
    let (state, exit) = line.trim().split_once('|')?;
    let state = state.split_whitespace().next()?.to_string();
    let exit = exit.split_once(':').and_then(|(code, sig)| {
        let (code, sig): (i32, i32) = (code.parse().ok()?, sig.parse().ok()?);
        (sig == 0).then_some(code)
    });
    Some((state, exit))
}

/// The job's state from the accounting database; `None` when there is none or it does not
/// know the job.
fn sacct(id: &str) -> Option<(String, Option<i32>)> {
    let out = Command::new("sacct")
        .args(["-j", id, "-n", "-P", "-X", "-o", "State,ExitCode"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_sacct(&String::from_utf8_lossy(&out.stdout))
}

/// How a Slurm state reads for the pool.
pub fn status_of(state: &str, exit: Option<i32>) -> Status {
    match state {
        "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
        | "RESIZING" | "SIGNALING" | "STAGE_OUT" | "REQUEUE_HOLD" | "REQUEUE_FED" => {
            Status::Running
        }
        "COMPLETED" => Status::Exited(Some(0)),
        "FAILED" => Status::Exited(exit),
        // cancelled, preempted, timed out, node failure, out of memory: ended by a signal
        _ => Status::Exited(None),
    }
}

impl Slurm {
    /// An executor that runs `fount` (its path on the nodes) in `partition` (Slurm's default
    /// when `None`), passing `extra` options to every `sbatch`.
    pub fn new(fount: PathBuf, partition: Option<String>, extra: Vec<String>) -> Slurm {
        Slurm {
            fount,
            partition,
            extra,
            env: Vec::new(),
        }
    }

    /// Exports these environment variables to every batch job (where the store is, so a job's
    /// run is logged to the ledger it was submitted to).
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Slurm {
        self.env = env;
        self
    }

    fn show(&self, id: &str) -> Result<Option<(String, Option<i32>)>> {
        let out = Command::new("scontrol")
            .args(["-o", "show", "job", id])
            .output()
            .map_err(|e| err(format!("running scontrol: {e}")))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stderr);
            if msg.contains("Invalid job id") {
                return Ok(None);
            }
            return Err(err(format!("scontrol show job {id}: {}", msg.trim())));
        }
        Ok(parse_show_job(&String::from_utf8_lossy(&out.stdout)))
    }
}

impl Executor for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn start(&mut self, launch: &Launch) -> Result<String> {
        let dir = launch
            .log
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| launch.cwd.clone());
        fs_err::create_dir_all(&dir)?;
        let script = dir.join(format!("attempt-{}.sbatch", launch.attempt));
        let mut body = String::from("#!/bin/sh\n# written by the fount pool\nexec");
        for a in std::iter::once(self.fount.display().to_string()).chain(launch.args.clone()) {
            body.push(' ');
            body.push_str(&quote(&a));
        }
        body.push('\n');
        fs_err::write(&script, body)?;
        let name = format!("{}.{}", launch.job_id, launch.attempt);
        let log = launch.log.display().to_string();
        let cwd = launch.cwd.display().to_string();
        let mut export = format!("ALL,{JOB_ENV}={name}");
        for (k, v) in &self.env {
            export.push_str(&format!(",{k}={v}"));
        }
        let script = script.display().to_string();
        let mut args = vec![
            "--parsable",
            "--job-name",
            &name,
            "--output",
            &log,
            "--open-mode=append",
            "--chdir",
            &cwd,
            "--export",
            &export,
            "--no-requeue",
        ];
        if let Some(p) = &self.partition {
            args.push("--partition");
            args.push(p);
        }
        args.extend(self.extra.iter().map(String::as_str));
        args.push(&script);
        let out = run("sbatch", &args)?;
        // `--parsable` prints `id` or `id;cluster`
        let id = out.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(err(format!("sbatch printed {out:?}, not a job id")));
        }
        Ok(id)
    }

    fn status(&mut self, handle: &str) -> Result<Status> {
        Ok(match self.show(handle)? {
            Some((state, exit)) => status_of(&state, exit),
            // slurmctld forgot it (MinJobAge passed): the accounting database, when there is
            // one, still knows; else the pool judges by the job's outputs
            None => match sacct(handle) {
                Some((state, exit)) => status_of(&state, exit),
                None => Status::Exited(None),
            },
        })
    }

    fn terminate(&mut self, handle: &str) -> Result<()> {
        match self.show(handle)? {
            // never started: nothing to checkpoint
            Some((state, _)) if state == "PENDING" => {
                run("scancel", &[handle])?;
            }
            Some((state, _)) if matches!(status_of(&state, None), Status::Running) => {
                run("scancel", &["--signal=TERM", "--batch", handle])?;
            }
            _ => {}
        }
        Ok(())
    }

    fn kill(&mut self, handle: &str) -> Result<()> {
        if let Some((state, _)) = self.show(handle)? {
            if matches!(status_of(&state, None), Status::Running) {
                run("scancel", &["--signal=KILL", "--full", handle])?;
                run("scancel", &[handle])?;
            }
        }
        Ok(())
    }

    fn find(&mut self, job_id: &str, attempt: i64) -> Result<Option<String>> {
        let name = format!("{job_id}.{attempt}");
        let out = run("squeue", &["-h", "-n", &name, "-o", "%i"])?;
        Ok(out.lines().next().map(|l| l.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scontrol_lines() {
        let line = "JobId=1 JobName=job-x.1 UserId=root(0) JobState=FAILED Reason=NonZeroExitCode \
                    Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=75:0";
        assert_eq!(parse_show_job(line), Some(("FAILED".into(), Some(75))));
        let (st, ex) = parse_show_job("JobState=CANCELLED ExitCode=0:15").unwrap();
        assert_eq!(status_of(&st, ex), Status::Exited(None));
        assert_eq!(status_of("PENDING", None), Status::Running);
        assert_eq!(status_of("COMPLETED", Some(0)), Status::Exited(Some(0)));
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(
            parse_sacct("FAILED|75:0\n"),
            Some(("FAILED".into(), Some(75)))
        );
        assert_eq!(
            parse_sacct("CANCELLED by 0|0:15\n"),
            Some(("CANCELLED".into(), None))
        );
        assert_eq!(parse_sacct(""), None);
    }
}
