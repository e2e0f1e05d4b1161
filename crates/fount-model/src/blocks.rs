//! Weights stored as ggml blocks (quantised or half precision), as GGUF files hold them, and
//! their products with f32 activations.
//!
//! The activations of a product of a few rows (decoding) are quantised to the weight type's
//! dot-product blocks, as llama.cpp does (Q8_0 for the 32-value types, Q8_K for the K types), so
//! a GGUF model decodes as llama.cpp does on the same file. From [`GEMM_ROWS`] rows on (a
//! prefill), Q8_0, Q4_0 and Q5_0 weights are widened to f32 a tile at a time for the blocked f32
//! GEMM instead, except in the engine's batch-invariant mode ([`BlockMatrix::matmul_rows`]);
//! F16 and BF16 need not be, their tile of four weight rows by four activation rows being
//! faster than widening at every size. The K types Q4_K and Q6_K run on candle's repacked
//! AVX-512 VNNI tiles where the CPU has them (their Q8_K activations are llama.cpp's); every
//! other type runs candle's per-type dot products, whose activation blocks match llama.cpp's
//! (candle's repacked Q8_0 tiles quantise activations to Q8_K instead, which llama.cpp does
//! not, so they are not used). Q8_0, Q4_0 and Q5_0 run on fount's own kernels
//! ([`crate::kernels::q8`]), and F16 and BF16 on [`crate::kernels::half`], both reading the
//! weights in place in the file's mapping.

use std::borrow::Cow;

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::k_quants::{self, BlockQ6K, QK_K};
use candle_core::quantized::{ggml_file, GgmlDType, QTensor, QuantizedType};
use candle_core::{CpuStorage, Device, Storage, Tensor};

use crate::error::{Error, Result};
use crate::kernels::half::{self, Half};
use crate::kernels::q8::{self, Q32};

/// A `(rows, cols)` matrix of ggml blocks, each row `cols / block size` whole blocks.
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    kind: Kind,
}

enum Kind {
    /// candle's quantised tensor, whose product repacks the blocks into tiles once.
    Packed(QTensor),
    /// The blocks as they are, multiplied by candle's per-type dot products.
    Plain(Box<dyn QuantizedType>),
    /// 32-value blocks read in place by fount's kernels ([`crate::kernels::q8`]).
    Q32(Q32, Bytes),
    /// f16 or bf16 values read in place by fount's kernels ([`crate::kernels::half`]).
    Half(Half, Bytes),
}

/// Bytes of blocks: a range of a mapped file (no copy), or owned.
pub enum Bytes {
    /// `map[range]`.
    Mapped(Arc<memmap2::Mmap>, Range<usize>),
    /// A copy (rows reordered, or not from a file).
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m, r) => &m[r.clone()],
            Bytes::Owned(v) => v,
        }
    }
}

fn q32(dtype: GgmlDType) -> Option<Q32> {
    Some(match dtype {
        GgmlDType::Q8_0 => Q32::Q8_0,
        GgmlDType::Q4_0 => Q32::Q4_0,
        GgmlDType::Q5_0 => Q32::Q5_0,
        _ => return None,
    })
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlockMatrix({:?}, {}×{})",
            self.dtype, self.rows, self.cols
        )
    }
}

/// From this many activation rows on, a product of Q8_0, Q4_0 or Q5_0 widens the weights to f32
/// and runs the blocked GEMM ([`BlockMatrix::matmul`]). Widening costs a pass over the weights
/// per product; below this the integer tile (four activation rows per weight block) is faster
/// (Q8_0 prefill of 64 tokens: 116 tok/s on the tile, 79 widened; of 128: 110 and 139).
pub const GEMM_ROWS: usize = 96;

/// Rows below which candle's Q4_K tiles compute every row alike ([`BlockMatrix::matmul_rows`]).
const PACKED_ROWS: usize = 32;

/// Weight rows widened at a time for the GEMM (at most 4 MB of f32 for rows of 1,024).
const GEMM_TILE: usize = 1024;

/// Whether products of `dtype` go through candle's repacked tiles.
fn packed(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K)
}

impl BlockMatrix {
    /// A matrix of `dtype` from its bytes, `rows` rows of `cols` values. The 32-value types
    /// read `bytes` in place when they are a mapping's.
    pub fn from_bytes(dtype: GgmlDType, bytes: Bytes, rows: usize, cols: usize) -> Result<Self> {
        let expected = crate::gguf::tensor_bytes(dtype, &[rows, cols]);
        let len = bytes.as_slice().len();
        if !cols.is_multiple_of(dtype.block_size()) || len != expected {
            return Err(Error::Batch(format!(
                "{rows}×{cols} {dtype:?} needs {expected} bytes of whole blocks, got {len}"
            )));
        }
        let kind = match dtype {
            GgmlDType::F16 => Kind::Half(Half::F16, bytes),
            GgmlDType::BF16 => Kind::Half(Half::Bf16, bytes),
            _ => match q32(dtype) {
                Some(t) => Kind::Q32(t, bytes),
                // the K types: candle's tensors
                None if packed(dtype) => Kind::Packed(ggml_file::qtensor_from_ggml(
                    dtype,
                    bytes.as_slice(),
                    vec![rows, cols],
                    &Device::Cpu,
                )?),
                None => Kind::Plain(dtype.from_data(Cow::Borrowed(bytes.as_slice()))),
            },
        };
        Ok(BlockMatrix {
            rows,
            cols,
            dtype,
            kind,
        })
    }

    /// The block type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// `x Wᵀ` for `x` `(m, cols)` in f32 → `(m, rows)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if x.dim(0)? >= GEMM_ROWS && matches!(self.kind, Kind::Q32(..)) {
            return self.gemm(&x);
        }
        self.matmul_rows(&x)
    }

    /// `x Wᵀ` with each row of the result computed as the row alone would be, bit for bit,
    /// whatever the other rows (the engine's batch-invariant mode): fount's types never take
    /// the widened GEMM, and the K types always go through the same kernel.
    pub fn matmul_rows(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let m = x.dim(0)?;
        if let Kind::Packed(q) = &self.kind {
            if self.dtype == GgmlDType::Q6K {
                // candle runs one Q6_K row on the blocks as they are and several on its tiles,
                // which round differently: every count takes the blocks as they are
                return self.q6k_rows(q, &x);
            }
            // candle's Q4_K tiles give each row the same bits at any count below
            // `PACKED_ROWS`; from there on, CPUs with AMX take another kernel
            if m < PACKED_ROWS {
                return Ok(x.apply_op1_no_bwd(q)?);
            }
            let mut parts = Vec::with_capacity(m.div_ceil(PACKED_ROWS - 1));
            for start in (0..m).step_by(PACKED_ROWS - 1) {
                let rows = (PACKED_ROWS - 1).min(m - start);
                parts.push(x.narrow(0, start, rows)?.apply_op1_no_bwd(q)?);
            }
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let (n, k) = (self.rows, self.cols);
        let mut out = vec![0f32; m * n];
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
                return Err(Error::Batch("block products take f32 CPU inputs".into()));
            };
            let start = layout.start_offset();
            let xs = &v[start..start + m * k];
            match &self.kind {
                Kind::Half(t, w) => half::matmul(*t, w.as_slice(), n, k, xs, &mut out),
                Kind::Q32(t, w) => q8::matmul(*t, w.as_slice(), n, k, xs, &mut out),
                Kind::Plain(p) => p.matmul_t((m, k, n), xs, &mut out)?,
                Kind::Packed(_) => {}
            }
        }
        Ok(Tensor::from_vec(out, (m, n), &Device::Cpu)?)
    }

    /// [`BlockMatrix::matmul_rows`] for Q6_K: candle's product on the blocks as they lie in
    /// its tensor (each output one dot product, whatever the number of rows).
    fn q6k_rows(&self, q: &QTensor, x: &Tensor) -> Result<Tensor> {
        let (m, n, k) = (x.dim(0)?, self.rows, self.cols);
        let data = q.data()?;
        let count = data.len() / std::mem::size_of::<BlockQ6K>();
        if data.len() != count * std::mem::size_of::<BlockQ6K>()
            || count != n * k / QK_K
            || !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<BlockQ6K>())
        {
            return Err(Error::Batch(format!(
                "{n}×{k} Q6_K blocks are not laid out as blocks"
            )));
        }
        // SAFETY: `data` is `count` whole `BlockQ6K`s (a plain `repr(C)` struct of integers and
        // an f16, valid for any bits), suitably aligned (both checked just above), and it lives
        // (borrowed from `q`, or owned) until the end of this function.
        #[allow(unsafe_code)]
        let blocks: &[BlockQ6K] =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<BlockQ6K>(), count) };
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
            return Err(Error::Batch("block products take f32 CPU inputs".into()));
        };
        let start = layout.start_offset();
        let mut out = vec![0f32; m * n];
        k_quants::matmul((m, k, n), &v[start..start + m * k], blocks, &mut out)?;
        Ok(Tensor::from_vec(out, (m, n), &Device::Cpu)?)
    }

    /// `x Wᵀ` for many rows (a prefill): the weights widened to f32 a tile of rows at a time
    /// and multiplied by the blocked f32 GEMM, which reuses each loaded weight for every row
    /// of `x` (the one-row kernels load each block once per activation row).
    fn gemm(&self, x: &Tensor) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.rows.div_ceil(GEMM_TILE));
        let mut ids: Vec<u32> = Vec::with_capacity(GEMM_TILE);
        for start in (0..self.rows).step_by(GEMM_TILE) {
            ids.clear();
            ids.extend(start as u32..self.rows.min(start + GEMM_TILE) as u32);
            let w = self.rows(&ids)?; // (tile, cols) f32
            parts.push(x.matmul(&w.t()?)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// Rows `ids`, dequantised to f32 `(ids, cols)` (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::Batch(format!("row {bad} of {} rows", self.rows)));
        }
        match &self.kind {
            Kind::Half(t, w) => {
                let mut out = vec![0f32; ids.len() * self.cols];
                half::dequantize_rows(*t, w.as_slice(), self.cols, ids, &mut out);
                Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
            }
            Kind::Q32(t, w) => {
                let mut out = vec![0f32; ids.len() * self.cols];
                q8::dequantize_rows(*t, w.as_slice(), self.cols, ids, &mut out);
                Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
            }
            Kind::Packed(q) => {
                let ids = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                Ok(q.embedding(&ids)?)
            }
            Kind::Plain(p) => match p.embedding(ids, self.rows, self.cols)? {
                CpuStorage::F32(v) => {
                    Ok(Tensor::from_vec(v, (ids.len(), self.cols), &Device::Cpu)?)
                }
                _ => Err(Error::Batch("embedding rows are f32".into())),
            },
        }
    }

    /// The whole matrix in f32.
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.kind {
            Kind::Q32(..) | Kind::Half(..) => {
                let ids: Vec<u32> = (0..self.rows as u32).collect();
                self.rows(&ids)
            }
            Kind::Packed(q) => Ok(q.dequantize(&Device::Cpu)?),
            Kind::Plain(p) => match p.dequantize(self.rows * self.cols)? {
                CpuStorage::F32(v) => {
                    Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
                }
                _ => Err(Error::Batch("dequantised blocks are f32".into())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    /// A random `(n, k)` matrix quantised to `dtype`, as block bytes.
    fn matrix(dtype: GgmlDType, n: usize, k: usize) -> BlockMatrix {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap().into_owned();
        BlockMatrix::from_bytes(dtype, Bytes::Owned(bytes), n, k).unwrap()
    }

    #[test]
    fn every_row_of_a_product_is_the_row_alone() {
        let (n, k) = (64, 512);
        let x = Tensor::randn(0f32, 1.0, (40, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let w = matrix(dtype, n, k);
            let alone: Vec<Vec<f32>> = (0..40)
                .map(|i| {
                    let r = w.matmul_rows(&x.narrow(0, i, 1).unwrap()).unwrap();
                    r.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            for rows in [2, 5, 16, 40] {
                let y: Vec<Vec<f32>> = w
                    .matmul_rows(&x.narrow(0, 0, rows).unwrap())
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                for (i, row) in y.iter().enumerate() {
                    assert_eq!(row, &alone[i], "{dtype:?}: row {i} of {rows}");
                }
            }
        }
    }
}
