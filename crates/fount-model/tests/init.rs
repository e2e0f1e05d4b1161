use candle_core::{DType, Device};
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::{Arch, ChatTemplate, GenerateOptions, Message, Model, ModelFiles, Tokenizer};

#[test]
fn every_architecture_initialises_loads_chats_and_generates() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Mistral, Arch::Mixtral] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let shape = preset(arch, "tiny").unwrap_or_else(|e| panic!("{e}"));
        init_model(arch, &shape, &InitOptions::default(), dir.path())
            .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        let files = ModelFiles::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let model = Model::load(dir.path(), DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        let tok = Tokenizer::from_file(&files.tokenizer_path()).unwrap_or_else(|e| panic!("{e}"));
        let template = ChatTemplate::from_dir(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("{arch:?}: no chat template"));
        let text = template
            .render(&[Message::new("user", "Hello, 世界")], true)
            .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        assert!(text.contains("Hello, 世界"));
        let ids = tok.encode(&text, false).unwrap_or_else(|e| panic!("{e}"));
        // The text round-trips through the trained byte-level tokenizer.
        assert_eq!(tok.decode(&ids, false).unwrap_or_default(), text);
        // Each token's bytes, concatenated, are the text's (characters split across tokens).
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), text, "{arch:?}");
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(&tok.token_bytes(id)).is_err())
                || text.is_ascii(),
            "{arch:?}: some token should hold part of a character of 世界"
        );
        let gen = files.generation_config().unwrap_or_else(|e| panic!("{e}"));
        assert!(!gen.eos_token_ids.is_empty());
        let opts = GenerateOptions {
            max_tokens: 5,
            ..Default::default()
        };
        let out = fount_model::generate(&model, &tok, &ids, &opts, |_| {})
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.tokens.len() <= 5);
    }
}

#[test]
fn the_same_seed_writes_the_same_weights() {
    let a = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let b = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let shape = preset(Arch::Qwen2, "tiny").unwrap_or_else(|e| panic!("{e}"));
    let opts = InitOptions {
        seed: 9,
        dtype: DType::BF16,
        std: 0.02,
        tokenizer: None,
    };
    init_model(Arch::Qwen2, &shape, &opts, a.path()).unwrap_or_else(|e| panic!("{e}"));
    init_model(Arch::Qwen2, &shape, &opts, b.path()).unwrap_or_else(|e| panic!("{e}"));
    let read = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap_or_default();
    assert_eq!(read(a.path()), read(b.path()));

    // a given tokenizer: the vocabulary follows it; one without the family's tokens is refused
    let c = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let with = InitOptions {
        tokenizer: Some(a.path().join("tokenizer.json")),
        ..InitOptions::default()
    };
    let big = fount_model::init::Shape {
        vocab_size: 100,
        ..shape.clone()
    };
    init_model(Arch::Qwen2, &big, &with, c.path()).unwrap_or_else(|e| panic!("{e}"));
    let cfg = fount_model::ModelFiles::open(c.path())
        .and_then(|f| f.config())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.vocab_size % 64, 0);
    assert!(cfg.vocab_size >= 512, "{}", cfg.vocab_size);
    let e = init_model(Arch::Llama, &shape, &with, c.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("<|begin_of_text|>"), "{e}");
    // bf16 weights load and compute in f32.
    Model::load(a.path(), DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn unknown_preset_lists_the_available_ones() {
    let e = preset(Arch::Llama, "huge")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("huge") && e.contains("llama-3.2-1b") && e.contains("tiny"),
        "{e}"
    );
}

#[test]
fn real_model_presets_resolve() {
    for (arch, name, params_m) in [
        (Arch::Qwen2, "qwen2.5-0.5b", 494),
        (Arch::Llama, "llama-3.2-1b", 1236),
        (Arch::Llama, "tinyllama-1.1b", 1100),
    ] {
        let s = preset(arch, name).unwrap_or_else(|e| panic!("{e}"));
        let mut cfg = serde_json::json!({
            "architectures": [arch.hf_names().0], "vocab_size": s.vocab_size, "hidden_size": s.hidden_size,
            "intermediate_size": s.intermediate_size, "num_hidden_layers": s.num_hidden_layers,
            "num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads,
            "max_position_embeddings": s.max_position_embeddings, "tie_word_embeddings": s.tie_word_embeddings,
        });
        if !s.rope_scaling.is_null() {
            cfg["rope_scaling"] = s.rope_scaling.clone();
        }
        let hf: fount_model::HfConfig = serde_json::from_value(cfg).unwrap_or_default();
        let c = hf.resolve().unwrap_or_else(|e| panic!("{e}"));
        let m = c.num_parameters() / 1_000_000;
        assert!(
            (m as i64 - params_m).abs() < 15,
            "{name}: {m}M parameters, expected about {params_m}M"
        );
    }
}
