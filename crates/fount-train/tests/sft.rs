use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use fount_model::peft::merge;
use fount_model::{Arch, Batch, Logits, LoraAdapter, LoraBatch, Model, NoCache};
use fount_train::finetune::{finetune, FinetuneConfig, TargetModules};

use crate::util::{scratch, tiny_model, tiny_model_wide_init};

fn chat_file(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn qa(q: &str, a: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        .to_string()
}

fn quick() -> FinetuneConfig {
    FinetuneConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::all_linear(),
        lr: 1e-2,
        epochs: 4.0,
        tokens_per_step: 256,
        eval_fraction: 0.2,
        ..FinetuneConfig::default()
    }
}

#[test]
fn lora_learns_the_assistant_turns_and_merges_into_the_same_model() {
    let d = scratch("sft");
    let base = tiny_model_wide_init(&d, Arch::Qwen2);
    // a task a random model can learn in a few steps: every answer is the same sentence
    let lines: Vec<String> = (0..60)
        .map(|i| qa(&format!("Is {i} a number?"), "Yes, it is a number."))
        .collect();
    chat_file(&d.join("chat.jsonl"), &lines);
    let out = finetune(
        &base,
        &d.join("chat.jsonl"),
        &d.join("adapter"),
        &quick(),
        false,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(out.data.examples, 60);
    assert_eq!(out.held_out, 12);
    let (base_loss, _) = out.base_eval.unwrap();
    let (loss, _) = out.eval.unwrap();
    assert!(
        loss < 0.3 * base_loss,
        "held-out loss {base_loss} -> {loss}"
    );
    // a PEFT directory the server and generate load
    let model = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
    let adapter = std::sync::Arc::new(
        LoraAdapter::load(&d.join("adapter"), model.config(), DType::F32, &Device::Cpu).unwrap(),
    );
    // merged: the same logits as base + adapter
    merge(&base, &d.join("adapter"), &d.join("merged")).unwrap();
    let merged = Model::load(&d.join("merged"), DType::F32, &Device::Cpu).unwrap();
    let ids = [5u32, 17, 42, 99, 3, 7];
    let mut lb = LoraBatch::none();
    lb.push(0..ids.len(), adapter);
    let a = model
        .forward_lora(
            &Batch::single(&ids, 0),
            &mut NoCache,
            Logits::All,
            &lb,
            false,
        )
        .unwrap()
        .logits;
    let b = merged
        .forward(&Batch::single(&ids, 0), &mut NoCache, Logits::All)
        .unwrap()
        .logits;
    let diff = crate::util::max_diff(&a, &b);
    assert!(diff < 1e-4, "merged model differs by {diff}");
    // nothing already written is overwritten
    let e = merge(&base, &d.join("adapter"), &d.join("merged"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds"), "{e}");
    let e = finetune(
        &base,
        &d.join("chat.jsonl"),
        &d.join("adapter"),
        &quick(),
        false,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already holds an adapter"), "{e}");
}

#[test]
fn bad_chat_data_and_mismatched_adapters_are_refused_clearly() {
    let d = scratch("sft-bad");
    let base = tiny_model(&d, Arch::Qwen2);
    let run = |lines: &[String], cfg: &FinetuneConfig| {
        let f = d.join("bad.jsonl");
        chat_file(&f, lines);
        finetune(
            &base,
            &f,
            &d.join("never"),
            cfg,
            false,
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string()
    };
    let ok = qa("hi", "hello");
    let no_assistant =
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let e = run(&[ok.clone(), no_assistant], &quick());
    assert!(e.contains(":2:") && e.contains("no assistant turn"), "{e}");
    let e = run(&[ok.clone(), "{\"messages\": 3}".into()], &quick());
    assert!(e.contains(":2:") && e.contains("messages"), "{e}");
    let e = run(&[ok.clone(), "not json".into()], &quick());
    assert!(e.contains(":2:"), "{e}");
    // a line longer than max_len: refused, or cut and reported
    let long = qa(&"word ".repeat(200), "yes");
    let short = FinetuneConfig {
        max_len: Some(64),
        ..quick()
    };
    let e = run(&[ok.clone(), long.clone()], &short);
    assert!(
        e.contains("longer than 64") && e.contains("line 2") && e.contains("--truncate"),
        "{e}"
    );
    assert!(!d.join("never").exists(), "nothing written");
    // unknown settings
    let cfgf = d.join("ft.toml");
    std::fs::write(&cfgf, "rank = 8\n").unwrap();
    let e = FinetuneConfig::from_file(&cfgf).unwrap_err().to_string();
    assert!(e.contains("unknown field") && e.contains("rank"), "{e}");
    std::fs::write(&cfgf, "target_modules = [\"qkv\"]\n").unwrap();
    let e = FinetuneConfig::from_file(&cfgf).unwrap_err().to_string();
    assert!(e.contains("qkv"), "{e}");
    // an adapter made for another model does not merge
    let other = d.join("other");
    fount_model::init::init_model(
        Arch::Llama,
        &fount_model::init::preset(Arch::Llama, "small").unwrap(),
        &Default::default(),
        &other,
    )
    .unwrap();
    let mut cfg = quick();
    cfg.epochs = 0.1;
    cfg.truncate = true;
    cfg.max_len = Some(64);
    let f = d.join("ok.jsonl");
    chat_file(
        &f,
        &(0..10)
            .map(|i| qa(&format!("q{i}"), "a"))
            .chain([long])
            .collect::<Vec<_>>(),
    );
    let out = finetune(
        &base,
        &f,
        &d.join("adapter"),
        &cfg,
        false,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(out.data.truncated, 1);
    let e = merge(&other, &d.join("adapter"), &d.join("merged"))
        .unwrap_err()
        .to_string();
    assert!(!d.join("merged").exists(), "{e}");
    assert!(e.contains("shape") || e.contains("lora"), "{e}");
}

#[test]
fn a_stopped_fine_tune_resumes_to_the_same_adapter_bit_for_bit() {
    let d = scratch("sft-resume");
    let base = tiny_model(&d, Arch::Qwen2);
    let lines: Vec<String> = (0..40)
        .map(|i| qa(&format!("What is {i} plus one?"), &format!("{}", i + 1)))
        .collect();
    let data = d.join("chat.jsonl");
    chat_file(&data, &lines);
    let cfg = FinetuneConfig {
        lora_dropout: 0.1,
        checkpoint_every: 3,
        tokens_per_step: 96,
        epochs: 2.0,
        ..quick()
    };
    let run = |out: &str, resume: bool, stop_after: Option<u64>| {
        let stop = AtomicBool::new(false);
        finetune(&base, &data, &d.join(out), &cfg, resume, &stop, &mut |s| {
            if Some(s.step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        })
    };
    let whole = run("whole", false, None).unwrap();
    assert!(whole.steps > 10, "{} steps", whole.steps);
    let weights = |dir: &str| std::fs::read(d.join(dir).join("adapter_model.safetensors")).unwrap();

    // stopped by a signal at step 5: a checkpoint at 5, and --resume finishes the run
    let stopped = run("signal", false, Some(5)).unwrap();
    assert!(stopped.interrupted && stopped.steps == 5);
    assert!(!d.join("signal/adapter_config.json").exists());
    let e = run("signal", false, None).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    let done = run("signal", true, None).unwrap();
    assert!(!done.interrupted && done.steps == whole.steps);
    assert!(
        weights("signal") == weights("whole"),
        "resumed at step 5: other weights"
    );

    // killed during the save at step 9: that checkpoint has no marker, the one of step 6 is used
    // (dropout masks, data order and moments all replayed)
    run("killed", false, Some(10)).unwrap();
    let ckpts = d.join("killed/checkpoints");
    std::fs::remove_dir_all(ckpts.join("step-00000010")).unwrap();
    std::fs::rename(
        ckpts.join("step-00000009"),
        ckpts.join("step-00000009.partial"),
    )
    .unwrap();
    std::fs::remove_file(ckpts.join("step-00000009.partial/COMPLETE")).unwrap();
    run("killed", true, None).unwrap();
    assert!(
        weights("killed") == weights("whole"),
        "resumed at step 6: other weights"
    );

    // a resume with other settings, or on another file, is refused
    run("other", false, Some(2)).unwrap();
    let stop = AtomicBool::new(false);
    let e = finetune(
        &base,
        &data,
        &d.join("other"),
        &FinetuneConfig {
            lr: 0.5,
            ..cfg.clone()
        },
        true,
        &stop,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("other settings"), "{e}");
    chat_file(&data, &lines[..30]);
    let e = run("other", true, None).unwrap_err().to_string();
    assert!(e.contains("SHA-256"), "{e}");
    // a finished run is not run again
    let e = run("whole", true, None).unwrap_err().to_string();
    assert!(e.contains("already holds an adapter"), "{e}");
}

#[test]
fn adapter_gradients_over_a_frozen_base_equal_those_over_a_trainable_one() {
    use fount_train::finetune::LoraParams;
    use fount_train::loss::cross_entropy;
    use fount_train::optim::Grads;
    let d = scratch("sft-frozen");
    let base = tiny_model_wide_init(&d, Arch::Qwen2);
    let ft = FinetuneConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: TargetModules::all_linear(),
        ..FinetuneConfig::default()
    };
    let frozen = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
    let (trainable, _) = fount_train::Params::load(&base).unwrap();
    let lora = LoraParams::init(frozen.config(), &ft).unwrap();
    // a non-zero B, so that every path of the adapter carries gradient
    for (name, var) in lora.params.iter() {
        if name.ends_with("lora_B.weight") {
            let t = (var.as_tensor().ones_like().unwrap() * 0.01).unwrap();
            var.set(&t).unwrap();
        }
    }
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 200).collect();
    let mut batch = Batch::default();
    batch.push(&ids[..20], 0);
    batch.push(&ids[20..], 0);
    let targets: Vec<u32> = ids.iter().map(|t| (t + 1) % 200).collect();
    let mask = vec![true; ids.len()];
    let grads_of = |model: &Model| {
        let mut lb = LoraBatch::none();
        lb.push(0..batch.len(), lora.adapter().unwrap());
        let logits = model
            .forward_lora(&batch, &mut NoCache, Logits::All, &lb, false)
            .unwrap()
            .logits;
        let (loss, _) = cross_entropy(&logits, &targets, &mask).unwrap();
        let mut g = Grads::default();
        g.accumulate(&lora.params, &loss.backward().unwrap(), 1.0)
            .unwrap();
        g
    };
    let (a, b) = (grads_of(&frozen), grads_of(&trainable));
    for (name, _) in lora.params.iter() {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: no gradient");
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{name}: {diff} (scale {scale})"
        );
    }
}
