use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use fount_model::{Batch, KvCache, Logits, LoraAdapter, LoraBatch, Model, NoCache};

use crate::util::{assert_close, fixture, load};

const TOL: f32 = 1e-4;

fn prompts() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixture("llama").join("golden.json")).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    serde_json::from_value(json["prompts"].clone()).unwrap_or_else(|e| panic!("prompts: {e}"))
}

/// PEFT's logits of `name` on prompt `i`, `(len, vocab)` flattened.
fn golden(name: &str, i: usize) -> Vec<f32> {
    let t = candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| {
            panic!("{name}/golden.safetensors: {e}; run tools/golden/make_lora_fixtures.py")
        });
    t[&format!("prompt{i}")]
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn adapter(model: &Model, name: &str) -> Arc<LoraAdapter> {
    Arc::new(
        LoraAdapter::load(&fixture(name), model.config(), DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {name}: {e}")),
    )
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn adapters_match_peft() {
    let model = load("llama");
    for name in ["lora_a", "lora_b"] {
        let a = adapter(&model, name);
        for (i, p) in prompts().iter().enumerate() {
            let mut lora = LoraBatch::none();
            lora.push(0..p.len(), a.clone());
            let out = model
                .forward_lora(
                    &Batch::single(p, 0),
                    &mut NoCache,
                    Logits::All,
                    &lora,
                    false,
                )
                .unwrap_or_else(|e| panic!("{e}"));
            assert_close(
                &format!("{name} prompt {i}"),
                &flat(&out.logits),
                &golden(name, i),
                TOL,
            );
        }
    }
    let a = adapter(&model, "lora_a");
    assert_eq!(a.rank, 4);
    assert!((a.scale - 2.0).abs() < 1e-12, "alpha / r");
    let b = adapter(&model, "lora_b");
    assert!(
        (b.scale - 4.0 / 2f64.sqrt()).abs() < 1e-12,
        "rsLoRA: alpha / sqrt(r)"
    );
}

#[test]
fn one_batch_mixes_adapters_and_the_bare_model() {
    let model = load("llama");
    let (a, b) = (adapter(&model, "lora_a"), adapter(&model, "lora_b"));
    let ps = prompts();
    // sequences 0 and 3 on lora_a, 1 bare, 2 on lora_b
    let plan: [Option<&Arc<LoraAdapter>>; 4] = [Some(&a), None, Some(&b), Some(&a)];
    let mut batch = Batch::default();
    let mut lora = LoraBatch::none();
    for (p, ad) in ps.iter().zip(plan) {
        let start = batch.len();
        batch.push(p, 0);
        if let Some(ad) = ad {
            lora.push(start..batch.len(), ad.clone());
        }
    }
    let out = model
        .forward_lora(&batch, &mut NoCache, Logits::All, &lora, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut row = 0;
    for (i, (p, ad)) in ps.iter().zip(plan).enumerate() {
        let got = flat(
            &out.logits
                .narrow(0, row, p.len())
                .unwrap_or_else(|e| panic!("{e}")),
        );
        row += p.len();
        let want = match ad {
            Some(x) if Arc::ptr_eq(x, &a) => golden("lora_a", i),
            Some(_) => golden("lora_b", i),
            None => {
                let alone = model
                    .forward(&Batch::single(p, 0), &mut NoCache, Logits::All)
                    .unwrap_or_else(|e| panic!("{e}"));
                flat(&alone.logits)
            }
        };
        assert_close(&format!("sequence {i}"), &got, &want, TOL);
    }
}

#[test]
fn invariant_mode_is_bitwise_independent_of_the_batch() {
    let model = load("llama");
    let a = adapter(&model, "lora_a");
    let ps = prompts();
    let p = &ps[2];
    // alone, in one piece
    let mut lora = LoraBatch::none();
    lora.push(0..p.len(), a.clone());
    let alone = model
        .forward_lora(&Batch::single(p, 0), &mut NoCache, Logits::All, &lora, true)
        .unwrap_or_else(|e| panic!("{e}"));
    let alone = flat(&alone.logits);
    // in chunks of 5 and the rest, behind two other sequences with other adapters
    let cfg = model.config();
    let mut caches: Vec<KvCache> = (0..3)
        .map(|_| {
            KvCache::new(
                cfg.num_hidden_layers,
                cfg.num_key_value_heads,
                cfg.head_dim,
                DType::F32,
                &Device::Cpu,
            )
        })
        .collect();
    let mut rows = Vec::new();
    for (start, end) in [(0, 5), (5, p.len())] {
        let mut batch = Batch::default();
        batch.push(&ps[0][..3], start.min(3));
        batch.push(&ps[3][..2], start.min(2));
        let first = batch.len();
        batch.push(&p[start..end], start);
        let mut lora = LoraBatch::none();
        lora.push(0..3, adapter(&model, "lora_b"));
        lora.push(first..batch.len(), a.clone());
        let out = model
            .forward_lora(&batch, &mut caches, Logits::All, &lora, true)
            .unwrap_or_else(|e| panic!("{e}"));
        rows.extend(flat(
            &out.logits
                .narrow(0, first, end - start)
                .unwrap_or_else(|e| panic!("{e}")),
        ));
    }
    assert_eq!(rows.len(), alone.len());
    let differ = rows
        .iter()
        .zip(&alone)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differ, 0, "{differ} logits differ in their bits");
}

#[test]
fn adapter_errors_are_clear() {
    let model = load("llama");
    let cfg = model.config();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let e = LoraAdapter::load(dir.path(), cfg, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    let src = fixture("lora_a");
    let write_cfg = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        edit(&mut v);
        std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap_or_default();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap_or_default();
        LoraAdapter::load(dir.path(), cfg, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let e = write_cfg(&|v| v["use_dora"] = true.into());
    assert!(e.contains("use_dora"), "{e}");
    let e = write_cfg(&|v| v["r"] = 8.into());
    assert!(e.contains("lora_A") && e.contains("shape"), "{e}");
    let e = write_cfg(&|v| v["target_modules"] = serde_json::json!(["q_proj", "lm_head"]));
    assert!(e.contains("lm_head"), "{e}");
    std::fs::write(dir.path().join("adapter_config.json"), "{not json").unwrap_or_default();
    let e = LoraAdapter::load(dir.path(), cfg, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid JSON"), "{e}");
    // on a model of another shape
    let mut wider = cfg.clone();
    wider.hidden_size = 96;
    let e = LoraAdapter::load(&src, &wider, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape") && e.contains("96"), "{e}");
    let mut deeper = cfg.clone();
    deeper.num_hidden_layers = 3;
    let e = LoraAdapter::load(&src, &deeper, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.2") && e.contains("missing"), "{e}");
    // rows outside the batch
    let mut lora = LoraBatch::none();
    lora.push(0..50, adapter(&model, "lora_a"));
    let e = model
        .forward_lora(
            &Batch::single(&[1, 2, 3], 0),
            &mut NoCache,
            Logits::Last,
            &lora,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the batch"), "{e}");
}

/// Writes `lora_a` with its tensors converted by `convert` into `dir`.
fn rewrite(dir: &std::path::Path, convert: &dyn Fn(&Tensor) -> Tensor) {
    let src = fixture("lora_a");
    let tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"));
    let converted: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), convert(t)))
        .collect();
    candle_core::safetensors::save(&converted, dir.join("adapter_model.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn logits_with(model: &Model, a: Arc<LoraAdapter>) -> Vec<f32> {
    let p = &prompts()[0];
    let mut lora = LoraBatch::none();
    lora.push(0..p.len(), a);
    let out = model
        .forward_lora(
            &Batch::single(p, 0),
            &mut NoCache,
            Logits::All,
            &lora,
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    flat(
        &out.logits
            .to_dtype(DType::F32)
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

#[test]
fn adapters_stored_in_half_precision_load_exactly() {
    let model = load("llama");
    let cfg = model.config();
    let (half, rounded) = (
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")),
    );
    let to = |t: &Tensor, d: DType| t.to_dtype(d).unwrap_or_else(|e| panic!("{e}"));
    // bf16 keeps 8 bits of mantissa, f16 11
    for (dtype, tol) in [(DType::BF16, 0.15), (DType::F16, 0.02)] {
        // the same values stored as 16-bit and as f32: identical logits, bit for bit
        rewrite(half.path(), &|t| to(t, dtype));
        rewrite(rounded.path(), &|t| to(&to(t, dtype), DType::F32));
        let load_dir = |d: &std::path::Path| {
            Arc::new(
                LoraAdapter::load(d, cfg, DType::F32, &Device::Cpu)
                    .unwrap_or_else(|e| panic!("{dtype:?}: {e}")),
            )
        };
        let (h, r) = (load_dir(half.path()), load_dir(rounded.path()));
        let (lh, lr) = (logits_with(&model, h), logits_with(&model, r));
        assert!(
            lh.iter().zip(&lr).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{dtype:?}: logits differ from the f32 file with the same values"
        );
        // and they stay close to the f32 adapter's
        assert_close(&format!("{dtype:?}"), &lh, &golden("lora_a", 0), tol);
    }
}

#[test]
fn adapters_apply_over_half_precision_weights() {
    // f16 weights on the CPU run the half-precision kernels with f32 activations around them,
    // so the adapter is applied in f32 over an f16 base
    let model =
        Model::load(&fixture("llama"), DType::F16, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.dtype(), DType::F32);
    let a = Arc::new(
        LoraAdapter::load(
            &fixture("lora_a"),
            model.config(),
            model.dtype(),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    let base = model
        .forward(&Batch::single(&prompts()[0], 0), &mut NoCache, Logits::All)
        .unwrap_or_else(|e| panic!("{e}"));
    let with = logits_with(&model, a);
    let golden = golden("lora_a", 0);
    // f16 weights: close to PEFT's f32 logits, and clearly not the bare model's
    assert_close("f16 model", &with, &golden, 5e-2);
    let base = flat(
        &base
            .logits
            .to_dtype(DType::F32)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let moved = base
        .iter()
        .zip(&golden)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(moved > 0.5, "the adapter changes the logits by {moved}");
}

#[test]
fn malformed_adapter_weights_are_refused() {
    let model = load("llama");
    let cfg = model.config();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = fixture("lora_a");
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let weights = dir.path().join("adapter_model.safetensors");
    let err = || {
        LoraAdapter::load(dir.path(), cfg, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let e = err();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("not found"),
        "{e}"
    );
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap_or_default();
    for cut in [0, 5, 100, bytes.len() - 1] {
        std::fs::write(&weights, &bytes[..cut]).unwrap_or_else(|e| panic!("{e}"));
        let e = err();
        assert!(
            e.contains("not a valid safetensors file"),
            "cut at {cut}: {e}"
        );
    }
    rewrite(dir.path(), &|t| {
        t.to_dtype(DType::U32).unwrap_or_else(|e| panic!("{e}"))
    });
    let e = err();
    assert!(e.contains("data type") && e.contains("U32"), "{e}");
}
