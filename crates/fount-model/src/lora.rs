//! LoRA adapters in PEFT's format, applied per sequence segment of a packed batch.
//!
//! An adapter directory is in PEFT's format ([`crate::peft`] reads and writes it). For the rows
//! of a sequence using the adapter, a target projection computes `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with
//! the scale `s` of [`crate::peft::scale`]. The base weights are never modified, so one batch can mix
//! sequences on different adapters and on the bare model ([`LoraBatch`]).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::peft::PeftConfig;

/// The projections LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Proj {
    /// All projections.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module name PEFT uses in `target_modules`.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// PEFT's name of this projection of `layer` in an adapter file, before `.lora_A.weight`
    /// (`base_model.model.model.layers.3.self_attn.q_proj`).
    pub fn peft_name(self, layer: usize) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}",
            self.parent(),
            self.module()
        )
    }

    fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    /// `(in, out)` features of the projection in a model of `cfg`.
    pub fn dims(self, cfg: &Config) -> (usize, usize) {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q = cfg.num_attention_heads * d;
        let kv = cfg.num_key_value_heads * d;
        let i = cfg.intermediate_size;
        match self {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, i),
            Proj::Down => (i, h),
        }
    }
}

/// Where the low-rank pair of one projection lies in the adapter's buffer: `A` `(r, in)` and
/// `Bᵀ` `(r, out)`, both contiguous f32.
#[derive(Debug, Clone, Copy)]
struct PairAt {
    a: usize,
    bt: usize,
    inp: usize,
    out: usize,
}

/// A loaded LoRA adapter.
///
/// For an f32 model on the CPU the weights stay in one buffer: an f32 file is read straight
/// into it and used in place (each `B` transposed where it lies), so loading costs little more
/// than reading the file. Other devices and data types get tensors made from that buffer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The adapter's rank.
    pub rank: usize,
    /// The scale `s` applied to `(x Aᵀ) Bᵀ`.
    pub scale: f64,
    host: Vec<f32>,
    pairs: HashMap<(usize, Proj), PairAt>,
    /// `(A, Bᵀ)` in the model's data type on its device, when that is not f32 on the CPU.
    tensors: HashMap<(usize, Proj), (Tensor, Tensor)>,
    bytes: usize,
    dir: PathBuf,
    /// Training only: dropout probability on the adapter's input and the seed of its masks.
    dropout: Option<(f32, u64)>,
}

/// Where a tensor's bytes lie in a safetensors file, and their type.
#[derive(Debug, Clone, Copy)]
struct Span {
    from: usize,
    to: usize,
    dtype: safetensors::Dtype,
}

/// Reads `path` into an f32 buffer (the bytes in order; the last element zero-padded).
fn read_f32_buffer(path: &Path) -> Result<(Vec<f32>, usize)> {
    use std::io::Read;
    let mut file = fs_err::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(|_| Error::Safetensors {
        path: path.to_path_buf(),
        source: safetensors::SafeTensorError::HeaderTooLarge,
    })?;
    let mut buf = vec![0f32; len.div_ceil(4)];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
    file.read_exact(&mut bytes[..len])?;
    Ok((buf, len))
}

/// The elements of a tensor's bytes as f32.
fn to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use safetensors::Dtype as D;
    let conv = |size: usize, f: &dyn Fn(&[u8]) -> f32| bytes.chunks_exact(size).map(f).collect();
    Some(match dtype {
        D::F32 => conv(4, &|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        D::F16 => conv(2, &|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        D::BF16 => conv(2, &|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        D::F64 => conv(8, &|b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }),
        _ => return None,
    })
}

/// Transposes the `rows × cols` matrix at `m` in place, through `scratch`.
fn transpose_in_place(m: &mut [f32], rows: usize, cols: usize, scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.extend_from_slice(m);
    for (r, row) in scratch.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            m[c * rows + r] = *v;
        }
    }
}

impl LoraAdapter {
    /// Loads a PEFT LoRA adapter for a model of `cfg`, with tensors in `dtype` on `device`.
    pub fn load(dir: &Path, cfg: &Config, dtype: DType, device: &Device) -> Result<LoraAdapter> {
        let pc = PeftConfig::read(dir)?;
        let targets = pc.supported()?;
        let scale = pc.scale();
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            return Err(Error::MissingFile {
                path: weights_path,
                what: "a PEFT adapter's weights",
            });
        }
        let (mut host, len) = read_f32_buffer(&weights_path)?;
        let bad = |source| Error::Safetensors {
            path: weights_path.clone(),
            source,
        };
        let (header, meta) = {
            let bytes: &[u8] = bytemuck::cast_slice(&host);
            safetensors::SafeTensors::read_metadata(&bytes[..len]).map_err(bad)?
        };
        let data_start = 8 + header;
        // find every tensor and check its shape and data type
        let mut found = Vec::with_capacity(cfg.num_hidden_layers * targets.len());
        let mut in_place = data_start % 4 == 0;
        for layer in 0..cfg.num_hidden_layers {
            for &proj in &targets {
                let base = proj.peft_name(layer);
                let (inp, out) = proj.dims(cfg);
                let mut get = |suffix: &str, shape: [usize; 2]| -> Result<Span> {
                    let name = format!("{base}.{suffix}.weight");
                    let info = meta.info(&name).ok_or_else(|| Error::MissingTensor {
                        name: name.clone(),
                        dir: dir.to_path_buf(),
                    })?;
                    if info.shape != shape {
                        return Err(Error::TensorShape {
                            name,
                            actual: info.shape.clone(),
                            expected: shape.to_vec(),
                        });
                    }
                    let (from, to) = info.data_offsets;
                    use safetensors::Dtype as D;
                    if !matches!(info.dtype, D::F32 | D::F16 | D::BF16 | D::F64) {
                        return Err(Error::TensorDtype {
                            name,
                            path: weights_path.clone(),
                            dtype: info.dtype.to_string(),
                        });
                    }
                    in_place &= info.dtype == safetensors::Dtype::F32 && from % 4 == 0;
                    Ok(Span {
                        from: data_start + from,
                        to: data_start + to,
                        dtype: info.dtype,
                    })
                };
                let a = get("lora_A", [pc.r, inp])?;
                let b = get("lora_B", [out, pc.r])?;
                found.push(((layer, proj), inp, out, a, b));
            }
        }
        let mut pairs = HashMap::with_capacity(found.len());
        if in_place {
            let mut scratch = Vec::new();
            for &(key, inp, out, a, b) in &found {
                transpose_in_place(&mut host[b.from / 4..b.to / 4], out, pc.r, &mut scratch);
                let (a, bt) = (a.from / 4, b.from / 4);
                pairs.insert(key, PairAt { a, bt, inp, out });
            }
        } else {
            // another data type, or misaligned: convert into a fresh buffer
            let bytes: &[u8] = bytemuck::cast_slice(&host);
            let (mut packed, mut scratch) = (Vec::new(), Vec::new());
            for &(key, inp, out, a, b) in &found {
                let a_at = packed.len();
                packed.extend(to_f32(a.dtype, &bytes[a.from..a.to]).unwrap_or_default());
                let bt_at = packed.len();
                let mut bt = to_f32(b.dtype, &bytes[b.from..b.to]).unwrap_or_default();
                transpose_in_place(&mut bt, out, pc.r, &mut scratch);
                packed.extend(bt);
                pairs.insert(
                    key,
                    PairAt {
                        a: a_at,
                        bt: bt_at,
                        inp,
                        out,
                    },
                );
            }
            host = packed;
        }
        let mut tensors = HashMap::new();
        let mut bytes = host.len() * 4;
        if !(device.is_cpu() && dtype == DType::F32) {
            bytes = 0;
            for (&key, p) in &pairs {
                let a = Tensor::from_slice(&host[p.a..p.a + pc.r * p.inp], (pc.r, p.inp), device)?
                    .to_dtype(dtype)?;
                let bt =
                    Tensor::from_slice(&host[p.bt..p.bt + pc.r * p.out], (pc.r, p.out), device)?
                        .to_dtype(dtype)?;
                bytes += (a.elem_count() + bt.elem_count()) * dtype.size_in_bytes();
                tensors.insert(key, (a, bt));
            }
            host = Vec::new();
        }
        Ok(LoraAdapter {
            rank: pc.r,
            scale,
            host,
            pairs,
            tensors,
            bytes,
            dir: dir.to_path_buf(),
            dropout: None,
        })
    }

    /// An adapter over tensors already made: `A` `(r, in)` and `Bᵀ` `(r, out)` per projection,
    /// applied as `scale · (x Aᵀ) Bᵀ`. With variables for tensors, a forward pass through the
    /// adapter records their gradients (LoRA training).
    pub fn from_tensors(
        rank: usize,
        scale: f64,
        pairs: HashMap<(usize, Proj), (Tensor, Tensor)>,
    ) -> Result<LoraAdapter> {
        let mut bytes = 0;
        for (&(layer, proj), (a, bt)) in &pairs {
            let (ar, br) = (a.dims2()?.0, bt.dims2()?.0);
            if ar != rank || br != rank {
                return Err(Error::Config {
                    field: "r",
                    reason: format!(
                        "layer {layer} {}: rank {ar}/{br}, expected {rank}",
                        proj.module()
                    ),
                });
            }
            bytes += (a.elem_count() + bt.elem_count()) * a.dtype().size_in_bytes();
        }
        Ok(LoraAdapter {
            rank,
            scale,
            host: Vec::new(),
            pairs: HashMap::new(),
            tensors: pairs,
            bytes,
            dir: PathBuf::new(),
            dropout: None,
        })
    }

    /// The same adapter with dropout `p` on its input, as PEFT's `lora_dropout` applies in
    /// training: every adapted projection of every layer draws its own mask from `seed`, and kept
    /// inputs are scaled by `1 / (1 - p)`. The masks are a function of `seed` alone, so a step
    /// replayed with the same seed is the same step. Used by training; never by serving.
    pub fn with_dropout(mut self, p: f32, seed: u64) -> LoraAdapter {
        self.dropout = (p > 0.0).then_some((p, seed));
        self
    }

    /// Memory held by the adapter's weights.
    pub fn size_bytes(&self) -> usize {
        self.bytes
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the adapter changes `proj` of `layer`.
    pub fn targets(&self, layer: usize, proj: Proj) -> bool {
        self.pairs.contains_key(&(layer, proj)) || self.tensors.contains_key(&(layer, proj))
    }

    /// `A` and `Bᵀ` of a projection as f32 slices, when the weights are held on the host.
    fn host_pair(&self, layer: usize, proj: Proj) -> Option<(&[f32], &[f32], PairAt)> {
        let p = *self.pairs.get(&(layer, proj))?;
        let r = self.rank;
        let a = self.host.get(p.a..p.a + r * p.inp)?;
        let bt = self.host.get(p.bt..p.bt + r * p.out)?;
        Some((a, bt, p))
    }

    fn delta(&self, x: &Tensor, layer: usize, proj: Proj) -> Result<Option<Tensor>> {
        let (a, bt) = if let Some((a, bt)) = self.tensors.get(&(layer, proj)) {
            (a.clone(), bt.clone())
        } else if let Some((a, bt, p)) = self.host_pair(layer, proj) {
            let r = self.rank;
            (
                Tensor::from_slice(a, (r, p.inp), x.device())?.to_dtype(x.dtype())?,
                Tensor::from_slice(bt, (r, p.out), x.device())?.to_dtype(x.dtype())?,
            )
        } else {
            return Ok(None);
        };
        let x = match self.dropout {
            Some((p, seed)) => {
                use rand::{Rng, SeedableRng};
                let stream =
                    seed ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
                let keep = 1.0 / (1.0 - p);
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
                    .collect();
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                x.mul(&mask)?
            }
            None => x.clone(),
        };
        // the scale on the rank-sized product: one (tokens × r) tensor, not (tokens × out)
        let xa = (x.matmul(&a.t()?)? * self.scale)?;
        Ok(Some(xa.matmul(&bt)?))
    }
}

/// One adapter segment as the CPU kernel reads it: rows, rank, scale, `A` and `Bᵀ`.
type Segment<'a> = (Range<usize>, usize, f32, &'a [f32], &'a [f32]);

/// Which rows of a packed batch use which adapter: contiguous, non-overlapping row ranges (the
/// engine groups sequences by adapter so that each adapter is one range). Rows outside every
/// range use the bare model.
#[derive(Debug, Clone, Default)]
pub struct LoraBatch {
    segments: Vec<(Range<usize>, Arc<LoraAdapter>)>,
}

impl LoraBatch {
    /// No adapters.
    pub fn none() -> LoraBatch {
        LoraBatch::default()
    }

    /// Adds rows `rows` under `adapter`.
    pub fn push(&mut self, rows: Range<usize>, adapter: Arc<LoraAdapter>) {
        if let Some((last, a)) = self.segments.last_mut() {
            if last.end == rows.start && Arc::ptr_eq(a, &adapter) {
                last.end = rows.end;
                return;
            }
        }
        self.segments.push((rows, adapter));
    }

    /// Whether no row uses an adapter.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The segments.
    pub fn segments(&self) -> &[(Range<usize>, Arc<LoraAdapter>)] {
        &self.segments
    }

    /// The adapters of rows `rows` only, renumbered from 0 (a slice of the batch's sequences).
    pub(crate) fn rows(&self, rows: Range<usize>) -> LoraBatch {
        let mut out = LoraBatch::none();
        for (range, adapter) in &self.segments {
            let (start, end) = (range.start.max(rows.start), range.end.min(rows.end));
            if start < end {
                out.segments
                    .push((start - rows.start..end - rows.start, adapter.clone()));
            }
        }
        out
    }

    /// Whether any adapter applies dropout (training).
    pub(crate) fn has_dropout(&self) -> bool {
        self.segments.iter().any(|(_, a)| a.dropout.is_some())
    }

    /// A training forward's adapter for `proj` of `layer`: when one adapter without dropout
    /// covers all `rows` and holds its weights as tensors, and adapts this projection, its
    /// `(A, Bᵀ, scale)`.
    pub(crate) fn whole_batch_pair(
        &self,
        rows: usize,
        layer: usize,
        proj: Proj,
    ) -> Option<(Tensor, Tensor, f64)> {
        let [(range, adapter)] = self.segments.as_slice() else {
            return None;
        };
        if range.start != 0 || range.end != rows || adapter.dropout.is_some() {
            return None;
        }
        let (a, bt) = adapter.tensors.get(&(layer, proj))?;
        Some((a.clone(), bt.clone(), adapter.scale))
    }

    /// `y + Σ_segments s · (x Aᵀ) Bᵀ` over the rows of each segment, for `proj` of `layer`.
    pub(crate) fn apply(&self, x: &Tensor, y: Tensor, layer: usize, proj: Proj) -> Result<Tensor> {
        if self.segments.iter().all(|(_, a)| !a.targets(layer, proj)) {
            return Ok(y);
        }
        let dropout = self.segments.iter().any(|(_, a)| a.dropout.is_some());
        let fast = !dropout
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && y.dtype() == DType::F32
            && !x.track_op()
            && !y.track_op();
        if fast {
            if let Some(out) = self.apply_cpu(x, &y, layer, proj)? {
                return Ok(out);
            }
        }
        let n = x.dim(0)?;
        let out = y.dim(1)?;
        if let [(range, adapter)] = self.segments.as_slice() {
            if range.start == 0 && range.end == n {
                // one adapter over every row (training): no padding, no concatenation
                return match adapter.delta(x, layer, proj)? {
                    Some(d) => {
                        let d = d.to_dtype(y.dtype())?;
                        Ok((y + d)?)
                    }
                    None => Ok(y),
                };
            }
        }
        let mut pieces = Vec::with_capacity(self.segments.len() * 2 + 1);
        let mut at = 0;
        for (range, adapter) in &self.segments {
            if range.start > at {
                pieces.push(Tensor::zeros(
                    (range.start - at, out),
                    y.dtype(),
                    y.device(),
                )?);
            }
            let xs = x.narrow(0, range.start, range.len())?;
            match adapter.delta(&xs, layer, proj)? {
                Some(d) => pieces.push(d.to_dtype(y.dtype())?),
                None => pieces.push(Tensor::zeros((range.len(), out), y.dtype(), y.device())?),
            }
            at = range.end;
        }
        if at < n {
            pieces.push(Tensor::zeros((n - at, out), y.dtype(), y.device())?);
        }
        Ok((y + Tensor::cat(&pieces, 0)?)?)
    }

    /// The CPU kernel: per row, `xa = s · A x` (each element a [`dot`] as the base kernel
    /// computes it), then `y += Σ_k xa_k · Bᵀ_k`. Rows run in parallel and each row's result
    /// is independent of the others (batch-invariant). `None` when an adapter's weights are not
    /// held as f32 on the host (the tensor path then runs).
    fn apply_cpu(
        &self,
        x: &Tensor,
        y: &Tensor,
        layer: usize,
        proj: Proj,
    ) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, inp) = x.dims2()?;
        let out = y.dim(1)?;
        let mut segs: Vec<Segment> = Vec::with_capacity(self.segments.len());
        for (range, adapter) in &self.segments {
            if !adapter.targets(layer, proj) {
                continue;
            }
            let Some((a, bt, _)) = adapter.host_pair(layer, proj) else {
                return Ok(None);
            };
            segs.push((range.clone(), adapter.rank, adapter.scale as f32, a, bt));
        }
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut yv = y.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        yv.par_chunks_mut(out).enumerate().for_each(|(row, yrow)| {
            let Some((_, r, scale, a, bt)) = segs.iter().find(|s| s.0.contains(&row)) else {
                return;
            };
            let xrow = &xv[row * inp..(row + 1) * inp];
            for k in 0..*r {
                let c = scale * crate::kernels::dot(&a[k * inp..(k + 1) * inp], xrow);
                crate::kernels::axpy(c, &bt[k * out..(k + 1) * out], yrow);
            }
        });
        Ok(Some(Tensor::from_vec(yv, (n, out), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adapter with `A = Bᵀ = I` and scale 1 on layer 0's `q_proj`: its delta is its input,
    /// after dropout.
    fn identity(n: usize) -> LoraAdapter {
        let eye = Tensor::eye(n, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let pairs = HashMap::from([((0, Proj::Q), (eye.clone(), eye))]);
        LoraAdapter::from_tensors(n, 1.0, pairs).unwrap_or_else(|e| panic!("{e}"))
    }

    fn delta(adapter: LoraAdapter, x: &Tensor) -> Vec<f32> {
        let mut batch = LoraBatch::none();
        batch.push(0..x.dim(0).unwrap_or(0), Arc::new(adapter));
        let y = x.zeros_like().unwrap_or_else(|e| panic!("{e}"));
        let out = batch
            .apply(x, y, 0, Proj::Q)
            .unwrap_or_else(|e| panic!("{e}"));
        out.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn dropout_zeroes_a_fraction_p_and_rescales_the_rest() {
        let x = Tensor::arange(1f32, 1.0 + 64.0 * 32.0, &Device::Cpu)
            .and_then(|t| t.reshape((64, 32)))
            .unwrap_or_else(|e| panic!("{e}"));
        let xs = x
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_else(|e| panic!("{e}"));
        let p = 0.25f32;
        assert_eq!(delta(identity(32).with_dropout(0.0, 7), &x), xs, "p = 0");
        let first = delta(identity(32).with_dropout(p, 7), &x);
        assert_eq!(
            first,
            delta(identity(32).with_dropout(p, 7), &x),
            "same seed"
        );
        assert_ne!(
            first,
            delta(identity(32).with_dropout(p, 8), &x),
            "other seed"
        );
        let dropped = first.iter().filter(|v| **v == 0.0).count() as f32 / xs.len() as f32;
        assert!((dropped - p).abs() < 0.03, "dropped {dropped}, p {p}");
        for (d, x) in first.iter().zip(&xs) {
            assert!(
                *d == 0.0 || (d - x / (1.0 - p)).abs() <= 1e-3 * x,
                "{d} from {x}"
            );
        }
        // an unbiased estimate: the mean over many masks approaches the undropped input
        let mut mean = vec![0f64; xs.len()];
        let draws = 400;
        for seed in 0..draws {
            for (m, d) in mean
                .iter_mut()
                .zip(delta(identity(32).with_dropout(p, seed), &x))
            {
                *m += f64::from(d) / draws as f64;
            }
        }
        let rel: f64 = mean
            .iter()
            .zip(&xs)
            .map(|(m, x)| (m - f64::from(*x)).abs() / f64::from(*x))
            .sum::<f64>()
            / xs.len() as f64;
        assert!(rel < 0.03, "mean relative error {rel}");
    }
}
