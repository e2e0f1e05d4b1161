//! RMSNorm: one pass forward, one backward per input.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{last_dim, par_rows, rows_per_task, sum, values};

/// `y = x / √(mean(x²) + eps) · w` over the last dimension (`transformers`' `LlamaRMSNorm` in
/// f32).
///
/// # Shapes
/// - `x`: `(rows, size)`, `w`: `(size)` → `(rows, size)`
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

/// `1 / √(mean(x²) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = sum(x.iter().map(|v| v * v)) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fount-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        let cols = last_dim(l1);
        if w.len() != cols {
            candle_core::bail!("fount-rms-norm: weight of {} for rows of {cols}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, cols, |r, out| {
            let row = &x[r * cols..(r + 1) * cols];
            let inv = inv_rms(row, self.eps);
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
                *o = v * inv * g;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &dy, &RmsNormBackX { eps: self.eps })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&dy, &RmsNormBackW { eps: self.eps })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `dx = r·(dy⊙w) − r³/n · x · Σ(dy⊙w⊙x)`, with `r` the row's inverse RMS.
struct RmsNormBackX {
    eps: f32,
}

impl CustomOp3 for RmsNormBackX {
    fn name(&self) -> &'static str {
        "fount-rms-norm-back-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, dy) = (
            values(s1, l1, name)?,
            values(s2, l2, name)?,
            values(s3, l3, name)?,
        );
        let cols = last_dim(l1);
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, cols, |r, out| {
            let row = &x[r * cols..(r + 1) * cols];
            let g = &dy[r * cols..(r + 1) * cols];
            let inv = inv_rms(row, self.eps);
            let dot = sum(row.iter().zip(g).zip(w).map(|((&v, &d), &k)| v * d * k));
            let c = inv * inv * inv * dot / cols as f32;
            for (((o, &v), &d), &k) in out.iter_mut().zip(row).zip(g).zip(w) {
                *o = inv * d * k - c * v;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `dw = Σ_rows dy ⊙ x·r`.
struct RmsNormBackW {
    eps: f32,
}

impl CustomOp2 for RmsNormBackW {
    fn name(&self) -> &'static str {
        "fount-rms-norm-back-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dy) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        let cols = last_dim(l1);
        if cols == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(0)));
        }
        let per = rows_per_task(cols);
        let dw = x
            .par_chunks(per * cols)
            .zip(dy.par_chunks(per * cols))
            .map(|(xs, ds)| {
                let mut acc = vec![0f32; cols];
                for (row, g) in xs.chunks(cols).zip(ds.chunks(cols)) {
                    let inv = inv_rms(row, self.eps);
                    for ((a, &v), &d) in acc.iter_mut().zip(row).zip(g) {
                        *a += d * v * inv;
                    }
                }
                acc
            })
            .reduce(
                || vec![0f32; cols],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            );
        Ok((CpuStorage::F32(dw), Shape::from(cols)))
    }
}
