use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fount_ledger::merkle::{leaf_hash, verify_inclusion, MemoryTree};
use fount_ledger::note::Verifier;
use serde_json::{json, Value};

use crate::util::{fount, fount_ok, go_verify, http, tiny_model};

/// A child process killed when dropped, with the address it printed.
struct Proc {
    child: Child,
    addr: String,
    stdout_first: String,
    boot: String,
    log: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `fount args` and waits for "listening on http://…" on stderr.
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fount"))
            .args(args)
            .env("FOUNT_THREADS", "1")
            .env("FOUNT_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting fount: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let mut stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = String::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("fount {args:?} did not start:\n{seen}"));
            seen.push_str(&line);
            seen.push('\n');
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
        };
        // the witness prints its key on stdout before it listens
        let mut first = String::new();
        if args.first() == Some(&"ledger") {
            let mut b = [0u8; 1];
            while stdout.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
                first.push(char::from(b[0]));
            }
        }
        Proc {
            child,
            addr,
            stdout_first: first,
            boot: seen,
            log: rx,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything logged since the last call.
    fn drain_log(&self) -> String {
        let mut s = String::new();
        while let Ok(l) = self.log.try_recv() {
            s.push_str(&l);
            s.push('\n');
        }
        s
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                assert!(s.success(), "exit {s}:\n{}", self.drain_log());
                return;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn json_of(status_body: (u16, String), want: u16) -> Value {
    let (status, body) = status_body;
    assert_eq!(status, want, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `fount serve` keeps the ledger: admin acts, the deployment and bills are logged; a witness
/// cosigns its checkpoints and refuses a rewritten history; Go's sumdb/tlog verifies the live
/// log; a tenant checks its bill; `fount ledger verify --log` names every kind of tampering.
#[test]
fn serve_logs_witnesses_cosign_and_tampering_is_named() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let model = tmp.path().join("tiny");
    tiny_model("qwen2", &model);
    let data = tmp.path().join("data");
    let d = s(&data);
    let (vkey, _) = fount_ok(&[
        "ledger",
        "--data-dir",
        &d,
        "key",
        "--origin",
        "test.fount/ledger",
    ]);
    let vkey = vkey.trim().to_string();
    assert!(vkey.starts_with("test.fount/ledger+"), "{vkey}");
    // the key is made once: asking again gives the same
    assert_eq!(
        fount_ok(&["ledger", "--data-dir", &d, "key"]).0.trim(),
        vkey
    );

    let wdir = tmp.path().join("witness");
    let witness = Proc::start(&[
        "ledger",
        "witness",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &s(&wdir),
        "--name",
        "test.fount/witness",
        "--log",
        &vkey,
    ]);
    let wkey = witness.stdout_first.trim().to_string();
    assert!(wkey.starts_with("test.fount/witness+"), "{wkey:?}");
    let wv = Verifier::parse(&wkey).unwrap_or_else(|e| panic!("{e}"));
    assert!(wv.is_cosigner());

    let serve_args = |witness_url: &str| -> Vec<String> {
        [
            "serve",
            "--model",
            &s(&model),
            "--model-name",
            "tiny",
            "--port",
            "0",
            "--data-dir",
            &d,
            "--kv-memory",
            "64MiB",
            "--no-pool",
            "--ledger-every",
            "1",
            "--witness",
            &format!("{witness_url}={wkey}"),
        ]
        .map(str::to_string)
        .to_vec()
    };
    let args = serve_args(&witness.url());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Proc::start(&argv);
    let boot = server.boot.clone();
    let admin = boot
        .lines()
        .find_map(|l| l.split("admin API key (shown once; store it now): ").nth(1))
        .unwrap_or_else(|| panic!("no admin key:\n{boot}"))
        .trim()
        .to_string();
    let url = server.url();

    // admin acts through the API; requests billed to the tenant
    json_of(
        http(
            "POST",
            &format!("{url}/admin/v1/tenants"),
            Some(&admin),
            Some(r#"{"name":"acme"}"#),
        ),
        200,
    );
    let k = json_of(
        http(
            "POST",
            &format!("{url}/admin/v1/keys"),
            Some(&admin),
            Some(r#"{"tenant":"acme"}"#),
        ),
        200,
    );
    let key = k["key"].as_str().unwrap_or_default().to_string();
    for _ in 0..3 {
        json_of(
            http(
                "POST",
                &format!("{url}/v1/completions"),
                Some(&key),
                Some(r#"{"model":"tiny","prompt":"hello","max_tokens":2}"#),
            ),
            200,
        );
    }
    // entries: the admin tenant and its bootstrap key, the deployment, the tenant, the key; the
    // keys' secrets never
    let (_, bundle) = http(
        "GET",
        &format!("{url}/ledger/tile/entries/000.p/5"),
        None,
        None,
    );
    assert!(
        bundle.contains("key.create") && bundle.contains("deployment/v1"),
        "{bundle}"
    );
    assert!(!bundle.contains(&key) && !bundle.contains(&admin));
    assert_eq!(
        http(
            "GET",
            &format!("{url}/ledger/tile/entries/000.p/200"),
            None,
            None
        )
        .0,
        404
    );
    assert_eq!(
        http("GET", &format!("{url}/ledger/tile/0/x000/000"), None, None).0,
        404
    );

    // the witness cosigns the checkpoint the server serves
    let deadline = Instant::now() + Duration::from_secs(30);
    let cosigned = loop {
        let (_, note) = http("GET", &format!("{url}/ledger/checkpoint"), None, None);
        if note.contains("— test.fount/witness ") && note.lines().nth(1) == Some("5") {
            break note;
        }
        assert!(
            Instant::now() < deadline,
            "no cosignature:\n{note}\n{}",
            server.drain_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let n = fount_ledger::note::Note::parse(&cosigned).unwrap_or_else(|e| panic!("{e}"));
    let log = Verifier::parse(&vkey).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        n.verify(&[log.clone(), wv.clone()]).map(|v| v.len()).ok(),
        Some(2)
    );

    // Go's sumdb verifies the live log; a wrong key is refused
    let go = go_verify(&url, &vkey, &[]);
    let out = String::from_utf8_lossy(&go.stdout).into_owned();
    assert!(
        go.status.success() && out.contains("5 entries"),
        "{out}{}",
        String::from_utf8_lossy(&go.stderr)
    );
    let other = fount_ledger::note::Signer::generate("test.fount/ledger", 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let go = go_verify(&url, &other.verifier_key(), &[]);
    assert!(
        !go.status.success(),
        "a checkpoint verified with another key"
    );

    // the bill: records of this hour are committed at shutdown, and the tenant can check them
    server.stop();
    let server = Proc::start(&argv);
    let url = server.url();
    let hour = fount_store::now_ms() / 1000;
    let proof = json_of(
        http(
            "GET",
            &format!("{url}/v1/usage/proof?hour={hour}"),
            Some(&key),
            None,
        ),
        200,
    );
    let commits = proof["commitments"].as_array().cloned().unwrap_or_default();
    let records: Vec<String> = commits
        .iter()
        .flat_map(|c| c["records"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    assert_eq!(records.len(), 3, "{proof}");
    for c in &commits {
        let mut t = MemoryTree::new();
        for r in c["records"].as_array().into_iter().flatten() {
            t.push(leaf_hash(r.as_str().unwrap_or_default().as_bytes()));
        }
        let root = fount_ledger::statement::hex(&t.root(t.size()));
        assert_eq!(
            c["statement"]["subject"][0]["digest"]["sha256"],
            json!(root)
        );
        let p = fount_ledger::log::parse_tlog_proof(c["proof"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let note = fount_ledger::note::Note::parse(&p.checkpoint).unwrap_or_else(|e| panic!("{e}"));
        note.verify_by(&log).unwrap_or_else(|e| panic!("{e}"));
        let cp = fount_ledger::checkpoint::Checkpoint::parse(&note.text)
            .unwrap_or_else(|e| panic!("{e}"));
        use base64::Engine as _;
        let leaf = base64::engine::general_purpose::STANDARD
            .decode(c["leaf"].as_str().unwrap_or_default())
            .unwrap_or_default();
        verify_inclusion(&leaf_hash(&leaf), p.index, cp.size, &p.path, &cp.root)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // an hour that is not one, no hour at all
    for q in ["hour=-1", "hour=99999999999999", "hour=soon", ""] {
        let (status, body) = http(
            "GET",
            &format!("{url}/v1/usage/proof?{q}"),
            Some(&key),
            None,
        );
        assert!(
            status == 400 && body.contains("hour"),
            "{q}: {status} {body}"
        );
    }
    // another tenant's bill needs an admin key
    let other = http(
        "GET",
        &format!("{url}/v1/usage/proof?hour={hour}&tenant=ten_x"),
        Some(&key),
        None,
    );
    assert_eq!(other.0, 403, "{}", other.1);
    server.stop();

    let verify_log = || fount(&["ledger", "--data-dir", &d, "verify", "--log"]);
    let ok = verify_log();
    let text = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(
        ok.status.success() && text.contains("1 hourly bills (3 usage records)"),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // tampering, each named: a usage record after its hour was committed, a stored entry, a
    // truncated log
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let store = rt
        .block_on(fount_store::Store::open(&data, None))
        .unwrap_or_else(|e| panic!("{e}"));
    let sql = |q: &str| {
        rt.block_on(fount_store::testing::execute(&store, q))
            .unwrap_or_else(|e| panic!("{q}: {e}"));
    };
    let fails_with = |needle: &str| {
        let out = verify_log();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(needle),
            "want {needle:?}:\n{err}"
        );
    };
    sql("UPDATE usage_records SET completion_tokens = completion_tokens + 1 WHERE tenant_id <> ''");
    fails_with("no longer match");
    sql("UPDATE usage_records SET completion_tokens = completion_tokens - 1 WHERE tenant_id <> ''");
    sql("UPDATE ledger_entries SET body = REPLACE(body, 'acme', 'acne') WHERE idx = 3");
    fails_with("entry 3 was changed");
    sql("UPDATE ledger_entries SET body = REPLACE(body, 'acne', 'acme') WHERE idx = 3");
    assert!(verify_log().status.success());

    // a rewritten history: entries from 3 on replaced, re-signed with the log's own key; the
    // witness that cosigned size 4 refuses what follows
    let size: u64 = rt
        .block_on(store.ledger_size())
        .unwrap_or_else(|e| panic!("{e}"));
    sql("DELETE FROM ledger_entries WHERE idx >= 3");
    fails_with("truncated");
    sql("DELETE FROM ledger_hashes WHERE NOT ((level = 0 AND idx < 3) OR (level = 1 AND idx < 1))");
    sql("DELETE FROM ledger_checkpoints WHERE size >= 3");
    sql("UPDATE ledger_head SET size = 3");
    assert!(size > 3);
    let ledger = fount_ledger::Ledger::open(store.clone(), &data).unwrap_or_else(|e| panic!("{e}"));
    let forged = rt
        .block_on(
            ledger.append(
                &(0..12)
                    .map(|i| (format!("{{\"forged\":{i}}}"), "test"))
                    .collect::<Vec<_>>(),
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let witness_size: u64 = {
        let st: Value =
            serde_json::from_slice(&std::fs::read(wdir.join("witness.json")).unwrap_or_default())
                .unwrap_or_default();
        st["logs"]["test.fount/ledger"][0].as_u64().unwrap_or(0)
    };
    assert!(witness_size >= 4);
    let proof = rt
        .block_on(ledger.consistency_proof(witness_size.min(forged.size), forged.size))
        .unwrap_or_else(|e| panic!("{e}"));
    let body = fount_ledger::witness::add_checkpoint_body(witness_size, &proof, &forged.checkpoint);
    let (status, msg) = http(
        "POST",
        &format!("{}/add-checkpoint", witness.url()),
        None,
        Some(&body),
    );
    assert_eq!(status, 422, "{msg}");
    rt.block_on(store.close());
}

/// `kill -9` while batches are appended: every acknowledged entry is kept, and the log (entries,
/// hashes, checkpoints) still verifies.
#[test]
fn kill_9_during_appends_loses_no_acknowledged_entry() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = s(&tmp.path().join("data"));
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fount"))
            .args([
                "bench",
                "ledger",
                "--append-only",
                &d,
                "--entries",
                "10000000",
                "--batch",
                "50",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let out = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let mut acked = 0u64;
        let wanted = 20 + 15 * round;
        for (n, line) in BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .enumerate()
        {
            if let Some(v) = line.strip_prefix("appended ") {
                acked = v.trim().parse().unwrap_or(acked);
            }
            if n >= wanted {
                break;
            }
        }
        let _ = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let (out, _) = fount_ok(&["ledger", "--data-dir", &d, "verify", "--log"]);
        let entries: u64 = out
            .split("ok: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            entries >= acked && acked > 0,
            "{entries} entries, {acked} acknowledged: {out}"
        );
    }
}

/// `fount ledger verify` on artifacts: a changed byte anywhere on the way back to the raw data
/// is named; bad arguments get clear errors.
#[test]
fn ledger_verify_names_what_changed_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = s(&tmp.path().join("store"));
    let raw = tmp.path().join("raw.jsonl");
    let chat: String = (0..40)
        .map(|i| {
            format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":\"say {i}\"}},{{\"role\":\"assistant\",\"content\":\"{i}\"}}]}}\n"
            )
        })
        .collect();
    std::fs::write(&raw, chat).unwrap_or_else(|e| panic!("{e}"));
    let model = tmp.path().join("tiny");
    tiny_model("qwen2", &model);
    let out = tmp.path().join("adapter");
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, "epochs = 1.0\nr = 2\n").unwrap_or_else(|e| panic!("{e}"));
    let finetune = |out: &Path, extra: &[&str]| {
        let (base, data, out, cfg) = (s(&model), s(&raw), s(out), s(&cfg));
        let mut args = vec!["finetune", "--base", &base, "--data", &data, "--out", &out];
        args.extend(["--config", &cfg, "--data-dir", &d]);
        args.extend(extra);
        fount_ok(&args);
    };
    finetune(&out, &[]);
    assert!(out.join("provenance.json").exists());
    let verify = |p: &Path| fount(&["ledger", "--data-dir", &d, "verify", &s(p)]);
    let ok = verify(&out);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(
        text.contains("raw.jsonl: raw input") && text.contains("model.safetensors: raw input"),
        "{text}"
    );

    let fails = |p: &Path, needle: &str| {
        let o = verify(p);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            !o.status.success() && e.contains(needle),
            "want {needle:?}:\n{e}"
        );
    };
    // one byte of the training data, of the base model, of the adapter: each named, then put
    // back
    for (file, at, named) in [
        (raw.clone(), 20, "raw.jsonl: its sha256 is"),
        (
            model.join("model.safetensors"),
            usize::MAX,
            "model.safetensors: its sha256 is",
        ),
        (
            out.join("adapter_model.safetensors"),
            100,
            "adapter_model.safetensors: its sha256 is",
        ),
    ] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let mut changed = bytes.clone();
        let at = at.min(changed.len() - 1);
        changed[at] ^= 1;
        std::fs::write(&file, &changed).unwrap_or_else(|e| panic!("{e}"));
        fails(&out, named);
        std::fs::write(&file, &bytes).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(verify(&out).status.success());

    // no provenance; a key that is not the log's; nonsense; a missing entry index
    fails(&model, "no provenance.json");
    let o = fount(&[
        "ledger",
        "--data-dir",
        &d,
        "verify",
        &s(&out),
        "--key",
        "nonsense",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--key"));
    let other =
        fount_ledger::note::Signer::generate("x.example/log", 1).unwrap_or_else(|e| panic!("{e}"));
    let o = fount(&[
        "ledger",
        "--data-dir",
        &d,
        "verify",
        &s(&out),
        "--key",
        &other.verifier_key(),
    ]);
    assert!(!o.status.success(), "verified with another log's key");
    let o = fount(&["ledger", "--data-dir", &d, "show", "99"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no entry 99"));
    let o = fount(&["ledger", "--data-dir", &d, "verify"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--log"));
    // a witness or a served log given keys that are not keys
    let o = fount(&[
        "ledger",
        "witness",
        "--dir",
        &s(&tmp.path().join("w")),
        "--log",
        "nonsense",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--log nonsense"));
    let o = fount(&[
        "serve",
        "--model",
        &s(&model),
        "--data-dir",
        &d,
        "--witness",
        "http://127.0.0.1:1",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("URL=VERIFIER_KEY"));
    let o = fount(&[
        "ledger",
        "--data-dir",
        &d,
        "key",
        "--origin",
        "another.example/log",
    ]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("not \"another.example/log\"")
    );
    // --no-ledger writes no provenance
    let out2 = tmp.path().join("adapter2");
    finetune(&out2, &["--no-ledger"]);
    assert!(!out2.join("provenance.json").exists());
    let (cp, _) = fount_ok(&["ledger", "--data-dir", &d, "checkpoint"]);
    assert_eq!(cp.lines().nth(1), Some("1"), "{cp}");
}
