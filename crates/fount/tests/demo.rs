use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{fount_err, fount_ok};

/// The number of held-out prompts asked through the API.
const ASKED: usize = 30;

/// Dates whose days the task must handle too (the last days of months, a leap day), asked
/// through the API with their expected answers.
const MONTH_ENDS: [(&str, &str); 4] = [
    ("2024-12-31", "31/12/2024"),
    ("2033-08-30", "30/08/2033"),
    ("2024-02-29", "29/02/2024"),
    ("1999-04-30", "30/04/1999"),
];

#[test]
fn the_demo_learns_the_task_serves_it_metered_and_reuses_its_steps() {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_string_lossy().into_owned();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fount"))
        .args(["demo", "--dir", &d, "--size", "small", "--port", "0"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting fount demo: {e}"));
    let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
    let err_log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut out = String::new();
    let (mut url, mut key) = (None, None);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        out.push_str(&line);
        out.push('\n');
        if let Some(rest) = line.strip_prefix("Serving fount-demo and its adapter dates on ") {
            url = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(k) = line.strip_prefix("The demo tenant's key: ") {
            key = Some(k.trim().to_string());
        }
        if line.contains("/v1/usage") {
            // the last of the examples: the server is up
            break;
        }
    }
    let (Some(url), Some(key)) = (url, key) else {
        let _ = child.kill();
        panic!(
            "the demo did not start serving:\n{out}\n{}",
            err_log.join().unwrap_or_default()
        );
    };
    eprintln!("demo ready in {:.0}s", started.elapsed().as_secs_f64());
    // every step reported; the loss curve and the manifest written
    for needle in [
        "[1/4] data",
        "documents in",
        "dropped:",
        "[2/4] pretrain",
        "[3/4] fine-tune",
        "held-out task accuracy",
        "[4/4] serve",
        "curl ",
        "from openai import OpenAI",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    assert!(dir.join("pretrain/loss.png").exists() && dir.join("data/manifest.json").exists());
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap_or_default())
            .unwrap_or_default();
    let (base_ok, adapter_ok, prompts) = (
        eval["base_correct"].as_u64().unwrap_or(0),
        eval["adapter_correct"].as_u64().unwrap_or(0),
        eval["prompts"].as_u64().unwrap_or(0),
    );
    eprintln!("held-out exact answers: base {base_ok}/{prompts}, adapter {adapter_ok}/{prompts}");
    // the LoRA fine-tune lifts held-out task accuracy from the base's to at least 90 %
    assert!(
        prompts >= 30 && adapter_ok * 10 >= prompts * 9 && base_ok < adapter_ok,
        "{eval}"
    );

    // the official client, with the demo tenant's key, against both models
    let test = dir.join("synth/chat/test.jsonl");
    let py = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/demo_client.py"
        ))
        .args([
            "--base-url",
            &url,
            "--api-key",
            &key,
            "--n",
            &ASKED.to_string(),
            "--dates",
            &MONTH_ENDS.map(|(d, _)| d).join(","),
            "--test",
        ])
        .arg(&test)
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let text = String::from_utf8_lossy(&py.stdout).into_owned();
    assert!(
        py.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
    let (base, adapter) = (
        r["correct"]["fount-demo"].as_u64().unwrap_or(0),
        r["correct"]["dates"].as_u64().unwrap_or(0),
    );
    eprintln!("through the API: base {base}/{ASKED}, adapter {adapter}/{ASKED}");
    assert!(adapter > base && adapter as usize * 10 >= ASKED * 9, "{r}");
    // days 29, 30 and 31 too (the task draws every calendar date)
    for (date, expected) in MONTH_ENDS {
        assert_eq!(r["answers"]["dates"][date], expected, "{date}: {r}");
    }
    // the tenant was metered: one record per request, tokens as the responses said
    let rows = r["usage"]["data"].as_array().cloned().unwrap_or_default();
    for model in ["fount-demo", "dates"] {
        let row = rows
            .iter()
            .find(|row| row["model"] == model)
            .unwrap_or_else(|| panic!("no usage of {model}: {r}"));
        let requests = ASKED + MONTH_ENDS.len();
        assert_eq!(row["requests"].as_u64(), Some(requests as u64), "{row}");
        let metered = row["prompt_tokens"].as_u64().unwrap_or(0)
            + row["completion_tokens"].as_u64().unwrap_or(0);
        assert_eq!(Some(metered), r["tokens"][model].as_u64(), "{row}");
    }

    // the fine-tuning example the demo prints runs as printed: a tenant's own model, served
    let marker = "# fine-tune your own model";
    let snippet = out
        .split_once(marker)
        .and_then(|(_, rest)| rest.split_once("python3 -c '"))
        .and_then(|(_, rest)| rest.split_once("\n'\n"))
        .map(|(code, _)| code.to_string())
        .unwrap_or_else(|| panic!("no fine-tuning example in:\n{out}"));
    let ft = Command::new("python3")
        .args(["-c", &snippet])
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let text = String::from_utf8_lossy(&ft.stdout).into_owned();
    assert!(
        ft.status.success() && text.contains("succeeded ft:fount-demo:demo:mine:"),
        "{text}{}",
        String::from_utf8_lossy(&ft.stderr)
    );
    eprintln!("the printed fine-tuning example: {}", text.trim());

    // the ledger, checked live by Go's sumdb/tlog and sumdb/note: the checkpoint's signature,
    // the tiles against its root, every entry's inclusion, and the served adapter's provenance
    let store = dir.join("store");
    let (vkey, _) = fount_ok(&["ledger", "--data-dir", &store.to_string_lossy(), "key"]);
    let adapter_prov = dir.join("adapters/dates/provenance.json");
    let go = crate::util::go_verify(&url, vkey.trim(), &[&adapter_prov]);
    let go_out = String::from_utf8_lossy(&go.stdout).into_owned();
    assert!(
        go.status.success() && go_out.contains("every entry is included"),
        "{go_out}{}",
        String::from_utf8_lossy(&go.stderr)
    );
    eprintln!("Go verifier: {}", go_out.trim());

    // Ctrl-C: the server drains and the demo exits cleanly
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "{status}: {}",
        err_log.join().unwrap_or_default()
    );

    // the served adapter verifies back to the synthetic corpus; the whole log verifies, bills
    // (committed at shutdown) included; the API's fine-tuned adapter was logged by its pool job
    let st = store.to_string_lossy().into_owned();
    let adapter = dir.join("adapters/dates").to_string_lossy().into_owned();
    let (v, _) = fount_ok(&["ledger", "--data-dir", &st, "verify", &adapter]);
    assert!(
        v.contains("synth/corpus/part-00000.jsonl: raw input")
            && v.contains("pretrain/final")
            && v.contains("/data: "),
        "{v}"
    );
    let (v, _) = fount_ok(&["ledger", "--data-dir", &st, "verify", "--log"]);
    assert!(!v.contains(" 0 hourly bills"), "{v}");
    let ft_prov = find_file(&store.join("fine_tuning"), "provenance.json")
        .unwrap_or_else(|| panic!("the fine-tuning job's adapter has no provenance.json"));
    let ft_dir = ft_prov
        .parent()
        .unwrap_or(&store)
        .to_string_lossy()
        .into_owned();
    fount_ok(&["ledger", "--data-dir", &st, "verify", &ft_dir]);

    // a second run reuses every finished step
    let again = Instant::now();
    let (out, _) = fount_ok(&["demo", "--dir", &d, "--size", "small", "--no-serve"]);
    assert_eq!(out.matches("done already").count(), 5, "{out}");
    assert!(
        again.elapsed() < Duration::from_secs(20),
        "{:?}",
        again.elapsed()
    );
    // ...and refuses to mix sizes in one directory
    let e = fount_err(&["demo", "--dir", &d, "--size", "standard", "--no-serve"]);
    assert!(e.contains("another --size"), "{e}");
}

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.map_while(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
