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
mod x86 {
    use super::{hsum8, ActPair, ActRow, Q32, QK};
    use std::arch::x86_64::*;

    /// A block's 32 values in a 256-bit register.
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn load_values(t: Q32, block: &[u8]) -> __m256i {
        match t {
            Q32::Q8_0 => _mm256_loadu_si256(block.as_ptr().add(2).cast()),
            Q32::Q4_0 => {
                let qs = _mm_loadu_si128(block.as_ptr().add(2).cast());
                let lo = _mm_and_si128(qs, _mm_set1_epi8(0x0f));
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
                let v = _mm256_set_m128i(hi, lo);
                _mm256_sub_epi8(v, _mm256_set1_epi8(8))
            }
            Q32::Q5_0 => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let qs = _mm_loadu_si128(block.as_ptr().add(6).cast());
                let lo = _mm_and_si128(qs, _mm_set1_epi8(0x0f));
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
                let v = _mm256_set_m128i(hi, lo);
                // bit j of qh is the fifth bit of value j: spread it to byte j as 0x10
                let bits = _mm256_set1_epi32(qh as i32);
                let shuffle = _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                );
                let bytes = _mm256_shuffle_epi8(bits, shuffle);
                let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi8(-1));
                let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
                _mm256_sub_epi8(_mm256_or_si256(v, high), _mm256_set1_epi8(16))
            }
        }
    }

    /// `$body` with `$T` a constant of `t`'s type, so that each type's loop is compiled on its
    /// own (the block size and the widening folded in, no branch per block).
    macro_rules! per_type {
        ($t:expr, |$T:ident| $body:expr) => {
            match $t {
                Q32::Q8_0 => {
                    const $T: Q32 = Q32::Q8_0;
                    $body
                }
                Q32::Q4_0 => {
                    const $T: Q32 = Q32::Q4_0;
                    $body
                }
                Q32::Q5_0 => {
                    const $T: Q32 = Q32::Q5_0;
                    $body
                }
            }
        };
    }

    /// How far ahead of the block in use the weights are prefetched, in bytes.
    const PREFETCH: usize = 2048;

    /// The f16 scale at the start of a block.
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn scale(block: &[u8]) -> f32 {
        let bits = u16::from_le_bytes([block[0], block[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// One weight row against one activation row.
    macro_rules! dot1_body {
        ($t:ident, $w:ident, $a:ident, $pairs:expr) => {{
            let bb = $t.block_bytes();
            let mut acc = _mm256_setzero_ps();
            for (b, k) in $w.chunks_exact(bb).enumerate() {
                _mm_prefetch::<_MM_HINT_T0>(k.as_ptr().wrapping_add(PREFETCH).cast());
                let av = _mm256_loadu_si256($a.q.as_ptr().add(b * QK).cast());
                let wv = load_values($t, k);
                let d = $pairs(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv));
                acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(scale(k) * $a.d[b]),
                    _mm256_cvtepi32_ps(d),
                    acc,
                );
            }
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), acc);
            hsum8(l)
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_vnni(t: Q32, w: &[u8], a: &ActRow) -> f32 {
        per_type!(t, |T| dot1_body!(T, w, a, pairs_vnni))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot_avx2(t: Q32, w: &[u8], a: &ActRow) -> f32 {
        per_type!(t, |T| dot1_body!(T, w, a, pairs_avx2))
    }

    /// Two weight rows against one activation row, sharing the activation loads; each row's
    /// sums are those of the one-row loop.
    macro_rules! dot2_body {
        ($t:ident, $w0:ident, $w1:ident, $a:ident, $pairs:expr) => {{
            let bb = $t.block_bytes();
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let blocks = $a.d.len();
            for b in 0..blocks {
                let (k0, k1) = (&$w0[b * bb..(b + 1) * bb], &$w1[b * bb..(b + 1) * bb]);
                // the rows are streamed once: ask for them well ahead of use
                _mm_prefetch::<_MM_HINT_T0>(k0.as_ptr().wrapping_add(PREFETCH).cast());
                _mm_prefetch::<_MM_HINT_T0>(k1.as_ptr().wrapping_add(PREFETCH).cast());
                let av = _mm256_loadu_si256($a.q.as_ptr().add(b * QK).cast());
                let da = $a.d[b];
                let w0 = load_values($t, k0);
                let w1 = load_values($t, k1);
                let d0 = $pairs(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(av, w0));
                let d1 = $pairs(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(av, w1));
                acc0 =
                    _mm256_fmadd_ps(_mm256_set1_ps(scale(k0) * da), _mm256_cvtepi32_ps(d0), acc0);
                acc1 =
                    _mm256_fmadd_ps(_mm256_set1_ps(scale(k1) * da), _mm256_cvtepi32_ps(d1), acc1);
            }
            let (mut l0, mut l1) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(l0.as_mut_ptr(), acc0);
            _mm256_storeu_ps(l1.as_mut_ptr(), acc1);
            [hsum8(l0), hsum8(l1)]
        }};
    }

    /// Two weight rows against four activation rows: each weight block is widened once for
    /// the four, and every one of the eight sums is that of the one-row loop.
    macro_rules! tile_body {
        ($t:ident, $w0:ident, $w1:ident, $a:ident, $pairs:expr) => {{
            let bb = $t.block_bytes();
            let z = _mm256_setzero_ps();
            let (mut acc0, mut acc1) = ([z; 4], [z; 4]);
            let blocks = $a[0].d.len();
            for b in 0..blocks {
                let (k0, k1) = (&$w0[b * bb..(b + 1) * bb], &$w1[b * bb..(b + 1) * bb]);
                let (w0, w1) = (load_values($t, k0), load_values($t, k1));
                let (s0, s1) = (scale(k0), scale(k1));
                let (m0, m1) = (_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(w1, w1));
                for r in 0..4 {
                    let av = _mm256_loadu_si256($a[r].q.as_ptr().add(b * QK).cast());
                    let da = $a[r].d[b];
                    let d0 = $pairs(m0, _mm256_sign_epi8(av, w0));
                    let d1 = $pairs(m1, _mm256_sign_epi8(av, w1));
                    acc0[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(s0 * da), _mm256_cvtepi32_ps(d0), acc0[r]);
                    acc1[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(s1 * da), _mm256_cvtepi32_ps(d1), acc1[r]);
                }
            }
            let mut out = [[0f32; 4]; 2];
            let mut l = [0f32; 8];
            for r in 0..4 {
                _mm256_storeu_ps(l.as_mut_ptr(), acc0[r]);
                out[0][r] = hsum8(l);
                _mm256_storeu_ps(l.as_mut_ptr(), acc1[r]);
                out[1][r] = hsum8(l);
            }
            out
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn tile_vnni(t: Q32, w0: &[u8], w1: &[u8], a: [&ActRow; 4]) -> [[f32; 4]; 2] {
        per_type!(t, |T| tile_body!(T, w0, w1, a, pairs_vnni))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn tile_avx2(t: Q32, w0: &[u8], w1: &[u8], a: [&ActRow; 4]) -> [[f32; 4]; 2] {
        per_type!(t, |T| tile_body!(T, w0, w1, a, pairs_avx2))
    }

    /// [`tile_vnni`] on 512-bit registers: each register holds the eight-lane sums of one weight
    /// row with two activation rows (an [`ActPair`]), so a block's sign, `vpdpbusd`, conversion,
    /// scale and FMA serve two products, lane for lane those of the one-row loop (AVX-512 has no
    /// `vpsignb`: the activations are negated under the mask of the negative weights instead,
    /// which gives the same products).
    macro_rules! tile512_body {
        ($t:ident, $w0:ident, $w1:ident, $p:ident, $P:ident) => {{
            let bb = $t.block_bytes();
            let z = _mm512_setzero_ps();
            let (mut acc0, mut acc1) = ([z; $P], [z; $P]);
            let blocks = $p[0].d.len() / 16;
            let zero = _mm512_setzero_si512();
            for b in 0..blocks {
                let (k0, k1) = (&$w0[b * bb..(b + 1) * bb], &$w1[b * bb..(b + 1) * bb]);
                let w0 = _mm512_broadcast_i64x4(load_values($t, k0));
                let w1 = _mm512_broadcast_i64x4(load_values($t, k1));
                let (n0, n1) = (_mm512_movepi8_mask(w0), _mm512_movepi8_mask(w1));
                let (m0, m1) = (_mm512_abs_epi8(w0), _mm512_abs_epi8(w1));
                let (s0, s1) = (_mm512_set1_ps(scale(k0)), _mm512_set1_ps(scale(k1)));
                for r in 0..$P {
                    let av = _mm512_loadu_si512($p[r].q.as_ptr().add(b * 2 * QK).cast());
                    let da = _mm512_loadu_ps($p[r].d.as_ptr().add(b * 16));
                    let a0 = _mm512_mask_sub_epi8(av, n0, zero, av);
                    let a1 = _mm512_mask_sub_epi8(av, n1, zero, av);
                    let d0 = _mm512_dpbusd_epi32(zero, m0, a0);
                    let d1 = _mm512_dpbusd_epi32(zero, m1, a1);
                    acc0[r] =
                        _mm512_fmadd_ps(_mm512_mul_ps(s0, da), _mm512_cvtepi32_ps(d0), acc0[r]);
                    acc1[r] =
                        _mm512_fmadd_ps(_mm512_mul_ps(s1, da), _mm512_cvtepi32_ps(d1), acc1[r]);
                }
            }
            let mut out = [[[0f32; 2]; $P]; 2];
            let mut l = [0f32; 16];
            for r in 0..$P {
                for (w, acc) in [acc0[r], acc1[r]].into_iter().enumerate() {
                    _mm512_storeu_ps(l.as_mut_ptr(), acc);
                    let (lo, hi) = l.split_at(8);
                    out[w][r][0] = hsum8(lo.try_into().unwrap_or([0.0; 8]));
                    out[w][r][1] = hsum8(hi.try_into().unwrap_or([0.0; 8]));
                }
            }
            out
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn tile512<const P: usize>(
        t: Q32,
        w0: &[u8],
        w1: &[u8],
        p: [&ActPair; P],
    ) -> [[[f32; 2]; P]; 2] {
        per_type!(t, |T| tile512_body!(T, w0, w1, p, P))
    }

    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn pairs_vnni(aw: __m256i, sa: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sa)
    }

    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn pairs_avx2(aw: __m256i, sa: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot2_vnni(t: Q32, w0: &[u8], w1: &[u8], a: &ActRow) -> [f32; 2] {
        per_type!(t, |T| dot2_body!(T, w0, w1, a, pairs_vnni))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn dot2_avx2(t: Q32, w0: &[u8], w1: &[u8], a: &ActRow) -> [f32; 2] {
        per_type!(t, |T| dot2_body!(T, w0, w1, a, pairs_avx2))
    }
}

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
