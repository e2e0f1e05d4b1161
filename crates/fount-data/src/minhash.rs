//! MinHash signatures with FineWeb's parameters (datatrove `pipeline/dedup/minhash.py`).
//!
//! Text is normalised as datatrove's `simplify_text` does (lower case, numbers → `0`, punctuation
//! → space, whitespace collapsed, NFD with combining marks removed), split into words, and every
//! 5-word shingle (`" ".join`) is hashed with 64-bit xxHash (seed 0, datatrove's default). Each of
//! the 112 permutations is `(a·h + b) mod (2^61 − 1)` with 64-bit wrapping multiply-add as numpy
//! computes it, `a`, `b` drawn by `np.random.RandomState(1)`; the signature keeps each minimum.
//! The 112 values form 14 bands of 8; two documents are candidates when any band is equal, which
//! happens with probability `1 − (1 − s^8)^14` at Jaccard similarity `s` (0.5 at s ≈ 0.72).
//! Documents with fewer than 5 words have no shingles and no signature (never deduplicated), as in
//! datatrove.

use unicode_general_category::{get_general_category, GeneralCategory};
use unicode_normalization::UnicodeNormalization;
use xxhash_rust::xxh3::xxh3_128;
use xxhash_rust::xxh64::xxh64;

use crate::tables::{MINHASH_A, MINHASH_B, PUNCTUATION};
use crate::words::{py_is_space, words_for, Lang};

/// Number of bands.
pub const BANDS: usize = 14;
/// Hashes per band.
pub const ROWS: usize = 8;
/// Hashes per signature.
pub const HASHES: usize = BANDS * ROWS;
/// Words per shingle.
pub const N_GRAMS: usize = 5;
const MERSENNE: u64 = (1 << 61) - 1;

/// A MinHash signature.
pub type Signature = [u64; HASHES];

fn is_decimal_digit(c: char) -> bool {
    c.is_ascii_digit()
        || (!c.is_ascii() && get_general_category(c) == GeneralCategory::DecimalNumber)
}

/// datatrove's `simplify_text` with its default `TextNormConfig`.
pub fn simplify(text: &str) -> String {
    if text.is_ascii() {
        return simplify_ascii(text);
    }
    let lower = text.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    let chars: Vec<char> = lower.chars().collect();
    let mut i = 0;
    let mut pending_space = false;
    let push = |out: &mut String, c: char, pending: &mut bool| {
        if c == ' ' || py_is_space(c) {
            *pending = true;
        } else {
            if *pending && !out.is_empty() {
                out.push(' ');
            }
            *pending = false;
            out.push(c);
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if is_decimal_digit(c) {
            // \p{Nd}+([.,،٫⎖⎗⎘]\p{Nd}+)?  →  "0"
            while i < chars.len() && is_decimal_digit(chars[i]) {
                i += 1;
            }
            if i + 1 < chars.len() && ".,،٫⎖⎗⎘".contains(chars[i]) && is_decimal_digit(chars[i + 1])
            {
                i += 1;
                while i < chars.len() && is_decimal_digit(chars[i]) {
                    i += 1;
                }
            }
            push(&mut out, '0', &mut pending_space);
            continue;
        }
        let c = if PUNCTUATION.binary_search(&c).is_ok() {
            ' '
        } else {
            c
        };
        push(&mut out, c, &mut pending_space);
        i += 1;
    }
    if out.is_ascii() {
        return out;
    }
    let stripped: String = out
        .nfd()
        .filter(|&c| get_general_category(c) != GeneralCategory::NonspacingMark)
        .collect();
    stripped.trim_matches(py_is_space).to_string()
}

/// ASCII bytes that [`PUNCTUATION`] turns into spaces, plus ASCII whitespace.
fn ascii_space_table() -> &'static [bool; 128] {
    static T: std::sync::OnceLock<[bool; 128]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = [false; 128];
        for c in PUNCTUATION.iter().copied().filter(char::is_ascii) {
            t[c as usize] = true;
        }
        for c in [
            ' ', '\t', '\n', '\x0b', '\x0c', '\r', '\x1c', '\x1d', '\x1e', '\x1f',
        ] {
            t[c as usize] = true;
        }
        t
    })
}

fn simplify_ascii(text: &str) -> String {
    let space = ascii_space_table();
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut pending = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let emit = if c.is_ascii_digit() {
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < b.len() && (b[i] == b'.' || b[i] == b',') && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            Some(b'0')
        } else {
            i += 1;
            if space[c as usize] {
                None
            } else {
                Some(c.to_ascii_lowercase())
            }
        };
        match emit {
            None => pending = true,
            Some(c) => {
                if pending && !out.is_empty() {
                    out.push(b' ');
                }
                pending = false;
                out.push(c);
            }
        }
    }
    // only ASCII bytes were pushed
    String::from_utf8(out).unwrap_or_default()
}

/// Computes MinHash signatures.
#[derive(Debug, Clone, Default)]
pub struct MinHasher;

impl MinHasher {
    /// The 64-bit hashes of the document's 5-word shingles.
    pub fn shingles(&self, text: &str, lang: Lang) -> Vec<u64> {
        let simple = simplify(text);
        let mut words = Vec::new();
        words_for(&simple, lang, &mut words);
        if words.len() < N_GRAMS {
            return Vec::new();
        }
        let mut buf = String::new();
        (0..=words.len() - N_GRAMS)
            .map(|i| {
                buf.clear();
                for (k, w) in words[i..i + N_GRAMS].iter().enumerate() {
                    if k > 0 {
                        buf.push(' ');
                    }
                    buf.push_str(w);
                }
                xxh64(buf.as_bytes(), 0)
            })
            .collect()
    }

    /// The signature of `text`, or `None` when it has fewer than 5 words.
    pub fn signature(&self, text: &str, lang: Lang) -> Option<Box<Signature>> {
        let shingles = self.shingles(text, lang);
        if shingles.is_empty() {
            return None;
        }
        Some(Box::new(signature_of(&shingles)))
    }
}

#[inline(always)]
fn mod_mersenne(x: u64) -> u64 {
    let r = (x & MERSENNE) + (x >> 61);
    if r >= MERSENNE {
        r - MERSENNE
    } else {
        r
    }
}

/// The signature of a set of shingle hashes.
pub fn signature_of(shingles: &[u64]) -> Signature {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            #[allow(unsafe_code)]
            return unsafe { signature_avx512(shingles) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            return unsafe { signature_avx2(shingles) };
        }
    }
    signature_portable(shingles)
}

/// The same loop compiled with AVX-512 (64-bit lane multiplies): 8 permutations per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn signature_avx512(shingles: &[u64]) -> Signature {
    signature_portable(shingles)
}

/// The same loop compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn signature_avx2(shingles: &[u64]) -> Signature {
    signature_portable(shingles)
}

#[inline(always)]
fn signature_portable(shingles: &[u64]) -> Signature {
    let mut sig = [u64::MAX; HASHES];
    for &h in shingles {
        for j in 0..HASHES {
            let v = mod_mersenne(h.wrapping_mul(MINHASH_A[j]).wrapping_add(MINHASH_B[j]));
            sig[j] = sig[j].min(v);
        }
    }
    sig
}

/// The 128-bit key of band `band` of a signature (equal keys ⇔ equal bands, up to 2^-128).
pub fn band_key(sig: &Signature, band: usize) -> u128 {
    let mut bytes = [0u8; ROWS * 8];
    for (k, v) in sig[band * ROWS..(band + 1) * ROWS].iter().enumerate() {
        bytes[k * 8..k * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    xxh3_128(&bytes)
}

/// The probability that two documents of Jaccard similarity `s` share at least one band.
pub fn candidate_probability(s: f64) -> f64 {
    1.0 - (1.0 - s.powi(ROWS as i32)).powi(BANDS as i32)
}
