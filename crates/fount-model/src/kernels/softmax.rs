//! A masked, scaled softmax over rows.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{last_dim, par_rows, sum, values, with_values};

/// `softmax(scale · s + mask)` over the last dimension, where row `r` of the flattened scores
/// takes row `r mod mask_rows` of the additive mask (`(queries, keys)`: every head and sequence
/// of a batched attention shares one mask). Its backward is
/// `ds = scale · p ⊙ (dp − Σ dp⊙p)`.
pub fn masked_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(MaskedSoftmax {
        mask: mask.map(Tensor::contiguous).transpose()?,
        scale: scale as f32,
    })
}

struct MaskedSoftmax {
    mask: Option<Tensor>,
    scale: f32,
}

fn softmax_rows(s: &[f32], mask: Option<&[f32]>, scale: f32, cols: usize) -> Vec<f32> {
    let mut p = vec![0f32; s.len()];
    let mask_rows = mask.map_or(1, |m| m.len() / cols.max(1)).max(1);
    par_rows(&mut p, cols, |r, out| {
        let row = &s[r * cols..(r + 1) * cols];
        match mask {
            Some(m) => {
                let m = &m[(r % mask_rows) * cols..(r % mask_rows + 1) * cols];
                for ((o, &v), &a) in out.iter_mut().zip(row).zip(m) {
                    *o = v * scale + a;
                }
            }
            None => {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = v * scale;
                }
            }
        }
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // every key masked: attend to nothing rather than divide by zero
            out.fill(0.0);
            return;
        }
        let mut total = 0f32;
        for o in out.iter_mut() {
            *o = (*o - max).exp();
            total += *o;
        }
        let inv = 1.0 / total;
        for o in out.iter_mut() {
            *o *= inv;
        }
    });
    p
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fount-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let scores = values(s, l, self.name())?;
        let cols = last_dim(l);
        let p = match &self.mask {
            Some(mask) => with_values(mask, self.name(), |m| {
                if m.is_empty() || m.len() % cols != 0 {
                    candle_core::bail!(
                        "fount-masked-softmax: a mask of {} for rows of {cols}",
                        m.len()
                    );
                }
                Ok(softmax_rows(scores, Some(m), self.scale, cols))
            })?,
            None => softmax_rows(scores, None, self.scale, cols),
        };
        Ok((CpuStorage::F32(p), l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(
            &dp.contiguous()?,
            &SoftmaxBack { scale: self.scale },
        )?))
    }
}

struct SoftmaxBack {
    scale: f32,
}

impl CustomOp2 for SoftmaxBack {
    fn name(&self) -> &'static str {
        "fount-masked-softmax-back"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (p, dp) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        let cols = last_dim(l1);
        let mut ds = vec![0f32; p.len()];
        par_rows(&mut ds, cols, |r, out| {
            let (pr, gr) = (&p[r * cols..(r + 1) * cols], &dp[r * cols..(r + 1) * cols]);
            let dot = sum(pr.iter().zip(gr).map(|(a, b)| a * b));
            for ((o, &a), &g) in out.iter_mut().zip(pr).zip(gr) {
                *o = self.scale * a * (g - dot);
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}
