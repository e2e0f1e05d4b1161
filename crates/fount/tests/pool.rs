//! The compute pool from the command line: `fount pool run` (and `fount serve`) with `fount jobs`,
//! on the local executor and on a one-node Slurm cluster.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::util::{fount_ok, tiny_model};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("pool-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// A tiny base model, a chat file and fine-tuning settings, shared by the tests; and the
/// adapters the settings give when run directly (the references every pooled run must equal).
struct Fixture {
    dir: PathBuf,
    base: PathBuf,
    data: PathBuf,
}

impl Fixture {
    /// Settings by length: `short` (about 0.3 s), `ft` (about 1.5 s), `long` (about 8 s).
    fn config(&self, which: &str) -> PathBuf {
        self.dir.join(format!("{which}.toml"))
    }

    /// The adapter of `which` run directly, without the pool.
    fn reference(&self, which: &str) -> Vec<u8> {
        // tests ask for the same reference at once: one computes it
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let out = self.dir.join(format!("ref-{which}"));
        if !out.join("adapter_model.safetensors").exists() {
            fount_ok(&[
                "finetune",
                "--base",
                &s(&self.base),
                "--data",
                &s(&self.data),
                "--out",
                &s(&out),
                "--config",
                &s(&self.config(which)),
            ]);
        }
        std::fs::read(out.join("adapter_model.safetensors")).unwrap_or_default()
    }

    /// The `finetune` command line of `which` into `out`.
    fn finetune(&self, which: &str, out: &Path) -> Vec<String> {
        [
            "finetune",
            "--base",
            &s(&self.base),
            "--data",
            &s(&self.data),
            "--out",
            &s(out),
            "--config",
            &s(&self.config(which)),
        ]
        .map(str::to_string)
        .to_vec()
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch("fixture");
        let base = dir.join("base");
        tiny_model("qwen2", &base);
        fount_ok(&[
            "data",
            "synth",
            "--out",
            &s(&dir.join("synth")),
            "--docs",
            "10",
            "--chat-examples",
            "200",
        ]);
        for (name, epochs) in [("short", 2), ("ft", 3), ("long", 30)] {
            std::fs::write(
                dir.join(format!("{name}.toml")),
                format!(
                    "epochs = {epochs}\ntokens_per_step = 256\ncheckpoint_every = 5\nkeep_checkpoints = 2\n"
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let data = dir.join("synth/chat/train.jsonl");
        Fixture { dir, base, data }
    })
}

/// Data directories whose jobs live in PostgreSQL: the database URL every command on them
/// gets.
fn database_of(store: &Path) -> Option<String> {
    DATABASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(store)
        .cloned()
}

static DATABASES: std::sync::Mutex<std::collections::BTreeMap<PathBuf, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The `--data-dir` (and `--database-url`) arguments of a store.
fn store_args(store: &Path) -> Vec<String> {
    let mut a = vec!["--data-dir".to_string(), s(store)];
    if let Some(url) = database_of(store) {
        a.extend(["--database-url".to_string(), url]);
    }
    a
}

/// `fount pool run` on a data directory, killed (SIGKILL) when dropped.
struct PoolProcess {
    child: Child,
}

impl PoolProcess {
    fn start(store: &Path, args: &[&str], env: &[(&str, &str)]) -> PoolProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(store.with_extension("pool.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_fount"))
            .args(["pool", "run"])
            .args(store_args(store))
            .args(args)
            .envs(env.iter().copied())
            .env("FOUNT_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("fount pool run: {e}"));
        PoolProcess { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PoolProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `fount jobs … --data-dir store`.
fn jobs(store: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fount"))
        .arg("jobs")
        .args(store_args(store))
        .args(args)
        .env("FOUNT_THREADS", "1")
        .output()
        .unwrap_or_else(|e| panic!("fount jobs: {e}"))
}

fn submit(store: &Path, opts: &[&str], command: &[String]) -> String {
    let mut args = vec!["submit"];
    args.extend_from_slice(opts);
    args.push("--");
    args.extend(command.iter().map(String::as_str));
    let out = jobs(store, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "submit {opts:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout.trim().to_string();
    assert!(id.starts_with("job-") && !id.contains('\n'), "{stdout:?}");
    id
}

/// Submits and expects a refusal; returns the message.
fn refused(store: &Path, opts: &[&str], command: &[String]) -> String {
    let mut args = vec!["submit"];
    args.extend_from_slice(opts);
    args.push("--");
    args.extend(command.iter().map(String::as_str));
    let out = jobs(store, &args);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(out.stdout.is_empty(), "a refused submit printed an id");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn show(store: &Path, id: &str) -> Value {
    let out = jobs(store, &["show", id, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("show --json: {e}"))
}

fn list(store: &Path) -> Vec<Value> {
    let out = jobs(store, &["list", "--json"]);
    assert!(out.status.success());
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `show` until `done` holds.
fn until(store: &Path, id: &str, what: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let v = show(store, id);
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{id}: not {what} after {secs} s: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until `id` runs and has written a checkpoint.
fn until_checkpointed(store: &Path, id: &str) -> Value {
    until(store, id, "checkpointing", 60, |v| {
        v["state"] == "running" && v["checkpoint_step"].as_i64().unwrap_or(0) > 0
    })
}

fn wait_ok(store: &Path, id: &str, secs: u64) {
    let out = jobs(store, &["wait", id, "--timeout", &secs.to_string()]);
    assert!(
        out.status.success(),
        "{id}: {}\n{:#}",
        String::from_utf8_lossy(&out.stderr),
        show(store, id)
    );
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter_model.safetensors")).unwrap_or_default()
}

fn states(v: &Value) -> Vec<String> {
    v["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["state"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A low-priority fine-tune preempted twice by high-priority ones checkpoints on SIGTERM,
/// resumes with `--resume`, and ends with weights bit-identical to the same run never
/// preempted.
#[test]
fn a_twice_preempted_finetune_ends_bit_identical() {
    let f = fixture();
    let d = scratch("preempt");
    let store = d.join("store");
    let _pool = PoolProcess::start(&store, &["--pool-slots", "1", "--preempt-grace", "60"], &[]);
    let low_out = d.join("low");
    let low = submit(
        &store,
        &["--priority", "low", "--name", "low"],
        &f.finetune("long", &low_out),
    );
    let follow = Command::new(env!("CARGO_BIN_EXE_fount"))
        .args(["jobs", "--data-dir", &s(&store), "logs", &low, "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("fount jobs logs: {e}"));
    let mut highs = Vec::new();
    for round in 1..=2 {
        // it runs (again) and has written a checkpoint in this attempt
        let before = show(&store, &low)["checkpoint_step"].as_i64().unwrap_or(0);
        until(&store, &low, "checkpointing", 60, |v| {
            v["state"] == "running"
                && v["attempts"] == round
                && v["checkpoint_step"].as_i64().unwrap_or(0) > before
        });
        let out = d.join(format!("high{round}"));
        highs.push((
            submit(&store, &["--priority", "high"], &f.finetune("ft", &out)),
            out,
        ));
        let v = until(&store, &low, "preempted", 30, |v| {
            v["attempts"] == round && v["state"] == "queued"
        });
        assert_eq!(
            states(&v).iter().filter(|s| *s == "preempted").count(),
            round as usize,
            "{v:#}"
        );
    }
    for (h, out) in &highs {
        wait_ok(&store, h, 60);
        assert_eq!(adapter(out), f.reference("ft"), "{h}");
    }
    wait_ok(&store, &low, 120);
    let v = show(&store, &low);
    assert_eq!(v["attempts"], 3, "{v:#}");
    assert_eq!(
        states(&v),
        [
            "queued",
            "running",
            "preempted",
            "queued",
            "running",
            "preempted",
            "queued",
            "running",
            "succeeded"
        ]
    );
    let log = std::fs::read_to_string(v["log"].as_str().unwrap_or("")).unwrap_or_default();
    assert_eq!(
        log.matches("signal received: writing a checkpoint").count(),
        2,
        "{log}"
    );
    assert!(v["slot_seconds"].as_f64().unwrap_or(0.0) > 0.0);
    // `logs --follow` printed the whole log as it grew and ended with the job
    let followed = follow
        .wait_with_output()
        .unwrap_or_else(|e| panic!("fount jobs logs: {e}"));
    let followed = String::from_utf8_lossy(&followed.stdout);
    assert_eq!(followed.matches("signal received").count(), 2, "{followed}");
    assert!(followed.contains("adapter written"), "{followed}");
    assert!(
        adapter(&low_out) == f.reference("long"),
        "preempted run's weights differ"
    );

    // what `show` prints, with ids, times, paths and timings masked
    let mut names = vec![(low.clone(), "[low]".to_string())];
    for (i, (h, _)) in highs.iter().enumerate() {
        names.push((h.clone(), format!("[high{}]", i + 1)));
    }
    let mask = |text: &str| {
        let mut t = text
            .replace(&s(&d), "[DIR]")
            .replace(&s(&f.dir), "[FIXTURE]")
            .replace(env!("CARGO_MANIFEST_DIR"), "[CRATE]");
        for (id, name) in &names {
            t = t.replace(id.as_str(), name);
        }
        t
    };
    let mut v = show(&store, &low);
    for k in [
        "handle",
        "slot_seconds",
        "checkpoint_step",
        "created_at",
        "finished_at",
    ] {
        v[k] = "[varies]".into();
    }
    for h in v["history"].as_array_mut().into_iter().flatten() {
        h["at"] = "[time]".into();
    }
    insta::assert_snapshot!(
        "show_json",
        mask(&serde_json::to_string_pretty(&v).unwrap_or_default())
    );
    let text = String::from_utf8_lossy(&jobs(&store, &["show", &low]).stdout).into_owned();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.contains("checkpoint step") {
                "  [checkpoint step, slot-seconds, log]".to_string()
            } else if l.trim_start().starts_with("20") {
                // a history line: its time, then the state and the reason
                format!("    [time]{}", l.trim_start().get(24..).unwrap_or(""))
            } else {
                l.to_string()
            }
        })
        .collect();
    insta::assert_snapshot!("show_text", mask(&text.join("\n")));
}

/// A job that does not stop within the grace period (here: stopped with SIGSTOP, so it cannot
/// answer SIGTERM) is killed, and resumes from its last complete periodic checkpoint to the same
/// weights.
#[test]
fn paused_by_its_owner_a_finetune_holds_at_a_checkpoint_and_resumes_bit_identical() {
    let f = fixture();
    let d = scratch("pause");
    let store = d.join("store");
    let _pool = PoolProcess::start(&store, &["--pool-slots", "1"], &[]);
    let out = d.join("long");
    let id = submit(&store, &["--name", "paused"], &f.finetune("long", &out));
    until_checkpointed(&store, &id);
    let paused = jobs(&store, &["pause", &id]);
    assert!(paused.status.success(), "{paused:?}");
    let v = until(&store, &id, "paused", 60, |v| v["state"] == "paused");
    let step = v["checkpoint_step"].as_i64().unwrap_or(0);
    assert!(step > 0, "{v:#}");
    // held: nothing runs it while paused, and it cannot be paused twice
    std::thread::sleep(Duration::from_millis(1500));
    let v = show(&store, &id);
    assert_eq!(
        (v["state"].as_str(), v["attempts"].as_i64()),
        (Some("paused"), Some(1)),
        "{v:#}"
    );
    assert!(!jobs(&store, &["pause", &id]).status.success());
    let resumed = jobs(&store, &["resume", &id]);
    assert!(resumed.status.success(), "{resumed:?}");
    wait_ok(&store, &id, 120);
    let v = show(&store, &id);
    assert_eq!(
        states(&v),
        [
            "queued",
            "running",
            "paused",
            "queued",
            "running",
            "succeeded"
        ],
        "{v:#}"
    );
    assert!(
        adapter(&out) == f.reference("long"),
        "the resumed adapter differs"
    );
    assert!(!jobs(&store, &["resume", &id]).status.success());
}

#[test]
fn a_job_that_ignores_its_stop_is_killed_after_the_grace_period_and_still_matches() {
    let f = fixture();
    let d = scratch("grace");
    let store = d.join("store");
    let _pool = PoolProcess::start(&store, &["--pool-slots", "1", "--preempt-grace", "1"], &[]);
    let low_out = d.join("low");
    let low = submit(
        &store,
        &["--priority", "low"],
        &f.finetune("long", &low_out),
    );
    let v = until_checkpointed(&store, &low);
    let pid = v["handle"]
        .as_str()
        .and_then(|h| h.split(':').next())
        .unwrap_or("")
        .to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .is_ok_and(|st| st.success()));
    let stopped = Instant::now();
    let high_out = d.join("high");
    let high = submit(
        &store,
        &["--priority", "high"],
        &f.finetune("short", &high_out),
    );
    let h = until(&store, &high, "started", 30, |v| v["attempts"] == 1);
    assert!(
        stopped.elapsed() >= Duration::from_secs(1),
        "started before the grace period: {h:#}"
    );
    wait_ok(&store, &high, 60);
    wait_ok(&store, &low, 120);
    let v = show(&store, &low);
    assert_eq!(v["attempts"], 2, "{v:#}");
    let log = std::fs::read_to_string(v["log"].as_str().unwrap_or("")).unwrap_or_default();
    assert!(
        !log.contains("signal received"),
        "the stopped process answered its signal:\n{log}"
    );
    assert!(
        adapter(&low_out) == f.reference("long"),
        "killed run's weights differ"
    );
}

/// The other two kinds of job: a `data run` as a job writes the same shards and tokenizer as
/// run directly, and a `train` job preempted by a fine-tune (and resumed with `--resume`) ends
/// with the same final weights as the same run never preempted.
#[test]
fn a_pooled_data_run_and_a_preempted_train_job_match_their_direct_runs() {
    let f = fixture();
    let d = scratch("train");
    let store = d.join("store");
    fount_ok(&[
        "data",
        "synth",
        "--out",
        &s(&d.join("synth")),
        "--docs",
        "400",
        "--seed",
        "3",
    ]);
    let curate = |out: &Path| -> Vec<String> {
        [
            "data",
            "run",
            "--input",
            &s(&d.join("synth/corpus")),
            "--out",
            &s(out),
            "--vocab-size",
            "512",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let direct: Vec<String> = curate(&d.join("curated-direct"));
    fount_ok(&direct.iter().map(String::as_str).collect::<Vec<_>>());
    let _pool = PoolProcess::start(&store, &["--pool-slots", "1", "--preempt-grace", "60"], &[]);
    let data = submit(&store, &[], &curate(&d.join("curated")));
    wait_ok(&store, &data, 120);
    assert_eq!(show(&store, &data)["state"], "succeeded");
    for f in [
        "tokenizer.json",
        "shards/train-00000.bin",
        "shards/validation-00000.bin",
    ] {
        let a = std::fs::read(d.join("curated").join(f)).unwrap_or_default();
        let b = std::fs::read(d.join("curated-direct").join(f)).unwrap_or_default();
        assert!(!a.is_empty() && a == b, "{f} differs");
    }

    let model = d.join("model");
    fount_ok(&[
        "model",
        "init",
        "--arch",
        "qwen2",
        "--preset",
        "tiny",
        "--tokenizer",
        &s(&d.join("curated/tokenizer.json")),
        "--out",
        &s(&model),
    ]);
    let config = |name: &str| {
        let path = d.join(format!("{name}.toml"));
        let text = format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 400\nseq_len = 32\nmicro_batch = 4\n\
             lr = 3e-3\neval_every = 0\ncheckpoint_every = 25\nkeep_checkpoints = 2\n",
            s(&model),
            s(&d.join("curated/shards")),
            s(&d.join(name))
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path
    };
    fount_ok(&["train", "--config", &s(&config("direct"))]);
    let cmd = ["train", "--config", &s(&config("pooled"))].map(str::to_string);
    let train = submit(&store, &["--priority", "low"], &cmd);
    until_checkpointed(&store, &train);
    let high = submit(
        &store,
        &["--priority", "high"],
        &f.finetune("short", &d.join("high")),
    );
    wait_ok(&store, &high, 60);
    wait_ok(&store, &train, 180);
    let v = show(&store, &train);
    assert_eq!(v["attempts"], 2, "{v:#}");
    assert!(v["command"]
        .as_array()
        .is_some_and(|c| !c.iter().any(|a| a == "--resume")));
    let a = std::fs::read(d.join("direct/final/model.safetensors")).unwrap_or_default();
    let b = std::fs::read(d.join("pooled/final/model.safetensors")).unwrap_or_default();
    assert!(
        !a.is_empty() && a == b,
        "preempted training's weights differ"
    );
    // a finished run's directory is refused as a new job's output
    let e = refused(&store, &[], &cmd);
    assert!(e.contains("already holds a finished run"), "{e}");
}

/// Processes whose environment names a pool job, by job: more than one at a time for a job
/// is a double run.
fn job_processes() -> HashMap<String, HashSet<u32>> {
    let mut out: HashMap<String, HashSet<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for v in env.split(|&b| b == 0) {
            if let Some(job) = v.strip_prefix(b"FOUNT_JOB=") {
                let job = String::from_utf8_lossy(job);
                let id = job.rsplit_once('.').map_or(job.as_ref(), |(j, _)| j);
                out.entry(id.to_string()).or_default().insert(pid);
            }
        }
    }
    out
}

/// 50 fine-tunes (about 1.5 s each) of three tenants and random priorities, some cancelled,
/// while the pool is killed with SIGKILL at random moments and restarted: no job is lost, none
/// ever runs twice at once, every job ends succeeded (or cancelled), and every adapter equals
/// the one run directly, whether its attempts were adopted, preempted or resumed.
#[test]
fn fifty_jobs_survive_the_pool_killed_at_random_moments() {
    let f = fixture();
    let reference = f.reference("ft");
    let d = scratch("soak");
    let store = d.join("store");
    for t in ["a", "b"] {
        fount_ok(&["admin", "--data-dir", &s(&store), "tenant", "create", t]);
    }
    // a monitor for double runs
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let monitor = std::thread::spawn(move || {
        let mut worst: Vec<(String, usize)> = Vec::new();
        while !flag.load(Ordering::SeqCst) {
            for (job, pids) in job_processes() {
                if pids.len() > 1 {
                    worst.push((job, pids.len()));
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        worst
    });
    let args = ["--pool-slots", "2", "--preempt-grace", "5"];
    let mut pool = PoolProcess::start(&store, &args, &[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut ids = Vec::new();
    let mut kills = 0;
    let mut cancelled = HashSet::new();
    let mut last_kill = Instant::now();
    for i in 0..50 {
        let tenant = ["a", "b", "default"][i % 3];
        // every fifth job is urgent: it finds the slots taken by lower ones and preempts one
        let priority = if i % 5 == 4 {
            "high"
        } else {
            ["low", "normal"][rng.random_range(0..2)]
        };
        let out = d.join(format!("out-{i:02}"));
        let mut opts = vec!["--priority", priority];
        if tenant != "default" {
            opts.extend(["--tenant", tenant]);
        }
        ids.push((submit(&store, &opts, &f.finetune("ft", &out)), out));
        if i % 9 == 4 {
            let (id, _) = &ids[rng.random_range(0..ids.len())];
            if jobs(&store, &["cancel", id]).status.success() {
                cancelled.insert(id.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
        if last_kill.elapsed() > Duration::from_millis(rng.random_range(300..1500)) {
            pool.kill();
            kills += 1;
            if rng.random_bool(0.3) {
                std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
            }
            pool = PoolProcess::start(&store, &args, &[]);
            last_kill = Instant::now();
        }
    }
    // keep killing while the queue drains, then let it finish
    let start = Instant::now();
    loop {
        let all = list(&store);
        if all.iter().all(|j| {
            matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        }) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "not drained");
        std::thread::sleep(Duration::from_millis(rng.random_range(200..900)));
        if kills < 40 {
            pool.kill();
            kills += 1;
            pool = PoolProcess::start(&store, &args, &[]);
        }
    }
    drop(pool);
    stop.store(true, Ordering::SeqCst);
    let doubles = monitor.join().unwrap_or_default();
    assert!(doubles.is_empty(), "jobs ran twice at once: {doubles:?}");
    assert!(kills >= 20, "only {kills} kills");
    let all = list(&store);
    assert_eq!(all.len(), 50, "jobs lost");
    let (mut resumed, mut preempted) = (0, 0);
    for (id, out) in &ids {
        let v = show(&store, id);
        let state = v["state"].as_str().unwrap_or("");
        if cancelled.contains(id) && state == "cancelled" {
            continue;
        }
        assert_eq!(state, "succeeded", "{v:#}");
        assert!(adapter(out) == reference, "{id}: adapter differs");
        if v["attempts"].as_i64().unwrap_or(0) > 1 {
            resumed += 1;
        }
        preempted += states(&v).iter().filter(|s| *s == "preempted").count();
    }
    eprintln!(
        "{kills} kills; {preempted} preemptions; {resumed} jobs resumed; {} cancelled",
        cancelled.len()
    );
    // the trace exercised what it is for: preemptions across restarts (how many depends on how
    // fast the machine trains: jobs children of a killed pool keep running and are adopted)
    assert!(
        preempted >= 1 && resumed >= 1,
        "{preempted} preemptions, {resumed} resumed"
    );
}

/// Sets acme's pool quota on `store` to `limits`.
fn quota_jobs(store: &str, limits: &[&str]) {
    let mut args = vec![
        "admin",
        "--data-dir",
        store,
        "quota",
        "jobs",
        "--tenant",
        "acme",
    ];
    args.extend_from_slice(limits);
    fount_ok(&args);
}

/// Quotas, budgets, fair waiting with reasons, failures with their log, cancel, usage billed
/// as training, and every refusal at submit.
#[test]
fn quotas_budgets_failures_and_refusals() {
    let f = fixture();
    let d = scratch("quota");
    let store = d.join("store");
    let st = s(&store);
    fount_ok(&["admin", "--data-dir", &st, "tenant", "create", "acme"]);
    quota_jobs(&st, &["--running-jobs", "1", "--max-priority", "normal"]);

    // refusals: nothing is queued by any of them
    let ok = f.finetune("ft", &d.join("x"));
    let with = |i: usize, v: &str| {
        let mut c = ok.clone();
        c[i] = v.into();
        c
    };
    let cases: Vec<(Vec<&str>, Vec<String>, &str)> = vec![
        (
            vec!["--tenant", "nobody"],
            ok.clone(),
            "no tenant named \"nobody\"",
        ),
        (
            vec![],
            vec![
                "generate".into(),
                "--model".into(),
                "m".into(),
                "--prompt".into(),
                "hi".into(),
            ],
            "only `train`, `finetune` and `data run`",
        ),
        (vec![], vec!["sparkle".into()], "the job's command line"),
        (
            vec![],
            [ok.clone(), vec!["--bogus".into()]].concat(),
            "--bogus",
        ),
        (vec![], with(2, "/no/such/model"), "not a model directory"),
        (vec![], with(4, "/no/such.jsonl"), "no such file"),
        (vec![], with(8, "/no/such.toml"), "--config"),
        (
            vec!["--priority", "urgent"],
            ok.clone(),
            "low, normal or high",
        ),
        (
            vec!["--tenant", "acme", "--priority", "high"],
            ok.clone(),
            "at most normal priority",
        ),
        (
            vec![],
            vec!["train".into(), "--config".into(), "/no/such.toml".into()],
            "--config",
        ),
        (
            vec![],
            vec![
                "data".into(),
                "run".into(),
                "--input".into(),
                "/no/such".into(),
                "--out".into(),
                "o".into(),
            ],
            "no such file",
        ),
    ];
    for (opts, cmd, want) in &cases {
        let e = refused(&store, opts, cmd);
        assert!(e.contains(want), "{opts:?} {cmd:?}: {e}");
    }
    assert!(list(&store).is_empty(), "a refused job was queued");

    let _pool = PoolProcess::start(&store, &["--pool-slots", "2", "--preempt-grace", "30"], &[]);
    // one at a time for acme: the second waits with the reason
    let a1 = submit(
        &store,
        &["--tenant", "acme"],
        &f.finetune("long", &d.join("a1")),
    );
    let a2 = submit(
        &store,
        &["--tenant", "acme"],
        &f.finetune("ft", &d.join("a2")),
    );
    // the output directory of a live job is taken
    let e = refused(&store, &[], &f.finetune("ft", &d.join("a1")));
    assert!(e.contains(&a1) && e.contains("already writes"), "{e}");
    until(&store, &a1, "running", 30, |v| v["state"] == "running");
    let v = until(&store, &a2, "waiting on its limit", 10, |v| {
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("1 jobs at once")
    });
    assert_eq!(v["state"], "queued");

    // a budget crossed while running stops the job at a checkpoint; it waits with the reason
    quota_jobs(&st, &["--running-jobs", "1", "--slot-seconds-per-day", "2"]);
    let v = until(&store, &a1, "stopped by its budget", 30, |v| {
        v["state"] == "queued" && v["attempts"] == 1
    });
    assert!(
        v["reason"].as_str().unwrap_or("").contains("over budget"),
        "{v:#}"
    );
    assert!(states(&v).contains(&"preempted".to_string()));
    // a job that can never fit is refused at submit
    let e = refused(
        &store,
        &["--tenant", "acme", "--time-limit", "60"],
        &f.finetune("ft", &d.join("a3")),
    );
    assert!(e.contains("can never fit"), "{e}");
    // raised, it resumes and ends as if never stopped
    quota_jobs(&st, &["--running-jobs", "1"]);
    wait_ok(&store, &a1, 120);
    wait_ok(&store, &a2, 60);
    assert!(adapter(&d.join("a1")) == f.reference("long"));

    // a command that fails at run time: failed, with its error and the log's last lines
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [\n").unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = f.finetune("ft", &d.join("bad"));
    cmd[4] = s(&bad);
    let b = submit(&store, &[], &cmd);
    let out = jobs(&store, &["wait", &b, "--timeout", "60"]);
    assert!(!out.status.success());
    let v = show(&store, &b);
    assert_eq!(v["state"], "failed");
    let err = v["error"].as_str().unwrap_or("");
    assert!(
        err.contains("exited with status 1") && err.contains("bad.jsonl"),
        "{err}"
    );
    let logs = jobs(&store, &["logs", &b]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("bad.jsonl"));

    // cancel: a queued job at once, a running one by signal; a finished one is refused
    let c1 = submit(
        &store,
        &["--tenant", "acme"],
        &f.finetune("long", &d.join("c1")),
    );
    let c2 = submit(
        &store,
        &["--tenant", "acme"],
        &f.finetune("long", &d.join("c2")),
    );
    until(&store, &c1, "running", 30, |v| v["state"] == "running");
    assert!(jobs(&store, &["cancel", &c2]).status.success());
    assert_eq!(show(&store, &c2)["state"], "cancelled");
    assert!(jobs(&store, &["cancel", &c1]).status.success());
    until(&store, &c1, "cancelled", 30, |v| v["state"] == "cancelled");
    let out = jobs(&store, &["cancel", &c1]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already cancelled"));
    assert!(!jobs(&store, &["show", "job-nope"]).status.success());
    let out = jobs(&store, &["list", "--state", "cancelled", "--json"]);
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let ids: Vec<&str> = listed.iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids, [c1.as_str(), c2.as_str()]);
    let e = jobs(&store, &["list", "--state", "held"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("--state \"held\""));
    assert!(jobs(&store, &["list", "--state", "paused"])
        .status
        .success());

    // a time limit stops an attempt that runs past it: failed, saying so
    let t = submit(
        &store,
        &["--time-limit", "1"],
        &f.finetune("long", &d.join("t")),
    );
    assert!(!jobs(&store, &["wait", &t, "--timeout", "60"])
        .status
        .success());
    let v = show(&store, &t);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("time limit of 1 s"),
        "{v:#}"
    );

    // every attempt is billed as training slot time
    let (csv, _) = fount_ok(&[
        "admin",
        "--data-dir",
        &st,
        "usage",
        "export",
        "--tenant",
        "acme",
    ]);
    let rows: Vec<&str> = csv.lines().filter(|l| l.contains(",training,")).collect();
    assert!(
        rows.iter().any(|r| r.starts_with(&format!("{a1}.1,"))),
        "{csv}"
    );
    assert!(
        rows.iter().any(|r| r.starts_with(&format!("{a1}.2,"))),
        "{csv}"
    );
    let v = show(&store, &a1);
    for k in [
        "id",
        "tenant",
        "state",
        "priority",
        "attempts",
        "command",
        "history",
        "checkpoint_step",
        "slot_seconds",
    ] {
        assert!(!v[k].is_null(), "show --json has no {k}: {v:#}");
    }
    assert_eq!(v["tenant"], "acme");
}

/// `fount serve` runs the pool in-process by default.
#[test]
fn serve_runs_the_pool() {
    let f = fixture();
    let d = scratch("serve");
    let store = d.join("store");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_fount"))
        .args([
            "serve",
            "--model",
            &s(&f.base),
            "--port",
            "0",
            "--data-dir",
            &s(&store),
        ])
        .args(["--kv-memory", "16MiB"])
        .env("FOUNT_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("fount serve: {e}"));
    let out = d.join("out");
    let start = Instant::now();
    let id = loop {
        // the store exists once serve opened it
        let o = jobs(&store, &["list"]);
        if o.status.success() {
            break submit(&store, &[], &f.finetune("short", &out));
        }
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(100));
    };
    wait_ok(&store, &id, 60);
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(adapter(&out) == f.reference("short"));
}

/// A pooled fine-tune that names only `artifacts:` inputs and publishes its adapter runs from the
/// object store (a directory here; the same code path as S3) and publishes the very adapter a
/// direct run from local files makes.
#[test]
fn a_pooled_finetune_reads_and_publishes_through_the_artifacts_store() {
    let f = fixture();
    let d = scratch("artifacts");
    let (store, objects, cache) = (d.join("store"), s(&d.join("objects")), s(&d.join("cache")));
    let put = |path: &Path, key: &str| {
        let args = [
            "artifacts",
            "--artifacts",
            &objects,
            "--data-dir",
            &cache,
            "put",
        ];
        fount_ok(&[&args[..], &[&s(path), key]].concat());
    };
    put(&f.base, "models/base");
    put(&f.data, "sets/train.jsonl");
    let mut command = f.finetune("short", &d.join("out"));
    command[2] = "artifacts:models/base".into();
    command[4] = "artifacts:sets/train.jsonl".into();
    command.extend(["--publish".into(), "adapters/pooled".into()]);
    let _pool = PoolProcess::start(&store, &[], &[("FOUNT_ARTIFACTS", objects.as_str())]);
    let id = submit(&store, &[], &command);
    wait_ok(&store, &id, 60);
    let get = [
        "artifacts",
        "--artifacts",
        &objects,
        "--data-dir",
        &cache,
        "get",
        "adapters/pooled",
    ];
    let (got, _) = fount_ok(&get);
    let published = std::fs::read(Path::new(got.trim()).join("adapter_model.safetensors"));
    assert!(published.is_ok_and(|w| w == f.reference("short")));
}

/// The same on PostgreSQL: jobs live in the database (logs in the data directory); a fine-tune
/// preempted by another ends bit-identical, and its attempts are billed there.
#[test]
fn on_postgresql_a_preempted_finetune_matches() {
    let f = fixture();
    let d = scratch("postgres");
    let store = d.join("store");
    let url = fount_store::testing::postgres_url("pool");
    DATABASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(store.clone(), url.clone());
    let _pool = PoolProcess::start(&store, &["--pool-slots", "1"], &[]);
    let low_out = d.join("low");
    let low = submit(
        &store,
        &["--priority", "low"],
        &f.finetune("long", &low_out),
    );
    until_checkpointed(&store, &low);
    let high = submit(
        &store,
        &["--priority", "high"],
        &f.finetune("short", &d.join("high")),
    );
    wait_ok(&store, &high, 60);
    wait_ok(&store, &low, 120);
    assert_eq!(show(&store, &low)["attempts"], 2);
    assert!(
        adapter(&low_out) == f.reference("long"),
        "preempted run's weights differ"
    );
    // nothing went to a SQLite file, and the attempts are billed in PostgreSQL
    assert!(!store.join("fount.db").exists());
    let (csv, _) = fount_ok(&["admin", "--database-url", &url, "usage", "export"]);
    assert_eq!(
        csv.lines().filter(|l| l.contains(",training,")).count(),
        3,
        "{csv}"
    );
}

/// A one-node Slurm cluster (`tools/slurm/cluster`), stopped when dropped.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/slurm/cluster");
        let out = Command::new(&script)
            .args(["start", &s(dir)])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(
            out.status.success(),
            "starting Slurm (scripts/test installs slurmctld, slurmd and munge):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/slurm/cluster");
        let _ = Command::new(&script).args(["stop", &s(&self.dir)]).status();
    }
}

/// On Slurm: a fine-tune submitted to the pool runs as a Slurm batch job, is preempted
/// (`scancel --signal=TERM`) by a higher-priority one, resumes as a new batch job with
/// `--resume`, and its adapter equals the unpreempted one's.
#[test]
fn on_slurm_a_preempted_finetune_resumes_and_matches() {
    let f = fixture();
    let d = scratch("slurm");
    let cluster = Cluster::start(&d.join("cluster"));
    let conf = s(&cluster.dir.join("slurm.conf"));
    let store = d.join("store");
    let pool = PoolProcess::start(
        &store,
        &[
            "--pool-slots",
            "1",
            "--pool-executor",
            "slurm",
            "--preempt-grace",
            "60",
        ],
        &[("SLURM_CONF", &conf)],
    );
    let low_out = d.join("low");
    let low = submit(
        &store,
        &["--priority", "low"],
        &f.finetune("long", &low_out),
    );
    let v = until(&store, &low, "checkpointing on Slurm", 90, |v| {
        v["state"] == "running" && v["checkpoint_step"].as_i64().unwrap_or(0) > 0
    });
    assert_eq!(v["executor"], "slurm");
    let slurm_id = v["handle"].as_str().unwrap_or("").to_string();
    let show_job = Command::new("scontrol")
        .args(["-o", "show", "job", &slurm_id])
        .env("SLURM_CONF", &conf)
        .output()
        .unwrap_or_else(|e| panic!("scontrol: {e}"));
    let line = String::from_utf8_lossy(&show_job.stdout);
    assert!(line.contains(&format!("JobName={low}.1")), "{line}");
    let high_out = d.join("high");
    let high = submit(
        &store,
        &["--priority", "high"],
        &f.finetune("ft", &high_out),
    );
    wait_ok(&store, &high, 120);
    wait_ok(&store, &low, 180);
    let v = show(&store, &low);
    assert_eq!(v["attempts"], 2, "{v:#}");
    assert!(states(&v).contains(&"preempted".to_string()));
    assert_ne!(
        v["handle"].as_str(),
        Some(slurm_id.as_str()),
        "a new batch job"
    );
    drop(pool);
    assert!(adapter(&high_out) == f.reference("ft"));
    assert!(
        adapter(&low_out) == f.reference("long"),
        "preempted run's weights differ"
    );
    drop(cluster);
}
