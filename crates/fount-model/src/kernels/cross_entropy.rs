//! Cross-entropy over logits with its backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{last_dim, par_rows, sum, values};

/// `−Σᵢ wᵢ · log softmax(logitsᵢ)[targetᵢ]`, a scalar. Its backward writes
/// `wᵢ · (softmax(logitsᵢ) − onehot(targetᵢ))` straight into the logits' gradient, recomputing
/// the softmax, so no vocabulary-sized intermediate outlives the forward pass.
///
/// # Shapes
/// - `logits`: `(rows, vocab)`; `targets`, `weights`: `rows` each → `()`
pub fn cross_entropy(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> candle_core::Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows || weights.len() != rows {
        candle_core::bail!(
            "fount-cross-entropy: {rows} rows, {} targets, {} weights",
            targets.len(),
            weights.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("fount-cross-entropy: target {t} outside a vocabulary of {vocab}");
    }
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
        weights: weights.to_vec(),
        upstream: 1.0,
    })
}

struct CrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// The loss's own gradient, when this computes the logits' gradient.
    upstream: f32,
}

/// `(max, log Σ exp(x − max))` of a row.
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total = sum(row.iter().map(|&v| (v - max).exp()));
    (max, total.ln())
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fount-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, self.name())?;
        let cols = last_dim(l).max(1);
        let loss: f64 = x
            .par_chunks(cols)
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .map(|(row, (&t, &w))| {
                if w == 0.0 {
                    return 0.0;
                }
                let (max, lse) = log_sum_exp(row);
                -(w as f64) * (row[t as usize] - max - lse) as f64
            })
            .sum();
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = CrossEntropyBack(CrossEntropy {
            targets: self.targets.clone(),
            weights: self.weights.clone(),
            upstream: dy.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? * self.upstream,
        });
        Ok(Some(x.apply_op1_no_bwd(&back)?))
    }
}

struct CrossEntropyBack(CrossEntropy);

impl CustomOp1 for CrossEntropyBack {
    fn name(&self) -> &'static str {
        "fount-cross-entropy-back"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, self.name())?;
        let cols = last_dim(l);
        let ce = &self.0;
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, cols, |r, out| {
            let w = ce.weights[r] * ce.upstream;
            if w == 0.0 {
                return;
            }
            let row = &x[r * cols..(r + 1) * cols];
            let (max, lse) = log_sum_exp(row);
            let shift = max + lse;
            for (o, &v) in out.iter_mut().zip(row) {
                *o = w * (v - shift).exp();
            }
            out[ce.targets[r] as usize] -= w;
        });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}
