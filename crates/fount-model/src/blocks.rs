//! Weights stored as ggml blocks (quantised or half precision), as GGUF files hold them, and
//! their products with f32 activations.
//!
//! The activations of a product of a few rows (decoding) are quantised to the weight type's
//! dot-product blocks, as llama.cpp does (Q8_0 for the 32-value types, Q8_K for the K types), so
//! a GGUF model decodes as llama.cpp does on the same file. From [`GEMM_ROWS`] rows on (a
//! prefill), fount's types are widened to f32 a tile at a time for the blocked f32 GEMM instead. The K types Q4_K and Q6_K run on candle's repacked
//! AVX-512 VNNI tiles where the CPU has them (their Q8_K activations are llama.cpp's); every
//! other type runs candle's per-type dot products, whose activation blocks match llama.cpp's
//! (candle's repacked Q8_0 tiles quantise activations to Q8_K instead, which llama.cpp does
//! not, so they are not used). Q8_0, Q4_0 and Q5_0 run on fount's own kernels
//! ([`crate::kernels::q8`]), and F16 and BF16 on [`crate::kernels::half`], both reading the
//! weights in place in the file's mapping.

use std::borrow::Cow;

use std::ops::Range;
use std::sync::Arc;

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

/// From this many activation rows on, a product of fount's block types widens the weights to
/// f32 and runs the blocked GEMM ([`BlockMatrix::matmul`]).
pub const GEMM_ROWS: usize = 32;

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
        let m = x.dim(0)?;
        if let Kind::Packed(q) = &self.kind {
            return Ok(x.apply_op1_no_bwd(q)?);
        }
        let (n, k) = (self.rows, self.cols);
        if m >= GEMM_ROWS && matches!(self.kind, Kind::Q32(..) | Kind::Half(..)) {
            return self.gemm(&x);
        }
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
