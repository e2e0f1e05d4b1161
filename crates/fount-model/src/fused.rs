//! Fused CPU kernels with their backward passes, for training in f32.
//!
//! Composed of candle's elementwise ops, an RMSNorm, a rotary embedding or a masked softmax
//! is five to ten passes over its tensor forward and as many backward, each allocating a
//! fresh buffer and keeping it alive for the backward pass. Here each is one pass forward and
//! one or two backward, over rows split across the rayon pool, and only the op's inputs and
//! output are kept. The composed versions stay as the reference (and for other devices and
//! dtypes); `tests` checks values and gradients against them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

mod attention;

pub use attention::{attention, AttnShape};

/// Rows of at most this many elements in all go to one rayon task.
const ROWS_PER_TASK_ELEMS: usize = 1 << 14;

/// Whether the fused kernels serve `t`: f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// The f32 values of a contiguous CPU tensor's storage.
pub(crate) fn values<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous inputs only");
    };
    Ok(&v[start..end])
}

/// Runs `f` on the values of a tensor the op holds (a table or a mask).
pub(crate) fn with_values<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        candle_core::bail!("{op}: CPU tensors only");
    };
    f(values(s, layout, op)?)
}

/// How many rows of `cols` elements one task takes.
fn rows_per_task(cols: usize) -> usize {
    (ROWS_PER_TASK_ELEMS / cols.max(1)).max(1)
}

/// Fills `out` row by row (`cols` per row) in parallel: `f(row index, out row)`.
fn par_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if cols == 0 {
        return; // no elements
    }
    let per = rows_per_task(cols);
    out.par_chunks_mut(per * cols)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_mut(cols).enumerate() {
                f(task * per + i, row);
            }
        });
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

fn sum(v: impl Iterator<Item = f32>) -> f32 {
    v.fold(0.0, |a, b| a + b)
}

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
// Matrix products

/// A matrix operand: its values and the strides of its rows and columns.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub values: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `(rows, cols)` matrix.
    pub fn rows(values: &'a [f32], cols: usize) -> Self {
        Mat {
            values,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `(rows, cols)` matrix.
    pub fn transposed(values: &'a [f32], cols: usize) -> Self {
        Mat {
            values,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// A row-major `(rows, cols)` matrix, or its transpose when `transposed`.
    pub fn of(values: &'a [f32], cols: usize, transposed: bool) -> Self {
        if transposed {
            Mat::transposed(values, cols)
        } else {
            Mat::rows(values, cols)
        }
    }

    /// Whether an `(rows, cols)` matrix with these strides lies within the values.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.values.len()
    }
}

/// `dst = [dst +] beta · lhs · rhs` for a row-major `dst` of `(m, n)`, `lhs` `(m, k)` and `rhs`
/// `(k, n)`, with `gemm` (the kernels candle's own matmul runs) on the rayon pool.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) -> candle_core::Result<()> {
    gemm_checked(dst, dims, accumulate, (lhs, rhs, beta), pool())
}

/// [`gemm_into`] on the calling thread alone, for products inside a task of a parallel loop.
pub(crate) fn gemm_serial(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) -> candle_core::Result<()> {
    let serial = gemm::Parallelism::None;
    gemm_checked(dst, dims, accumulate, (lhs, rhs, beta), serial)
}

fn gemm_checked(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (lhs, rhs, beta): (Mat, Mat, f32),
    parallelism: gemm::Parallelism,
) -> candle_core::Result<()> {
    if dst.len() != m * n {
        candle_core::bail!("fount-gemm: a ({m}, {n}) product into {} values", dst.len());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    check_operands((m, n, k), lhs, rhs)?;
    // SAFETY: `dst` is exactly m × n values, and the operands were checked to fit.
    #[allow(unsafe_code)]
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            (m, n, k),
            accumulate,
            lhs,
            rhs,
            beta,
            parallelism,
        );
    }
    Ok(())
}

/// `beta · lhs · rhs` into a new row-major `(m, n)` buffer, which gemm writes without reading,
/// so it is never zeroed first.
pub(crate) fn gemm_new(
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    beta: f32,
) -> candle_core::Result<Vec<f32>> {
    if k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    check_operands((m, n, k), lhs, rhs)?;
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: the buffer has room for m × n values and the operands were checked to fit. With
    // `accumulate` false gemm only writes `dst`, every one of its m × n values, so they are all
    // initialised when the length is set.
    #[allow(unsafe_code)]
    unsafe {
        gemm_raw(dst.as_mut_ptr(), (m, n, k), false, lhs, rhs, beta, pool());
        dst.set_len(m * n);
    }
    Ok(dst)
}

fn check_operands((m, n, k): (usize, usize, usize), lhs: Mat, rhs: Mat) -> candle_core::Result<()> {
    if !lhs.fits(m, k) || !rhs.fits(k, n) {
        candle_core::bail!("fount-gemm: operands do not fit ({m}, {k}) × ({k}, {n})");
    }
    Ok(())
}

/// The rayon pool's threads for one product.
fn pool() -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// # Safety
/// `dst` points to `m × n` writable values (initialised when `accumulate`) that nothing else
/// reads or writes meanwhile, and both operands fit their shapes ([`check_operands`]).
#[allow(unsafe_code)]
unsafe fn gemm_raw(
    dst: *mut f32,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract: every index gemm touches lies within `dst` and the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.values.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `lhs · rhs` of two contiguous f32 CPU matrices, each read as stored `(rows, cols)` or, when
/// its flag is set, as the transpose of that: a new contiguous tensor, never zeroed first.
pub(crate) fn product(
    lhs: &Tensor,
    lhs_t: bool,
    rhs: &Tensor,
    rhs_t: bool,
) -> candle_core::Result<Tensor> {
    let (lr, lc) = lhs.dims2()?;
    let (rr, rc) = rhs.dims2()?;
    let (m, k) = if lhs_t { (lc, lr) } else { (lr, lc) };
    let (k2, n) = if rhs_t { (rc, rr) } else { (rr, rc) };
    if k != k2 {
        candle_core::bail!("fount-product: ({m}, {k}) × ({k2}, {n})");
    }
    let (lhs, rhs) = (lhs.contiguous()?, rhs.contiguous()?);
    let out = with_values(&lhs, "fount-product", |a| {
        with_values(&rhs, "fount-product", |b| {
            gemm_new((m, n, k), Mat::of(a, lc, lhs_t), Mat::of(b, rc, rhs_t), 1.0)
        })
    })?;
    Tensor::from_vec(out, (m, n), lhs.device())
}

// ---------------------------------------------------------------------------------------------
// Linear projection

/// `y = x Wᵀ` for a `W` `(out, in)` that is trained: its backward writes `dW = dyᵀ x` straight in
/// `W`'s layout. (Through `x.matmul(&W.t())` the gradient comes out as `(in, out)` and is
/// transposed and copied back.) A gradient goes only to the operands autograd tracks.
///
/// # Shapes
/// - `x`: `(tokens, in)`, `weight`: `(out, in)` → `(tokens, out)`
pub fn linear(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let (_, inp) = weight.dims2()?;
    if x.dim(1)? != inp {
        candle_core::bail!(
            "fount-linear: x {:?} does not fit W {:?}",
            x.dims(),
            weight.dims()
        );
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, Linear)
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fount-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        let (n, inp) = l1.shape().dims2()?;
        let (out, _) = l2.shape().dims2()?;
        let y = gemm_new(
            (n, out, inp),
            Mat::rows(x, inp),
            Mat::transposed(w, inp),
            1.0,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(product(dy, false, w, false)?) // (n, out) · (out, in)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(product(dy, true, x, false)?) // (out, n) · (n, in)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA projection

/// `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ` over a frozen base (`W`, `b` untracked) with the adapter's
/// `A` `(r, in)` and `Bᵀ` `(r, out)` trained: one op whose graph keeps `y` alone (the composed
/// version keeps the base output, the rank-sized product, the update and the sum). Its backward
/// recomputes `x Aᵀ`, and gives `x` a gradient only when it is tracked.
///
/// # Shapes
/// - `x`: `(tokens, in)` → `(tokens, out)`
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    bt: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let (r, a_in) = a.dims2()?;
    if a_in != inp || bt.dims2()? != (r, out) || x.dim(1)? != inp {
        candle_core::bail!(
            "fount-lora-linear: x {:?}, W {:?}, A {:?}, Bᵀ {:?} do not fit",
            x.dims(),
            weight.dims(),
            a.dims(),
            bt.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &bt.contiguous()?,
        LoraLinear {
            weight: weight.contiguous()?,
            bias: bias.map(Tensor::contiguous).transpose()?,
            scale: scale as f32,
        },
    )
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fount-lora-linear"
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
        let (x, a, bt) = (
            values(s1, l1, name)?,
            values(s2, l2, name)?,
            values(s3, l3, name)?,
        );
        let (n, inp) = l1.shape().dims2()?;
        let (r, out) = l3.shape().dims2()?;
        let mut y = with_values(&self.weight, name, |w| {
            gemm_new(
                (n, out, inp),
                Mat::rows(x, inp),
                Mat::transposed(w, inp),
                1.0,
            )
        })?;
        if let Some(b) = &self.bias {
            with_values(b, name, |b| {
                par_rows(&mut y, out, |_, row| {
                    for (v, &c) in row.iter_mut().zip(b) {
                        *v += c;
                    }
                });
                Ok(())
            })?;
        }
        let xa = gemm_new((n, r, inp), Mat::rows(x, inp), Mat::transposed(a, inp), 1.0)?;
        gemm_into(
            &mut y,
            (n, out, r),
            true,
            Mat::rows(&xa, r),
            Mat::rows(bt, out),
            self.scale,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bt: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = f64::from(self.scale);
        let xa = product(x, false, a, true)?; // (n, r)
        let dbt = (product(&xa, true, dy, false)? * s)?; // (r, out)
        let dxa = (product(dy, false, bt, true)? * s)?; // (n, r)
        let da = product(&dxa, true, x, false)?; // (r, in)
        let dx = if x.track_op() {
            Some((product(dy, false, &self.weight, false)? + product(&dxa, false, a, false)?)?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(dbt)))
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        Var::from_tensor(
            &Tensor::from_vec(v, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        let (a, b) = (host(a), host(b));
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{what}[{i}]: fused {x}, composed {y}"
            );
        }
    }

    /// Checks `fused` against `composed`: values, and the gradients of every input under the
    /// same (random) upstream gradient.
    fn same(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        what: &str,
    ) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let a = fused(&ts).unwrap_or_else(|e| panic!("{e}"));
        let b = composed(&ts).unwrap_or_else(|e| panic!("{e}"));
        close(&a, &b, what);
        let up = rand(a.dims(), 99);
        let ga = (a * up.as_tensor())
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .unwrap_or_else(|e| panic!("{e}"));
        let gb = (b * up.as_tensor())
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .unwrap_or_else(|e| panic!("{e}"));
        for (i, v) in inputs.iter().enumerate() {
            let (Some(x), Some(y)) = (ga.get(v), gb.get(v)) else {
                panic!("{what}: no gradient for input {i}");
            };
            close(x, y, &format!("{what}: gradient of input {i}"));
        }
    }

    #[test]
    fn rms_norm_matches_the_composed_norm() {
        same(
            &[rand(&[37, 48], 1), rand(&[48], 2)],
            |t| rms_norm(&t[0], &t[1], 1e-6),
            |t| {
                let inv = (t[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
                    .sqrt()?
                    .recip()?;
                t[0].broadcast_mul(&inv)?.broadcast_mul(&t[1])
            },
            "rms_norm",
        );
    }

    #[test]
    fn rope_matches_the_composed_rotation() {
        let (heads, n, d) = (3, 5, 8);
        let cos = rand(&[n, d / 2], 3)
            .as_tensor()
            .cos()
            .unwrap_or_else(|e| panic!("{e}"));
        let sin = rand(&[n, d / 2], 3)
            .as_tensor()
            .sin()
            .unwrap_or_else(|e| panic!("{e}"));
        same(
            &[rand(&[heads, n, d], 4)],
            |t| rope(&t[0], &cos, &sin),
            |t| {
                let (c, s) = (cos.reshape((1, n, d / 2))?, sin.reshape((1, n, d / 2))?);
                let x1 = t[0].narrow(2, 0, d / 2)?;
                let x2 = t[0].narrow(2, d / 2, d / 2)?;
                let r1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
                let r2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
                Tensor::cat(&[r1, r2], 2)
            },
            "rope",
        );
    }

    #[test]
    fn masked_softmax_matches_the_composed_softmax() {
        // two heads × three queries of a causal mask over three keys, and no mask
        let mask = Tensor::from_vec(
            vec![
                0f32,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY,
                0.,
                0.,
                f32::NEG_INFINITY,
                0.,
                0.,
                0.,
            ],
            (3, 3),
            &Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let composed = |s: &Tensor, m: Option<&Tensor>| -> candle_core::Result<Tensor> {
            let s = (s * 0.125)?;
            let s = match m {
                Some(m) => s.broadcast_add(m)?,
                None => s,
            };
            let max = s.max_keepdim(D::Minus1)?;
            let e = s.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        };
        same(
            &[rand(&[2, 3, 3], 5)],
            |t| masked_softmax(&t[0], Some(&mask), 0.125),
            |t| composed(&t[0], Some(&mask)),
            "masked softmax",
        );
        same(
            &[rand(&[4, 7], 6)],
            |t| masked_softmax(&t[0], None, 0.125),
            |t| composed(&t[0], None),
            "softmax",
        );
    }

    #[test]
    fn cross_entropy_matches_the_composed_loss() {
        let targets = [3u32, 0, 9, 9, 4];
        let weights = [0.25f32, 0.0, 0.25, 0.25, 0.25];
        let w = Tensor::new(&weights, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let idx =
            Tensor::from_slice(&targets, (5, 1), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        same(
            &[rand(&[5, 10], 10)],
            |t| cross_entropy(&t[0], &targets, &weights),
            |t| {
                let logp = candle_nn::ops::log_softmax(&t[0], D::Minus1)?;
                logp.gather(&idx, 1)?.squeeze(1)?.mul(&w)?.sum_all()?.neg()
            },
            "cross_entropy",
        );
    }

    #[test]
    fn lora_linear_matches_the_composed_projection() {
        let w = rand(&[6, 10], 11).as_tensor().clone();
        let b = rand(&[6], 12).as_tensor().clone();
        for bias in [None, Some(&b)] {
            same(
                &[rand(&[7, 10], 13), rand(&[3, 10], 14), rand(&[3, 6], 15)],
                |t| lora_linear(&t[0], &w, bias, &t[1], &t[2], 0.5),
                |t| {
                    let y = t[0].matmul(&w.t()?)?;
                    let y = match bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    };
                    y + (t[0].matmul(&t[1].t()?)? * 0.5)?.matmul(&t[2])?
                },
                "lora_linear",
            );
        }
    }

    #[test]
    fn linear_matches_the_composed_product() {
        same(
            &[rand(&[7, 10], 16), rand(&[6, 10], 17)],
            |t| linear(&t[0], &t[1]),
            |t| t[0].matmul(&t[1].t()?),
            "linear",
        );
        // an untracked input gets no gradient; the weight still does, in its own layout
        let x = rand(&[7, 10], 18).as_tensor().detach();
        let w = rand(&[6, 10], 19);
        let grads = linear(&x, w.as_tensor())
            .and_then(|y| y.sum_all())
            .and_then(|y| y.backward())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(grads.get(&x).is_none());
        let dw = grads
            .get(w.as_tensor())
            .map(|g| (g.dims().to_vec(), g.is_contiguous()));
        assert_eq!(dw, Some((vec![6, 10], true)));
    }

    /// Attention composed of candle ops: per sequence, RoPE, `q kᵀ` per key/value head with its
    /// query heads stacked, the causal (windowed) mask, softmax, and `p v`.
    fn composed_attention(t: &[Tensor], shape: &AttnShape) -> candle_core::Result<Tensor> {
        let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let rotate = |x: &Tensor, cos: &Tensor, sin: &Tensor| -> candle_core::Result<Tensor> {
            let half = d / 2;
            let (x1, x2) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
            let (cos, sin) = (cos.unsqueeze(0)?, sin.unsqueeze(0)?);
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[r1, r2], 2)
        };
        let mut outs = Vec::new();
        let mut start = 0;
        for &len in &shape.seq_lens {
            let rows = |x: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
                x.narrow(0, start, len)?
                    .reshape((len, heads, d))?
                    .transpose(0, 1)
            };
            let (cos, sin) = (t[3].narrow(0, start, len)?, t[4].narrow(0, start, len)?);
            let q = rotate(&rows(&t[0], h)?, &cos, &sin)?.contiguous()?;
            let k = rotate(&rows(&t[1], kvh)?, &cos, &sin)?.contiguous()?;
            let v = rows(&t[2], kvh)?.contiguous()?;
            let q = q.reshape((kvh, h / kvh * len, d))?;
            let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
            let scores = match crate::layers::attention_mask(len, 0, len, shape.window) {
                Some(m) => {
                    let m = Tensor::from_vec(m, (len, len), &Device::Cpu)?;
                    scores
                        .reshape((kvh, h / kvh, len, len))?
                        .broadcast_add(&m)?
                        .reshape((kvh, h / kvh * len, len))?
                }
                None => scores,
            };
            let p = crate::layers::softmax_last_dim(&scores)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let out = p.matmul(&v)?.reshape((h, len, d))?.transpose(0, 1)?;
            outs.push(out.reshape((len, h * d))?);
            start += len;
        }
        Tensor::cat(&outs, 0)
    }

    #[test]
    fn attention_matches_the_composed_attention() {
        // two query heads per key/value head; sequences of unequal lengths; with and without a
        // sliding window that bites
        let (h, kvh, d) = (4, 2, 6);
        for window in [None, Some(3)] {
            let shape = AttnShape {
                heads: h,
                kv_heads: kvh,
                head_dim: d,
                seq_lens: vec![5, 1, 7],
                window,
            };
            let n = 13;
            let (cos, sin) = (
                rand(&[n, d / 2], 20).as_tensor().detach(),
                rand(&[n, d / 2], 21).as_tensor().detach(),
            );
            same(
                &[
                    rand(&[n, h * d], 22),
                    rand(&[n, kvh * d], 23),
                    rand(&[n, kvh * d], 24),
                ],
                |t| attention(&t[0], &t[1], &t[2], &cos, &sin, &shape),
                |t| {
                    let all = [
                        t[0].clone(),
                        t[1].clone(),
                        t[2].clone(),
                        cos.clone(),
                        sin.clone(),
                    ];
                    composed_attention(&all, &shape)
                },
                "attention",
            );
        }
    }

    #[test]
    fn attention_refuses_shapes_that_do_not_fit() {
        let shape = AttnShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
            seq_lens: vec![5, 7],
            window: None,
        };
        let t = |rows: usize, cols: usize| rand(&[rows, cols], 25).as_tensor().clone();
        let (cos, sin) = (t(12, 3), t(12, 3));
        assert!(attention(&t(12, 24), &t(12, 12), &t(12, 12), &cos, &sin, &shape).is_ok());
        for (q, k, v) in [
            (t(11, 24), t(12, 12), t(12, 12)),
            (t(12, 24), t(12, 24), t(12, 12)),
        ] {
            let err = attention(&q, &k, &v, &cos, &sin, &shape).map(|_| ());
            assert!(err.is_err_and(|e| e.to_string().contains("do not fit")));
        }
    }

    #[test]
    fn silu_mul_matches_the_composed_product() {
        same(
            &[rand(&[9, 40], 7), rand(&[9, 40], 8)],
            |t| silu_mul(&t[0], &t[1]),
            |t| t[0].silu()? * &t[1],
            "silu_mul",
        );
    }
}
