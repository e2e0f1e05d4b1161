use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fount_model::{Batch, Logits, NoCache};
use fount_train::loss::{cross_entropy, load_balancing_loss};
use fount_train::optim::{AdamW, AdamWConfig, Grads};
use fount_train::Params;

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fount-model/tests/fixtures")
        .join(name)
}

fn golden(name: &str) -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let info = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .unwrap();
    (serde_json::from_str(&info).unwrap(), tensors)
}

/// `‖a − b‖ / ‖b‖` (Frobenius norms).
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    norm(&(a - b).unwrap()) / norm(b).max(1e-12)
}

/// The golden batch packed, with next-token targets (each sequence's last token predicts
/// nothing).
fn packed(info: &serde_json::Value) -> (Batch, Vec<u32>, Vec<bool>) {
    let mut batch = Batch::default();
    let (mut targets, mut mask) = (Vec::new(), Vec::new());
    for seq in info["batch"].as_array().unwrap() {
        let ids: Vec<u32> = seq
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        batch.push(&ids, 0);
        for i in 0..ids.len() {
            targets.push(*ids.get(i + 1).unwrap_or(&0));
            mask.push(i + 1 < ids.len());
        }
    }
    (batch, targets, mask)
}

fn check(name: &str, moe: bool) {
    let (info, gold) = golden(name);
    let (model, params) = Params::load(&fixture_model(name)).unwrap();
    let (batch, targets, mask) = packed(&info);
    let out = model.forward(&batch, &mut NoCache, Logits::All).unwrap();
    let (lm, counted) = cross_entropy(&out.logits, &targets, &mask).unwrap();
    assert_eq!(counted, 22);
    let lm_value = lm.to_scalar::<f32>().unwrap();
    let want = info["lm_loss"].as_f64().unwrap() as f32;
    assert!(
        (lm_value - want).abs() / want < 1e-5,
        "{name}: loss {lm_value} against {want}"
    );
    let loss = if moe {
        let cfg = model.config().moe.unwrap();
        for (i, r) in out.router_logits.iter().enumerate() {
            let e = rel(r, &gold[&format!("router.{i}")]);
            assert!(e < 1e-4, "{name}: router logits of layer {i}: {e}");
        }
        let (aux, share) =
            load_balancing_loss(&out.router_logits, cfg.num_experts, cfg.top_k).unwrap();
        let aux_value = aux.to_scalar::<f32>().unwrap();
        let want = info["aux_loss"].as_f64().unwrap() as f32;
        assert!(
            (aux_value - want).abs() < 1e-6,
            "{name}: aux loss {aux_value} against {want}"
        );
        assert!((share.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let coef = info["router_aux_loss_coef"].as_f64().unwrap();
        (lm + (aux * coef).unwrap()).unwrap()
    } else {
        lm
    };
    let total = loss.to_scalar::<f32>().unwrap();
    let want = info["loss"].as_f64().unwrap() as f32;
    assert!(
        (total - want).abs() / want < 1e-5,
        "{name}: loss {total} against {want}"
    );

    let store = loss.backward().unwrap();
    let mut grads = Grads::default();
    grads.accumulate(&params, &store, 1.0).unwrap();
    for p in info["params"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        let want = &gold[&format!("grad.{p}")];
        let got = Tensor::from_slice(grads.get(p).unwrap(), want.shape(), &Device::Cpu).unwrap();
        let e = rel(&got, want);
        assert!(e < 1e-4, "{name}: gradient of {p}: relative error {e}");
    }
    let norm = grads.clip(info["clip"].as_f64().unwrap());
    let want = info["grad_norm"].as_f64().unwrap();
    assert!(
        (norm - want).abs() / want < 1e-5,
        "{name}: grad norm {norm} against {want}"
    );

    let betas = info["betas"].as_array().unwrap();
    let cfg = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: info["eps"].as_f64().unwrap(),
        weight_decay: info["weight_decay"].as_f64().unwrap(),
    };
    let sizes: Vec<(String, usize)> = params
        .iter()
        .map(|(n, v)| (n.to_string(), v.elem_count()))
        .collect();
    let mut opt = AdamW::new(cfg, &sizes);
    opt.update(&params, &grads, info["lr"].as_f64().unwrap())
        .unwrap();
    for p in info["params"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        let want = &gold[&format!("after.{p}")];
        let got = params.get(p).unwrap().as_tensor();
        let e = rel(got, want);
        assert!(
            e < 1e-4,
            "{name}: {p} after one AdamW step: relative error {e}"
        );
    }
}

#[test]
fn llama_loss_gradients_and_adamw_step_match_pytorch() {
    check("llama", false);
}

#[test]
fn mixtral_loss_aux_loss_gradients_and_adamw_step_match_pytorch() {
    check("mixtral", true);
}
