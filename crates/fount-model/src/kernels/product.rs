//! Matrix products on gemm's kernels (the ones candle's own matmul runs) into buffers the kernels
//! own, and the linear and LoRA projections built on them, whose weight gradients come out in the
//! weights' layouts.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{par_rows, values, with_values};

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

/// Where a product's work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Split over the rayon pool.
    Pool,
    /// On the calling thread alone, for products inside a task of a parallel loop.
    Caller,
}

/// `dst = [dst +] beta · lhs · rhs` for a row-major `dst` of `(m, n)`, `lhs` `(m, k)` and `rhs`
/// `(k, n)`, with `gemm` (the kernels candle's own matmul runs), on `threads`.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    (lhs, rhs, beta): (Mat, Mat, f32),
    threads: Threads,
) -> candle_core::Result<()> {
    let parallelism = match threads {
        Threads::Pool => pool(),
        Threads::Caller => ::gemm::Parallelism::None,
    };
    gemm_checked(dst, dims, accumulate, (lhs, rhs, beta), parallelism)
}

fn gemm_checked(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (lhs, rhs, beta): (Mat, Mat, f32),
    parallelism: ::gemm::Parallelism,
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
fn pool() -> ::gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
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
    parallelism: ::gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract: every index gemm touches lies within `dst` and the operands.
    unsafe {
        ::gemm::gemm(
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
// Linear and LoRA projections

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
            (Mat::rows(&xa, r), Mat::rows(bt, out), self.scale),
            Threads::Pool,
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
