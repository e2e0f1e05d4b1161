//! Linear and LoRA projections whose weight gradients come out in the weights' layouts.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{gemm_into, gemm_new, par_rows, product, values, with_values, Mat};

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
