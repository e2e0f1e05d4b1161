//! SwiGLU's gate: `silu(gate) · up`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{last_dim, par_rows, values};

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
