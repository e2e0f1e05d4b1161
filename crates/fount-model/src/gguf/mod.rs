//! GGUF files (llama.cpp's format): reading a model as users have it, and writing one.
//!
//! A file is a header (magic `GGUF`, version, counts), metadata key/values, a table of tensors
//! (name, dimensions innermost first, ggml type, offset) and the tensors' data aligned to
//! `general.alignment`. The file is memory-mapped; the header is parsed here, with every length
//! and offset checked against the file, so a truncated or malformed file is an error that names
//! what is wrong (and which tensor) instead of a crash.
//!
//! `header.rs` parses the bytes, `model.rs` reads a model's configuration, tokenizer and chat
//! template from the metadata, `write.rs` writes a file.
//!
//! llama.cpp stores the query and key rows of Llama-family models permuted for its interleaved
//! RoPE; [`Gguf::tensor`] and the writer undo and redo that, so the model code sees the Hugging
//! Face layout whatever the source.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::blocks::{BlockMatrix, Bytes};
use crate::error::{Error, Result};

mod header;
mod model;
mod vocab;
mod write;

pub use header::{dtype_from_u32, dtype_to_u32};
pub use model::tensor_name;
pub use write::{write, WriteTensor};

use header::{Cursor, MAX_ARRAY, MAX_DIMS};

/// `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor in a GGUF file's table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Its ggml type.
    pub dtype: GgmlDType,
    /// Its shape, outermost first (`(rows, cols)`: the reverse of the file's order).
    pub dims: Vec<usize>,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of data.
    pub fn size(&self) -> usize {
        tensor_bytes(self.dtype, &self.dims)
    }
}

/// Bytes of a tensor of `dtype` and shape `dims` (whole blocks along its rows).
pub fn tensor_bytes(dtype: GgmlDType, dims: &[usize]) -> usize {
    dims.iter().product::<usize>() / dtype.block_size() * dtype.type_size()
}

/// An open, memory-mapped GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    version: u32,
    metadata: HashMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_offset: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Maps `path` and parses its header and tensor table.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = fs_err::File::open(path)?;
        // SAFETY: the file is mapped read-only and fount never writes to a model it serves; a
        // concurrent writer would be an operator error (as with safetensors).
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(file.file())? };
        let bad = |reason: String| Error::Gguf {
            path: path.to_path_buf(),
            reason,
        };
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
        };
        let magic = c.u32("the magic").map_err(bad)?;
        if magic != MAGIC {
            return Err(bad(format!(
                "not a GGUF file (magic {magic:#010x}, expected \"GGUF\")"
            )));
        }
        let version = c.u32("the version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version}; fount reads 2 and 3")));
        }
        let n_tensors = c.u64("the tensor count").map_err(bad)?;
        let n_kv = c.u64("the metadata count").map_err(bad)?;
        if n_tensors > MAX_ARRAY || n_kv > MAX_ARRAY || n_tensors + n_kv > map.len() as u64 {
            return Err(bad(format!(
                "truncated: {n_tensors} tensors and {n_kv} metadata entries in a file of {} bytes",
                map.len()
            )));
        }
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}")).map_err(bad)?;
            let ty = c.u32(&key).map_err(bad)?;
            let value = c.value(ty, &key, 0).map_err(bad)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor {i}'s name")).map_err(bad)?;
            let nd = c.u32(&name).map_err(bad)?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(bad(format!("tensor {name:?} has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                let d = c.u64(&name).map_err(bad)?;
                dims.push(usize::try_from(d).map_err(|_| bad(format!("tensor {name:?}: {d}")))?);
            }
            dims.reverse();
            let ty = c.u32(&name).map_err(bad)?;
            let dtype = dtype_from_u32(ty).ok_or_else(|| {
                bad(format!(
                    "tensor {name:?} has ggml type {ty}, which fount does not read \
                     (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K…Q6_K)"
                ))
            })?;
            let offset = c.u64(&name).map_err(bad)?;
            let cols = dims.last().copied().unwrap_or(0);
            if !cols.is_multiple_of(dtype.block_size()) {
                return Err(bad(format!(
                    "tensor {name:?}: rows of {cols} values are not whole {dtype:?} blocks of {}",
                    dtype.block_size()
                )));
            }
            if dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .is_none()
            {
                return Err(bad(format!("tensor {name:?}: shape {dims:?} overflows")));
            }
            tensors.push(TensorInfo {
                name,
                dtype,
                dims,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .to_u32()
                .ok()
                .map(u64::from)
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| bad(format!("general.alignment {v:?} is not a power of two")))?,
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut by_name = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size() as u64));
            if end.is_none_or(|e| e > map.len() as u64) {
                return Err(bad(format!(
                    "truncated: tensor {:?} ({:?} {:?}) ends past the end of the file ({} bytes)",
                    t.name,
                    t.dtype,
                    t.dims,
                    map.len()
                )));
            }
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(bad(format!("tensor {:?} appears twice", t.name)));
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            map: Arc::new(map),
            version,
            metadata,
            tensors,
            by_name,
            data_offset,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The error for metadata `key` that is absent or unusable.
    pub(crate) fn bad_meta(&self, key: &str, reason: &str) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            reason: format!("metadata {key}: {reason}"),
        }
    }

    /// A metadata string.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// A required metadata integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.bad_meta(key, "missing"))
    }

    /// An optional metadata integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.bad_meta(key, &format!("{v:?} is not a count")))
    }

    /// An optional metadata float.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.bad_meta(key, &format!("{v:?} is not a number"))),
        }
    }

    /// The table entry of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of tensor `name` (borrowed from the mapping).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.size()]
    }

    /// Tensor `name` as a quantised tensor of `shape` (outermost first), its query/key rows
    /// put back in the Hugging Face order when `unpermute` gives `(heads)`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        unpermute: Option<usize>,
    ) -> Result<BlockMatrix> {
        let info = self.checked(name, shape)?;
        let (rows, cols) = match shape {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            _ => {
                return Err(Error::Gguf {
                    path: self.path.clone(),
                    reason: format!("tensor {name:?}: fount reads 1-D and 2-D tensors"),
                })
            }
        };
        let start = (self.data_offset + info.offset) as usize;
        let data = match unpermute {
            Some(heads) => Bytes::Owned(
                unpermute_rows(self.bytes(info), shape, heads).ok_or_else(|| Error::Gguf {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor {name:?}: {shape:?} rows do not split into {heads} heads"
                    ),
                })?,
            ),
            None => Bytes::Mapped(self.map.clone(), start..start + info.size()),
        };
        BlockMatrix::from_bytes(info.dtype, data, rows, cols)
    }

    /// Expert `e`'s `(rows, cols)` matrix of the stacked expert tensor `name` (llama.cpp's
    /// `ffn_*_exps`, of shape `(experts, rows, cols)`), read in place.
    pub fn expert(&self, name: &str, e: usize, shape: [usize; 3]) -> Result<BlockMatrix> {
        let info = self.checked(name, &shape)?;
        let [experts, rows, cols] = shape;
        if e >= experts {
            return Err(Error::Gguf {
                path: self.path.clone(),
                reason: format!("tensor {name:?} has {experts} experts, not {}", e + 1),
            });
        }
        let each = tensor_bytes(info.dtype, &[rows, cols]);
        let start = (self.data_offset + info.offset) as usize + e * each;
        let data = Bytes::Mapped(self.map.clone(), start..start + each);
        BlockMatrix::from_bytes(info.dtype, data, rows, cols)
    }

    /// The table entry of `name`, which must have `shape`.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.path.clone(),
        })?;
        if info.dims != shape {
            return Err(Error::Gguf {
                path: self.path.clone(),
                reason: format!(
                    "tensor {name:?} has shape {:?}, but the metadata implies {shape:?}",
                    info.dims
                ),
            });
        }
        Ok(info)
    }

    /// The metadata as candle's GGUF content (for its tokenizer conversion).
    pub(crate) fn content(&self) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: self.metadata.clone(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: self.data_offset,
        }
    }
}

/// The order llama.cpp stores the query (or key) rows of a Llama-family model in: within each
/// head, the rotary pairs `(i, i + d/2)` of the Hugging Face layout become adjacent rows
/// `(2i, 2i + 1)`. Returns, for each stored row, the Hugging Face row it holds.
pub(crate) fn permuted_rows(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let d = rows / heads;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                order.push(h * d + j * (d / 2) + i);
            }
        }
    }
    Some(order)
}

/// Rows of a stored (llama.cpp-permuted) tensor back in Hugging Face order.
fn unpermute_rows(bytes: &[u8], shape: &[usize], heads: usize) -> Option<Vec<u8>> {
    let rows = shape.first().copied()?;
    let row = bytes.len() / rows.max(1);
    let order = permuted_rows(rows, heads)?;
    let mut out = vec![0u8; bytes.len()];
    for (stored, &hf) in order.iter().enumerate() {
        out[hf * row..(hf + 1) * row].copy_from_slice(&bytes[stored * row..(stored + 1) * row]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_llama_cpps_and_inverts() {
        // two heads of four rows: HF rows (0,2) and (1,3) are the rotary pairs of head 0
        assert_eq!(permuted_rows(8, 2), Some(vec![0, 2, 1, 3, 4, 6, 5, 7]));
        let bytes: Vec<u8> = (0..24).collect();
        let order = permuted_rows(8, 2).unwrap_or_default();
        let p: Vec<u8> = order
            .iter()
            .flat_map(|&hf| bytes[hf * 3..(hf + 1) * 3].to_vec())
            .collect();
        assert_eq!(unpermute_rows(&p, &[8, 3], 2), Some(bytes));
        assert_eq!(permuted_rows(6, 4), None);
    }
}
