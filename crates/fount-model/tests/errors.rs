use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fount_model::{Batch, Error, GenerateOptions, KvCache, Logits, Model, NoCache, Tokenizer};

use crate::util::{fixture, load};

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(fixture(name))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
    {
        std::fs::copy(entry.path(), dir.path().join(entry.file_name()))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    dir
}

fn load_err(dir: &Path) -> Error {
    match Model::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_default())
            .unwrap_or_default();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap_or_else(|e| panic!("{e}"));
}

fn edit_weights(dir: &Path, f: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    f(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn missing_config_names_the_file() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap_or_else(|e| panic!("{e}"));
    let e = load_err(dir.path());
    assert!(matches!(e, Error::MissingFile { .. }), "{e:?}");
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn missing_directory_is_named() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.to_string().contains("/nonexistent/model"), "{e}");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |v| {
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    let e = load_err(dir.path());
    assert!(matches!(e, Error::UnknownArchitecture { .. }), "{e:?}");
    assert!(
        e.to_string().contains("GPT2LMHeadModel") && e.to_string().contains("LlamaForCausalLM"),
        "{e}"
    );
}

#[test]
fn missing_config_field_is_named() {
    let dir = copy_fixture("llama");
    edit_config(dir.path(), |v| {
        v.as_object_mut().map(|o| o.remove("hidden_size"));
    });
    let e = load_err(dir.path());
    assert!(
        e.to_string().contains("hidden_size") && e.to_string().contains("missing"),
        "{e}"
    );
}

#[test]
fn malformed_config_names_line_and_column() {
    let dir = copy_fixture("llama");
    std::fs::write(
        dir.path().join("config.json"),
        "{\n  \"vocab_size\": 512,\n  oops\n}",
    )
    .unwrap_or_default();
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("line 3"),
        "{msg}"
    );
}

#[test]
fn wrong_tensor_shape_names_tensor_and_shapes() {
    let dir = copy_fixture("llama");
    edit_weights(dir.path(), |t| {
        t.insert(
            "model.layers.1.self_attn.k_proj.weight".into(),
            Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}")),
        );
    });
    let e = load_err(dir.path());
    match &e {
        Error::TensorShape {
            name,
            expected,
            actual,
        } => {
            assert_eq!(name, "model.layers.1.self_attn.k_proj.weight");
            assert_eq!(expected, &[32, 64]);
            assert_eq!(actual, &[16, 64]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("llama");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.0.mlp.down_proj.weight");
    });
    let e = load_err(dir.path());
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name == "model.layers.0.mlp.down_proj.weight"),
        "{e:?}"
    );
}

#[test]
fn missing_weights_file_is_named() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap_or_default();
    let e = load_err(dir.path());
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let model = load("llama"); // max_position_embeddings = 256
    let tok = Tokenizer::from_file(&fixture("chat/qwen2_jinja/tokenizer.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let prompt = vec![5u32; 300];
    let e = fount_model::generate(
        &model,
        &tok,
        &prompt,
        &GenerateOptions {
            max_tokens: 4,
            ..Default::default()
        },
        |_| {},
    )
    .err();
    assert!(
        matches!(
            e,
            Some(Error::ContextLength {
                tokens: 301,
                max: 256
            })
        ),
        "{e:?}"
    );
    let e = model
        .forward(&Batch::single(&prompt, 0), &mut NoCache, Logits::Last)
        .err();
    assert!(
        matches!(e, Some(Error::ContextLength { max: 256, .. })),
        "{e:?}"
    );
    // Generation stops at the context instead of running past it.
    let out = fount_model::generate(
        &model,
        &tok,
        &vec![5u32; 250],
        &GenerateOptions {
            max_tokens: 100,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.tokens.len(), 6);
}

#[test]
fn empty_prompt_is_refused() {
    let model = load("llama");
    let tok = Tokenizer::from_file(&fixture("chat/qwen2_jinja/tokenizer.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let e = fount_model::generate(&model, &tok, &[], &GenerateOptions::default(), |_| {}).err();
    assert!(matches!(e, Some(Error::EmptyPrompt)), "{e:?}");
    let e = model
        .forward(&Batch::default(), &mut NoCache, Logits::Last)
        .err();
    assert!(matches!(e, Some(Error::EmptyPrompt)), "{e:?}");
}

#[test]
fn malformed_batches_are_refused() {
    let model = load("llama");
    let mut b = Batch::single(&[1, 2, 3], 0);
    b.seq_lens = vec![2];
    assert!(matches!(
        model.forward(&b, &mut NoCache, Logits::All),
        Err(Error::Batch(_))
    ));
    let b = Batch::single(&[1, 9999], 0);
    let e = model
        .forward(&b, &mut NoCache, Logits::All)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("9999") && e.contains("vocabulary"), "{e}");
    let c = model.config();
    let mut one = KvCache::new(
        c.num_hidden_layers,
        c.num_key_value_heads,
        c.head_dim,
        DType::F32,
        &Device::Cpu,
    );
    let mut two = Batch::single(&[1], 0);
    two.push(&[2], 0);
    assert!(matches!(
        model.forward(&two, &mut one, Logits::Last),
        Err(Error::Batch(_))
    ));
}
