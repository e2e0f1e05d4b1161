//! GGUF files against llama.cpp (llama-cpp-python built from source, `scripts/test`): fount
//! writes each type with `quantize`, loads it, and must agree with llama.cpp on the same file.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::quantize::{quantize, QuantType};
use fount_model::{Arch, Batch, GenerateOptions, Loaded, Logits, Model, NoCache};

const TEXT: &str = "The river rose in the spring and the town moved its market up the hill, \
    where the old church stood. Children carried baskets of bread and apples; the miller \
    counted sacks by lamplight. In 1887 the bridge was rebuilt in stone, with three arches \
    and a toll house on the north bank. Trade came back slowly: first the barges of coal, \
    then timber, then the weekly boat from the coast with letters, cloth and news. 雨が降る. \
    河水在春天上涨，市场搬到了山上。 def add(a, b): return a + b  # 42 + 17 = 59";

/// A model whose predictions are confident (weights of std 0.1), so agreement measures the
/// kernels rather than ties between near-equal logits.
fn model_dir(arch: Arch, name: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{name}-hf"));
    let shape = preset(arch, name).unwrap();
    let opts = InitOptions {
        seed: 7,
        dtype: DType::F32,
        std: 0.02,
        tokenizer: None,
    };
    init_model(arch, &shape, &opts, &out).unwrap();
    out
}

struct Reference {
    vocab: usize,
    logits: Vec<f32>,
    greedy: Vec<Vec<u32>>,
}

/// llama.cpp's logits of `sequences` and greedy continuations of `prompts` on `gguf`.
fn llama_cpp(gguf: &Path, sequences: &[Vec<u32>], prompts: &[Vec<u32>], n: usize) -> Reference {
    let dir = gguf.parent().unwrap();
    let req = dir.join("request.json");
    let body = serde_json::json!({"sequences": sequences, "greedy": prompts, "greedy_tokens": n});
    fs_err::write(&req, body.to_string()).unwrap();
    let out = dir.join("reference");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/gguf/llama_cpp_reference.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(gguf)
        .arg(&req)
        .arg(&out)
        .status()
        .expect("python3 runs (scripts/test installs llama-cpp-python in target/test-python)");
    assert!(
        status.success(),
        "llama.cpp reference failed on {}; scripts/test builds llama-cpp-python from source",
        gguf.display()
    );
    let bytes = fs_err::read(out.with_extension("f32")).unwrap();
    let logits = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let meta: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(out.with_extension("json")).unwrap()).unwrap();
    Reference {
        vocab: meta["vocab"].as_u64().unwrap() as usize,
        logits,
        greedy: serde_json::from_value(meta["greedy"].clone()).unwrap(),
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Mean negative log-likelihood of each next token under `logits` rows.
fn nll(rows: &[&[f32]], next: &[u32]) -> f64 {
    let mut total = 0f64;
    for (row, &t) in rows.iter().zip(next) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        total += max + sum.ln() - row[t as usize] as f64;
    }
    total
}

/// Checks one type: next-token agreement on teacher-forced text, perplexity, and (where
/// `greedy_equal`) greedy continuations token for token.
fn check(hf: &Path, dir: &Path, qtype: &str, greedy_equal: bool) {
    let gguf = dir.join(format!(
        "{}-{qtype}.gguf",
        hf.file_name().unwrap().to_string_lossy()
    ));
    quantize(hf, &gguf, QuantType::parse(qtype).unwrap()).unwrap();
    let loaded = Loaded::open(&gguf, None, DType::F32).unwrap();
    let hf_tok = fount_model::Tokenizer::from_file(&hf.join("tokenizer.json")).unwrap();
    let ids = loaded.tokenizer.encode(TEXT, false).unwrap();
    assert_eq!(
        ids,
        hf_tok.encode(TEXT, false).unwrap(),
        "{qtype}: GGUF tokenizer differs"
    );
    // overlapping windows of the text, each from position 0
    let len = 48.min(ids.len());
    let sequences: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let start = (i * 7) % (ids.len() - len + 1);
            ids[start..start + len].to_vec()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = sequences.iter().take(3).map(|s| s[..8].to_vec()).collect();
    let reference = llama_cpp(&gguf, &sequences, &prompts, 24);
    let model: &Model = &loaded.model;
    assert_eq!(reference.vocab, model.config().vocab_size);
    let (mut agree, mut total) = (0usize, 0usize);
    let (mut ours_nll, mut theirs_nll) = (0f64, 0f64);
    let mut offset = 0;
    for seq in &sequences {
        let out = model
            .forward(&Batch::single(seq, 0), &mut NoCache, Logits::All)
            .unwrap();
        let ours: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
        let v = reference.vocab;
        let theirs = &reference.logits[offset..offset + seq.len() * v];
        offset += seq.len() * v;
        let ours_rows: Vec<&[f32]> = ours.chunks(v).collect();
        let theirs_rows: Vec<&[f32]> = theirs.chunks(v).collect();
        for (pos, (a, b)) in ours_rows.iter().zip(&theirs_rows).enumerate() {
            if std::env::var("GGUF_DEBUG").is_ok() {
                let d = a
                    .iter()
                    .zip(b.iter())
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                let mut s: Vec<f32> = b.to_vec();
                s.sort_by(|x, y| y.total_cmp(x));
                eprintln!(
                    "{qtype} pos {pos}: maxdiff {d:.4} margin {:.4} agree {}",
                    s[0] - s[1],
                    argmax(a) == argmax(b)
                );
            }
            agree += usize::from(argmax(a) == argmax(b));
            total += 1;
        }
        let n = seq.len() - 1;
        ours_nll += nll(&ours_rows[..n], &seq[1..]);
        theirs_nll += nll(&theirs_rows[..n], &seq[1..]);
    }
    let rate = agree as f64 / total as f64;
    let ppl_ratio = (ours_nll / theirs_nll.max(1e-9) - 1.0).abs();
    let (ppl_ours, ppl_theirs) = (
        (ours_nll / (total - sequences.len()) as f64).exp(),
        (theirs_nll / (total - sequences.len()) as f64).exp(),
    );
    eprintln!(
        "{qtype}: next-token agreement {agree}/{total} ({:.2} %), perplexity {ppl_ours:.3} vs llama.cpp {ppl_theirs:.3}",
        rate * 100.0
    );
    assert!(
        rate >= 0.99,
        "{qtype}: next-token agreement {rate:.4} < 0.99"
    );
    assert!(
        (ppl_ours / ppl_theirs - 1.0).abs() <= 0.01,
        "{qtype}: perplexity {ppl_ours} vs llama.cpp {ppl_theirs} (nll ratio off by {ppl_ratio})"
    );
    if greedy_equal {
        for (i, p) in prompts.iter().enumerate() {
            let opts = GenerateOptions {
                max_tokens: 24,
                ..Default::default()
            };
            let got = fount_model::generate(model, &loaded.tokenizer, p, &opts, |_| {}).unwrap();
            assert_eq!(
                got.tokens, reference.greedy[i],
                "{qtype}: greedy prompt {i}"
            );
        }
    }
}

#[test]
fn llama_gguf_agrees_with_llama_cpp_at_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let hf = model_dir(Arch::Llama, "small", dir.path());
    for (t, greedy) in [
        ("f32", true),
        ("f16", true),
        ("q8_0", true),
        ("bf16", false),
        ("q4_0", false),
        ("q4_k_m", false),
        ("q5_k_m", false),
        ("q6_k", false),
    ] {
        check(&hf, dir.path(), t, greedy);
    }
}

#[test]
fn qwen2_gguf_agrees_with_llama_cpp() {
    // tied embeddings and q/k/v biases; rows of 64 values fall back from the K types
    let dir = tempfile::tempdir().unwrap();
    let hf = model_dir(Arch::Qwen2, "tiny", dir.path());
    for (t, greedy) in [("f32", true), ("q8_0", true), ("q4_k_m", false)] {
        check(&hf, dir.path(), t, greedy);
    }
}

#[test]
fn gguf_f32_equals_the_safetensors_model() {
    let dir = tempfile::tempdir().unwrap();
    let hf = model_dir(Arch::Llama, "tiny", dir.path());
    let gguf = dir.path().join("m.gguf");
    quantize(&hf, &gguf, QuantType::F32).unwrap();
    let a = Model::load(&hf, DType::F32, &Device::Cpu).unwrap();
    let b = Model::load_gguf(&gguf).unwrap();
    let seq: Vec<u32> = (1..40).collect();
    let la = a
        .forward(&Batch::single(&seq, 0), &mut NoCache, Logits::All)
        .unwrap();
    let lb = b
        .forward(&Batch::single(&seq, 0), &mut NoCache, Logits::All)
        .unwrap();
    let diff = (la.logits - lb.logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
}
