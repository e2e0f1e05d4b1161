//! LoRA adapters in PEFT's format, applied per sequence segment of a packed batch.
//!
//! An adapter directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! `use_rslora`) and `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `(r, in)`, and
//! `….lora_B.weight`, `(out, r)`). For the rows of a sequence using the adapter, a target
//! projection computes `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with `s = lora_alpha / r` (or
//! `lora_alpha / √r` under rsLoRA). The base weights are never modified, so one batch can mix
//! sequences on different adapters and on the bare model ([`LoraBatch`]).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::Config;
use crate::error::{Error, Result};

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

#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

/// The low-rank pair of one projection: `A` `(r, in)` and `Bᵀ` `(r, out)`, both contiguous.
#[derive(Debug, Clone)]
pub struct LoraPair {
    a: Tensor,
    bt: Tensor,
}

/// A loaded LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The adapter's rank.
    pub rank: usize,
    /// The scale `s` applied to `(x Aᵀ) Bᵀ`.
    pub scale: f64,
    pairs: HashMap<(usize, Proj), LoraPair>,
    bytes: usize,
    dir: PathBuf,
}

fn cfg_err(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Config {
        field,
        reason: reason.into(),
    }
}

impl LoraAdapter {
    /// Loads a PEFT LoRA adapter for a model of `cfg`, with tensors in `dtype` on `device`.
    pub fn load(dir: &Path, cfg: &Config, dtype: DType, device: &Device) -> Result<LoraAdapter> {
        let config_path = dir.join("adapter_config.json");
        if !config_path.exists() {
            return Err(Error::MissingFile {
                path: config_path,
                what: "a PEFT adapter's configuration",
            });
        }
        let text = std::fs::read_to_string(&config_path)?;
        let pc: PeftConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
        if pc.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(cfg_err(
                "peft_type",
                format!("{:?} is not LORA", pc.peft_type),
            ));
        }
        if pc.r == 0 {
            return Err(cfg_err("r", "the rank must be at least 1"));
        }
        for (flag, on) in [
            ("use_dora", pc.use_dora),
            ("fan_in_fan_out", pc.fan_in_fan_out),
        ] {
            if on {
                return Err(cfg_err(
                    "adapter_config.json",
                    format!("{flag} adapters are not supported"),
                ));
            }
        }
        if pc.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(cfg_err(
                "modules_to_save",
                "adapters that replace whole modules are not supported",
            ));
        }
        if !pc.rank_pattern.is_empty() || !pc.alpha_pattern.is_empty() {
            return Err(cfg_err(
                "rank_pattern",
                "per-module ranks and alphas are not supported",
            ));
        }
        let targets: Vec<Proj> = match &pc.target_modules {
            TargetModules::List(names) => {
                let mut out = Vec::new();
                for n in names {
                    let short = n.rsplit('.').next().unwrap_or(n);
                    match Proj::ALL.iter().find(|p| p.module() == short) {
                        Some(p) => out.push(*p),
                        None => {
                            return Err(cfg_err("target_modules", format!("unknown module {n:?}")))
                        }
                    }
                }
                out
            }
            TargetModules::Pattern(p) => {
                let found: Vec<Proj> = Proj::ALL
                    .iter()
                    .copied()
                    .filter(|m| p.contains(m.module()))
                    .collect();
                if found.is_empty() {
                    return Err(cfg_err(
                        "target_modules",
                        format!("pattern {p:?} names no known module"),
                    ));
                }
                found
            }
        };
        let scale = if pc.use_rslora {
            pc.lora_alpha / (pc.r as f64).sqrt()
        } else {
            pc.lora_alpha / pc.r as f64
        };
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            return Err(Error::MissingFile {
                path: weights_path,
                what: "a PEFT adapter's weights",
            });
        }
        let tensors = candle_core::safetensors::load(&weights_path, device)?;
        let mut pairs = HashMap::new();
        let mut bytes = 0;
        for layer in 0..cfg.num_hidden_layers {
            for &proj in &targets {
                let base = format!(
                    "base_model.model.model.layers.{layer}.{}.{}",
                    proj.parent(),
                    proj.module()
                );
                let (inp, out) = proj.dims(cfg);
                let get = |suffix: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let name = format!("{base}.{suffix}.weight");
                    let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                        name: name.clone(),
                        dir: dir.to_path_buf(),
                    })?;
                    if t.dims() != shape {
                        return Err(Error::TensorShape {
                            name,
                            actual: t.dims().to_vec(),
                            expected: shape.to_vec(),
                        });
                    }
                    Ok(t.to_dtype(dtype)?)
                };
                let a = get("lora_A", [pc.r, inp])?;
                let b = get("lora_B", [out, pc.r])?;
                bytes += (a.elem_count() + b.elem_count()) * dtype.size_in_bytes();
                pairs.insert(
                    (layer, proj),
                    LoraPair {
                        a: a.contiguous()?,
                        bt: b.t()?.contiguous()?,
                    },
                );
            }
        }
        Ok(LoraAdapter {
            rank: pc.r,
            scale,
            pairs,
            bytes,
            dir: dir.to_path_buf(),
        })
    }

    /// Memory held by the adapter's tensors.
    pub fn size_bytes(&self) -> usize {
        self.bytes
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the adapter changes `proj` of `layer`.
    pub fn targets(&self, layer: usize, proj: Proj) -> bool {
        self.pairs.contains_key(&(layer, proj))
    }

    fn delta(&self, x: &Tensor, layer: usize, proj: Proj) -> Result<Option<Tensor>> {
        let Some(p) = self.pairs.get(&(layer, proj)) else {
            return Ok(None);
        };
        let xa = x.matmul(&p.a.t()?)?;
        let xab = xa.matmul(&p.bt)?;
        Ok(Some((xab * self.scale)?))
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

    /// `y + Σ_segments s · (x Aᵀ) Bᵀ` over the rows of each segment, for `proj` of `layer`.
    pub(crate) fn apply(&self, x: &Tensor, y: Tensor, layer: usize, proj: Proj) -> Result<Tensor> {
        if self.segments.iter().all(|(_, a)| !a.targets(layer, proj)) {
            return Ok(y);
        }
        let fast = x.device().is_cpu()
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
    /// is independent of the others (batch-invariant). `None` when a weight is not f32 on the
    /// CPU (the tensor path then runs).
    fn apply_cpu(
        &self,
        x: &Tensor,
        y: &Tensor,
        layer: usize,
        proj: Proj,
    ) -> Result<Option<Tensor>> {
        use candle_core::{CpuStorage, Storage};
        use rayon::prelude::*;
        let (n, inp) = x.dims2()?;
        let out = y.dim(1)?;
        // hold the weights' storage while the rows read them
        let mut guards = Vec::new();
        for (range, adapter) in &self.segments {
            if let Some(p) = adapter.pairs.get(&(layer, proj)) {
                let (ga, la) = p.a.storage_and_layout();
                let (gb, lb) = p.bt.storage_and_layout();
                guards.push((
                    range.clone(),
                    adapter.rank,
                    adapter.scale as f32,
                    ga,
                    la.start_offset(),
                    gb,
                    lb.start_offset(),
                ));
            }
        }
        let mut segs: Vec<Segment> = Vec::with_capacity(guards.len());
        for (range, r, scale, ga, oa, gb, ob) in &guards {
            let (Storage::Cpu(CpuStorage::F32(a)), Storage::Cpu(CpuStorage::F32(bt))) =
                (&**ga, &**gb)
            else {
                return Ok(None);
            };
            segs.push((
                range.clone(),
                *r,
                *scale,
                &a[*oa..*oa + r * inp],
                &bt[*ob..*ob + r * out],
            ));
        }
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut yv = y.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        yv.par_chunks_mut(out).enumerate().for_each(|(row, yrow)| {
            let Some((_, r, scale, a, bt)) = segs.iter().find(|s| s.0.contains(&row)) else {
                return;
            };
            let xrow = &xv[row * inp..(row + 1) * inp];
            for k in 0..*r {
                let c = scale * crate::matvec::dot(&a[k * inp..(k + 1) * inp], xrow);
                crate::matvec::axpy(c, &bt[k * out..(k + 1) * out], yrow);
            }
        });
        Ok(Some(Tensor::from_vec(yv, (n, out), x.device())?))
    }
}
