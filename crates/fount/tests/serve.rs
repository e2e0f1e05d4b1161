use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::tiny_model;

/// A running `fount serve`, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) port: u16,
    /// The admin key it printed on its first start.
    pub(crate) key: String,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `fount serve` again on a store that already has `key`.
    fn start_with_key(model: &Path, extra: &[&str], key: &str) -> Server {
        Server::launch(model, extra, Some(key), "info")
    }

    /// Starts `fount serve` on a free port and waits until it listens.
    fn start(model: &Path, extra: &[&str]) -> Server {
        Server::launch(model, extra, None, "info")
    }

    /// Starts `fount serve` with `FOUNT_LOG=log`.
    fn launch(model: &Path, extra: &[&str], known_key: Option<&str>, log: &str) -> Server {
        Server::launch_in(
            &model.with_extension("data"),
            model,
            extra,
            known_key,
            log,
            &[],
        )
    }

    /// Starts `fount serve` on data directory `data` with `FOUNT_LOG=log` and `env` set.
    pub(crate) fn launch_in(
        data: &Path,
        model: &Path,
        extra: &[&str],
        known_key: Option<&str>,
        log: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fount"))
            .args(["serve", "--model"])
            .arg(model)
            .arg("--data-dir")
            .arg(data)
            .args([
                "--model-name",
                "tiny",
                "--port",
                "0",
                "--kv-memory",
                "64MiB",
            ])
            .args(extra)
            .env("FOUNT_THREADS", "1")
            .env("FOUNT_LOG", log)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting fount serve: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let key = Arc::new(Mutex::new(String::new()));
        let key_sink = key.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(k) = line.strip_prefix("admin API key (shown once; store it now): ") {
                    if let Ok(mut slot) = key_sink.lock() {
                        *slot = k.trim().to_string();
                    }
                }
                if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    let _ = tx.send(port.parse::<u16>().unwrap_or(0));
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "fount serve did not start:\n{}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                )
            });
        let key = match known_key {
            Some(k) => k.to_string(),
            None => key.lock().map(|k| k.clone()).unwrap_or_default(),
        };
        assert!(
            key.starts_with("fk-"),
            "no admin key printed:\n{}",
            log.lock().map(|l| l.clone()).unwrap_or_default()
        );
        Server {
            child,
            port,
            key,
            log,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Resident memory of the server process, in bytes.
    fn rss(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// Usage records as `fount admin usage export --format json` prints them.
pub(crate) fn parse_records(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Billing's invariants after a kill: no request recorded twice, every completed one recorded.
pub(crate) fn each_once(records: &[serde_json::Value], completed: &[String], what: &str) {
    let mut ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    ids.sort();
    let all = ids.len();
    ids.dedup();
    assert_eq!(all, ids.len(), "{what}: a request recorded twice");
    for id in completed {
        assert!(
            ids.binary_search(&id.as_str()).is_ok(),
            "{what}: {id} completed but has no record ({} completed, {} records)",
            completed.len(),
            ids.len()
        );
    }
}

pub(crate) fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Runs a Python program; fails with its output (and a hint when a package is missing).
fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running python3 (scripts/test installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "python3 {args:?} failed (scripts/test installs the openai and schemathesis packages):\n{text}"
    );
    text
}

pub(crate) fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

pub(crate) fn model_with_adapter(name: &str) -> (PathBuf, PathBuf) {
    let root = scratch(name);
    let model = root.join("tiny");
    tiny_model("qwen2", &model);
    let adapters = root.join("adapters");
    let cfg = fount_model::HfConfig::from_file(&model.join("config.json"))
        .and_then(|c| c.resolve())
        .unwrap_or_else(|e| panic!("{e}"));
    fount_model::init::init_lora(&cfg, 4, 0.3, 7, &adapters.join("support"))
        .unwrap_or_else(|e| panic!("{e}"));
    (model, adapters)
}

/// A key of tenant `tenant` (created when new) with `scopes`, made on the server's store.
fn tenant_key(model: &Path, tenant: &str, scopes: &str) -> String {
    let data = model.with_extension("data").display().to_string();
    let _ = crate::util::fount(&["admin", "--data-dir", &data, "tenant", "create", tenant]);
    let (key, _) = crate::util::fount_ok(&[
        "admin",
        "--data-dir",
        &data,
        "key",
        "create",
        "--tenant",
        tenant,
        "--scopes",
        scopes,
    ]);
    key.trim().to_string()
}

#[test]
fn the_openai_sdk_uploads_pages_reads_and_deletes_files() {
    let (model, _) = model_with_adapter("files");
    let server = Server::start(&model, &[]);
    let a = tenant_key(&model, "acme", "files,inference");
    let b = tenant_key(&model, "other", "files");
    let inference = tenant_key(&model, "acme", "inference");
    let data = model.with_extension("train.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = python(&[
        &python_script("files_client.py").display().to_string(),
        &format!("{}/v1", server.url()),
        &a,
        &b,
        &inference,
        &data.display().to_string(),
    ]);
    assert!(
        out.contains("files: all checks passed"),
        "{out}\n{}",
        server.log()
    );
}

#[test]
fn the_openai_sdk_fine_tunes_and_calls_the_model_the_moment_the_job_succeeds() {
    let (model, _) = model_with_adapter("finetuning");
    let server = Server::start(&model, &[]);
    let a = tenant_key(&model, "acme", "files,fine_tuning,inference");
    let b = tenant_key(&model, "other", "files,fine_tuning,inference");
    let work = model.with_extension("work");
    crate::util::fount_ok(&[
        "data",
        "synth",
        "--out",
        &work.join("synth").display().to_string(),
        "--docs",
        "10",
        "--chat-examples",
        "40",
    ]);
    let out = python(&[
        &python_script("finetuning_client.py").display().to_string(),
        &format!("{}/v1", server.url()),
        &a,
        &b,
        env!("CARGO_BIN_EXE_fount"),
        &model.with_extension("data").display().to_string(),
        &model.display().to_string(),
        &work.join("synth/chat/train.jsonl").display().to_string(),
        &work.display().to_string(),
    ]);
    assert!(
        out.contains("fine-tuning: all checks passed"),
        "{out}\n{}",
        server.log()
    );
}

#[test]
fn the_openai_sdk_works_against_fount_serve_and_sigterm_drains() {
    let (model, adapters) = model_with_adapter("sdk");
    sdk_checks(&model, &adapters);
}

#[test]
fn the_openai_sdk_works_against_a_quantised_gguf_model_with_a_lora_adapter() {
    // the same checks over a Q8_0 GGUF file of the model, the adapter applied over its blocks
    let (model, adapters) = model_with_adapter("sdk-gguf");
    let gguf = model.with_extension("gguf");
    crate::util::fount_ok(&[
        "quantize",
        "--model",
        &model.display().to_string(),
        "--out",
        &gguf.display().to_string(),
        "--type",
        "q8_0",
    ]);
    sdk_checks(&gguf, &adapters);
}

/// The `openai` client's checks against `fount serve --model model --adapters adapters`,
/// ending with SIGTERM and a drained exit.
fn sdk_checks(model: &Path, adapters: &Path) {
    let mut server = Server::start(model, &["--adapters", &adapters.display().to_string()]);
    let out = python(&[
        &python_script("openai_client.py").display().to_string(),
        "--base-url",
        &format!("{}/v1", server.url()),
        "--model",
        "tiny",
        "--adapter",
        "support",
        "--pid",
        &server.child.id().to_string(),
        "--api-key",
        &server.key,
    ]);
    assert!(out.contains("all checks passed"), "{out}");
    // the script sent SIGTERM: the server drains and exits 0
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap_or(None) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        server.log()
    );
    let log = server.log();
    assert!(
        log.contains("SIGTERM received") && log.contains("drained; exiting"),
        "{log}"
    );
}

#[test]
fn ten_times_the_queue_gets_429s_and_the_server_stays_up() {
    let (model, _) = model_with_adapter("overload");
    let server = Server::start(&model, &["--max-queue", "4", "--max-running", "2"]);
    let url = format!("{}/v1", server.url());
    let script = python_script("overload.py").display().to_string();
    let run = || {
        python(&[
            &script,
            "--base-url",
            &url,
            "--model",
            "tiny",
            "--requests",
            "40",
            "--api-key",
            &server.key,
        ])
    };
    let before = server.rss();
    let first = run();
    let after_one = server.rss();
    let second = run();
    let after_two = server.rss();
    eprintln!("{first}{second}rss {before} → {after_one} → {after_two}");
    // bounded: a second round of the same load does not grow the server
    assert!(
        after_two <= after_one + (32 << 20),
        "memory grew from {after_one} to {after_two} bytes between two rounds"
    );
    let health = python(&[
        "-c",
        &format!(
            "import urllib.request as u; print(u.urlopen('{}/health').read().decode())",
            server.url()
        ),
    ]);
    assert!(health.contains("\"ok\""), "{health}");
}

#[test]
fn schema_fuzzing_finds_no_server_error_and_no_undocumented_response() {
    let (model, _) = model_with_adapter("fuzz");
    let server = Server::start(&model, &["--max-model-len", "96"]);
    let report = scratch("fuzz-report");
    // revoking keys last: a fuzzed revocation may hit the very key the fuzzer sends, and every
    // operation after it would only see 401s
    let keys = r"^/admin/v1/keys/\{id\}$";
    for (filter, paths) in [
        ("--exclude-path-regex", keys),
        ("--include-path-regex", keys),
    ] {
        let out = Command::new("st")
            .args(["run", &format!("{}/openapi.json", server.url())])
            // most generated requests name the served model (tests/python/schemathesis_hooks.py)
            .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
            .env("PYTHONPATH", python_script(""))
            .args(["--header", &format!("Authorization: Bearer {}", server.key)])
            .args([filter, paths])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--workers",
                "1",
                "--generation-deterministic",
                "--request-timeout",
                "60",
                "--suppress-health-check",
                "too_slow",
                "--no-color",
                "--report-dir",
            ])
            .arg(&report)
            .output()
            .unwrap_or_else(|e| panic!("running schemathesis (`st`; scripts/test installs it): {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "schemathesis found problems:\n{text}\nserver log:\n{}",
            server.log()
        );
        // every operation was reached with the key, not only refused
        assert!(
            !text.contains("Authentication failed"),
            "schemathesis reached some operations only with 401/403:\n{text}"
        );
    }
}

#[test]
fn a_killed_server_keeps_exactly_one_record_per_completed_request() {
    // on SQLite, then on PostgreSQL
    let postgres = fount_store::testing::postgres_url("crash");
    for (name, url) in [("crash", None), ("crash-pg", Some(postgres.as_str()))] {
        let (model, _) = model_with_adapter(name);
        let store_args: Vec<&str> = url.map(|u| vec!["--database-url", u]).unwrap_or_default();
        let mut server = Server::start(&model, &store_args);
        let ids_file = model.with_extension("ids");
        let mut load = Command::new("python3")
            .arg(python_script("crash_load.py"))
            .args(["--base-url", &format!("{}/v1", server.url())])
            .args(["--api-key", &server.key])
            .arg("--out")
            .arg(&ids_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("python3: {e}"));
        // let a few hundred requests complete, then kill -9 under load
        let start = Instant::now();
        while std::fs::read_to_string(&ids_file).map_or(0, |s| s.lines().count()) < 200 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the load did not get going"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = server.child.kill();
        let _ = server.child.wait();
        let _ = load.wait();
        let completed: Vec<String> = std::fs::read_to_string(&ids_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        // the store opens cleanly after the kill and holds every completed request once
        let data = model.with_extension("data");
        let out = Command::new(env!("CARGO_BIN_EXE_fount"))
            .args(["admin", "usage", "export", "--format", "json", "--data-dir"])
            .arg(&data)
            .args(&store_args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let records = parse_records(&String::from_utf8_lossy(&out.stdout));
        each_once(&records, &completed, name);
        // and the server starts again on it
        let again = Server::start_with_key(&model, &store_args, &server.key);
        drop(again);
    }
}

#[test]
fn no_key_ever_appears_in_the_logs() {
    let (model, _) = model_with_adapter("logs");
    // the most verbose logging there is, every crate included
    let server = Server::launch(&model, &[], None, "trace");
    let out = python(&[
        python_script("key_logs.py").to_str().unwrap_or_default(),
        "--base-url",
        &server.url(),
        "--admin-key",
        &server.key,
    ]);
    std::thread::sleep(Duration::from_millis(200));
    let log = server.log();
    let secrets: Vec<&str> = out.lines().filter(|l| l.starts_with("fk-")).collect();
    assert_eq!(secrets.len(), 2, "{out}");
    assert!(log.lines().count() > 20, "trace logging is on:\n{log}");
    for secret in secrets {
        // the secret part after the public prefix
        let tail = &secret[12..];
        assert!(!log.contains(tail), "a key in the logs:\n{log}");
    }
    // the bootstrap admin key is printed once, on its own line, and never logged
    let tail = &server.key[12..];
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(tail)).collect();
    assert_eq!(
        lines,
        [format!(
            "admin API key (shown once; store it now): {}",
            server.key
        )],
        "{log}"
    );
}

/// `logit_bias` keeping the model at `dir` from ending a sequence, as JSON.
fn no_eos(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("generation_config.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let ids: Vec<u64> = match &cfg["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
        v => v.as_u64().into_iter().collect(),
    };
    let bias: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .map(|id| (id.to_string(), (-100).into()))
        .collect();
    serde_json::Value::Object(bias).to_string()
}

#[test]
fn the_openai_sdk_meets_policies_moderation_and_suspensions_set_by_fount_admin() {
    let (model, _) = model_with_adapter("safety");
    let server = Server::start(&model, &[]);
    let acme = tenant_key(&model, "acme", "inference");
    let other = tenant_key(&model, "other", "inference");
    let data = model.with_extension("data").display().to_string();
    let script = python_script("safety_client.py").display().to_string();
    let base = format!("{}/v1", server.url());
    let bias = no_eos(&model);
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--data-dir", &data];
        all.extend_from_slice(args);
        crate::util::fount(&all)
    };
    // what the model says with no policy; a word of it becomes acme's blocked term
    let free = python(&[&script, "free", &base, &other, &bias]);
    let free: String = serde_json::from_str(free.trim()).unwrap_or_else(|e| panic!("{e}: {free}"));
    let term = free
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| w.len() >= 3)
        .max_by_key(|w| w.len())
        .unwrap_or_else(|| panic!("no word in {free:?}"))
        .to_string();
    let policy = model.with_extension("policy.toml");
    let text = format!(
        "hold_chars = 8\n[input]\nblock = [\"illicit\", \"pii\"]\n[output]\nblock = [\"hate\"]\n\
         [[rules]]\ncategory = \"illicit\"\nterms = [\"counterfeit banknotes\", \"假钞\"]\n\
         [[rules]]\ncategory = \"hate\"\nterms = [{term:?}]\n"
    );
    std::fs::write(&policy, &text).unwrap_or_else(|e| panic!("{e}"));
    let p = policy.display().to_string();
    let out = admin(&["policy", "set", "--tenant", "acme", "--file", &p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a bad file is refused, naming what is wrong, and the policy in force stays
    let bad = model.with_extension("bad.toml");
    std::fs::write(&bad, "[input]\nblock = [\"violent\"]\n").unwrap_or_else(|e| panic!("{e}"));
    let out = admin(&[
        "policy",
        "set",
        "--tenant",
        "acme",
        "--file",
        &bad.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"violent\"") && err.contains("not changed"),
        "{err}"
    );
    let out = admin(&["policy", "show", "--tenant", "acme"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    // the server reads the store's policies within its poll
    std::thread::sleep(Duration::from_millis(600));
    let out = python(&[&script, "check", &base, &acme, &other, &term, &bias]);
    assert!(
        out.contains("safety: all checks passed"),
        "{out}\n{}",
        server.log()
    );
    // refused requests are billed nothing, and recorded
    let out = admin(&["usage", "export", "--format", "json", "--tenant", "acme"]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refused: Vec<_> = records.iter().filter(|r| r["status"] == 400).collect();
    assert_eq!(refused.len(), 3, "{records:?}");
    assert!(
        refused.iter().all(|r| r["prompt_tokens"] == 0
            && r["completion_tokens"] == 0
            && r["cost_usd"]
                .as_str()
                .is_some_and(|c| c.trim_start_matches(['0', '.']).is_empty())),
        "{refused:?}"
    );

    // the operator's switch, thrown from the command line
    let out = admin(&["suspend", "--tenant", "acme", "--reason", "unpaid invoice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(600));
    let out = python(&[&script, "suspended", &base, &acme, &other]);
    assert!(out.contains("suspended: all checks passed"), "{out}");
    let out = admin(&["resume", "--tenant", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(600));
    let out = python(&[&script, "served", &base, &acme]);
    assert!(out.contains("served: all checks passed"), "{out}");

    // the audit trail: every decision, hashed, and the switches
    let out = admin(&["audit", "export", "--tenant", "acme"]);
    let audit: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let count = |stage: &str, action: &str| {
        audit
            .iter()
            .filter(|a| a["stage"] == stage && a["action"] == action)
            .count()
    };
    assert_eq!(count("input", "block"), 3, "{audit:?}");
    assert_eq!(count("output", "block"), 2, "{audit:?}");
    assert_eq!(
        (count("operator", "suspend"), count("operator", "resume")),
        (1, 1)
    );
    assert!(audit
        .iter()
        .filter(|a| a["stage"] != "operator")
        .all(|a| a["content"].is_null()
            && a["content_sha256"].as_str().is_some_and(|h| h.len() == 64)));
}

#[test]
fn a_guard_model_fine_tuned_here_in_the_llama_guard_format_drives_a_policy() {
    use fount_safety::guard::{prompt, Turn};
    let root = scratch("guard");
    let model = root.join("tiny");
    tiny_model("qwen2", &model);
    // a synthetic set in the Llama Guard 3 format: "smuggle" is a non-violent crime (S2)
    let nouns = [
        "the boat",
        "a parcel",
        "my friend",
        "the river",
        "some bread",
        "a letter",
        "the garden",
        "our village",
    ];
    let verbs = [
        "paint", "carry", "find", "visit", "cook", "describe", "repair", "watch",
    ];
    let mut lines = String::new();
    for i in 0..240 {
        let bad = i % 2 == 0;
        let verb = if bad {
            "smuggle"
        } else {
            verbs[(i / 2) % verbs.len()]
        };
        let question = format!("How do I {verb} {}?", nouns[(i * 7 / 3) % nouns.len()]);
        let example = serde_json::json!({"messages": [
            {"role": "user", "content": prompt(Turn::User, &[(Turn::User, &question)])},
            {"role": "assistant", "content": if bad { "unsafe\nS2" } else { "safe" }},
        ]});
        lines += &format!("{example}\n");
    }
    let data = root.join("guard.jsonl");
    std::fs::write(&data, lines).unwrap_or_else(|e| panic!("{e}"));
    let cfg = root.join("guard.toml");
    std::fs::write(
        &cfg,
        "r = 16\nlora_alpha = 32\ntarget_modules = \"all-linear\"\nlr = 1e-2\nepochs = 4\ntokens_per_step = 4096\neval_fraction = 0.05\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let adapters = root.join("adapters");
    let s = |p: &Path| p.display().to_string();
    crate::util::fount_ok(&[
        "finetune",
        "--base",
        &s(&model),
        "--data",
        &s(&data),
        "--out",
        &s(&adapters.join("guard")),
        "--config",
        &s(&cfg),
        "--no-ledger",
    ]);
    let server = Server::start(&model, &["--adapters", &s(&adapters)]);
    let acme = tenant_key(&model, "acme", "inference");
    let policy = root.join("policy.toml");
    std::fs::write(
        &policy,
        "guard = \"guard\"\n[input]\nblock = [\"illicit\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let data_dir = model.with_extension("data");
    crate::util::fount_ok(&[
        "admin",
        "--data-dir",
        &s(&data_dir),
        "policy",
        "set",
        "--tenant",
        "acme",
        "--file",
        &s(&policy),
    ]);
    std::thread::sleep(Duration::from_millis(600));
    let base = format!("{}/v1", server.url());
    let out = Command::new("python3")
        .args([
            &s(&python_script("safety_client.py")),
            "guard",
            &base,
            &acme,
        ])
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let out =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.contains("guard: all checks passed"),
        "{out}\n{}",
        server.log()
    );
    // the verdict is in the audit trail; the guard's tokens are the operator's, not the tenant's
    let (audit, _) = crate::util::fount_ok(&[
        "admin",
        "--data-dir",
        &s(&data_dir),
        "audit",
        "export",
        "--tenant",
        "acme",
    ]);
    let records: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let guarded = |stage: &str, action: &str| {
        records.iter().any(|r| {
            r["stage"] == stage
                && r["action"] == action
                && r["rules"].to_string().contains("guard:guard")
        })
    };
    assert!(guarded("input", "block"), "{audit}");
    let (usage, _) = crate::util::fount_ok(&[
        "admin",
        "--data-dir",
        &s(&data_dir),
        "usage",
        "export",
        "--format",
        "json",
        "--tenant",
        "acme",
    ]);
    let records: Vec<serde_json::Value> = usage
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let served = records
        .iter()
        .find(|r| r["status"] == 200)
        .unwrap_or_else(|| panic!("{usage}"));
    // (the guard's question alone, with its category list, is over 1,000 characters)
    assert!(
        served["prompt_tokens"].as_i64().unwrap_or(0) < 200,
        "{served}"
    );
    let metrics = python(&[
        "-c",
        &format!(
            "import urllib.request; print(urllib.request.urlopen('{}/metrics').read().decode())",
            server.url()
        ),
    ]);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fount_guard_tokens_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
