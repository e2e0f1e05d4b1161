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
        y_t.par_chunks_mut(CHUNK * rows)
            .enumerate()
            .for_each(|(c, block)| {
                let first = c * CHUNK;
                for (j, dst) in block.chunks_mut(rows).enumerate() {
                    let wrow = &w[(first + j) * k..(first + j + 1) * k];
                    if let Some(ahead) =
                        w.get((first + j + PREFETCH_ROWS) * k..(first + j + PREFETCH_ROWS + 1) * k)
                    {
                        prefetch(ahead);
                    }
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = dot(wrow, &x[r * k..(r + 1) * k]);
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

/// Dot product with independent accumulators, so the compiler keeps several vector FMAs in
/// flight.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            #[allow(unsafe_code)]
            return unsafe { dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            #[allow(unsafe_code)]
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
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
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

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
