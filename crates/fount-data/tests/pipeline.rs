//! `fount data run` end to end on the synthetic corpus.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use fount_data::pipeline::{read_zst_jsonl, run, PipelineConfig, RunOptions, TokenizerSource};
use fount_data::shard::ShardSet;
use fount_data::synth::{synth_corpus, SynthOptions};
use serde_json::Value;

fn synth(dir: &Path, docs: usize) -> std::path::PathBuf {
    let opts = SynthOptions {
        docs,
        seed: 11,
        docs_per_file: 300,
        chat_examples: 12,
        ..Default::default()
    };
    synth_corpus(dir, &opts).unwrap();
    dir.join("corpus")
}

fn options(input: &Path, out: &Path) -> RunOptions {
    let mut config = PipelineConfig::default();
    config.tokenizer.vocab_size = 600;
    config.chunk_docs = 128;
    config.dedup.run_records = 2000; // several sorted runs per part
    RunOptions {
        inputs: vec![input.to_path_buf()],
        out: out.to_path_buf(),
        config,
        tokenizer: TokenizerSource::Train,
        max_parts: None,
    }
}

fn kept(out: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(out.join("kept"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| read_zst_jsonl(f).unwrap().map(|r| r.unwrap()))
        .collect()
}

#[test]
fn curates_dedups_redacts_and_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let input = synth(&tmp.path().join("synth"), 1500);
    let out = tmp.path().join("run");
    let m = run(&options(&input, &out), &|_| {}).unwrap().unwrap();

    // counts chain from stage to stage
    assert_eq!(m.inputs.iter().map(|i| i.records).sum::<u64>(), 1500);
    for w in m.stages.windows(2) {
        assert_eq!(
            w[0].docs_out, w[1].docs_in,
            "{} -> {}",
            w[0].name, w[1].name
        );
        let dropped: u64 = w[0].dropped.values().sum();
        assert_eq!(w[0].docs_in, w[0].docs_out + dropped, "{}", w[0].name);
    }
    let kept_docs = kept(&out);
    assert_eq!(m.stages.last().unwrap().docs_out, kept_docs.len() as u64);
    assert!(
        kept_docs.len() > 600 && kept_docs.len() < 1200,
        "{}",
        kept_docs.len()
    );
    assert!(
        m.kept_by_language["zh"] > 50,
        "Chinese is curated, not dropped: {:?}",
        m.kept_by_language
    );

    // planted duplicates: no kept document is a copy of another kept one
    let by_id: HashMap<&str, &Value> = kept_docs
        .iter()
        .map(|d| (d["id"].as_str().unwrap(), d))
        .collect();
    let mut near_total = 0;
    let mut near_kept = 0;
    for d in &kept_docs {
        if let Some(src) = d["synth_dup_of"].as_str() {
            if by_id.contains_key(src) {
                assert_ne!(
                    d["synth_kind"], "exact_duplicate",
                    "{} kept beside its source",
                    d["id"]
                );
                near_kept += 1;
            }
        }
    }
    let texts: HashSet<&str> = kept_docs
        .iter()
        .map(|d| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), kept_docs.len(), "exact duplicates remain");
    let dropped_near = m.dedup.near_duplicates;
    near_total += dropped_near + near_kept;
    assert!(
        m.dedup.exact_duplicates > 20 && dropped_near > 20,
        "{:?}",
        m.dedup
    );
    assert!(
        (near_kept as f64) < 0.1 * near_total as f64,
        "{near_kept} of {near_total} near duplicates kept"
    );

    // PII: planted values are gone, look-alikes stay
    let mut planted = 0;
    for d in &kept_docs {
        let text = d["text"].as_str().unwrap();
        for p in d["synth_pii"].as_array().unwrap() {
            planted += 1;
            assert!(
                !text.contains(p["value"].as_str().unwrap()),
                "{} still in {}",
                p["value"],
                d["id"]
            );
        }
    }
    assert!(planted > 20);
    assert!(m.pii.values().sum::<u64>() >= planted);
    assert!(
        kept_docs
            .iter()
            .any(|d| d["text"].as_str().unwrap().contains("version ")),
        "version numbers stay"
    );

    // every drop is recorded with its reason
    let dropped: usize = std::fs::read_dir(out.join("dropped"))
        .unwrap()
        .map(|e| read_zst_jsonl(&e.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(dropped + kept_docs.len(), 1500);

    // shards: documents in equal documents out, in order, split by id
    let tok = fount_data::tokenize::load(&out.join("tokenizer.json")).unwrap();
    let mut from_shards = Vec::new();
    for split in ["train", "validation"] {
        let set = ShardSet::open(&out.join("shards"), split).unwrap();
        for s in set.shards() {
            for i in 0..s.num_docs() {
                let mut ids = s.doc(i).unwrap();
                assert_eq!(ids.pop(), Some(m.tokenizer.eos_id));
                from_shards.push(tok.decode(&ids, false).unwrap());
            }
        }
    }
    assert_eq!(from_shards.len(), kept_docs.len());
    assert_eq!(
        m.tokens.train_docs + m.tokens.validation_docs,
        kept_docs.len() as u64
    );
    assert!(m.tokens.validation_docs > 0);
    let mut want: Vec<String> = kept_docs
        .iter()
        .map(|d| d["text"].as_str().unwrap().to_string())
        .collect();
    let mut got = from_shards.clone();
    want.sort();
    got.sort();
    assert_eq!(
        got, want,
        "decoded shards equal the kept text byte for byte"
    );
    // the train split is in kept order
    let train = ShardSet::open(&out.join("shards"), "train").unwrap();
    let first = tok
        .decode(&train.shards()[0].doc(0).unwrap(), true)
        .unwrap();
    assert!(want.contains(&first));

    // the manifest is on disk and names every output with its hash
    let on_disk = fount_data::pipeline::load_manifest(&out).unwrap();
    assert_eq!(on_disk, m);
    assert!(m
        .outputs
        .iter()
        .any(|o| o.path == "tokenizer.json" && o.sha256.len() == 64));
    assert!(m.inputs.iter().all(|i| i.sha256.len() == 64 && i.bytes > 0));
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let input = synth(&tmp.path().join("synth"), 900);
    let whole = tmp.path().join("whole");
    let a = run(&options(&input, &whole), &|_| {}).unwrap().unwrap();

    let parts = tmp.path().join("parts");
    let mut o = options(&input, &parts);
    o.max_parts = Some(1);
    assert!(run(&o, &|_| {}).unwrap().is_none());
    // a part that was cut off (no done marker) is redone
    let half = parts.join("work/parts/00001");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("filtered.jsonl.zst"), b"garbage").unwrap();
    assert!(run(&o, &|_| {}).unwrap().is_none());
    o.max_parts = None;
    let skipped = std::sync::atomic::AtomicUsize::new(0);
    let b = run(&o, &|e| {
        if let fount_data::pipeline::Event::Skipped(_) = e {
            skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap()
    .unwrap();
    assert_eq!(skipped.into_inner(), 2, "finished files are not redone");
    assert_eq!(a.stages, b.stages);
    assert_eq!(a.outputs, b.outputs, "same bytes out");

    // the same directory reused for fewer inputs holds only the new run's files
    let one = input.join("part-00000.jsonl");
    let mut o = options(&one, &parts);
    o.config.tokenizer.vocab_size = 600;
    let c = run(&o, &|_| {}).unwrap().unwrap();
    let kept_files = std::fs::read_dir(parts.join("kept")).unwrap().count();
    assert_eq!(kept_files, 1);
    assert_eq!(std::fs::read_dir(parts.join("dropped")).unwrap().count(), 2);
    assert_eq!(c.inputs.len(), 1);
}

#[test]
fn pipeline_files_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\":\"The quick brown fox.\"}\n{\"text\": broken\n{\"text\":\"Another line of text here.\"}\n").unwrap();
    // stop at the bad line, naming it
    let e = run(&options(&input, &tmp.path().join("a")), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("in.jsonl:2") && e.contains("malformed JSON"),
        "{e}"
    );
    // skip it when asked: it is recorded as unreadable
    let toml = r#"
chunk_docs = 16
[reader]
on_error = "skip"
[[stages]]
kind = "normalize"
[[stages]]
kind = "gopher_quality"
min_doc_words = 2
min_stop_words = 0
[tokenizer]
vocab_size = 300
"#;
    let mut o = options(&input, &tmp.path().join("b"));
    o.config = PipelineConfig::from_toml(toml).unwrap();
    let m = run(&o, &|_| {}).unwrap().unwrap();
    assert_eq!(m.inputs[0].unreadable, 1);
    assert_eq!(
        m.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        [
            "normalize",
            "gopher_quality",
            "exact_dedup",
            "minhash_dedup"
        ]
    );
    assert_eq!(m.kept_by_language.values().sum::<u64>(), 2);
    // unknown stages and fields are refused with the reason
    let e = PipelineConfig::from_toml("[[stages]]\nkind = \"sparkle\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sparkle"), "{e}");
    let e = PipelineConfig::from_toml("[[stages]]\nkind = \"c4\"\nmin_sentences = 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("min_sentences"), "{e}");
    // the default pipeline round-trips through TOML
    let text = PipelineConfig::default().to_toml().unwrap();
    assert_eq!(
        PipelineConfig::from_toml(&text).unwrap().to_toml().unwrap(),
        text
    );
    // an empty file is an error naming it
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = run(&options(&empty, &tmp.path().join("c")), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("empty.jsonl") && e.contains("no documents"),
        "{e}"
    );
    // a tokenizer that does not exist
    let mut o = options(&input, &tmp.path().join("d"));
    o.config.reader.on_error = fount_data::read::OnError::Skip;
    o.tokenizer = TokenizerSource::File(tmp.path().join("missing.json"));
    let e = run(&o, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
}
