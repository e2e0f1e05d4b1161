//! `fount data synth | run | inspect` as a user runs them, including a run killed midway.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{fount_err, fount_ok};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn synth_then_run_then_inspect() {
    let dir = tmp();
    let synth = dir.path().join("synth");
    let (out, _) = fount_ok(&[
        "data",
        "synth",
        "--out",
        &s(&synth),
        "--docs",
        "600",
        "--seed",
        "4",
    ]);
    assert!(out.contains("wrote 600 documents"), "{out}");
    assert!(synth.join("chat/train.jsonl").exists() && synth.join("chat/test.jsonl").exists());
    // the same seed writes the same bytes
    let again = dir.path().join("again");
    fount_ok(&[
        "data",
        "synth",
        "--out",
        &s(&again),
        "--docs",
        "600",
        "--seed",
        "4",
    ]);
    let a = std::fs::read(synth.join("corpus/part-00000.jsonl")).unwrap_or_default();
    assert_eq!(
        a,
        std::fs::read(again.join("corpus/part-00000.jsonl")).unwrap_or_default()
    );
    assert!(!a.is_empty());

    let run = dir.path().join("run");
    let (out, _) = fount_ok(&[
        "data",
        "run",
        "--input",
        &s(&synth.join("corpus")),
        "--out",
        &s(&run),
        "--vocab-size",
        "512",
    ]);
    assert!(
        out.contains("600 documents in") && out.contains("peak memory"),
        "{out}"
    );
    for p in [
        "manifest.json",
        "tokenizer.json",
        "pipeline.toml",
        "shards/train-00000.bin",
        "kept/part-00000.jsonl.zst",
    ] {
        assert!(run.join(p).exists(), "{p} missing");
    }
    let m = manifest(&run);
    assert_eq!(m["tokenizer"]["vocab_size"], 512);
    let (out, _) = fount_ok(&[
        "data",
        "inspect",
        &s(&run),
        "--reason",
        "gopher_short_doc",
        "--show",
        "2",
    ]);
    assert!(
        out.contains("gopher_quality") && out.contains("gopher_short_doc") && out.contains("--- "),
        "{out}"
    );
    // the printed default pipeline is a valid pipeline file
    let (toml, _) = fount_ok(&["data", "pipeline"]);
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, toml).unwrap_or_default();
    let run2 = dir.path().join("run2");
    fount_ok(&[
        "data",
        "run",
        "--input",
        &s(&synth.join("corpus")),
        "--out",
        &s(&run2),
        "--pipeline",
        &s(&pipeline),
        "--tokenizer",
        &s(&run.join("tokenizer.json")),
    ]);
    assert_eq!(
        manifest(&run2)["outputs"],
        m["outputs"],
        "same pipeline and tokenizer, same outputs"
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_bytes() {
    let dir = tmp();
    let synth = dir.path().join("synth");
    fount_ok(&[
        "data",
        "synth",
        "--out",
        &s(&synth),
        "--docs",
        "4000",
        "--docs-per-file",
        "250",
        "--seed",
        "9",
    ]);
    let corpus = s(&synth.join("corpus"));
    let whole = dir.path().join("whole");
    fount_ok(&[
        "data",
        "run",
        "--input",
        &corpus,
        "--out",
        &s(&whole),
        "--vocab-size",
        "400",
    ]);

    // kill the run as soon as its first input file is finished
    let cut = dir.path().join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fount"))
        .env(
            "FOUNT_DATA_DIR",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/fount-data"),
        )
        .args([
            "--threads",
            "1",
            "data",
            "run",
            "--input",
            &corpus,
            "--out",
            &s(&cut),
            "--vocab-size",
            "400",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let marker = cut.join("work/parts/00000/done.json");
    let start = Instant::now();
    while !marker.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap_or_default();
    let _ = child.wait();
    assert!(marker.exists(), "the first file never finished");
    assert!(
        !cut.join("manifest.json").exists(),
        "the run was killed before the end"
    );

    let (out, err) = fount_ok(&[
        "data",
        "run",
        "--input",
        &corpus,
        "--out",
        &s(&cut),
        "--vocab-size",
        "400",
    ]);
    assert!(out.contains("4000 documents in"), "{out}{err}");
    assert_eq!(
        manifest(&cut)["outputs"],
        manifest(&whole)["outputs"],
        "resumed output differs"
    );
    assert_eq!(manifest(&cut)["stages"], manifest(&whole)["stages"]);
}

#[test]
fn data_errors_are_clear() {
    let dir = tmp();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap_or_default();
    let out = s(&dir.path().join("out"));
    let err = fount_err(&["data", "run", "--input", &s(&bad), "--out", &out]);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("malformed JSON"),
        "{err}"
    );
    let err = fount_err(&[
        "data",
        "run",
        "--input",
        &s(&dir.path().join("missing")),
        "--out",
        &out,
    ]);
    assert!(err.contains("missing"), "{err}");
    let err = fount_err(&["data", "inspect", &s(dir.path())]);
    assert!(err.contains("no manifest.json"), "{err}");
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        "[[stages]]\nkind = \"gopher_quality\"\nmin_doc_wordz = 3\n",
    )
    .unwrap_or_default();
    let err = fount_err(&[
        "data",
        "run",
        "--input",
        &s(&bad),
        "--out",
        &out,
        "--pipeline",
        &s(&p),
    ]);
    assert!(err.contains("min_doc_wordz"), "{err}");
}
