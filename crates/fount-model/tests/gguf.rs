//! GGUF files: what `quantize` writes loads back to the same model, and every malformed file is
//! a clear error naming what is wrong. (Agreement with llama.cpp at every type is checked on a
//! trained model in `crates/fount/tests/gguf.rs`.)

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::quantize::{quantize, QuantType};
use fount_model::{Arch, Batch, Logits, Model, NoCache};

fn written(arch: Arch, qtype: QuantType, dir: &Path) -> (PathBuf, PathBuf) {
    let hf = dir.join("hf");
    init_model(
        arch,
        &preset(arch, "tiny").unwrap(),
        &InitOptions::default(),
        &hf,
    )
    .unwrap();
    let gguf = dir.join("m.gguf");
    quantize(&hf, &gguf, qtype).unwrap();
    (hf, gguf)
}

fn logits(m: &Model, seq: &[u32]) -> Vec<f32> {
    m.forward(&Batch::single(seq, 0), &mut NoCache, Logits::All)
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn an_f32_gguf_computes_what_the_safetensors_model_computes() {
    // llama (query/key rows permuted on write and back on read, Llama 3 RoPE scaling as
    // rope_freqs), qwen2 (biases, tied embeddings), mistral
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Mistral] {
        let dir = tempfile::tempdir().unwrap();
        let (hf, gguf) = written(arch, QuantType::F32, dir.path());
        let a = Model::load(&hf, DType::F32, &Device::Cpu).unwrap();
        let b = Model::load_gguf(&gguf).unwrap();
        let seq: Vec<u32> = (1..60).map(|i| (i * 7) % 500).collect();
        let (la, lb) = (logits(&a, &seq), logits(&b, &seq));
        let worst = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{arch:?}: logits differ by {worst}");
    }
}

/// Offset of the tensor-table entry of `name` (just after its name) in `bytes`.
fn entry(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap()
        + key.len()
}

fn load_err(path: &Path) -> String {
    Model::load_gguf(path).unwrap_err().to_string()
}

#[test]
fn malformed_files_are_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = written(Arch::Llama, QuantType::Q8_0, dir.path());
    let good = fs_err::read(&gguf).unwrap();
    let bad = dir.path().join("bad.gguf");

    // truncated: the last tensor ends past the end of the file
    fs_err::write(&bad, &good[..good.len() - 100]).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("truncated") && e.contains("output.weight"),
        "{e}"
    );
    // truncated inside the header
    fs_err::write(&bad, &good[..200]).unwrap();
    let e = load_err(&bad);
    assert!(e.contains("truncated"), "{e}");

    // an unknown tensor type (ggml type 99) names the tensor
    let mut b = good.clone();
    let at = entry(&b, "blk.1.ffn_up.weight") + 4 + 2 * 8;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    fs_err::write(&bad, &b).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("ggml type 99"),
        "{e}"
    );

    // a shape that does not match the metadata names the tensor and both shapes
    let mut b = good.clone();
    let at = entry(&b, "blk.0.attn_k.weight") + 4 + 8;
    b[at..at + 8].copy_from_slice(&16u64.to_le_bytes()); // 32 key/value rows → 16
    fs_err::write(&bad, &b).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("blk.0.attn_k.weight") && e.contains("[16, 64]"),
        "{e}"
    );

    // an architecture fount does not run
    let mut b = good.clone();
    let at = entry(&b, "general.architecture") + 4 + 8;
    b[at..at + 5].copy_from_slice(b"gemma");
    fs_err::write(&bad, &b).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("\"gemma\"") && e.contains("not supported"),
        "{e}"
    );

    // a missing tensor
    let mut b = good.clone();
    let at = entry(&b, "blk.1.attn_norm.weight") - "blk.1.attn_norm.weight".len();
    b[at..at + 3].copy_from_slice(b"BLK");
    fs_err::write(&bad, &b).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("blk.1.attn_norm.weight") && e.contains("missing"),
        "{e}"
    );

    // not a GGUF file at all, and no file
    fs_err::write(&bad, b"{\"model_type\": \"llama\"}").unwrap();
    let e = load_err(&bad);
    assert!(e.contains("not a GGUF file"), "{e}");
    let e = load_err(&dir.path().join("absent.gguf"));
    assert!(e.contains("absent.gguf"), "{e}");

    // a compute dtype is for model directories
    let e = fount_model::Loaded::open(&gguf, None, DType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model directories"), "{e}");

    // and the intact file still loads
    Model::load_gguf(&gguf).unwrap();
}

#[test]
fn quantize_refuses_what_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let (hf, gguf) = written(Arch::Qwen2, QuantType::Q4KM, dir.path());
    // an existing output is never overwritten
    let before = fs_err::read(&gguf).unwrap();
    let e = quantize(&hf, &gguf, QuantType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds"), "{e}");
    assert_eq!(fs_err::read(&gguf).unwrap(), before);
    // Mixtral is refused, and nothing is left behind
    let moe = dir.path().join("moe");
    init_model(
        Arch::Mixtral,
        &preset(Arch::Mixtral, "tiny").unwrap(),
        &InitOptions::default(),
        &moe,
    )
    .unwrap();
    let out = dir.path().join("moe.gguf");
    let e = quantize(&moe, &out, QuantType::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Mixtral"), "{e}");
    assert!(!out.exists());
    // a directory that is not a model
    let e = quantize(dir.path(), &dir.path().join("x.gguf"), QuantType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}
