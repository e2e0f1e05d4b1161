//! Writing a GGUF v3 file.

use std::io::Write;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use super::{dtype_to_u32, tensor_bytes, DEFAULT_ALIGNMENT, MAGIC};
use crate::error::{Error, Result};

/// A tensor to write: its name, type, shape (outermost first) and bytes.
pub struct WriteTensor {
    /// Name in the file.
    pub name: String,
    /// ggml type.
    pub dtype: GgmlDType,
    /// Shape, outermost first.
    pub dims: Vec<usize>,
}

fn put_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => put_string(w, s),
        Value::Array(a) => {
            let inner = a.first().map(value_type).unwrap_or(8);
            w.write_all(&inner.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| put_value(w, x))
        }
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Writes a GGUF v3 file: the header and table first (sizes follow from the types and shapes),
/// then each tensor's bytes from `data(i)`, produced one at a time so a large model is never
/// held whole in memory.
pub fn write(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut header, k)?;
        header.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut header, v)?;
    }
    let pad = |n: u64| (DEFAULT_ALIGNMENT - n % DEFAULT_ALIGNMENT) % DEFAULT_ALIGNMENT;
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut header, &t.name)?;
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&dtype_to_u32(t.dtype).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        let size = tensor_bytes(t.dtype, &t.dims);
        offset += size as u64 + pad(size as u64);
    }
    w.write_all(&header)?;
    w.write_all(&vec![0u8; pad(header.len() as u64) as usize])?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        let size = tensor_bytes(t.dtype, &t.dims);
        if bytes.len() != size {
            return Err(Error::Gguf {
                path: PathBuf::from(&t.name),
                reason: format!("{} bytes written for a tensor of {size}", bytes.len()),
            });
        }
        w.write_all(&bytes)?;
        w.write_all(&vec![0u8; pad(size as u64) as usize])?;
    }
    Ok(())
}
