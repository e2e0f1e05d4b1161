//! The x86 kernels of [`super`]: one weight row against one activation row, two against one,
//! and the tiles of two weight rows by four activation rows (256-bit) or by four pairs of rows
//! (512-bit), each summing exactly as the portable loop does.

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
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale(k0) * da), _mm256_cvtepi32_ps(d0), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(scale(k1) * da), _mm256_cvtepi32_ps(d1), acc1);
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
                acc0[r] = _mm256_fmadd_ps(_mm256_set1_ps(s0 * da), _mm256_cvtepi32_ps(d0), acc0[r]);
                acc1[r] = _mm256_fmadd_ps(_mm256_set1_ps(s1 * da), _mm256_cvtepi32_ps(d1), acc1[r]);
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
                acc0[r] = _mm512_fmadd_ps(_mm512_mul_ps(s0, da), _mm512_cvtepi32_ps(d0), acc0[r]);
                acc1[r] = _mm512_fmadd_ps(_mm512_mul_ps(s1, da), _mm512_cvtepi32_ps(d1), acc1[r]);
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
