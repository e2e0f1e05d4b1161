use std::sync::atomic::{AtomicBool, Ordering};

use fount_model::Arch;
use fount_train::pretrain::unigram_entropy;
use fount_train::{checkpoint, train, Observer, Quiet, Single, StepMetrics};

use crate::util::{config, patterned_shards, scratch, tiny_model};

#[test]
fn a_tiny_model_learns_far_below_the_unigram_entropy() {
    let d = scratch("learn");
    let model = tiny_model(&d, Arch::Llama);
    let data = patterned_shards(&d, 2000, 1);
    let cfg = config(&model, &data, &d.join("run"), 300);
    let out = train(&cfg, false, &AtomicBool::new(false), &Single, &mut Quiet).unwrap();
    let unigram = unigram_entropy(&data, "train").unwrap();
    let val = out.val_loss.unwrap();
    eprintln!("unigram entropy {unigram:.3} nats, validation loss after 300 steps {val:.3}");
    assert!(
        val < 0.5 * unigram,
        "validation loss {val} against unigram entropy {unigram}"
    );
    // the metrics log has every step, the final model loads and generates
    let lines = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 300);
    let m = fount_model::Model::load(
        &out.final_model.unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    assert!(m.is_ok());
}

/// Stops the run (as SIGTERM does) once it reaches `at`.
struct StopAt {
    at: u64,
    flag: std::sync::Arc<AtomicBool>,
}

impl Observer for StopAt {
    fn step(&mut self, m: &StepMetrics) {
        if m.step == self.at {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

fn weights(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights_bit_for_bit() {
    let d = scratch("resume");
    let model = tiny_model(&d, Arch::Llama);
    let data = patterned_shards(&d, 400, 2);
    let steps = 45;
    let straight = train(
        &config(&model, &data, &d.join("straight"), steps),
        false,
        &AtomicBool::new(false),
        &Single,
        &mut Quiet,
    )
    .unwrap();
    // stopped at 7 (between checkpoints), resumed, stopped at 33, resumed to the end
    let cfg = config(&model, &data, &d.join("stopped"), steps);
    let mut resume = false;
    for at in [7, 33] {
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let mut obs = StopAt {
            at,
            flag: flag.clone(),
        };
        let out = train(&cfg, resume, &flag, &Single, &mut obs).unwrap();
        assert!(out.interrupted);
        assert_eq!(out.step, at);
        resume = true;
    }
    let done = train(&cfg, true, &AtomicBool::new(false), &Single, &mut Quiet).unwrap();
    assert_eq!(done.step, steps);
    assert!(
        weights(&straight.final_model.unwrap()) == weights(&done.final_model.unwrap()),
        "resumed weights differ"
    );
    // the metrics log holds each step once
    let log = std::fs::read_to_string(d.join("stopped/metrics.jsonl")).unwrap();
    let steps_logged: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps_logged, (1..=steps).collect::<Vec<_>>());
    // three checkpoints kept, the newest complete one is the end
    let kept = checkpoint::list(&d.join("stopped/checkpoints")).unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept.last().unwrap().0, steps);
}

#[test]
fn bad_runs_are_refused_clearly_and_touch_nothing() {
    let d = scratch("bad");
    let model = tiny_model(&d, Arch::Llama);
    let data = patterned_shards(&d, 200, 3);
    // an unknown field
    let path = d.join("bad.toml");
    std::fs::write(
        &path,
        "model = \"m\"\ndata = \"d\"\nout = \"o\"\nsteps = 1\nlearning_rate = 1\n",
    )
    .unwrap();
    let e = fount_train::TrainConfig::from_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown field") && e.contains("learning_rate"),
        "{e}"
    );
    // a run directory in use, without --resume
    let cfg = config(&model, &data, &d.join("run"), 3);
    train(&cfg, false, &AtomicBool::new(false), &Single, &mut Quiet).unwrap();
    let before = std::fs::read(d.join("run/metrics.jsonl")).unwrap();
    let e = train(&cfg, false, &AtomicBool::new(false), &Single, &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    assert_eq!(std::fs::read(d.join("run/metrics.jsonl")).unwrap(), before);
    // shards made with another tokenizer (ids past the model's vocabulary)
    let wide = d.join("wide");
    let mut w = fount_data::shard::ShardWriter::new(&wide, "train", 70_000, 2, 1 << 16).unwrap();
    w.push(&(0..200).map(|i| 600 + i).collect::<Vec<u32>>())
        .unwrap();
    w.finish().unwrap();
    let e = train(
        &config(&model, &wide, &d.join("wide-run"), 2),
        false,
        &AtomicBool::new(false),
        &Single,
        &mut Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vocabulary"), "{e}");
    // a checkpoint with its optimizer state cut short is refused, not half-loaded
    let ckpt = checkpoint::list(&d.join("run/checkpoints"))
        .unwrap()
        .pop()
        .unwrap()
        .1;
    let opt = ckpt.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let mut more = cfg.clone();
    more.steps = 5;
    let e = train(&more, true, &AtomicBool::new(false), &Single, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
    // a checkpoint without its marker is not a checkpoint
    std::fs::remove_file(ckpt.join(checkpoint::COMPLETE)).unwrap();
    assert!(checkpoint::list(&d.join("run/checkpoints"))
        .unwrap()
        .iter()
        .all(|(_, p)| p != &ckpt));
}
