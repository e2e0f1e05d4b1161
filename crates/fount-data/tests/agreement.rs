//! Decisions and MinHash clusters against datatrove's, recorded by
//! `tools/golden/datatrove_decisions.py` on the synthetic English corpus (seed 7, 3000 documents).

use std::collections::HashMap;

use fount_data::dedup::cluster_in_memory;
use fount_data::doc::Document;
use fount_data::filters::{FineWeb, GopherQuality, GopherRepetition, Verdict, C4};
use fount_data::minhash::MinHasher;
use fount_data::stages::{run_chain, Stage};
use fount_data::synth::{synth_corpus, SynthOptions};
use fount_data::words::Lang;
use serde_json::Value;

struct Case {
    id: String,
    text: String,
    decision: String,
    cluster: Option<u64>,
}

fn cases() -> Vec<Case> {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        docs: 3000,
        seed: 7,
        docs_per_file: 1000,
        chinese_fraction: 0.0,
        chat_examples: 10,
    };
    let summary = synth_corpus(dir.path(), &opts).unwrap();
    let mut texts = HashMap::new();
    for f in &summary.corpus_files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            texts.insert(
                v["id"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            );
        }
    }
    let fixture = include_str!("fixtures/datatrove_decisions.jsonl");
    fixture
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            let text = texts
                .remove(&id)
                .expect("fixture id not in the regenerated corpus");
            let want = v["text_xxh64"].as_str().unwrap();
            let got = format!("{:016x}", xxhash_rust::xxh64::xxh64(text.as_bytes(), 0));
            assert_eq!(
                got, want,
                "{id}: synth output changed; regenerate the fixture (see the script)"
            );
            Case {
                id,
                text,
                decision: v["decision"].as_str().unwrap().to_string(),
                cluster: v["cluster"].as_u64(),
            }
        })
        .collect()
}

/// FineWeb's chain as the script runs it, through the pipeline's own chain (words split once
/// and shared): the first rule that drops the document.
fn decide(text: &str) -> String {
    let stages = [
        Stage::GopherRepetition(GopherRepetition::default()),
        Stage::GopherQuality(GopherQuality::default()),
        Stage::C4(C4::default()),
        Stage::FineWeb(FineWeb::default()),
    ];
    let out = run_chain(Document::new("", text), &stages);
    match out.dropped {
        Some((i, reason)) => format!("{}:{reason}", stages[i].name()),
        None => "keep".into(),
    }
}

/// The same decision from each rule's standalone `check`.
fn decide_standalone(text: &str) -> String {
    let mut text = text.to_string();
    if let Verdict::Drop(r) = GopherRepetition::default().check(&text, Lang::Latin) {
        return format!("gopher_repetition:{r}");
    }
    if let Verdict::Drop(r) = GopherQuality::default().check(&text, Lang::Latin) {
        return format!("gopher_quality:{r}");
    }
    if let Verdict::Drop(r) = C4::default().check(&mut text, Lang::Latin) {
        return format!("c4:{r}");
    }
    if let Verdict::Drop(r) = FineWeb::default().check(&text, Lang::Latin) {
        return format!("fineweb:{r}");
    }
    "keep".into()
}

#[test]
fn filter_decisions_agree_with_datatrove() {
    let cases = cases();
    assert!(cases.len() >= 3000);
    let mut differ = Vec::new();
    for c in &cases {
        let got = decide(&c.text);
        assert_eq!(
            got,
            decide_standalone(&c.text),
            "{}: chain and standalone rules disagree",
            c.id
        );
        if got != c.decision {
            differ.push(format!("{}: fount {got}, datatrove {}", c.id, c.decision));
        }
    }
    let agreement = 1.0 - differ.len() as f64 / cases.len() as f64;
    eprintln!(
        "agreement {:.4} ({} of {} differ)",
        agreement,
        differ.len(),
        cases.len()
    );
    for d in &differ {
        eprintln!("  {d}");
    }
    assert!(agreement >= 0.995, "agreement {agreement:.4} below 0.995");
}

#[test]
fn minhash_clusters_agree_with_datatrove() {
    let cases = cases();
    let hasher = MinHasher;
    let sigs: Vec<_> = cases
        .iter()
        .map(|c| hasher.signature(&c.text, Lang::Latin).map(|b| *b))
        .collect();
    let mut uf = cluster_in_memory(&sigs);
    let ours: Vec<u32> = (0..cases.len() as u32).map(|i| uf.find(i)).collect();
    // pairwise precision and recall over all pairs in the same cluster
    let mut by_ref: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, c) in cases.iter().enumerate() {
        if let Some(k) = c.cluster {
            by_ref.entry(k).or_default().push(i);
        }
    }
    let mut by_ours: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, r) in ours.iter().enumerate() {
        by_ours.entry(*r).or_default().push(i);
    }
    let pairs = |groups: Vec<Vec<usize>>| -> std::collections::HashSet<(usize, usize)> {
        let mut out = std::collections::HashSet::new();
        for g in groups {
            for a in 0..g.len() {
                for b in a + 1..g.len() {
                    out.insert((g[a], g[b]));
                }
            }
        }
        out
    };
    let ref_pairs = pairs(by_ref.into_values().collect());
    let our_pairs = pairs(by_ours.into_values().collect());
    let tp = ref_pairs.intersection(&our_pairs).count() as f64;
    let precision = tp / our_pairs.len().max(1) as f64;
    let recall = tp / ref_pairs.len().max(1) as f64;
    let f1 = 2.0 * precision * recall / (precision + recall).max(1e-12);
    eprintln!(
        "pairs: datatrove {}, fount {}, F1 {f1:.4}",
        ref_pairs.len(),
        our_pairs.len()
    );
    assert!(
        ref_pairs.len() > 100,
        "the fixture should hold many duplicate pairs"
    );
    assert!(f1 >= 0.99, "pairwise F1 {f1:.4} below 0.99");
}
