//! Products of weights in ggml's 32-value block types (Q8_0, Q4_0, Q5_0) with f32 activations,
//! computed as llama.cpp computes them on x86.
//!
//! Each activation row is quantised once to Q8_0 blocks (scale `amax / 127` rounded to f16,
//! values `x · 127 / amax` rounded half to even, as llama.cpp's `quantize_row_q8_0`), then each
//! weight block is widened to 32 signed bytes and multiplied with the activation block as
//! integers: `|w| · sign(a, w)` summed by pairs into eight 32-bit lanes (one AVX-512 VNNI
//! `vpdpbusd`, or AVX2's `vpmaddubsw` + `vpmaddwd`), scaled by the two block scales and
//! accumulated in eight f32 lanes, summed at the end. The portable code does the same sums in
//! the same order, so every path gives the same bits.
//!
//! The weights are read in place (a GGUF file's mapping): a block is `d: f16` then its values
//! (Q8_0: 32 × i8; Q4_0: 16 bytes of nibbles, `q − 8`; Q5_0: 4 bytes of fifth bits then 16 of
//! nibbles, `q − 16`). Rows are split across the rayon pool; for several activation rows, each
//! task takes a tile of weight rows and runs every activation row over it while it is in cache.

use rayon::prelude::*;

/// Values per block.
pub const QK: usize = 32;

/// The 32-value block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q32 {
    /// 34-byte blocks: f16 scale, 32 × i8.
    Q8_0,
    /// 18-byte blocks: f16 scale, 32 nibbles, value `q − 8`.
    Q4_0,
    /// 22-byte blocks: f16 scale, 32 fifth bits, 32 nibbles, value `q − 16`.
    Q5_0,
}

impl Q32 {
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Q32::Q8_0 => 34,
            Q32::Q4_0 => 18,
            Q32::Q5_0 => 22,
        }
    }

    /// The 32 signed values of `block` (after its scale).
    #[inline(always)]
    fn values(self, block: &[u8], out: &mut [i8; QK]) {
        match self {
            Q32::Q8_0 => {
                for (o, &b) in out.iter_mut().zip(&block[2..34]) {
                    *o = b as i8;
                }
            }
            Q32::Q4_0 => {
                let qs = &block[2..18];
                for j in 0..16 {
                    out[j] = (qs[j] & 0x0f) as i8 - 8;
                    out[j + 16] = (qs[j] >> 4) as i8 - 8;
                }
            }
            Q32::Q5_0 => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let qs = &block[6..22];
                for j in 0..16 {
                    let lo = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                    let hi = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                    out[j] = lo as i8 - 16;
                    out[j + 16] = hi as i8 - 16;
                }
            }
        }
    }
}

/// The f16 at the start of a block, in f32.
#[inline(always)]
fn scale(block: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32()
}

/// One activation row as Q8_0 blocks: the scales (rounded to f16, held as f32) and the values.
#[derive(Debug, Default, Clone)]
pub struct ActRow {
    d: Vec<f32>,
    q: Vec<i8>,
}

/// Two quantised activation rows interleaved block by block for the 512-bit tile: each block's
/// 32 values of the first row then of the second, and each block's two scales spread over the
/// eight lanes that accumulate it.
#[derive(Debug, Default, Clone)]
pub struct ActPair {
    q: Vec<i8>,
    d: Vec<f32>,
}

impl ActPair {
    /// Rows `a` and `b` (of equal length) interleaved.
    fn fill(&mut self, a: &ActRow, b: &ActRow) {
        self.q.clear();
        self.d.clear();
        for (blk, (&da, &db)) in a.d.iter().zip(&b.d).enumerate() {
            self.q.extend_from_slice(&a.q[blk * QK..(blk + 1) * QK]);
            self.q.extend_from_slice(&b.q[blk * QK..(blk + 1) * QK]);
            self.d.extend_from_slice(&[da; 8]);
            self.d.extend_from_slice(&[db; 8]);
        }
    }
}

/// Quantises `x` (a multiple of 32 long) as llama.cpp's x86 `quantize_row_q8_0` does.
pub fn quantize_row(x: &[f32], row: &mut ActRow) {
    let blocks = x.len() / QK;
    row.d.clear();
    row.q.clear();
    row.d.reserve(blocks);
    row.q.reserve(x.len());
    for xs in x.chunks_exact(QK) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = half::f16::from_f32(amax / 127.0).to_f32();
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        row.d.push(d);
        row.q
            .extend(xs.iter().map(|&v| (v * id).round_ties_even() as i8));
    }
}

/// `Σ_blocks d_w · d_a · Σ_j w_j a_j`, eight lanes wide as the SIMD paths sum it.
fn dot_portable(t: Q32, w: &[u8], a: &ActRow) -> f32 {
    let bb = t.block_bytes();
    let mut acc = [0f32; 8];
    let mut v = [0i8; QK];
    for (b, block) in w.chunks_exact(bb).enumerate() {
        t.values(block, &mut v);
        let aq = &a.q[b * QK..(b + 1) * QK];
        let s = scale(block) * a.d[b];
        for (lane, acc) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for j in 0..4 {
                let i = lane * 4 + j;
                sum += i32::from(v[i]) * i32::from(aq[i]);
            }
            *acc = s.mul_add(sum as f32, *acc);
        }
    }
    hsum8(acc)
}

/// The sum of eight lanes in the order the SIMD paths reduce them.
#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

#[cfg(target_arch = "x86_64")]
mod x86;

/// The best dot product this CPU has, chosen once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Vnni,
    Avx2,
    Portable,
}

fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "vnni" => {
                    std::arch::is_x86_feature_detected!("avx512vnni")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512f")
                }
                _ => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
            };
            if has("vnni") && has("avx2") && std::env::var_os("FOUNT_NO_VNNI").is_none() {
                return Path::Vnni;
            }
            if has("avx2") {
                return Path::Avx2;
            }
        }
        Path::Portable
    })
}

/// The dot products of two weight rows (`k / 32` blocks of `t` each) with a quantised
/// activation row; each equals what the row gives alone.
#[inline]
pub fn dot2(t: Q32, w0: &[u8], w1: &[u8], a: &ActRow) -> [f32; 2] {
    debug_assert_eq!(w0.len() / t.block_bytes(), a.d.len());
    debug_assert_eq!(w1.len(), w0.len());
    match path() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 VNNI/VL, AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        Path::Vnni => unsafe { x86::dot2_vnni(t, w0, w1, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        Path::Avx2 => unsafe { x86::dot2_avx2(t, w0, w1, a) },
        _ => [dot_portable(t, w0, a), dot_portable(t, w1, a)],
    }
}

/// The dot products of two weight rows with four quantised activation rows, `[w][a]`; each
/// equals what the pair gives alone.
#[inline]
pub fn tile(t: Q32, w0: &[u8], w1: &[u8], a: [&ActRow; 4]) -> [[f32; 4]; 2] {
    debug_assert!(a.iter().all(|r| w0.len() / t.block_bytes() == r.d.len()));
    debug_assert_eq!(w1.len(), w0.len());
    match path() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 VNNI/VL, AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        Path::Vnni => unsafe { x86::tile_vnni(t, w0, w1, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        Path::Avx2 => unsafe { x86::tile_avx2(t, w0, w1, a) },
        _ => [
            a.map(|r| dot_portable(t, w0, r)),
            a.map(|r| dot_portable(t, w1, r)),
        ],
    }
}

/// The dot product of one weight row with a quantised activation row.
#[inline]
pub fn dot(t: Q32, w: &[u8], a: &ActRow) -> f32 {
    match path() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 VNNI/VL, AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        Path::Vnni => unsafe { x86::dot_vnni(t, w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        Path::Avx2 => unsafe { x86::dot_avx2(t, w, a) },
        _ => dot_portable(t, w, a),
    }
}

/// `out[i] = dot(row i of w, a)` for the rows of `w` (`row_bytes` each).
fn dots(t: Q32, w: &[u8], row_bytes: usize, a: &ActRow, out: &mut [f32]) {
    let mut pairs = out.chunks_exact_mut(2);
    let mut rows = w.chunks_exact(row_bytes);
    for o in &mut pairs {
        let (Some(w0), Some(w1)) = (rows.next(), rows.next()) else {
            return;
        };
        let [d0, d1] = dot2(t, w0, w1, a);
        o[0] = d0;
        o[1] = d1;
    }
    if let ([o], Some(w0)) = (pairs.into_remainder(), rows.next()) {
        *o = dot2(t, w0, w0, a)[0];
    }
}

/// `out[r · width + i] = dot(row i of w, acts[r])` for the `width` rows of `w`: groups of four
/// activation rows against pairs of weight rows ([`tile`]), the rest row by row.
fn tile_dots(
    t: Q32,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActRow],
    pairs: &[ActPair],
    out: &mut [f32],
) {
    let width = w.len() / row_bytes;
    let wrow = |i: usize| &w[i * row_bytes..(i + 1) * row_bytes];
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if !pairs.is_empty() {
        // SAFETY (both calls): `pairs` is filled only on the VNNI path (`matmul`), whose CPU
        // has AVX-512 VNNI/VL/BW, AVX2, FMA and F16C (checked by `path`).
        #[allow(unsafe_code)]
        fn run<const P: usize>(t: Q32, w0: &[u8], w1: &[u8], p: &[ActPair]) -> [[[f32; 2]; P]; 2] {
            let p: [&ActPair; P] = std::array::from_fn(|i| &p[i]);
            unsafe { x86::tile512(t, w0, w1, p) }
        }
        // eight activation rows (four pairs) at a time, then four, for pairs of weight rows
        while r + 4 <= acts.len() {
            let eight = r + 8 <= acts.len();
            let p = &pairs[r / 2..];
            let mut i = 0;
            while i < width {
                let (w0, w1) = (wrow(i), wrow((i + 1).min(width - 1)));
                let cols = if i + 1 < width { 2 } else { 1 };
                let mut put = |rows: &[[f32; 2]], col: usize| {
                    for (q, pair) in rows.iter().enumerate() {
                        out[(r + 2 * q) * width + i + col] = pair[0];
                        out[(r + 2 * q + 1) * width + i + col] = pair[1];
                    }
                };
                if eight {
                    let d = run::<4>(t, w0, w1, p);
                    for (col, rows) in d.iter().enumerate().take(cols) {
                        put(rows, col);
                    }
                } else {
                    let d = run::<2>(t, w0, w1, p);
                    for (col, rows) in d.iter().enumerate().take(cols) {
                        put(rows, col);
                    }
                }
                i += 2;
            }
            r += if eight { 8 } else { 4 };
        }
    }
    while r + 4 <= acts.len() {
        let a = [&acts[r], &acts[r + 1], &acts[r + 2], &acts[r + 3]];
        let mut i = 0;
        while i < width {
            let (w0, w1) = (wrow(i), wrow((i + 1).min(width - 1)));
            let d = tile(t, w0, w1, a);
            for q in 0..4 {
                out[(r + q) * width + i] = d[0][q];
                if i + 1 < width {
                    out[(r + q) * width + i + 1] = d[1][q];
                }
            }
            i += 2;
        }
        r += 4;
    }
    for (r, a) in acts.iter().enumerate().skip(r) {
        dots(t, w, row_bytes, a, &mut out[r * width..(r + 1) * width]);
    }
}

/// Weight rows a task takes when several activation rows share them.
const TILE: usize = 16;

thread_local! {
    static ACTS: std::cell::RefCell<Vec<ActRow>> = const { std::cell::RefCell::new(Vec::new()) };
    static PAIRS: std::cell::RefCell<Vec<ActPair>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst (m × n) = x (m × k) · Wᵀ` for `W` `n` rows of `k / 32` blocks of `t` in `w`.
pub fn matmul(t: Q32, w: &[u8], n: usize, k: usize, x: &[f32], dst: &mut [f32]) {
    let m = x.len() / k.max(1);
    let row_bytes = k / QK * t.block_bytes();
    ACTS.with(|cell| {
        let mut acts = cell.borrow_mut();
        let len = m.max(acts.len());
        acts.resize_with(len, ActRow::default);
        for (r, xr) in x.chunks_exact(k).enumerate() {
            quantize_row(xr, &mut acts[r]);
        }
        let acts = &acts[..m];
        if m == 1 {
            let a = &acts[0];
            super::decode_rows(dst, 64, |first, out| {
                let rows = &w[first * row_bytes..(first + out.len()) * row_bytes];
                for (o, row) in out.iter_mut().zip(rows.chunks_exact(row_bytes)) {
                    *o = dot(t, row, a);
                }
            });
            return;
        }
        PAIRS.with(|cell| {
            // the 512-bit tile takes the groups of four activation rows as two pairs each
            let mut pairs = cell.borrow_mut();
            let count = if path() == Path::Vnni { m / 4 * 2 } else { 0 };
            let len = count.max(pairs.len());
            pairs.resize_with(len, ActPair::default);
            for (i, p) in pairs.iter_mut().take(count).enumerate() {
                p.fill(&acts[2 * i], &acts[2 * i + 1]);
            }
            let pairs = &pairs[..count];
            // tiles of weight rows, each run over every activation row while in cache
            let tiles = n.div_ceil(TILE);
            let cols: Vec<Vec<f32>> = (0..tiles)
                .into_par_iter()
                .map(|tile| {
                    let rows = tile * TILE..n.min((tile + 1) * TILE);
                    let width = rows.len();
                    let tile_w = &w[rows.start * row_bytes..rows.end * row_bytes];
                    let mut out = vec![0f32; m * width];
                    tile_dots(t, tile_w, row_bytes, acts, pairs, &mut out);
                    out
                })
                .collect();
            for (tile, out) in cols.iter().enumerate() {
                let start = tile * TILE;
                let width = out.len() / m;
                for r in 0..m {
                    dst[r * n + start..r * n + start + width]
                        .copy_from_slice(&out[r * width..(r + 1) * width]);
                }
            }
        });
    });
}

/// Rows `ids` of the weights, dequantised into `out` (`ids × k`).
pub fn dequantize_rows(t: Q32, w: &[u8], k: usize, ids: &[u32], out: &mut [f32]) {
    let row_bytes = k / QK * t.block_bytes();
    let mut v = [0i8; QK];
    for (o, &id) in out.chunks_exact_mut(k).zip(ids) {
        let row = &w[id as usize * row_bytes..(id as usize + 1) * row_bytes];
        for (ob, block) in o
            .chunks_exact_mut(QK)
            .zip(row.chunks_exact(t.block_bytes()))
        {
            t.values(block, &mut v);
            let d = scale(block);
            for (x, &q) in ob.iter_mut().zip(&v) {
                *x = d * f32::from(q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn weights(t: Q32, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let vals: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let dtype = match t {
            Q32::Q8_0 => GgmlDType::Q8_0,
            Q32::Q4_0 => GgmlDType::Q4_0,
            Q32::Q5_0 => GgmlDType::Q5_0,
        };
        let src = Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let q = QTensor::quantize(&src, dtype).unwrap_or_else(|e| panic!("{e}"));
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .and_then(|d| d.flatten_all()?.to_vec1())
            .unwrap_or_else(|e| panic!("{e}"));
        (q.data().unwrap_or_else(|e| panic!("{e}")).into_owned(), deq)
    }

    #[test]
    fn every_path_gives_the_same_bits_and_dequantising_matches_candle() {
        let (n, k) = (37, 256);
        let x: Vec<f32> = (0..13 * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0)
            .collect();
        for t in [Q32::Q8_0, Q32::Q4_0, Q32::Q5_0] {
            let (w, deq) = weights(t, n, k);
            let ids: Vec<u32> = (0..n as u32).collect();
            let mut ours = vec![0f32; n * k];
            dequantize_rows(t, &w, k, &ids, &mut ours);
            assert_eq!(ours, deq, "{t:?}: dequantised rows");
            let mut a = ActRow::default();
            quantize_row(&x[..k], &mut a);
            for row in 0..n {
                let wr = &w[row * k / QK * t.block_bytes()..(row + 1) * k / QK * t.block_bytes()];
                let p = dot_portable(t, wr, &a);
                let [d0, d1] = dot2(t, wr, &w[..wr.len()], &a);
                assert_eq!(d0.to_bits(), p.to_bits(), "{t:?} row {row}");
                assert_eq!(dot(t, wr, &a).to_bits(), p.to_bits(), "{t:?} row {row}");
                assert_eq!(d1.to_bits(), dot_portable(t, &w[..wr.len()], &a).to_bits());
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (and FMA and F16C with it on every CPU fount runs)
                    #[allow(unsafe_code)]
                    let [a0, _] = unsafe { x86::dot2_avx2(t, wr, wr, &a) };
                    assert_eq!(a0.to_bits(), p.to_bits(), "{t:?} row {row}: AVX2");
                }
                // against the dequantised weights and activations in f64
                let exact: f64 = (0..k)
                    .map(|j| deq[row * k + j] as f64 * a.d[j / QK] as f64 * a.q[j] as f64)
                    .sum();
                assert!(
                    (p as f64 - exact).abs() < 1e-3 * (1.0 + exact.abs()),
                    "{t:?}"
                );
            }
            // the tile of two weight rows by four activation rows, on every path
            let acts: Vec<ActRow> = x
                .chunks_exact(k)
                .take(4)
                .map(|xr| {
                    let mut a = ActRow::default();
                    quantize_row(xr, &mut a);
                    a
                })
                .collect();
            let four = [&acts[0], &acts[1], &acts[2], &acts[3]];
            let rb = k / QK * t.block_bytes();
            for row in 0..n - 1 {
                let (w0, w1) = (
                    &w[row * rb..(row + 1) * rb],
                    &w[(row + 1) * rb..(row + 2) * rb],
                );
                let want = [
                    four.map(|a| dot_portable(t, w0, a).to_bits()),
                    four.map(|a| dot_portable(t, w1, a).to_bits()),
                ];
                let got = tile(t, w0, w1, four).map(|r| r.map(f32::to_bits));
                assert_eq!(got, want, "{t:?} rows {row}, {}", row + 1);
                #[cfg(target_arch = "x86_64")]
                if path() == Path::Vnni {
                    let mut p = [ActPair::default(), ActPair::default()];
                    p[0].fill(four[0], four[1]);
                    p[1].fill(four[2], four[3]);
                    // SAFETY: the VNNI path's features (checked by `path`)
                    #[allow(unsafe_code)]
                    let got = unsafe { x86::tile512(t, w0, w1, [&p[0], &p[1]]) };
                    let got = got.map(|r| [r[0][0], r[0][1], r[1][0], r[1][1]].map(f32::to_bits));
                    assert_eq!(got, want, "{t:?} rows {row}, {}: 512-bit", row + 1);
                }
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above
                    #[allow(unsafe_code)]
                    let got =
                        unsafe { x86::tile_avx2(t, w0, w1, four) }.map(|r| r.map(f32::to_bits));
                    assert_eq!(got, want, "{t:?} rows {row}, {}: AVX2", row + 1);
                }
            }
            // many activation rows (a group of eight, one of four and one more) equal one at a
            // time, over tiles of 16 weight rows and one of 5
            let mut many = vec![0f32; 13 * n];
            matmul(t, &w, n, k, &x, &mut many);
            for r in 0..13 {
                let mut one = vec![0f32; n];
                matmul(t, &w, n, k, &x[r * k..(r + 1) * k], &mut one);
                assert_eq!(one, many[r * n..(r + 1) * n], "{t:?}: row {r}");
            }
        }
    }
}
