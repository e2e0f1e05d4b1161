//! SentencePiece GGUF vocabularies (`tokenizer.ggml.model = llama`, as Llama 2, Mistral and
//! TinyLlama files have them): fount's conversion tokenizes and detokenizes as llama.cpp does on
//! the same file. The vocabulary is trained here by `sentencepiece`
//! (`tools/gguf/sentencepiece_reference.py`) on this repository's documentation and Chinese text.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use fount_model::gguf::{write, WriteTensor};
use fount_model::Loaded;

use crate::util::fount_ok;

fn reference(args: &[&str]) {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/gguf/sentencepiece_reference.py");
    let status = Command::new("python3")
        .arg(&script)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        status.success(),
        "{args:?} failed (scripts/test installs sentencepiece and llama-cpp-python into target/test-python)"
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A training corpus: the repository's documentation, and Chinese text repeated enough that its
/// common characters become pieces while rare ones fall back to bytes.
fn corpus(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut text = String::new();
    for doc in ["README.md", "docs/architecture.md", "docs/benchmarks.md"] {
        text += &std::fs::read_to_string(root.join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
    }
    for _ in 0..40 {
        text += "\n智能应该像水和电一样流动：一个共享、开放、运行良好的平台。\n\
                 模型服务按每个词元计量，配额由租户共享。\n";
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

/// A two-layer Llama of random weights with the vocabulary of `pieces` in its metadata.
fn llama_gguf(pieces: &[serde_json::Value], path: &Path) {
    let vocab = pieces.len();
    let (hidden, ff, heads, kv_heads, layers) = (64usize, 128usize, 4u32, 2u32, 2usize);
    let head_dim = hidden / heads as usize;
    let arr =
        |f: &dyn Fn(&serde_json::Value) -> Value| Value::Array(pieces.iter().map(f).collect());
    let u = |x: usize| Value::U32(x as u32);
    let meta: Vec<(String, Value)> = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", u(256)),
        ("llama.embedding_length", u(hidden)),
        ("llama.block_count", u(layers)),
        ("llama.feed_forward_length", u(ff)),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.dimension_count", u(head_dim)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", arr(&|p| Value::String(p[0].as_str().unwrap_or_default().into()))),
        ("tokenizer.ggml.scores", arr(&|p| Value::F32(p[1].as_f64().unwrap_or(0.0) as f32))),
        ("tokenizer.ggml.token_type", arr(&|p| Value::I32(p[2].as_i64().unwrap_or(1) as i32))),
        ("tokenizer.ggml.unknown_token_id", u(0)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            Value::String(
                "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}".into(),
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let kv = kv_heads as usize * head_dim;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![vocab, hidden]),
        ("output_norm.weight".into(), vec![hidden]),
        ("output.weight".into(), vec![vocab, hidden]),
    ];
    for l in 0..layers {
        for (name, dims) in [
            ("attn_norm", vec![hidden]),
            ("attn_q", vec![hidden, hidden]),
            ("attn_k", vec![kv, hidden]),
            ("attn_v", vec![kv, hidden]),
            ("attn_output", vec![hidden, hidden]),
            ("ffn_norm", vec![hidden]),
            ("ffn_gate", vec![ff, hidden]),
            ("ffn_up", vec![ff, hidden]),
            ("ffn_down", vec![hidden, ff]),
        ] {
            shapes.push((format!("blk.{l}.{name}.weight"), dims));
        }
    }
    let tensors: Vec<WriteTensor> = shapes
        .iter()
        .map(|(name, dims)| WriteTensor {
            name: name.clone(),
            dtype: GgmlDType::F32,
            dims: dims.clone(),
        })
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut file = std::fs::File::create(path).unwrap_or_else(|e| panic!("{e}"));
    write(&mut file, &meta, &tensors, |i| {
        let (name, dims) = &shapes[i];
        let n: usize = dims.iter().product();
        let norm = name.contains("norm");
        Ok((0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let x = if norm {
                    1.0
                } else {
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                };
                x.to_le_bytes()
            })
            .collect())
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_sentencepiece_vocabulary_tokenizes_as_llama_cpp_does() {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("spm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let pieces_json = dir.join("pieces.json");
    reference(&["train", &s(&corpus(&dir)), "1200", &s(&pieces_json)]);
    let pieces = read_json(&pieces_json)
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(pieces.len() == 1200, "{} pieces", pieces.len());
    let gguf = dir.join("spm.gguf");
    llama_gguf(&pieces, &gguf);

    let texts = [
        "Hello world",
        "fount serves tenants through an OpenAI-compatible API.",
        " a leading space, and  two   runs of spaces ",
        "lines\nand\n\nparagraphs\n",
        "tabs\tand carriage\r\nreturns",
        "digits 1234567890 and 3.14159",
        "智能应该像水和电一样流动。",
        "罕见的字：龘靐齉。",
        "emoji 🦀🚰 and accents: Ünïcödé àçcénts",
        "<s>[INST] special tokens inside the text [/INST] an answer</s>",
        "a user-defined <tool> piece, twice<tool>",
        "",
        "   ",
        "The GGUF file's metadata (tokenizer.ggml.*) converted to the same tokenizers path.",
    ];
    let texts_json = dir.join("texts.json");
    std::fs::write(
        &texts_json,
        serde_json::to_string(&texts).unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = dir.join("llama_cpp.json");
    reference(&["tokenize", &s(&gguf), &s(&texts_json), &s(&out)]);
    let theirs = read_json(&out);

    let loaded = Loaded::open(&gguf, None, DType::F32).unwrap_or_else(|e| panic!("{e}"));
    let tok = &loaded.tokenizer;
    for (i, text) in texts.iter().enumerate() {
        let ids = tok.encode(text, true).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<u32> = serde_json::from_value(theirs["ids"][i].clone()).unwrap_or_default();
        assert_eq!(ids, want, "tokens of {text:?}");
        // llama.cpp keeps the space the first piece starts with when it drops BOS; Hugging
        // Face's Llama tokenizer (and so fount) strips it
        let text_ref = theirs["text"][i].as_str().unwrap_or_default();
        let back = tok.decode(&ids, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            back,
            text_ref.strip_prefix(' ').unwrap_or(text_ref),
            "text of {text:?}"
        );
    }

    // the file serves: a raw prompt and one through its chat template
    let model = s(&gguf);
    for extra in [&[][..], &["--chat"][..]] {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "智能像水",
            "--max-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        fount_ok(&args);
    }
}
