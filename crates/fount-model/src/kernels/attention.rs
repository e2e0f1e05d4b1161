//! Causal grouped-query attention with RoPE over packed sequences that have no past (training,
//! scoring), as one op.
//!
//! The composed version rotates the queries and keys, moves the heads to the front, batches the
//! sequences, multiplies, takes a masked softmax and multiplies again, each a tensor of its own
//! that autograd keeps, with a transpose copied back for every one of them in the backward
//! pass. Here each task takes one key/value head of one sequence: it rotates its keys once and
//! its query heads one at a time into scratch buffers, reads the values and the output's
//! gradient in place, and skips the masked half of the softmax. Nothing of size
//! `sequence × sequence` outlives a task: the backward pass recomputes the probabilities
//! (as FlashAttention does), so the graph keeps only `q`, `k`, `v` and the output.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{gemm_into, values, with_values, Mat, Threads};

/// What an [`attention`] computes over.
#[derive(Debug, Clone)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Size of one head (even).
    pub head_dim: usize,
    /// Lengths of the packed sequences, in order; they sum to the rows of `q`.
    pub seq_lens: Vec<usize>,
    /// Sliding window: a query sees only the last `window` positions, itself included.
    pub window: Option<usize>,
}

/// `softmax(scale · rope(q) rope(k)ᵀ + causal mask) · v` for every head of every sequence, the
/// heads side by side in the output as `o_proj` reads them.
///
/// # Shapes
/// - `q`: `(tokens, heads · head_dim)`; `k`, `v`: `(tokens, kv_heads · head_dim)`
/// - `cos`, `sin`: `(tokens, head_dim / 2)`, the rotary tables at each token's position
/// - returns `(tokens, heads · head_dim)`
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    shape: &AttnShape,
) -> candle_core::Result<Tensor> {
    let AttnShape {
        heads: h,
        kv_heads: kvh,
        head_dim: d,
        ..
    } = *shape;
    let n: usize = shape.seq_lens.iter().sum();
    let fits = kvh > 0
        && h % kvh == 0
        && d % 2 == 0
        && q.dims2()? == (n, h * d)
        && k.dims2()? == (n, kvh * d)
        && v.dims2()? == (n, kvh * d)
        && cos.dims2()? == (n, d / 2)
        && sin.dims2()? == (n, d / 2);
    if !fits {
        candle_core::bail!(
            "fount-attention: q {:?}, k {:?}, v {:?}, cos {:?} do not fit {shape:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            cos.dims()
        );
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            shape: shape.clone(),
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            scale: 1.0 / (d as f32).sqrt(),
        },
    )
}

struct Attention {
    shape: AttnShape,
    cos: Tensor,
    sin: Tensor,
    scale: f32,
}

/// One task: key/value head `kv` of the sequence at rows `start..start + len`.
#[derive(Clone, Copy)]
struct Task {
    start: usize,
    len: usize,
    kv: usize,
}

/// The inputs every task reads.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
}

impl Attention {
    fn tasks(&self) -> Vec<Task> {
        let mut tasks = Vec::new();
        let mut start = 0;
        for &len in &self.shape.seq_lens {
            for kv in 0..self.shape.kv_heads {
                tasks.push(Task { start, len, kv });
            }
            start += len;
        }
        tasks
    }

    fn with_inputs<R>(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        f: impl FnOnce(&Inputs) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        with_values(&self.cos, "fount-attention", |cos| {
            with_values(&self.sin, "fount-attention", |sin| {
                f(&Inputs { q, k, v, cos, sin })
            })
        })
    }

    /// Rotates the `(len, d)` block of `x` (rows `row_stride` apart, the first at token
    /// `first`) into `out`; `inverse` rotates back (the backward pass of the rotation).
    fn rotate(
        &self,
        x: &[f32],
        row_stride: usize,
        first: usize,
        inputs: &Inputs,
        inverse: bool,
        out: &mut [f32],
    ) {
        let d = self.shape.head_dim;
        let half = d / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let tok = first + i;
            let (x1, x2) = x[i * row_stride..i * row_stride + d].split_at(half);
            let (c, s) = (
                &inputs.cos[tok * half..(tok + 1) * half],
                &inputs.sin[tok * half..(tok + 1) * half],
            );
            let (y1, y2) = row.split_at_mut(half);
            for j in 0..half {
                let sj = sign * s[j];
                y1[j] = x1[j] * c[j] - x2[j] * sj;
                y2[j] = x2[j] * c[j] + x1[j] * sj;
            }
        }
    }

    /// The first key query `i` sees (causal, within the window); it sees keys `first..=i`.
    fn first_key(&self, i: usize) -> usize {
        match self.shape.window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// `p = softmax(scale · qr krᵀ + mask)` `(len, len)` for rotated `qr`, `kr` `(len, d)`;
    /// masked entries are 0.
    fn probs(&self, qr: &[f32], kr: &[f32], len: usize, p: &mut [f32]) -> candle_core::Result<()> {
        let d = self.shape.head_dim;
        gemm_into(
            p,
            (len, len, d),
            false,
            (Mat::rows(qr, d), Mat::transposed(kr, d), self.scale),
            Threads::Caller,
        )?;
        for (i, row) in p.chunks_exact_mut(len).enumerate() {
            let first = self.first_key(i);
            let (before, rest) = row.split_at_mut(first);
            let (seen, after) = rest.split_at_mut(i + 1 - first);
            before.fill(0.0);
            after.fill(0.0);
            let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for x in seen.iter_mut() {
                *x = (*x - max).exp();
                total += *x;
            }
            let inv = 1.0 / total;
            for x in seen.iter_mut() {
                *x *= inv;
            }
        }
        Ok(())
    }

    /// The task's keys, rotated: `(len, d)`.
    fn keys(&self, t: Task, inputs: &Inputs) -> Vec<f32> {
        let (kvh, d) = (self.shape.kv_heads, self.shape.head_dim);
        let mut kr = vec![0f32; t.len * d];
        let k = &inputs.k[t.start * kvh * d + t.kv * d..];
        self.rotate(k, kvh * d, t.start, inputs, false, &mut kr);
        kr
    }

    /// A task's output: its query heads' `(len, d)` blocks, one after another.
    fn forward_task(&self, t: Task, inputs: &Inputs) -> candle_core::Result<Vec<f32>> {
        let AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            ..
        } = self.shape;
        let groups = h / kvh;
        let len = t.len;
        let kr = self.keys(t, inputs);
        let mut qr = vec![0f32; len * d];
        let mut p = vec![0f32; len * len];
        let mut out = vec![0f32; groups * len * d];
        let v = Mat {
            values: &inputs.v[t.start * kvh * d + t.kv * d..],
            row_stride: kvh * d,
            col_stride: 1,
        };
        for (g, o) in out.chunks_exact_mut(len * d).enumerate() {
            let q = &inputs.q[t.start * h * d + (t.kv * groups + g) * d..];
            self.rotate(q, h * d, t.start, inputs, false, &mut qr);
            self.probs(&qr, &kr, len, &mut p)?;
            gemm_into(
                o,
                (len, d, len),
                false,
                (Mat::rows(&p, len), v, 1.0),
                Threads::Caller,
            )?;
        }
        Ok(out)
    }

    /// A task's gradients: `(dq blocks of its query heads, dk, dv)`, each block `(len, d)`.
    fn backward_task(
        &self,
        t: Task,
        inputs: &Inputs,
        dy: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            ..
        } = self.shape;
        let groups = h / kvh;
        let len = t.len;
        let kr = self.keys(t, inputs);
        let v = Mat {
            values: &inputs.v[t.start * kvh * d + t.kv * d..],
            row_stride: 1,
            col_stride: kvh * d,
        }; // vᵀ (d, len)
        let mut qr = vec![0f32; len * d];
        let mut p = vec![0f32; len * len];
        let mut ds = vec![0f32; len * len];
        let mut dqr = vec![0f32; len * d];
        let mut dq = vec![0f32; groups * len * d];
        let mut dkr = vec![0f32; len * d];
        let mut dv = vec![0f32; len * d];
        for (g, dq) in dq.chunks_exact_mut(len * d).enumerate() {
            let head = t.kv * groups + g;
            let q = &inputs.q[t.start * h * d + head * d..];
            self.rotate(q, h * d, t.start, inputs, false, &mut qr);
            self.probs(&qr, &kr, len, &mut p)?;
            let dout = Mat {
                values: &dy[t.start * h * d + head * d..],
                row_stride: h * d,
                col_stride: 1,
            };
            // dv += pᵀ dout; dp = dout vᵀ
            gemm_into(
                &mut dv,
                (len, d, len),
                g > 0,
                (Mat::transposed(&p, len), dout, 1.0),
                Threads::Caller,
            )?;
            gemm_into(
                &mut ds,
                (len, len, d),
                false,
                (dout, v, 1.0),
                Threads::Caller,
            )?;
            // ds = scale · p ⊙ (dp − Σ dp ⊙ p), row by row over the keys each query sees
            for (i, (dsr, pr)) in ds
                .chunks_exact_mut(len)
                .zip(p.chunks_exact(len))
                .enumerate()
            {
                let first = self.first_key(i);
                let dot: f32 = dsr[first..=i]
                    .iter()
                    .zip(&pr[first..=i])
                    .map(|(a, b)| a * b)
                    .sum();
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = self.scale * pv * (*x - dot);
                }
            }
            // dqr = ds kr; dkr += dsᵀ qr
            gemm_into(
                &mut dqr,
                (len, d, len),
                false,
                (Mat::rows(&ds, len), Mat::rows(&kr, d), 1.0),
                Threads::Caller,
            )?;
            gemm_into(
                &mut dkr,
                (len, d, len),
                g > 0,
                (Mat::transposed(&ds, len), Mat::rows(&qr, d), 1.0),
                Threads::Caller,
            )?;
            self.rotate(&dqr, d, t.start, inputs, true, dq);
        }
        let mut dk = vec![0f32; len * d];
        self.rotate(&dkr, d, t.start, inputs, true, &mut dk);
        Ok((dq, dk, dv))
    }
}

/// Writes the `(len, d)` blocks of `blocks` (one per head from `first_head`) into rows
/// `start..start + len` of the row-major `dst` of `width` columns.
fn scatter(
    dst: &mut [f32],
    width: usize,
    d: usize,
    start: usize,
    first_head: usize,
    blocks: &[f32],
    len: usize,
) {
    for (g, block) in blocks.chunks_exact(len * d).enumerate() {
        let col = (first_head + g) * d;
        for (i, row) in block.chunks_exact(d).enumerate() {
            let at = (start + i) * width + col;
            dst[at..at + d].copy_from_slice(row);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fount-attention"
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
        let (q, k, v) = (
            values(s1, l1, name)?,
            values(s2, l2, name)?,
            values(s3, l3, name)?,
        );
        let AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            ..
        } = self.shape;
        let groups = h / kvh;
        let n = l1.shape().dims2()?.0;
        let tasks = self.tasks();
        let blocks = self.with_inputs(q, k, v, |inputs| {
            tasks
                .par_iter()
                .map(|&t| self.forward_task(t, inputs))
                .collect::<candle_core::Result<Vec<_>>>()
        })?;
        let mut out = vec![0f32; n * h * d];
        for (t, block) in tasks.iter().zip(&blocks) {
            scatter(&mut out, h * d, d, t.start, t.kv * groups, block, t.len);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            ..
        } = self.shape;
        let groups = h / kvh;
        let n = q.dim(0)?;
        let dy = dy.contiguous()?;
        let tasks = self.tasks();
        let name = self.name();
        let blocks = with_values(q, name, |q| {
            with_values(k, name, |k| {
                with_values(v, name, |v| {
                    with_values(&dy, name, |dy| {
                        self.with_inputs(q, k, v, |inputs| {
                            tasks
                                .par_iter()
                                .map(|&t| self.backward_task(t, inputs, dy))
                                .collect::<candle_core::Result<Vec<_>>>()
                        })
                    })
                })
            })
        })?;
        let mut dq = vec![0f32; n * h * d];
        let mut dk = vec![0f32; n * kvh * d];
        let mut dv = vec![0f32; n * kvh * d];
        for (t, (bq, bk, bv)) in tasks.iter().zip(&blocks) {
            scatter(&mut dq, h * d, d, t.start, t.kv * groups, bq, t.len);
            scatter(&mut dk, kvh * d, d, t.start, t.kv, bk, t.len);
            scatter(&mut dv, kvh * d, d, t.start, t.kv, bv, t.len);
        }
        let dev = q.device();
        let tracked = |t: &Tensor, g: Vec<f32>, cols: usize| {
            t.track_op()
                .then(|| Tensor::from_vec(g, (n, cols), dev))
                .transpose()
        };
        Ok((
            tracked(q, dq, h * d)?,
            tracked(k, dk, kvh * d)?,
            tracked(v, dv, kvh * d)?,
        ))
    }
}
