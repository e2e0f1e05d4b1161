//! A tiny model with a tokenizer, PEFT-format adapters for it, and helpers to run requests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use fount_engine::{Engine, EngineConfig, Event, FinishReason, Stream, Usage};
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::{Arch, Config, Model, Tokenizer};
use rand::{Rng, SeedableRng};

/// The tiny Llama (written once per test run).
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // under target/, where cargo keeps integration-test scratch space
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fount-engine-tiny-{}", std::process::id()));
        if !d.join("model.safetensors").exists() {
            let opts = InitOptions {
                std: 0.2,
                ..Default::default()
            };
            init_model(
                Arch::Llama,
                &preset(Arch::Llama, "tiny").unwrap(),
                &opts,
                &d,
            )
            .unwrap();
        }
        d
    })
}

pub fn engine(cfg: EngineConfig) -> Engine {
    let dir = model_dir();
    let model = Model::load(dir, DType::F32, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    Engine::start(model, tok, Vec::new(), cfg).unwrap()
}

pub fn config() -> Config {
    Model::load(model_dir(), DType::F32, &Device::Cpu)
        .unwrap()
        .config()
        .clone()
}

/// Writes a random rank-`r` adapter on every projection, in PEFT's format.
pub fn write_adapter(dir: &Path, r: usize, seed: u64) {
    fount_model::init::init_lora(&config(), r, 0.3, seed, dir).unwrap();
}

/// What one choice produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Choice {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: Option<FinishReason>,
    pub usage: Usage,
}

/// Reads a stream to the end.
pub fn collect(stream: &mut Stream, n: usize) -> Vec<Choice> {
    let mut out = vec![Choice::default(); n];
    let mut done = 0;
    while done < n {
        match stream.next_blocking() {
            Some(Event::Token {
                choice,
                token,
                text,
                ..
            }) => {
                out[choice].tokens.push(token);
                out[choice].text.push_str(&text);
            }
            Some(Event::Finished {
                choice,
                reason,
                text,
                usage,
            }) => {
                out[choice].text.push_str(&text);
                out[choice].reason = Some(reason);
                out[choice].usage = usage;
                done += 1;
            }
            Some(Event::Error(e)) => panic!("engine error: {e}"),
            None => panic!("stream ended with {done} of {n} choices finished"),
        }
    }
    out
}

/// A prompt of `len` token ids from `seed`.
pub fn prompt(len: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(3..500)).collect()
}

/// Waits until the engine has no running sequence and no blocks in use.
pub fn wait_idle(e: &Engine) -> fount_engine::MetricsSnapshot {
    let start = std::time::Instant::now();
    loop {
        let m = e.metrics();
        if (m.running == 0 && m.blocks_used == 0 && m.waiting == 0)
            || start.elapsed().as_secs() > 30
        {
            return m;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Each request run alone on `solo` (one at a time), then all at once on `batched`: the two
/// lists of choices, in request order.
pub fn solo_and_batched(
    solo: &Engine,
    batched: &Engine,
    reqs: &[fount_engine::Request],
) -> (Vec<Choice>, Vec<Choice>) {
    let alone: Vec<Choice> = reqs
        .iter()
        .map(|r| collect(&mut solo.submit(r.clone()).unwrap(), 1).remove(0))
        .collect();
    let mut streams: Vec<_> = reqs
        .iter()
        .map(|r| batched.submit(r.clone()).unwrap())
        .collect();
    let together = streams
        .iter_mut()
        .map(|s| collect(s, 1).remove(0))
        .collect();
    (alone, together)
}
