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
    // mixtral (written as llama with stacked experts)
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Mistral, Arch::Mixtral] {
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
    // weights that cannot be read are an error, and nothing is left behind
    let out = dir.path().join("bad.gguf");
    fs_err::write(hf.join("model.safetensors"), b"not safetensors").unwrap();
    assert!(quantize(&hf, &out, QuantType::Q8_0).is_err());
    assert!(!out.exists() && !out.with_extension("gguf.partial").exists());
    // a directory that is not a model
    let e = quantize(dir.path(), &dir.path().join("x.gguf"), QuantType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn mixtral_experts_read_stacked_or_one_tensor_each() {
    use candle_core::quantized::gguf_file::Value;
    use fount_model::gguf::{write, Gguf, WriteTensor};
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = written(Arch::Mixtral, QuantType::Q8_0, dir.path());
    let g = Gguf::open(&gguf).unwrap();
    assert!(g.info("blk.0.ffn_gate_exps.weight").is_some());
    assert_eq!(
        g.info("blk.0.ffn_gate_inp.weight").unwrap().dtype,
        candle_core::quantized::GgmlDType::F32,
        "the router stays f32"
    );
    // the same file with each expert in a tensor of its own (llama.cpp's format before 2024)
    let mut tensors = Vec::new();
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    for t in g.tensors() {
        let data = g.bytes(t);
        match t.name.strip_suffix("_exps.weight") {
            Some(base) => {
                let each = data.len() / t.dims[0];
                for e in 0..t.dims[0] {
                    tensors.push(WriteTensor {
                        name: format!("{base}.{e}.weight"),
                        dtype: t.dtype,
                        dims: t.dims[1..].to_vec(),
                    });
                    bytes.push(data[e * each..(e + 1) * each].to_vec());
                }
            }
            None => {
                tensors.push(WriteTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    dims: t.dims.clone(),
                });
                bytes.push(data.to_vec());
            }
        }
    }
    let meta: Vec<(String, Value)> = g
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let split = dir.path().join("split.gguf");
    let mut f = fs_err::File::create(&split).unwrap();
    write(&mut f, &meta, &tensors, |i| Ok(bytes[i].clone())).unwrap();
    drop(f);
    let seq: Vec<u32> = (1..40).map(|i| (i * 11) % 500).collect();
    let a = logits(&Model::load_gguf(&gguf).unwrap(), &seq);
    let b = logits(&Model::load_gguf(&split).unwrap(), &seq);
    assert_eq!(a, b);
    // a layer short of experts names the tensor
    let short = dir.path().join("short.gguf");
    let keep: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].name != "blk.1.ffn_up.3.weight")
        .collect();
    let kept: Vec<WriteTensor> = keep
        .iter()
        .map(|&i| WriteTensor {
            name: tensors[i].name.clone(),
            dtype: tensors[i].dtype,
            dims: tensors[i].dims.clone(),
        })
        .collect();
    let mut f = fs_err::File::create(&short).unwrap();
    write(&mut f, &meta, &kept, |i| Ok(bytes[keep[i]].clone())).unwrap();
    drop(f);
    let e = load_err(&short);
    assert!(e.contains("blk.1.ffn_up.3.weight"), "{e}");
}
