//! A tiny model and token shards with structure to learn.

use std::path::{Path, PathBuf};

use fount_data::shard::ShardWriter;
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::Arch;
use rand::{Rng, SeedableRng};

/// A scratch directory under the target directory, fresh.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fount-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny model of `arch` (512-token vocabulary, 2 layers, 64 wide) at `dir`.
pub fn tiny_model(dir: &Path, arch: Arch) -> PathBuf {
    let out = dir.join("model");
    init_model(
        arch,
        &preset(arch, "tiny").unwrap(),
        &InitOptions::default(),
        &out,
    )
    .unwrap();
    out
}

/// The tiny model with weights ten times larger: its frozen output head can express confident
/// predictions, so an adapter alone can fit a task (at the default scale a random head caps the
/// logits near uniform).
pub fn tiny_model_wide_init(dir: &Path, arch: Arch) -> PathBuf {
    let out = dir.join("model");
    let opts = InitOptions {
        std: 0.2,
        ..InitOptions::default()
    };
    init_model(arch, &preset(arch, "tiny").unwrap(), &opts, &out).unwrap();
    out
}

/// Shards of documents where each token mostly follows from the one before
/// (`next = (7·t + 3) mod 500`, 85 % of the time; otherwise random): far below the unigram
/// entropy for a model that learns it.
pub fn patterned_shards(dir: &Path, docs: usize, seed: u64) -> PathBuf {
    let out = dir.join("shards");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (split, n) in [("train", docs), ("validation", docs / 10)] {
        let mut w = ShardWriter::new(&out, split, 512, 2, 1 << 16).unwrap();
        for _ in 0..n {
            let len = rng.random_range(20..80);
            let mut t: u32 = rng.random_range(3..500);
            let mut doc = Vec::with_capacity(len);
            for _ in 0..len {
                doc.push(t);
                t = if rng.random_bool(0.85) {
                    (7 * t + 3) % 500
                } else {
                    rng.random_range(3..500)
                };
            }
            w.push(&doc).unwrap();
        }
        w.finish().unwrap();
    }
    out
}

/// A run configuration over `model` and `data` writing to `out`.
pub fn config(model: &Path, data: &Path, out: &Path, steps: u64) -> fount_train::TrainConfig {
    let text = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = {steps}\nseq_len = 32\nmicro_batch = 8\nlr = 3e-3\neval_every = 50\ncheckpoint_every = 20\nkeep_checkpoints = 3\n",
        model, data, out
    );
    let path = out.with_extension("toml");
    std::fs::write(&path, text).unwrap();
    fount_train::TrainConfig::from_file(&path).unwrap()
}

/// `max |a − b|`.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
