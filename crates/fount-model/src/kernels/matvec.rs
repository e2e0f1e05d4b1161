//! `x Wᵀ` for a few rows of `x` (decoding), as a kernel that streams each weight row once.
//!
//! At batch 1 a decode step is bound by reading the weights from memory. candle's general
//! matmul routes a one-row product to a single-threaded vector kernel; this one splits the
//! output features across the rayon pool and computes every row of `x` against each weight
//! row while it is in cache. It is inference-only (no backward), so [`crate::Linear`] uses it
//! only for weights that autograd does not track.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use rayon::prelude::*;

/// The op: `lhs` is `x` `(rows, in)`, `rhs` is `W` `(out, in)`; the result is `(rows, out)`.
pub(crate) struct SmallMatmul;

const CHUNK: usize = 64;

/// The tile of [`tiled_block`]: weight rows by input rows, two accumulator registers each (24
/// of AVX-512's 32; the six input registers take the rest, so no wider tile fits).
const TW: usize = 4;
/// Input rows of the tile.
const TX: usize = 3;

/// Bytes of weight rows a task keeps in L2 while every group of input rows passes over them.
const TILE_BYTES: usize = 128 << 10;

/// From this many input rows on, groups of three input rows go on the outside of the loop
/// ([`tiled_block`]): compute-bound shapes, where keeping the inputs in L1 pays; below it the
/// weights stream from memory once, prefetched, two rows at a time.
const TILE_ROWS: usize = 16;

/// How many weight rows ahead of the one being multiplied are prefetched.
const PREFETCH_ROWS: usize = 4;

/// Asks the CPU to start loading `data` into cache (a hint; no effect on results).
#[inline]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: prefetching is a hint that never faults, even for addresses it cannot load.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

impl CustomOp2 for SmallMatmul {
    fn name(&self) -> &'static str {
        "fount-small-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("fount-small-matmul: f32 only");
        };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fount-small-matmul: contiguous operands only");
        };
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("fount-small-matmul: inner dimensions {k} and {k2} differ");
        }
        let x = &x[xs..xe];
        let w = &w[ws..we];
        // Output features in parallel chunks; each chunk writes its columns for every row.
        let mut y_t = vec![0f32; out * rows]; // (out, rows), transposed at the end
                                              // with many rows, a chunk's weight rows are read once per group of three input rows:
                                              // they must stay in L2
        let chunk = if rows >= TILE_ROWS {
            (TILE_BYTES / (4 * k.max(1))).clamp(4, CHUNK) & !3
        } else {
            CHUNK
        };
        y_t.par_chunks_mut(chunk * rows)
            .enumerate()
            .for_each(|(c, block)| {
                let first = c * chunk;
                let nw = block.len() / rows;
                let avx512 = has_avx512();
                if rows >= TILE_ROWS && avx512 {
                    tiled_block(&w[first * k..(first + nw) * k], x, k, rows, block);
                    return;
                }
                // every output is accumulated exactly as `dot` accumulates it, so a row's result
                // does not depend on how many rows there are or which path computed it
                let mut j = 0;
                while j < nw {
                    let w0 = &w[(first + j) * k..(first + j + 1) * k];
                    if let Some(ahead) =
                        w.get((first + j + PREFETCH_ROWS) * k..(first + j + PREFETCH_ROWS + 1) * k)
                    {
                        prefetch(ahead);
                    }
                    if avx512 && rows >= 4 && j + 1 < nw {
                        let w1 = &w[(first + j + 1) * k..(first + j + 2) * k];
                        let (d0, d1) = block[j * rows..(j + 2) * rows].split_at_mut(rows);
                        pair_dots(w0, w1, x, k, rows, d0, d1);
                        j += 2;
                    } else {
                        row_dots(w0, x, k, rows, &mut block[j * rows..(j + 1) * rows]);
                        j += 1;
                    }
                }
            });
        let y = if rows == 1 {
            y_t
        } else {
            let mut y = vec![0f32; rows * out];
            for o in 0..out {
                for r in 0..rows {
                    y[r * out + o] = y_t[o * rows + r];
                }
            }
            y
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

/// Defines `$name`, which runs `$portable` compiled for AVX-512 or AVX2+FMA when the CPU has
/// them (detected at run time), else as portable code. The loop is the same in all three, so the
/// results are too.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $portable:ident) => {
        $(#[$doc])*
        #[inline]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    #[allow(unsafe_code)]
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    #[allow(unsafe_code)]
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

simd_dispatch! {
    /// [`dot`] without AVX-512.
    fn dot_any(a: &[f32], b: &[f32]) -> f32 => dot_portable
}

/// Dot product in 32 lanes with independent accumulators ([`dot_portable`]'s sums), on the
/// AVX-512 tile where the CPU has it (the compiler does not keep the portable loop's lanes in
/// vector registers once they are summed as a tree).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len() == b.len() && has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        #[allow(unsafe_code)]
        return unsafe { tile_avx512([a], [b]) }[0][0];
    }
    dot_any(a, b)
}

simd_dispatch! {
    /// `y += c · x`, element-wise with fused multiply-adds.
    pub(crate) fn axpy(c: f32, x: &[f32], y: &mut [f32]) => axpy_portable
}

simd_dispatch! {
    /// [`dot4`] without AVX-512.
    fn dot4_any(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] => dot4_portable
}

/// `[dot(w, x[0]), …, dot(w, x[3])]`, bit for bit, loading each chunk of `w` once.
#[inline]
fn dot4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if x.iter().all(|r| r.len() == w.len()) && has_avx512() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        #[allow(unsafe_code)]
        return unsafe { tile_avx512([w], x) }[0];
    }
    dot4_any(w, x)
}

/// Rows `r..r + 4` of `x` (`rows × k`).
fn four_rows(x: &[f32], r: usize, k: usize) -> [&[f32]; 4] {
    [
        &x[r * k..(r + 1) * k],
        &x[(r + 1) * k..(r + 2) * k],
        &x[(r + 2) * k..(r + 3) * k],
        &x[(r + 3) * k..(r + 4) * k],
    ]
}

/// `dst[r] = dot(wrow, x_r)` for every row of `x` (`rows × k`), four rows per pass.
fn row_dots(wrow: &[f32], x: &[f32], k: usize, rows: usize, dst: &mut [f32]) {
    let mut r = 0;
    while r + 4 <= rows {
        let xs = four_rows(x, r, k);
        dst[r..r + 4].copy_from_slice(&dot4(wrow, xs));
        r += 4;
    }
    for (r, d) in dst.iter_mut().enumerate().take(rows).skip(r) {
        *d = dot(wrow, &x[r * k..(r + 1) * k]);
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[j · rows + r] = dot(w_j, x_r)` for a chunk of weight rows `w` (`nw × k`) and every
/// input row, with the AVX-512 4 × 3 tile: groups of three input rows on the outside, so each
/// group stays in L1 while the chunk's weight rows (in L2 after the first group) stream past,
/// four at a time. Every output is accumulated exactly as `dot` accumulates it, so a row's
/// result does not depend on how many rows there are or how they are tiled. Only called when
/// AVX-512F is present.
fn tiled_block(w: &[f32], x: &[f32], k: usize, rows: usize, dst: &mut [f32]) {
    let nw = w.len() / k;
    let wrow = |j: usize| &w[j * k..(j + 1) * k];
    let xrow = |r: usize| &x[r * k..(r + 1) * k];
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    while r + TX <= rows {
        let xs: [&[f32]; TX] = std::array::from_fn(|i| xrow(r + i));
        let mut j = 0;
        while j + TW <= nw {
            let ws: [&[f32]; TW] = std::array::from_fn(|i| wrow(j + i));
            // SAFETY: callers check AVX-512F (`has_avx512`) before choosing this path.
            #[allow(unsafe_code)]
            let out = unsafe { tile_avx512(ws, xs) };
            for (i, o) in out.iter().enumerate() {
                dst[(j + i) * rows + r..(j + i) * rows + r + TX].copy_from_slice(o);
            }
            j += TW;
        }
        for j in j..nw {
            for (i, xr) in xs.iter().enumerate() {
                dst[j * rows + r + i] = dot(wrow(j), xr);
            }
        }
        r += TX;
    }
    for j in 0..nw {
        for rr in r..rows {
            dst[j * rows + rr] = dot(wrow(j), xrow(rr));
        }
    }
}

/// The `W × X` tile: `2 · W · X` accumulator registers, each pair `(w, x)` accumulated in the 32 lanes and
/// chunk order of [`dot_portable`], then reduced the same way, so the results are bit-identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn tile_avx512<const W: usize, const X: usize>(w: [&[f32]; W], x: [&[f32]; X]) -> [[f32; X]; W] {
    use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps};
    const LANES: usize = 32;
    let k = w[0].len();
    assert!(
        w.iter().all(|r| r.len() == k) && x.iter().all(|r| r.len() == k),
        "tile operands differ in length"
    );
    let full = k / LANES * LANES;
    let z = _mm512_setzero_ps();
    let mut acc: [[[__m512; 2]; X]; W] = [[[z; 2]; X]; W];
    let mut at = 0;
    while at < full {
        // SAFETY: `at + 32 <= full <= k`, the length of every operand (asserted above).
        #[allow(unsafe_code)]
        let xv: [[__m512; 2]; X] = unsafe {
            x.map(|xr| {
                [
                    _mm512_loadu_ps(xr.as_ptr().add(at)),
                    _mm512_loadu_ps(xr.as_ptr().add(at + 16)),
                ]
            })
        };
        for (i, wr) in w.iter().enumerate() {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            let (u0, u1) = unsafe {
                (
                    _mm512_loadu_ps(wr.as_ptr().add(at)),
                    _mm512_loadu_ps(wr.as_ptr().add(at + 16)),
                )
            };
            for r in 0..X {
                acc[i][r][0] = _mm512_fmadd_ps(u0, xv[r][0], acc[i][r][0]);
                acc[i][r][1] = _mm512_fmadd_ps(u1, xv[r][1], acc[i][r][1]);
            }
        }
        at += LANES;
    }
    let mut out = [[0f32; X]; W];
    for i in 0..W {
        for r in 0..X {
            let tail: f32 = w[i][full..]
                .iter()
                .zip(&x[r][full..])
                .map(|(p, q)| p * q)
                .sum();
            out[i][r] = reduce_avx512(acc[i][r]) + tail;
        }
    }
    out
}

/// `d0[r] = dot(w0, x_r)` and `d1[r] = dot(w1, x_r)` for every row, two weight rows and four
/// input rows per pass of the AVX-512 tile. Only called when AVX-512F is present.
#[allow(clippy::too_many_arguments)]
fn pair_dots(
    w0: &[f32],
    w1: &[f32],
    x: &[f32],
    k: usize,
    rows: usize,
    d0: &mut [f32],
    d1: &mut [f32],
) {
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    while r + 4 <= rows {
        let xs = four_rows(x, r, k);
        // SAFETY: callers check AVX-512F (`has_avx512`) before choosing this path.
        #[allow(unsafe_code)]
        let [a, b] = unsafe { tile_2x4_avx512(w0, w1, xs) };
        d0[r..r + 4].copy_from_slice(&a);
        d1[r..r + 4].copy_from_slice(&b);
        r += 4;
    }
    for r in r..rows {
        let xr = &x[r * k..(r + 1) * k];
        d0[r] = dot(w0, xr);
        d1[r] = dot(w1, xr);
    }
}

/// The 2 × 4 tile: 16 accumulator registers, each pair `(w, x)` accumulated in the 32 lanes and
/// chunk order of [`dot_portable`], then reduced the same way, so the results are bit-identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn tile_2x4_avx512(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps};
    const LANES: usize = 32;
    let k = w0.len();
    assert!(
        w1.len() == k && x.iter().all(|r| r.len() == k),
        "tile operands differ in length"
    );
    let full = k / LANES * LANES;
    let z = _mm512_setzero_ps();
    let mut a: [[__m512; 2]; 4] = [[z; 2]; 4];
    let mut b: [[__m512; 2]; 4] = [[z; 2]; 4];
    let mut at = 0;
    while at < full {
        // SAFETY: `at + 32 <= full <= k`, the length of every operand (asserted above).
        #[allow(unsafe_code)]
        let (u0, u1, v0, v1) = unsafe {
            (
                _mm512_loadu_ps(w0.as_ptr().add(at)),
                _mm512_loadu_ps(w0.as_ptr().add(at + 16)),
                _mm512_loadu_ps(w1.as_ptr().add(at)),
                _mm512_loadu_ps(w1.as_ptr().add(at + 16)),
            )
        };
        for r in 0..4 {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            let (x0, x1) = unsafe {
                (
                    _mm512_loadu_ps(x[r].as_ptr().add(at)),
                    _mm512_loadu_ps(x[r].as_ptr().add(at + 16)),
                )
            };
            a[r][0] = _mm512_fmadd_ps(u0, x0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(u1, x1, a[r][1]);
            b[r][0] = _mm512_fmadd_ps(v0, x0, b[r][0]);
            b[r][1] = _mm512_fmadd_ps(v1, x1, b[r][1]);
        }
        at += LANES;
    }
    let reduce = |acc: [__m512; 2], w: &[f32], xr: &[f32]| -> f32 {
        let tail: f32 = w[full..].iter().zip(&xr[full..]).map(|(p, q)| p * q).sum();
        reduce_avx512(acc) + tail
    };
    let mut out = [[0f32; 4]; 2];
    for r in 0..4 {
        out[0][r] = reduce(a[r], w0, x[r]);
        out[1][r] = reduce(b[r], w1, x[r]);
    }
    out
}

/// The sum of a dot product's 32 lanes, halving the lanes in a tree (`a[i] + a[i + 16]`, then
/// `+ [i + 8]`, …), the order [`reduce_avx512`] adds them in with vector instructions.
#[inline(always)]
fn reduce32(a: &[f32; 32]) -> f32 {
    let mut s = [0f32; 16];
    for i in 0..16 {
        s[i] = a[i] + a[i + 16];
    }
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = s[i] + s[i + 8];
    }
    let u = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    let v = [u[0] + u[2], u[1] + u[3]];
    v[0] + v[1]
}

/// [`reduce32`] of the lanes `acc[0]` (0–15) and `acc[1]` (16–31).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reduce_avx512(acc: [std::arch::x86_64::__m512; 2]) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm512_add_ps(acc[0], acc[1]);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
    let t = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
    let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
    let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps::<1>(v, v)))
}

#[inline(always)]
fn axpy_portable(c: f32, x: &[f32], y: &mut [f32]) {
    for (yo, xi) in y.iter_mut().zip(x) {
        *yo = c.mul_add(*xi, *yo);
    }
}

#[inline(always)]
fn dot4_portable(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    const LANES: usize = 32;
    let (mut a0, mut a1, mut a2, mut a3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let cw = w.chunks_exact(LANES);
    let full = w.len() - cw.remainder().len();
    let chunks = cw
        .zip(x[0].chunks_exact(LANES))
        .zip(x[1].chunks_exact(LANES))
        .zip(x[2].chunks_exact(LANES))
        .zip(x[3].chunks_exact(LANES));
    for ((((wc, x0), x1), x2), x3) in chunks {
        for i in 0..LANES {
            a0[i] = wc[i].mul_add(x0[i], a0[i]);
            a1[i] = wc[i].mul_add(x1[i], a1[i]);
            a2[i] = wc[i].mul_add(x2[i], a2[i]);
            a3[i] = wc[i].mul_add(x3[i], a3[i]);
        }
    }
    let tail = |xr: &[f32]| -> f32 { w[full..].iter().zip(&xr[full..]).map(|(a, b)| a * b).sum() };
    [
        reduce32(&a0) + tail(x[0]),
        reduce32(&a1) + tail(x[1]),
        reduce32(&a2) + tail(x[2]),
        reduce32(&a3) + tail(x[3]),
    ]
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    reduce32(&acc) + tail
}

/// `x Wᵀ` for a trainable input and a frozen weight (LoRA training): the backward pass computes
/// the input's gradient only. candle's own matmul also computes the weight's gradient whether or
/// not anything asks for it, which costs a third of the step's work and a weight-sized buffer
/// per projection.
pub(crate) struct FrozenMatmul {
    /// `(out, in)`, untracked.
    pub weight: candle_core::Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "fount-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::{gemm_new, values, with_values, Mat};
        let x = values(s, l, self.name())?;
        let (rows, inp) = l.shape().dims2()?;
        let out = self.weight.dim(0)?;
        let y = with_values(&self.weight, self.name(), |w| {
            gemm_new(
                (rows, out, inp),
                Mat::rows(x, inp),
                Mat::transposed(w, inp),
                1.0,
            )
        })?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        Ok(Some(super::product(grad, false, &self.weight, false)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn a_row_does_not_depend_on_the_other_rows() {
        let dev = Device::Cpu;
        // 100 = three chunks of 32 and a tail of 4; 11 rows take the two-weight-row path, 21
        // and 23 the tiled one (groups of three input rows by four weight rows, with none or
        // two input rows left over); 70 weight rows = a chunk of 64 and one of 6 (a group of
        // four and two left over)
        for rows in [11, 21, 23] {
            let x = Tensor::randn(0f32, 1.0, (rows, 100), &dev).unwrap_or_else(|e| panic!("{e}"));
            let w = Tensor::randn(0f32, 1.0, (70, 100), &dev).unwrap_or_else(|e| panic!("{e}"));
            let all = x
                .apply_op2_no_bwd(&w, &SmallMatmul)
                .and_then(|t| t.to_vec2::<f32>())
                .unwrap_or_else(|e| panic!("{e}"));
            for (r, want) in all.iter().enumerate() {
                let one = x
                    .narrow(0, r, 1)
                    .and_then(|t| t.apply_op2_no_bwd(&w, &SmallMatmul))
                    .and_then(|t| t.to_vec2::<f32>())
                    .unwrap_or_else(|e| panic!("{e}"));
                let same = one[0]
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "row {r} of {rows} differs when computed alone");
            }
        }
    }

    #[test]
    fn the_vector_paths_sum_as_the_portable_code() {
        let dev = Device::Cpu;
        for k in [1, 31, 32, 100, 896] {
            let t = Tensor::randn(0f32, 1.0, (5, k), &dev).unwrap_or_else(|e| panic!("{e}"));
            let v = t.to_vec2::<f32>().unwrap_or_else(|e| panic!("{e}"));
            let x = [&v[1][..], &v[2][..], &v[3][..], &v[4][..]];
            assert_eq!(
                dot(&v[0], &v[1]).to_bits(),
                dot_portable(&v[0], &v[1]).to_bits(),
                "k = {k}"
            );
            assert_eq!(
                dot4(&v[0], x).map(f32::to_bits),
                dot4_portable(&v[0], x).map(f32::to_bits),
                "k = {k}"
            );
            assert_eq!(
                dot_any(&v[0], &v[1]).to_bits(),
                dot_portable(&v[0], &v[1]).to_bits(),
                "k = {k}: AVX2"
            );
        }
    }

    #[test]
    fn equals_the_general_matmul() {
        let dev = Device::Cpu;
        for (rows, k, out) in [(1, 896, 200), (3, 70, 129), (8, 64, 64), (2, 5, 1)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap_or_else(|e| panic!("{e}"));
            let w = Tensor::randn(0f32, 1.0, (out, k), &dev).unwrap_or_else(|e| panic!("{e}"));
            let fast = x
                .apply_op2_no_bwd(&w, &SmallMatmul)
                .unwrap_or_else(|e| panic!("{e}"));
            let slow = x
                .matmul(&w.t().unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
            let diff = (fast - slow)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .unwrap_or(f32::INFINITY);
            assert!(diff < 1e-3, "({rows}, {k}, {out}): {diff}");
        }
    }
}
