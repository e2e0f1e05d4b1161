//! The rotary embedding (RoPE) as one op.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{par_rows, values, with_values};

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
