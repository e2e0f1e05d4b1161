//! Row-wise ops, each one pass over its rows forward and one or two backward, split across the
//! rayon pool: RMSNorm, the rotary embedding, the masked softmax, SwiGLU's gate and the
//! cross-entropy of logits.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{last_dim, par_rows, rows_per_task, sum, values, with_values};

// ---------------------------------------------------------------------------------------------
// RMSNorm

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

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// RoPE in the "rotate half" layout: `y₁ = x₁·cos − x₂·sin`, `y₂ = x₂·cos + x₁·sin`. Its
/// backward is the rotation by the opposite angle.
///
/// # Shapes
/// - `x`: `(heads, tokens, head_dim)`; `cos`, `sin`: `(tokens, head_dim / 2)` → like `x`
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        inverse: false,
    })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fount-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, self.name())?;
        let (_, n, d) = l.shape().dims3()?;
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        with_values(&self.cos, self.name(), |cos| {
            with_values(&self.sin, self.name(), |sin| {
                if cos.len() != n * half || sin.len() != n * half {
                    candle_core::bail!("fount-rope: tables for {} tokens, not {n}", cos.len());
                }
                par_rows(&mut y, d, |r, out| {
                    let t = r % n;
                    let row = &x[r * d..(r + 1) * d];
                    let (c, s) = (
                        &cos[t * half..(t + 1) * half],
                        &sin[t * half..(t + 1) * half],
                    );
                    let (x1, x2) = row.split_at(half);
                    let (y1, y2) = out.split_at_mut(half);
                    for i in 0..half {
                        let si = sign * s[i];
                        y1[i] = x1[i] * c[i] - x2[i] * si;
                        y2[i] = x2[i] * c[i] + x1[i] * si;
                    }
                });
                Ok(())
            })
        })?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Masked softmax

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

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) · up`, the SwiGLU product.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fount-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        if g.len() != u.len() {
            candle_core::bail!("fount-silu-mul: {} gates, {} ups", g.len(), u.len());
        }
        let cols = last_dim(l1);
        let mut y = vec![0f32; g.len()];
        par_rows(&mut y, cols, |r, out| {
            let span = r * cols..(r + 1) * cols;
            for ((o, &a), &b) in out.iter_mut().zip(&g[span.clone()]).zip(&u[span]) {
                *o = a * sigmoid(a) * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dg = g.apply_op3_no_bwd(u, &dy, &SiluMulBack { gate: true })?;
        let du = g.apply_op3_no_bwd(u, &dy, &SiluMulBack { gate: false })?;
        Ok((Some(dg), Some(du)))
    }
}

/// `d gate = dy · up · σ(g)(1 + g(1 − σ(g)))` or `d up = dy · silu(g)`.
struct SiluMulBack {
    gate: bool,
}

impl CustomOp3 for SiluMulBack {
    fn name(&self) -> &'static str {
        "fount-silu-mul-back"
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
        let (g, u, dy) = (
            values(s1, l1, name)?,
            values(s2, l2, name)?,
            values(s3, l3, name)?,
        );
        let cols = last_dim(l1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, cols, |r, o| {
            let span = r * cols..(r + 1) * cols;
            let rows = g[span.clone()].iter().zip(&u[span.clone()]).zip(&dy[span]);
            for (o, ((&a, &b), &d)) in o.iter_mut().zip(rows) {
                let s = sigmoid(a);
                *o = if self.gate {
                    d * b * s * (1.0 + a * (1.0 - s))
                } else {
                    d * a * s
                };
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

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
