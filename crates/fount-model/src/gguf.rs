//! GGUF files (llama.cpp's format): reading a model as users have it, and writing one.
//!
//! A file is a header (magic `GGUF`, version, counts), metadata key/values, a table of tensors
//! (name, dimensions innermost first, ggml type, offset) and the tensors' data aligned to
//! `general.alignment`. The file is memory-mapped; the header is parsed here, with every length
//! and offset checked against the file, so a truncated or malformed file is an error that names
//! what is wrong (and which tensor) instead of a crash.
//!
//! llama.cpp stores the query and key rows of Llama-family models permuted for its interleaved
//! RoPE; [`Gguf::tensor`] and the writer undo and redo that, so the model code sees the Hugging
//! Face layout whatever the source.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::blocks::{BlockMatrix, Bytes};
use crate::chat::ChatTemplate;
use crate::config::{Arch, Config, RopeScaling};
use crate::error::{Error, Result};
use crate::files::GenerationConfig;
use crate::tokenizer::Tokenizer;

/// `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Caps that keep a crafted header from allocating without bound (llama.cpp's own).
const MAX_STRING: u64 = 1 << 30;
const MAX_ARRAY: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;

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
        let elems: usize = self.dims.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
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

/// The ggml type numbers fount reads and writes (`ggml.h`).
pub fn dtype_from_u32(v: u32) -> Option<GgmlDType> {
    Some(match v {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The ggml type number of `d`.
pub fn dtype_to_u32(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A bounds-checked reader over the mapped header.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "truncated: {what} at byte {} needs {n} bytes, the file has {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(format!("{what}: a string of {n} bytes"));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.arr(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => Value::Bool(self.arr::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deep"));
                }
                let inner = self.u32(what)?;
                let n = self.u64(what)?;
                let remaining = (self.bytes.len() - self.pos) as u64;
                if n > MAX_ARRAY || n > remaining {
                    return Err(format!(
                        "{what}: an array of {n} values in {remaining} bytes"
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
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
        let bytes = self.bytes(info);
        let data = match unpermute {
            Some(heads) => {
                Bytes::Owned(
                    unpermute_rows(bytes, shape, heads).ok_or_else(|| Error::Gguf {
                        path: self.path.clone(),
                        reason: format!(
                            "tensor {name:?}: {shape:?} rows do not split into {heads} heads"
                        ),
                    })?,
                )
            }
            None => {
                let start = (self.data_offset + info.offset) as usize;
                Bytes::Mapped(self.map.clone(), start..start + info.size())
            }
        };
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
        BlockMatrix::from_bytes(info.dtype, data, rows, cols)
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

/// How a GGUF architecture maps onto fount's: the family, and whether llama.cpp stored its
/// query/key rows permuted (the families it runs with interleaved RoPE).
fn family(name: &str) -> Option<(Arch, bool)> {
    Some(match name {
        "llama" => (Arch::Llama, true),
        "mistral" => (Arch::Mistral, true),
        "qwen2" => (Arch::Qwen2, false),
        _ => return None,
    })
}

/// llama.cpp's GGUF name of the tensor Hugging Face calls `hf` (`model.layers.3.mlp.up_proj`
/// → `blk.3.ffn_up`), without the `.weight`/`.bias` suffix.
pub fn tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

impl Gguf {
    /// The architecture: its GGUF name, fount's family, and whether query/key rows are stored
    /// permuted.
    pub fn arch(&self) -> Result<(&str, Arch, bool)> {
        let name = self
            .string("general.architecture")
            .ok_or_else(|| self.bad_meta("general.architecture", "missing"))?;
        let (arch, permuted) = family(name).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            reason: format!(
                "architecture {name:?} is not supported (fount runs llama, mistral and qwen2 GGUF files)"
            ),
        })?;
        Ok((name, arch, permuted))
    }

    /// The model's configuration, from the `<arch>.*` metadata and the tensor table.
    pub fn config(&self) -> Result<Config> {
        let (name, arch, _) = self.arch()?;
        let key = |k: &str| format!("{name}.{k}");
        if self.opt_usize(&key("expert_count"))?.unwrap_or(0) > 0 {
            return Err(self.bad_meta(
                &key("expert_count"),
                "mixture-of-experts GGUF files are not supported yet",
            ));
        }
        let hidden = self.usize(&key("embedding_length"))?;
        let heads = self.usize(&key("attention.head_count"))?;
        let kv_heads = self
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(self.bad_meta(
                &key("attention.head_count_kv"),
                &format!("{kv_heads} key/value heads for {heads} query heads"),
            ));
        }
        let head_dim = match self.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden / heads,
        };
        let vocab = match self.info("token_embd.weight") {
            Some(t) => t.dims.first().copied().unwrap_or(0),
            None => {
                return Err(Error::MissingTensor {
                    name: "token_embd.weight".into(),
                    dir: self.path.clone(),
                })
            }
        };
        let rope_scaling = match self.string(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self
                    .opt_f64(&key("rope.scaling.factor"))?
                    .ok_or_else(|| self.bad_meta(&key("rope.scaling.factor"), "missing"))?,
            },
            Some(other) => {
                return Err(self.bad_meta(
                    &key("rope.scaling.type"),
                    &format!("{other:?} is not supported (none, linear)"),
                ))
            }
        };
        let config = Config {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.usize(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.usize(&key("context_length"))?,
            rms_norm_eps: self
                .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: self.info("output.weight").is_none(),
            qkv_bias: self.info("blk.0.attn_q.bias").is_some(),
            o_bias: self.info("blk.0.attn_output.bias").is_some(),
            mlp_bias: self.info("blk.0.ffn_up.bias").is_some(),
            sliding_window: None,
            sliding_window_from_layer: 0,
            moe: None,
        };
        if config.num_hidden_layers == 0 || hidden == 0 || vocab == 0 {
            return Err(self.bad_meta(&key("block_count"), "an empty model"));
        }
        Ok(config)
    }

    /// RoPE frequency factors (`rope_freqs.weight`, how llama.cpp stores Llama 3.1 scaling),
    /// if the file has them.
    pub fn rope_factors(&self, half_dim: usize) -> Result<Option<Vec<f32>>> {
        if self.info("rope_freqs.weight").is_none() {
            return Ok(None);
        }
        let t = self.tensor("rope_freqs.weight", &[half_dim], None)?;
        Ok(Some(t.dequantize()?.flatten_all()?.to_vec1::<f32>()?))
    }

    /// The tokenizer in the file's metadata (`tokenizer.ggml.*`), as a `tokenizers` tokenizer.
    /// Byte-level BPE (`gpt2`: Llama 3, Qwen2, fount's own) converts; SentencePiece (`llama`)
    /// files need `--tokenizer`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        let kind = self.string("tokenizer.ggml.model").unwrap_or("none");
        if kind != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer.ggml.model is {kind:?}; fount converts byte-level BPE (\"gpt2\") \
                 tokenizers from GGUF metadata; give a tokenizer.json with --tokenizer",
                self.path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_gguf(&self.content())
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.path.display())))?;
        Ok(Tokenizer::from_inner(inner))
    }

    /// The chat template (`tokenizer.chat_template`) with the special tokens it may name.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        let Some(source) = self.string("tokenizer.chat_template") else {
            return Ok(None);
        };
        let tokens = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok());
        let mut special = serde_json::Map::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            let token = self
                .opt_usize(key)?
                .and_then(|id| tokens.and_then(|t| t.get(id)))
                .and_then(|v| v.to_string().ok());
            if let Some(t) = token {
                special.insert(name.into(), t.clone().into());
            }
        }
        ChatTemplate::new(source, special).map(Some)
    }

    /// What ends generation: `tokenizer.ggml.eos_token_id` (and `eot_token_id`), as a
    /// generation config.
    pub fn generation_config(&self) -> Result<GenerationConfig> {
        let mut eos = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = self.opt_usize(key)? {
                let id = id as u32;
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(GenerationConfig {
            eos_token_ids: eos,
            ..GenerationConfig::default()
        })
    }
}

/// The order llama.cpp stores the query (or key) rows of a Llama-family model in: within each
/// head, the rotary pairs `(i, i + d/2)` of the Hugging Face layout become adjacent rows
/// `(2i, 2i + 1)`. Returns, for each stored row, the Hugging Face row it holds.
fn permuted_rows(rows: usize, heads: usize) -> Option<Vec<usize>> {
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

/// Rows of a Hugging Face tensor in llama.cpp's permuted order (the inverse of
/// [`unpermute_rows`]).
#[cfg(test)]
fn permute_rows(bytes: &[u8], rows: usize, heads: usize) -> Option<Vec<u8>> {
    let row = bytes.len() / rows.max(1);
    let order = permuted_rows(rows, heads)?;
    let mut out = Vec::with_capacity(bytes.len());
    for &hf in &order {
        out.extend_from_slice(&bytes[hf * row..(hf + 1) * row]);
    }
    Some(out)
}

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
        let size = t.dims.iter().product::<usize>() / t.dtype.block_size() * t.dtype.type_size();
        offset += size as u64 + pad(size as u64);
    }
    w.write_all(&header)?;
    w.write_all(&vec![0u8; pad(header.len() as u64) as usize])?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        let size = t.dims.iter().product::<usize>() / t.dtype.block_size() * t.dtype.type_size();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_llama_cpps_and_inverts() {
        // two heads of four rows: HF rows (0,2) and (1,3) are the rotary pairs of head 0
        assert_eq!(permuted_rows(8, 2), Some(vec![0, 2, 1, 3, 4, 6, 5, 7]));
        let bytes: Vec<u8> = (0..24).collect();
        let p = permute_rows(&bytes, 8, 2).unwrap_or_default();
        assert_eq!(unpermute_rows(&p, &[8, 3], 2), Some(bytes));
        assert_eq!(permuted_rows(6, 4), None);
    }
}
