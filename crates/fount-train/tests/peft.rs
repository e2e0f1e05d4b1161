use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fount_model::{Batch, Logits, LoraAdapter, LoraBatch, Model, NoCache};
use fount_train::finetune::{FinetuneConfig, LoraParams, TargetModules};
use rand::{Rng, SeedableRng};

fn llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fount-model/tests/fixtures/llama")
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fount_adapter")
}

/// The adapter fount writes for the check: rank 4, alpha 8, on q, v, gate and down, `A` as
/// initialised and `B` seeded random (zeros would check nothing).
fn write_adapter(dir: &Path) -> FinetuneConfig {
    let model = Model::load(&llama(), DType::F32, &Device::Cpu).unwrap();
    let ft = FinetuneConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::List(
            ["q_proj", "v_proj", "gate_proj", "down_proj"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        seed: 3,
        ..FinetuneConfig::default()
    };
    let lora = LoraParams::init(model.config(), &ft).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (name, var) in lora.params.iter() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    lora.save_peft(dir, &ft, "fixtures/llama").unwrap();
    ft
}

fn logits(model: &Model, adapter: &std::sync::Arc<LoraAdapter>, ids: &[u32]) -> Tensor {
    let batch = Batch::single(ids, 0);
    let mut lb = LoraBatch::none();
    lb.push(0..ids.len(), adapter.clone());
    model
        .forward_lora(&batch, &mut NoCache, Logits::All, &lb, false)
        .unwrap()
        .logits
}

#[test]
fn peft_reads_the_adapters_fount_writes() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path());
    if std::env::var("FOUNT_BLESS").is_ok() {
        std::fs::create_dir_all(fixture()).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(dir.path().join(f), fixture().join(f)).unwrap();
        }
    }
    // the writer still writes the committed adapter, tensor for tensor
    let now =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let committed =
        candle_core::safetensors::load(fixture().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(now.len(), committed.len());
    for (name, t) in &now {
        let c = &committed[name];
        assert_eq!(t.dims(), c.dims(), "{name}");
        let same = t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            same,
            "{name} differs from the committed fixture (FOUNT_BLESS=1 regenerates it)"
        );
    }
    // fount's logits with it match PEFT's (tools/golden/peft_loads_fount_adapter.py)
    let model = Model::load(&llama(), DType::F32, &Device::Cpu).unwrap();
    let adapter = std::sync::Arc::new(
        LoraAdapter::load(&fixture(), model.config(), DType::F32, &Device::Cpu).unwrap(),
    );
    let golden =
        candle_core::safetensors::load(fixture().join("peft_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama().join("golden.json")).unwrap())
            .unwrap();
    for (i, p) in info["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = logits(&model, &adapter, &ids);
        let want = &golden[&format!("prompt{i}")];
        let diff = crate::util::max_diff(&got, want);
        assert!(
            diff < 1e-4,
            "prompt {i}: fount and PEFT logits differ by {diff}"
        );
    }
    // and the adapter changes the model: without it the logits are the base's
    let base = model
        .forward(&Batch::single(&[1, 5], 0), &mut NoCache, Logits::All)
        .unwrap()
        .logits;
    let with = logits(&model, &adapter, &[1, 5]);
    let moved = crate::util::max_diff(&base, &with);
    assert!(moved > 1e-3, "the adapter does nothing ({moved})");
}
