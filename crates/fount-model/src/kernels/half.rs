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

    /// `[dot(w[i], x[r])]` for `W` weight rows and `X` activation rows: each weight vector is
    /// converted once for the `X` rows, and every output is summed as [`dot`] sums it.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn tile<const BF16: bool, const W: usize, const X: usize>(
        w: [&[u8]; W],
        x: [&[f32]; X],
    ) -> [[f32; X]; W] {
        let z = _mm512_setzero_ps();
        let mut acc = [[z; X]; W];
        let k = x[0].len();
        let steps = k / LANES;
        for s in 0..steps {
            let xv = x.map(|xr| _mm512_loadu_ps(xr.as_ptr().add(s * LANES)));
            for (i, wr) in w.iter().enumerate() {
                let raw = _mm256_loadu_si256(wr.as_ptr().add(s * 2 * LANES).cast());
                let wv = if BF16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
                } else {
                    _mm512_cvtph_ps(raw)
                };
                for r in 0..X {
                    acc[i][r] = _mm512_fmadd_ps(wv, xv[r], acc[i][r]);
                }
            }
        }
        let t = if BF16 { Half::Bf16 } else { Half::F16 };
        let mut out = [[0f32; X]; W];
        let mut lanes = [0f32; LANES];
        for i in 0..W {
            for r in 0..X {
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc[i][r]);
                let mut total = reduce(lanes);
                for j in steps * LANES..k {
                    let wv = t.to_f32(u16::from_le_bytes([w[i][2 * j], w[i][2 * j + 1]]));
                    total = wv.mul_add(x[r][j], total);
                }
                out[i][r] = total;
            }
        }
        out
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

/// `out[r · width + i] = dot(row i of w, row r of xs)` for the `width` rows of `w`: tiles of
/// four weight rows by four activation rows on AVX-512, the rest one product at a time.
fn tile_dots(t: Half, w: &[u8], row_bytes: usize, xs: &[f32], k: usize, out: &mut [f32]) {
    let width = w.len() / row_bytes;
    let m = xs.len() / k.max(1);
    let wrow = |i: usize| &w[i * row_bytes..(i + 1) * row_bytes];
    let xrow = |r: usize| &xs[r * k..(r + 1) * k];
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        while r + 4 <= m {
            let x: [&[f32]; 4] = std::array::from_fn(|j| xrow(r + j));
            let mut i = 0;
            while i + 4 <= width {
                let ws: [&[u8]; 4] = std::array::from_fn(|j| wrow(i + j));
                // SAFETY: the CPU has AVX-512F, F16C and FMA (checked by `has_avx512`).
                #[allow(unsafe_code)]
                let d = unsafe {
                    match t {
                        Half::F16 => x86::tile::<false, 4, 4>(ws, x),
                        Half::Bf16 => x86::tile::<true, 4, 4>(ws, x),
                    }
                };
                for (j, dj) in d.iter().enumerate() {
                    for (q, v) in dj.iter().enumerate() {
                        out[(r + q) * width + i + j] = *v;
                    }
                }
                i += 4;
            }
            for i in i..width {
                for (q, xr) in x.iter().enumerate() {
                    out[(r + q) * width + i] = dot(t, wrow(i), xr);
                }
            }
            r += 4;
        }
    }
    for r in r..m {
        for i in 0..width {
            out[r * width + i] = dot(t, wrow(i), xrow(r));
        }
    }
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
            let width = rows.len();
            let mut out = vec![0f32; m * width];
            let tile_w = &w[rows.start * row_bytes..rows.end * row_bytes];
            tile_dots(t, tile_w, row_bytes, &xs, k, &mut out);
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
            // six activation rows (a tile of four and two more) against nine weight rows (two
            // tiles of four and one more): every output is the one-pair product
            let w9: Vec<u8> = (0..9 * k)
                .flat_map(|i| {
                    let v = ((i * 29 % 89) as f32 - 44.0) / 21.0;
                    match t {
                        Half::F16 => half::f16::from_f32(v).to_bits(),
                        Half::Bf16 => half::bf16::from_f32(v).to_bits(),
                    }
                    .to_le_bytes()
                })
                .collect();
            let xs: Vec<f32> = (0..6 * k)
                .map(|i| t.round(((i * 13 % 71) as f32 - 35.0) / 9.0))
                .collect();
            let mut out = vec![0f32; 6 * 9];
            matmul(t, &w9, 9, k, &xs, &mut out);
            for r in 0..6 {
                for i in 0..9 {
                    let row = &w9[i * 2 * k..(i + 1) * 2 * k];
                    let want = dot_portable(t, row, &xs[r * k..(r + 1) * k]);
                    assert_eq!(out[r * 9 + i].to_bits(), want.to_bits(), "{t:?} ({r}, {i})");
                }
            }
        }
    }
}
