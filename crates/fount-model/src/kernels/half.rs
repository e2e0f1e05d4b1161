//! Products of f16 or bf16 weights with f32 activations, computed as llama.cpp computes them:
//! each activation row is rounded to the weights' type once (llama.cpp's `vec_dot_type` for
//! F16 and BF16 is the type itself), then every product of two half-precision values is exact
//! in f32 and summed there with fused multiply-adds, sixteen lanes wide. The weights are read in
//! place (a GGUF file's mapping), converted sixteen at a time (`vcvtph2ps` for f16, a 16-bit
//! shift for bf16).

use rayon::prelude::*;

/// The half-precision weight types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Half {
    fn to_f32(self, bits: u16) -> f32 {
        match self {
            Half::F16 => half::f16::from_bits(bits).to_f32(),
            Half::Bf16 => half::bf16::from_bits(bits).to_f32(),
        }
    }

    /// `x` rounded to this type (nearest, ties to even), back in f32.
    fn round(self, x: f32) -> f32 {
        match self {
            Half::F16 => half::f16::from_f32(x).to_f32(),
            Half::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// Lanes per step: one 512-bit register of f32.
const LANES: usize = 16;

fn dot_portable(t: Half, w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (wc, xc) in w.chunks_exact(2 * LANES).zip(x.chunks_exact(LANES)) {
        for l in 0..LANES {
            let wv = t.to_f32(u16::from_le_bytes([wc[2 * l], wc[2 * l + 1]]));
            acc[l] = wv.mul_add(xc[l], acc[l]);
        }
    }
    let mut total = reduce(acc);
    let done = x.len() / LANES * LANES;
    for (i, &xv) in x.iter().enumerate().skip(done) {
        let wv = t.to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]]));
        total = wv.mul_add(xv, total);
    }
    total
}

/// The sum of sixteen lanes, pairwise as the SIMD path reduces them.
#[inline(always)]
fn reduce(mut a: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            a[i] += a[i + width];
        }
        width /= 2;
    }
    a[0]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{reduce, Half, LANES};
    use std::arch::x86_64::*;

    /// How far ahead of the values in use the weights are prefetched, in bytes.
    const PREFETCH: usize = 2048;

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot(t: Half, w: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let steps = x.len() / LANES;
        for s in 0..steps {
            let raw = _mm256_loadu_si256(w.as_ptr().add(s * 2 * LANES).cast());
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(s * 2 * LANES + PREFETCH).cast());
            let wv = match t {
                Half::F16 => _mm512_cvtph_ps(raw),
                Half::Bf16 => {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                }
            };
            let xv = _mm512_loadu_ps(x.as_ptr().add(s * LANES));
            acc = _mm512_fmadd_ps(wv, xv, acc);
        }
        let mut lanes = [0f32; LANES];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut total = reduce(lanes);
        for i in steps * LANES..x.len() {
            let wv = t.to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]]));
            total = wv.mul_add(x[i], total);
        }
        total
    }
}

fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// One weight row (`x.len()` values of `t`) with an activation row already rounded to `t`.
#[inline]
pub fn dot(t: Half, w: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512F, F16C and FMA (checked by `has_avx512`).
        #[allow(unsafe_code)]
        return unsafe { x86::dot(t, w, x) };
    }
    dot_portable(t, w, x)
}

/// `dst (m × n) = x (m × k) · Wᵀ` for `W` `n` rows of `k` values of `t` in `w`.
pub fn matmul(t: Half, w: &[u8], n: usize, k: usize, x: &[f32], dst: &mut [f32]) {
    let m = x.len() / k.max(1);
    let xs: Vec<f32> = x.iter().map(|&v| t.round(v)).collect();
    let row_bytes = 2 * k;
    if m == 1 {
        super::decode_rows(dst, 32, |first, out| {
            let rows = &w[first * row_bytes..(first + out.len()) * row_bytes];
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(row_bytes)) {
                *o = dot(t, row, &xs);
            }
        });
        return;
    }
    const CHUNK: usize = 32;
    let out_rows: Vec<Vec<f32>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let rows = c * CHUNK..n.min((c + 1) * CHUNK);
            let mut out = vec![0f32; m * rows.len()];
            for (r, xr) in xs.chunks_exact(k).enumerate() {
                for (i, row) in rows.clone().enumerate() {
                    out[r * rows.len() + i] =
                        dot(t, &w[row * row_bytes..(row + 1) * row_bytes], xr);
                }
            }
            out
        })
        .collect();
    for (c, out) in out_rows.iter().enumerate() {
        let width = out.len() / m.max(1);
        for r in 0..m {
            dst[r * n + c * CHUNK..r * n + c * CHUNK + width]
                .copy_from_slice(&out[r * width..(r + 1) * width]);
        }
    }
}

/// Rows `ids` in f32 (`ids × k`).
pub fn dequantize_rows(t: Half, w: &[u8], k: usize, ids: &[u32], out: &mut [f32]) {
    for (o, &id) in out.chunks_exact_mut(k).zip(ids) {
        let row = &w[id as usize * 2 * k..(id as usize + 1) * 2 * k];
        for (v, b) in o.iter_mut().zip(row.chunks_exact(2)) {
            *v = t.to_f32(u16::from_le_bytes([b[0], b[1]]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_portable_agree_and_products_are_exact() {
        let k = 4 * LANES + 5; // a tail after the full steps
        for t in [Half::F16, Half::Bf16] {
            let w: Vec<u8> = (0..3 * k)
                .flat_map(|i| {
                    let v = ((i * 37 % 101) as f32 - 50.0) / 33.0;
                    match t {
                        Half::F16 => half::f16::from_f32(v).to_bits(),
                        Half::Bf16 => half::bf16::from_f32(v).to_bits(),
                    }
                    .to_le_bytes()
                })
                .collect();
            let x: Vec<f32> = (0..k).map(|i| t.round((i as f32 - 30.0) / 7.0)).collect();
            for r in 0..3 {
                let row = &w[r * 2 * k..(r + 1) * 2 * k];
                assert_eq!(
                    dot(t, row, &x).to_bits(),
                    dot_portable(t, row, &x).to_bits()
                );
                let mut vals = vec![0f32; k];
                dequantize_rows(t, &w, k, &[r as u32], &mut vals);
                let exact: f64 = vals
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((dot(t, row, &x) as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()));
            }
            let mut many = vec![0f32; 3];
            matmul(t, &w, 3, k, &x, &mut many);
            assert_eq!(many[1].to_bits(), dot(t, &w[2 * k..4 * k], &x).to_bits());
        }
    }
}
