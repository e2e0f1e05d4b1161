use candle_core::{DType, Device};
use fount_model::{Arch, Batch, Logits, LoraBatch, Model, NoCache, RECOMPUTE_TOKENS};
use fount_train::finetune::{FinetuneConfig, LoraParams, TargetModules};
use fount_train::loss::{cross_entropy, row_weights, weighted_cross_entropy};
use fount_train::optim::Grads;
use fount_train::Params;

use crate::util::{scratch, tiny_model_wide_init};

/// Three 300-token sequences and an 80-token one: recomputed as [300], [300], [300 + 80] (no
/// group exceeds the budget), with some rows not trained on.
fn batch() -> (Batch, Vec<u32>, Vec<bool>) {
    const { assert!(300 + 300 > RECOMPUTE_TOKENS && 300 + 80 <= RECOMPUTE_TOKENS) };
    let mut b = Batch::default();
    let mut targets = Vec::new();
    for (s, len) in [300usize, 300, 300, 80].into_iter().enumerate() {
        let ids: Vec<u32> = (0..=len)
            .map(|i| ((i * 7 + s * 31 + 3) % 500) as u32)
            .collect();
        b.push(&ids[..len], s * 3);
        targets.extend_from_slice(&ids[1..]);
    }
    let mask = (0..targets.len()).map(|i| i % 5 != 0).collect();
    (b, targets, mask)
}

/// Gradients (and the loss) of one step, stored or recomputed.
fn step(
    model: &Model,
    params: &Params,
    lora: &LoraBatch,
    data: &(Batch, Vec<u32>, Vec<bool>),
    recompute: bool,
) -> (f64, Grads) {
    let (batch, targets, mask) = data;
    let mut g = Grads::default();
    let loss = if recompute {
        let weights = row_weights(mask).unwrap();
        model
            .backward_checkpointed(
                batch,
                lora,
                &mut |logits, rows| {
                    weighted_cross_entropy(logits, &targets[rows.clone()], &weights[rows])
                },
                &mut |store| g.accumulate(params, store, 1.0),
            )
            .unwrap()
    } else {
        let logits = model
            .forward_lora(batch, &mut NoCache, Logits::All, lora, false)
            .unwrap()
            .logits;
        let (loss, _) = cross_entropy(&logits, targets, mask).unwrap();
        g.accumulate(params, &loss.backward().unwrap(), 1.0)
            .unwrap();
        f64::from(loss.to_scalar::<f32>().unwrap())
    };
    (loss, g)
}

fn same(params: &Params, (la, a): &(f64, Grads), (lb, b): &(f64, Grads), what: &str) {
    assert!(
        (la - lb).abs() <= 1e-5 * lb.abs(),
        "{what}: loss {la} vs {lb}"
    );
    let mut compared = 0;
    for (name, _) in params.iter() {
        let (Some(x), Some(y)) = (a.get(name), b.get(name)) else {
            panic!("{what}: {name} has a gradient on one side only");
        };
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 2e-5 * scale.max(1e-3),
            "{what}: {name} differs by {diff} (largest {scale})"
        );
        compared += 1;
    }
    assert_eq!(compared, params.iter().count(), "{what}");
}

#[test]
fn recomputed_gradients_equal_the_stored_ones() {
    let data = batch();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let d = scratch(&format!("recompute-{arch:?}"));
        let base = tiny_model_wide_init(&d, arch);
        // full training: every weight, the embedding included
        let (model, params) = Params::load(&base).unwrap();
        let none = LoraBatch::none();
        same(
            &params,
            &step(&model, &params, &none, &data, true),
            &step(&model, &params, &none, &data, false),
            &format!("{arch:?} full"),
        );
        // an adapter over the frozen base, without and with dropout (one piece then)
        let frozen = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
        let ft = FinetuneConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::all_linear(),
            ..FinetuneConfig::default()
        };
        let lora = LoraParams::init(frozen.config(), &ft).unwrap();
        for (name, var) in lora.params.iter() {
            if name.ends_with("lora_B.weight") {
                var.set(&(var.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                    .unwrap();
            }
        }
        for dropout in [0.0, 0.2] {
            let adapter = lora.adapter().unwrap();
            let adapter = if dropout > 0.0 {
                std::sync::Arc::new(
                    fount_model::LoraAdapter::clone(&adapter).with_dropout(dropout, 5),
                )
            } else {
                adapter
            };
            let mut lb = LoraBatch::none();
            lb.push(0..data.0.len(), adapter);
            same(
                &lora.params,
                &step(&frozen, &lora.params, &lb, &data, true),
                &step(&frozen, &lora.params, &lb, &data, false),
                &format!("{arch:?} LoRA, dropout {dropout}"),
            );
        }
    }
}

#[test]
fn recompute_is_refused_for_moe_models() {
    let d = scratch("recompute-moe");
    let base = crate::util::tiny_model(&d, Arch::Mixtral);
    let model = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
    let (batch, targets, mask) = batch();
    let weights = row_weights(&mask).unwrap();
    let e = model
        .backward_checkpointed::<fount_train::Error>(
            &batch,
            &LoraBatch::none(),
            &mut |logits, rows| {
                weighted_cross_entropy(logits, &targets[rows.clone()], &weights[rows])
            },
            &mut |_| Ok(()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("dense models"), "{e}");
}
