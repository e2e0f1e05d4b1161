//! Helpers: running the binary and making tiny models.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `fount` with `args`.
pub fn fount(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fount"))
        .args(args)
        .env("FOUNT_THREADS", "1")
        .output()
        .unwrap_or_else(|e| panic!("running fount: {e}"))
}

/// Runs `fount` and asserts success, returning stdout.
pub fn fount_ok(args: &[&str]) -> (String, String) {
    let out = fount(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "fount {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

/// Runs `fount` and asserts failure, returning stderr.
pub fn fount_err(args: &[&str]) -> String {
    let out = fount(args);
    assert!(!out.status.success(), "fount {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a tiny model of `arch` into `dir`.
pub fn tiny_model(arch: &str, dir: &Path) {
    fount_ok(&[
        "model",
        "init",
        "--arch",
        arch,
        "--preset",
        "tiny",
        "--out",
        &dir.display().to_string(),
    ]);
}
