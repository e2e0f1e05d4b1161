//! PEFT's LoRA adapter format, in one place: `adapter_config.json` read and written as one typed
//! [`PeftConfig`], the one scale rule ([`scale`]), the adapter writer ([`write_adapter`]) and
//! folding an adapter into its base ([`merge`]).
//!
//! An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's
//! tensor names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `(r, in)`,
//! and `….lora_B.weight`, `(out, r)`); see `peft/tuners/lora/config.py` and `model.py` in PEFT.
//! [`crate::LoraAdapter`] loads one for serving and training; fine-tuning writes one here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::lora::Proj;
use crate::publish::Staged;

/// The configuration file of an adapter.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of an adapter.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The LoRA scale `s` in `y = x Wᵀ + s · (x Aᵀ) Bᵀ`: `alpha / r`, or `alpha / √r` with rank-
/// stabilised LoRA (Kalajdzievski, 2023).
pub fn scale(lora_alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        lora_alpha / (r as f64).sqrt()
    } else {
        lora_alpha / r as f64
    }
}

/// Which projections an adapter targets, as PEFT writes `target_modules`: a list of module
/// names, or one string (`"all-linear"`, or a pattern the module names are matched against).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// `["q_proj", "v_proj"]` (a dotted path names its last part).
    List(Vec<String>),
    /// `"all-linear"`: every projection of attention and MLP; another string is a pattern and
    /// selects the projections whose names it contains.
    Pattern(String),
}

impl TargetModules {
    /// Every projection of attention and MLP (PEFT's `"all-linear"`, the output head excluded).
    pub fn all_linear() -> TargetModules {
        TargetModules::Pattern("all-linear".into())
    }

    /// The modules as a list.
    pub fn of(projs: &[Proj]) -> TargetModules {
        TargetModules::List(projs.iter().map(|p| p.module().to_string()).collect())
    }

    /// The projections named, each once, in the order first named.
    pub fn resolve(&self) -> Result<Vec<Proj>> {
        let mut out: Vec<Proj> = Vec::new();
        match self {
            TargetModules::Pattern(p) if p == "all-linear" => return Ok(Proj::ALL.to_vec()),
            TargetModules::Pattern(p) => {
                out.extend(Proj::ALL.iter().filter(|m| p.contains(m.module())));
                if out.is_empty() {
                    return Err(target_err(format!(
                        "pattern {p:?} names no known module (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear)"
                    )));
                }
            }
            TargetModules::List(names) => {
                for n in names {
                    let short = n.rsplit('.').next().unwrap_or(n);
                    let p = Proj::ALL
                        .iter()
                        .find(|p| p.module() == short)
                        .ok_or_else(|| {
                            target_err(format!(
                                "unknown module {n:?} (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear)"
                            ))
                        })?;
                    if !out.contains(p) {
                        out.push(*p);
                    }
                }
                if out.is_empty() {
                    return Err(target_err("names no module".into()));
                }
            }
        }
        Ok(out)
    }
}

fn target_err(reason: String) -> Error {
    Error::Config {
        field: "target_modules",
        reason,
    }
}

fn cfg_err(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Config {
        field,
        reason: reason.into(),
    }
}

fn lora() -> Option<String> {
    Some("LORA".into())
}

fn no_bias() -> String {
    "none".into()
}

/// `adapter_config.json` as PEFT writes it (the fields fount reads or writes; others are
/// ignored when read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    /// `"LORA"`.
    #[serde(default = "lora")]
    pub peft_type: Option<String>,
    /// `"CAUSAL_LM"`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// The rank.
    pub r: usize,
    /// The update is scaled by `lora_alpha / r` ([`scale`]).
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling, `lora_alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The projections adapted.
    pub target_modules: TargetModules,
    /// Which biases are trained (`"none"`).
    #[serde(default = "no_bias")]
    pub bias: String,
    /// Weights stored `(in, out)` (GPT-2's `Conv1D`): not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Written as `true` for a finished adapter.
    #[serde(default)]
    pub inference_mode: bool,
    /// Weight-decomposed LoRA: not supported.
    #[serde(default)]
    pub use_dora: bool,
    /// Whole modules replaced by the adapter: not supported.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Per-module ranks: not supported.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    /// Per-module alphas: not supported.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
}

impl PeftConfig {
    /// The configuration of a finished adapter of rank `r` on `targets`.
    pub fn new(r: usize, lora_alpha: f64, targets: &[Proj]) -> PeftConfig {
        PeftConfig {
            peft_type: lora(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            r,
            lora_alpha,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::of(targets),
            bias: no_bias(),
            fan_in_fan_out: false,
            inference_mode: true,
            use_dora: false,
            modules_to_save: None,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
        }
    }

    /// Reads `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<PeftConfig> {
        let path = dir.join(CONFIG_FILE);
        if !path.exists() {
            return Err(Error::MissingFile {
                path,
                what: "a PEFT adapter's configuration",
            });
        }
        let text = fs_err::read_to_string(&path)?;
        serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
    }

    /// Writes `dir/adapter_config.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        fs_err::write(&path, text)?;
        Ok(())
    }

    /// The scale of the update ([`scale`]).
    pub fn scale(&self) -> f64 {
        scale(self.lora_alpha, self.r, self.use_rslora)
    }

    /// Checks that fount can apply the adapter as PEFT would, and returns the projections it
    /// targets: plain LoRA on the attention and MLP projections, one rank and alpha for all.
    pub fn supported(&self) -> Result<Vec<Proj>> {
        if self.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(cfg_err(
                "peft_type",
                format!("{:?} is not LORA", self.peft_type),
            ));
        }
        if self.r == 0 {
            return Err(cfg_err("r", "the rank must be at least 1"));
        }
        for (flag, on) in [
            ("use_dora", self.use_dora),
            ("fan_in_fan_out", self.fan_in_fan_out),
        ] {
            if on {
                return Err(cfg_err(
                    "adapter_config.json",
                    format!("{flag} adapters are not supported"),
                ));
            }
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(cfg_err(
                "modules_to_save",
                "adapters that replace whole modules are not supported",
            ));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(cfg_err(
                "rank_pattern",
                "per-module ranks and alphas are not supported",
            ));
        }
        self.target_modules.resolve()
    }
}

/// Writes an adapter directory: `tensors` (PEFT's names, `lora_A` `(r, in)`, `lora_B`
/// `(out, r)`) into `adapter_model.safetensors`, then `adapter_config.json`, so the file a
/// loader opens first is written last.
pub fn write_adapter(
    dir: &Path,
    cfg: &PeftConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    fs_err::create_dir_all(dir)?;
    candle_core::safetensors::save(tensors, dir.join(WEIGHTS_FILE))?;
    cfg.write(dir)
}

/// Writes the base model at `base` with the adapter at `adapter_dir` folded into its weights
/// (`W + s · B A` for every adapted projection), stored in the base's data types, as a model
/// directory at `out` (published whole: see [`crate::publish`]). `out` must not hold a model; an
/// empty directory there is replaced.
pub fn merge(base: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    if out.join("config.json").exists() {
        return Err(Error::Exists {
            path: out.to_path_buf(),
            what: "a model",
        });
    }
    let files = ModelFiles::open(base)?;
    let cfg: Config = files.config()?;
    // loading checks the adapter against the base (names, shapes, ranks)
    let adapter = crate::LoraAdapter::load(adapter_dir, &cfg, DType::F32, &Device::Cpu)?;
    let lora = candle_core::safetensors::load(adapter_dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut dtypes = HashMap::new();
    for f in files.weight_files()? {
        for (name, t) in candle_core::safetensors::load(&f, &Device::Cpu)? {
            dtypes.insert(name.clone(), t.dtype());
            weights.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    let bad = |reason: String| Error::Adapter {
        path: adapter_dir.to_path_buf(),
        reason,
    };
    let mut merged = 0;
    for (name, a) in &lora {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = lora
            .get(&format!("{prefix}.lora_B.weight"))
            .ok_or_else(|| bad(format!("{prefix}: lora_A without lora_B")))?;
        let target = format!("{}.weight", prefix.trim_start_matches("base_model.model."));
        let w = weights
            .get(&target)
            .ok_or_else(|| bad(format!("the base has no {target}")))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * adapter.scale)?;
        let updated = (w + delta)?;
        weights.insert(target, updated);
        merged += 1;
    }
    if merged == 0 {
        return Err(bad("adapts nothing".into()));
    }
    let staged = Staged::begin(out)?;
    for f in files.side_files()? {
        if let Some(name) = f.file_name() {
            fs_err::copy(&f, staged.path().join(name))?;
        }
    }
    let mut stored = HashMap::new();
    for (name, t) in weights {
        let dt = dtypes.get(&name).copied().unwrap_or(DType::F32);
        stored.insert(name, t.to_dtype(dt)?);
    }
    candle_core::safetensors::save(&stored, staged.path().join("model.safetensors"))?;
    if out.exists() {
        // an empty directory is replaced; anything in it is left alone
        fs_err::remove_dir(out).map_err(|_| Error::NotEmpty {
            path: out.to_path_buf(),
            staged: staged.path().to_path_buf(),
        })?;
    }
    staged.commit(None)?;
    Ok(())
}
