//! GGUF files against llama.cpp (llama-cpp-python built from source by `scripts/test`): a model
//! trained here is written at each type by `fount quantize`, loaded by fount and by llama.cpp,
//! and the two must agree on held-out text.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use fount_model::sampling::argmax;
use fount_model::{Batch, GenerateOptions, Loaded, Logits, Model, NoCache};

use crate::util::{fount_err, fount_ok};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A Qwen2 of rows of 256 values (whole K-quant super-blocks; tied embeddings, q/k/v biases)
/// pretrained for 200 steps on synthetic text, and held-out text of the same kind: a trained
/// model's predictions have the margins a real model's have, which a random one's do not.
fn trained() -> &'static (PathBuf, String) {
    static MODEL: OnceLock<(PathBuf, String)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("gguf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        for (seed, out) in [("1", "synth"), ("2", "heldout")] {
            let out = s(&d.join(out));
            fount_ok(&["data", "synth", "--out", &out, "--docs", "3000", "--seed", seed]);
        }
        let curated = d.join("curated");
        fount_ok(&[
            "data", "run", "--input", &s(&d.join("synth/corpus")), "--out", &s(&curated),
            "--vocab-size", "1024",
        ]);
        let init = d.join("init");
        fount_ok(&[
            "model", "init", "--arch", "qwen2", "--preset", "small", "--tokenizer",
            &s(&curated.join("tokenizer.json")), "--out", &s(&init),
        ]);
        let cfg = d.join("run.toml");
        let text = format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 200\nseq_len = 64\nmicro_batch = 8\nlr = 3e-3\n",
            s(&init),
            s(&curated.join("shards")),
            s(&d.join("run"))
        );
        std::fs::write(&cfg, text).unwrap_or_else(|e| panic!("{e}"));
        fount_ok(&["train", "--config", &s(&cfg)]);
        let doc = std::fs::read_to_string(d.join("heldout/corpus/part-00000.jsonl"))
            .unwrap_or_else(|e| panic!("{e}"));
        let first: serde_json::Value =
            serde_json::from_str(doc.lines().next().unwrap_or("{}")).unwrap_or_default();
        let held = first["text"].as_str().unwrap_or_default().to_string();
        assert!(held.len() > 500, "held-out text: {held:?}");
        (d.join("run/final"), held)
    })
}

/// The trained model written by `fount quantize` as `name.gguf` of type `qtype`.
fn quantized(name: &str, qtype: &str) -> PathBuf {
    let (hf, _) = trained();
    let gguf = hf.parent().unwrap_or(hf).join(format!("{name}.gguf"));
    let _ = std::fs::remove_file(&gguf);
    fount_ok(&[
        "quantize",
        "--model",
        &s(hf),
        "--out",
        &s(&gguf),
        "--type",
        qtype,
    ]);
    gguf
}

struct Reference {
    vocab: usize,
    logits: Vec<f32>,
    greedy: Vec<Vec<u32>>,
}

/// llama.cpp's logits of `sequences` and greedy continuations of `prompts` on `gguf`
/// (`tools/gguf/llama_cpp_reference.py`).
fn llama_cpp(gguf: &Path, sequences: &[Vec<u32>], prompts: &[Vec<u32>], n: usize) -> Reference {
    let stem = gguf.with_extension("");
    let req = stem.with_extension("request.json");
    let body = serde_json::json!({"sequences": sequences, "greedy": prompts, "greedy_tokens": n});
    std::fs::write(&req, body.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let out = stem.with_extension("reference");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/gguf/llama_cpp_reference.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(gguf)
        .arg(&req)
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        status.success(),
        "llama.cpp failed on {} (scripts/test builds llama-cpp-python into target/test-python)",
        gguf.display()
    );
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", out.display()));
    let bytes = std::fs::read(with("f32")).unwrap_or_else(|e| panic!("{e}"));
    let logits = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(with("json")).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Reference {
        vocab: meta["vocab"].as_u64().unwrap_or(0) as usize,
        logits,
        greedy: serde_json::from_value(meta["greedy"].clone()).unwrap_or_default(),
    }
}

/// Summed negative log-likelihood of each next token under the rows of logits.
fn nll(rows: &[&[f32]], next: &[u32]) -> f64 {
    let mut total = 0f64;
    for (row, &t) in rows.iter().zip(next) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        total += max + sum.ln() - row[t as usize] as f64;
    }
    total
}

/// One type: `fount quantize`, then next-token agreement with llama.cpp on teacher-forced
/// held-out text (≥ 99 %), perplexity within 1 % of llama.cpp's, and, where `greedy_equal`,
/// greedy continuations token for token.
fn check(qtype: &str, greedy_equal: bool) {
    let (hf, held) = trained();
    let gguf = quantized(&format!("model-{qtype}"), qtype);
    let loaded = Loaded::open(&gguf, None, DType::F32).unwrap_or_else(|e| panic!("{e}"));
    let hf_tok = fount_model::Tokenizer::from_file(&hf.join("tokenizer.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = loaded
        .tokenizer
        .encode(held, false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ids,
        hf_tok.encode(held, false).unwrap_or_else(|e| panic!("{e}")),
        "{qtype}: the tokenizer converted from GGUF metadata encodes differently"
    );
    // six windows of 64 tokens from the held-out text, each from position 0
    let len = 64.min(ids.len());
    let sequences: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let start = (i * 37) % (ids.len() - len + 1);
            ids[start..start + len].to_vec()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = sequences.iter().take(3).map(|s| s[..8].to_vec()).collect();
    let reference = llama_cpp(&gguf, &sequences, &prompts, 24);
    let model: &Model = &loaded.model;
    let v = reference.vocab;
    assert_eq!(v, model.config().vocab_size, "{qtype}: vocabulary");
    let (mut agree, mut total) = (0usize, 0usize);
    let (mut ours_nll, mut theirs_nll, mut predicted) = (0f64, 0f64, 0usize);
    for (i, seq) in sequences.iter().enumerate() {
        let out = model
            .forward(&Batch::single(seq, 0), &mut NoCache, Logits::All)
            .unwrap_or_else(|e| panic!("{e}"));
        let ours: Vec<f32> = out
            .logits
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .unwrap_or_else(|e| panic!("{e}"));
        let theirs = &reference.logits[i * len * v..(i + 1) * len * v];
        let ours_rows: Vec<&[f32]> = ours.chunks(v).collect();
        let theirs_rows: Vec<&[f32]> = theirs.chunks(v).collect();
        for (a, b) in ours_rows.iter().zip(&theirs_rows) {
            agree += usize::from(argmax(a) == argmax(b));
            total += 1;
        }
        let n = seq.len() - 1;
        ours_nll += nll(&ours_rows[..n], &seq[1..]);
        theirs_nll += nll(&theirs_rows[..n], &seq[1..]);
        predicted += n;
    }
    let rate = agree as f64 / total as f64;
    let ppl = (ours_nll / predicted as f64).exp();
    let ppl_ref = (theirs_nll / predicted as f64).exp();
    eprintln!(
        "{qtype}: next-token agreement with llama.cpp {agree}/{total} ({:.2} %); perplexity {ppl:.4}, llama.cpp {ppl_ref:.4}",
        rate * 100.0
    );
    assert!(
        rate >= 0.99,
        "{qtype}: next-token agreement {rate:.4} < 0.99"
    );
    assert!(
        (ppl / ppl_ref - 1.0).abs() <= 0.01,
        "{qtype}: perplexity {ppl} is not within 1 % of llama.cpp's {ppl_ref}"
    );
    if greedy_equal {
        for (i, p) in prompts.iter().enumerate() {
            let opts = GenerateOptions {
                max_tokens: 24,
                ..Default::default()
            };
            let got = fount_model::generate(model, &loaded.tokenizer, p, &opts, |_| {})
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                got.tokens, reference.greedy[i],
                "{qtype}: greedy from prompt {i}"
            );
        }
    }
}

#[test]
fn f32_f16_and_q8_0_generate_what_llama_cpp_generates() {
    for t in ["f32", "f16", "q8_0"] {
        check(t, true);
    }
}

#[test]
fn every_quantised_type_agrees_with_llama_cpp() {
    for t in ["bf16", "q4_0", "q4_k_m", "q5_k_m", "q6_k"] {
        check(t, false);
    }
}

#[test]
fn a_gguf_file_serves_through_fount_generate() {
    let (hf, _) = trained();
    let gguf = quantized("generate-q8_0", "q8_0");
    let (from_gguf, _) = fount_ok(&[
        "generate",
        "--model",
        &s(&gguf),
        "--prompt",
        "The village",
        "--max-tokens",
        "12",
    ]);
    assert!(from_gguf.trim().len() > 5, "{from_gguf:?}");
    // the same text through a tokenizer given on the command line
    let (overridden, _) = fount_ok(&[
        "generate",
        "--model",
        &s(&gguf),
        "--tokenizer",
        &s(&hf.join("tokenizer.json")),
        "--prompt",
        "The village",
        "--max-tokens",
        "12",
    ]);
    assert_eq!(from_gguf, overridden);
    // an f32 file generates exactly what the safetensors model does
    let f32 = quantized("generate-f32", "f32");
    let (a, _) = fount_ok(&[
        "generate",
        "--model",
        &s(&f32),
        "--prompt",
        "The village",
        "--max-tokens",
        "24",
    ]);
    let (b, _) = fount_ok(&[
        "generate",
        "--model",
        &s(hf),
        "--prompt",
        "The village",
        "--max-tokens",
        "24",
    ]);
    assert_eq!(a, b);
    // quantize refuses to overwrite, and names unknown types
    let err = fount_err(&[
        "quantize",
        "--model",
        &s(hf),
        "--out",
        &s(&f32),
        "--type",
        "f32",
    ]);
    assert!(err.contains("already holds"), "{err}");
    let err = fount_err(&[
        "quantize",
        "--model",
        &s(hf),
        "--out",
        &s(&gguf.with_extension("x.gguf")),
        "--type",
        "q3",
    ]);
    assert!(err.contains("unknown type \"q3\""), "{err}");
    let model = Model::load(hf, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.config().hidden_size, 256);
}

#[test]
fn a_mixtral_gguf_computes_what_llama_cpp_computes() {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("moe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    crate::util::tiny_model("mixtral", &d.join("hf"));
    let seqs: Vec<Vec<u32>> = (0..3u32)
        .map(|s| (0..48).map(|i| (i * 37 + s * 101 + 3) % 500).collect())
        .collect();
    for qtype in ["f32", "q8_0"] {
        let gguf = d.join(format!("moe-{qtype}.gguf"));
        fount_ok(&[
            "quantize",
            "--model",
            &s(&d.join("hf")),
            "--out",
            &s(&gguf),
            "--type",
            qtype,
        ]);
        let reference = llama_cpp(&gguf, &seqs, &[], 0);
        let model = Model::load_gguf(&gguf).unwrap_or_else(|e| panic!("{e}"));
        let v = reference.vocab;
        assert_eq!(v, model.config().vocab_size);
        let (mut worst, mut spread, mut agree, mut total) = (0f32, 0f32, 0usize, 0usize);
        for (i, seq) in seqs.iter().enumerate() {
            let ours: Vec<f32> = model
                .forward(&Batch::single(seq, 0), &mut NoCache, Logits::All)
                .and_then(|o| Ok(o.logits.flatten_all()?.to_vec1()?))
                .unwrap_or_else(|e| panic!("{e}"));
            let theirs = &reference.logits[i * seq.len() * v..(i + 1) * seq.len() * v];
            for (a, b) in ours.chunks(v).zip(theirs.chunks(v)) {
                agree += usize::from(argmax(a) == argmax(b));
                total += 1;
                let (lo, hi) = b
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
                spread = spread.max(hi - lo);
            }
            worst = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(worst, f32::max);
        }
        // and it serves
        fount_ok(&[
            "generate",
            "--model",
            &s(&gguf),
            "--prompt",
            "The",
            "--max-tokens",
            "4",
        ]);
        eprintln!("mixtral {qtype}: logits within {worst:.2e} of llama.cpp's (spread {spread:.3}); argmax {agree}/{total}");
        let bound = if qtype == "f32" { 1e-3 } else { 2e-2 };
        assert!(
            agree as f64 >= 0.99 * total as f64,
            "mixtral {qtype}: next-token agreement {agree}/{total}"
        );
        assert!(
            worst <= bound * spread,
            "mixtral {qtype}: logits differ by {worst} (spread {spread})"
        );
    }
}
