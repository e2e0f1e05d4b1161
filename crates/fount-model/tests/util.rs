//! Helpers shared by the integration tests.

use std::path::PathBuf;

use candle_core::{DType, Device};
use fount_model::Model;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Loads a fixture model in f32 on the CPU.
pub fn load(name: &str) -> Model {
    Model::load(&fixture(name), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

/// The command that regenerates the fixtures, for failure messages.
pub const REGENERATE: &str =
    "python3 tools/golden/make_model_fixtures.py crates/fount-model/tests/fixtures";

/// Asserts `|a - b| <= tol` element-wise, naming the first differing index.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let mut worst = (0.0f32, 0usize);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let d = (a - e).abs();
        if d.is_nan() || d > worst.0 {
            worst = (if d.is_nan() { f32::INFINITY } else { d }, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: max |difference| {} > {tol} at index {} (actual {}, expected {}); fixtures from `{REGENERATE}`",
        worst.0,
        worst.1,
        actual[worst.1],
        expected[worst.1]
    );
}
