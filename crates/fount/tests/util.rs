//! Helpers: running the binary and making tiny models.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `fount` with `args`.
pub fn fount(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fount"))
        .args(args)
        .env("FOUNT_THREADS", "1")
        // runs are logged to a store of the tests' own unless a test names one
        .env(
            "FOUNT_DATA_DIR",
            std::env::var("FOUNT_DATA_DIR")
                .unwrap_or_else(|_| concat!(env!("CARGO_TARGET_TMPDIR"), "/fount-data").into()),
        )
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

/// Go's `sumdb/tlog` and `sumdb/note` in `tools/ledger/verify`, built once per test binary
/// (GOPATH mode, offline, against Debian's `golang-golang-x-mod-dev`).
pub fn go_verifier() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let out = tmp.join("ledger-verify");
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let built = Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg("./tools/ledger/verify")
                .current_dir(&root)
                .env("GO111MODULE", "off")
                .env("GOPATH", "/usr/share/gocode")
                .env("GOCACHE", tmp.join("go-cache"))
                .output()
                .unwrap_or_else(|e| {
                    panic!("go: {e} (scripts/test installs golang-go and golang-golang-x-mod-dev)")
                });
            assert!(
                built.status.success(),
                "building tools/ledger/verify:\n{}",
                String::from_utf8_lossy(&built.stderr)
            );
            out
        })
        .clone()
}

/// Runs the Go verifier against the server at `url` with the log's verifier `key`, checking
/// the given provenance files too; returns its output.
pub fn go_verify(url: &str, key: &str, provenance: &[&Path]) -> Output {
    Command::new(go_verifier())
        .args(["-url", url, "-key", key])
        .args(provenance)
        .output()
        .unwrap_or_else(|e| panic!("ledger-verify: {e}"))
}

/// A minimal HTTP/1.1 exchange (`Connection: close`), for a test that needs no client library.
pub fn http(method: &str, url: &str, key: Option<&str>, body: Option<&str>) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("{url}: {e}"));
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        // the API takes JSON; a witness takes its text protocol
        let ty = if body.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        };
        req.push_str(&format!(
            "Content-Type: {ty}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, mut payload) = text
        .split_once("\r\n\r\n")
        .map_or((text.as_str(), String::new()), |(h, b)| (h, b.to_string()));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = payload.as_str();
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n.min(after.len())]);
            rest = after.get(n + 2..).unwrap_or("");
        }
        payload = out;
    }
    (status, payload)
}
