// Tests fail by panicking: unwrapping here is the assertion.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Each workspace crate and the workspace crates it may depend on (normal and build
/// dependencies), as `docs/architecture.md` draws the layers: arrows point down, never up.
const ALLOWED: &[(&str, &[&str])] = &[
    ("fount-tokenizer", &[]),
    ("fount-model", &["fount-tokenizer"]),
    ("fount-data", &["fount-tokenizer"]),
    ("fount-store", &[]),
    ("fount-artifacts", &[]),
    ("fount-ledger", &["fount-store"]),
    ("fount-train", &["fount-model", "fount-data"]),
    ("fount-engine", &["fount-model"]),
    ("fount-pool", &["fount-store"]),
    ("fount-safety", &["fount-data"]),
    (
        "fount-server",
        &[
            "fount-artifacts",
            "fount-engine",
            "fount-ledger",
            "fount-model",
            "fount-safety",
            "fount-store",
        ],
    ),
    (
        "fount",
        &[
            "fount-artifacts",
            "fount-data",
            "fount-engine",
            "fount-ledger",
            "fount-model",
            "fount-pool",
            "fount-safety",
            "fount-server",
            "fount-store",
            "fount-train",
        ],
    ),
];

/// A job is a `fount …` command line: the pool never links the training code or the tensors.
const NOT_IN_POOL: &[&str] = &["fount-model", "fount-train", "fount-data", "candle-core"];

/// Crates that must not reach these packages, even through others: compute never sees records
/// (no database) or requests (no HTTP server), and moderation is pure decisions the server
/// stores.
const COMPUTE: &[&str] = &[
    "fount-tokenizer",
    "fount-model",
    "fount-data",
    "fount-train",
    "fount-engine",
    "fount-safety",
];
const NOT_IN_COMPUTE: &[&str] = &["sqlx", "sqlx-core", "axum", "axum-core", "hyper", "tower"];

/// The resolved graph of normal and build dependencies: package name → dependency names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut g = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
            .map(|d| names[d["pkg"].as_str().unwrap()].to_string())
            .collect();
        g.insert(names[node["id"].as_str().unwrap()].to_string(), deps);
    }
    g
}

#[test]
fn workspace_crates_depend_only_downward() {
    let g = graph();
    let workspace: BTreeSet<&str> = ALLOWED.iter().map(|(c, _)| *c).collect();
    for name in g.keys().filter(|n| n.starts_with("fount")) {
        assert!(
            workspace.contains(name.as_str()),
            "{name} is not in the layer table of this test and docs/architecture.md"
        );
    }
    for (krate, allowed) in ALLOWED {
        let deps = &g[*krate];
        for d in deps.iter().filter(|d| workspace.contains(d.as_str())) {
            assert!(
                allowed.contains(&d.as_str()),
                "{krate} depends on {d}, which docs/architecture.md does not allow"
            );
        }
    }
}

#[test]
fn compute_crates_link_no_database_and_no_http_server() {
    let g = graph();
    for krate in COMPUTE {
        let seen = reachable(&g, krate);
        for banned in NOT_IN_COMPUTE {
            assert!(
                !seen.contains(*banned),
                "{krate} reaches {banned}; compute crates take paths and values, never records or requests"
            );
        }
    }
}

/// Every crate `from` reaches through normal and build dependencies.
fn reachable(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(n) = todo.pop() {
        for d in &g[&n] {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_pool_links_no_training_code() {
    let g = graph();
    let seen = reachable(&g, "fount-pool");
    for banned in NOT_IN_POOL {
        assert!(
            !seen.contains(*banned),
            "fount-pool reaches {banned}; the pool runs `fount` command lines, it never links them"
        );
    }
}

#[test]
fn the_ledger_links_no_compute_and_no_http_server() {
    let g = graph();
    let seen = reachable(&g, "fount-ledger");
    for banned in NOT_IN_POOL
        .iter()
        .chain(["fount-engine", "axum", "hyper"].iter())
    {
        assert!(
            !seen.contains(*banned),
            "fount-ledger reaches {banned}; the log holds digests and names, never tensors or requests"
        );
    }
}

#[test]
fn artifacts_link_no_database_and_no_http_server() {
    let g = graph();
    let seen = reachable(&g, "fount-artifacts");
    for banned in ["sqlx", "sqlx-core", "axum", "fount-store", "candle-core"] {
        assert!(
            !seen.contains(banned),
            "fount-artifacts reaches {banned}; it moves files, it keeps no records"
        );
    }
}
