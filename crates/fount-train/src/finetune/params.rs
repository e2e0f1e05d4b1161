//! The trainable adapter: PEFT's initialisation, restoring from a checkpoint, the adapter the
//! forward pass runs through, and writing it in PEFT's format.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use fount_model::peft::{PeftConfig, TargetModules};
use fount_model::{Config, LoraAdapter, Proj};
use rand::{Rng, SeedableRng};

use super::config::FinetuneConfig;
use crate::error::{Error, Result};
use crate::params::Params;

/// The trainable adapter: `A` `(r, in)` and `Bᵀ` `(r, out)` per targeted projection.
#[derive(Debug)]
pub struct LoraParams {
    /// As the optimizer sees them: PEFT's `lora_A` names, and `lora_B` names holding `Bᵀ`.
    pub params: Params,
    pairs: Vec<((usize, Proj), Var, Var)>,
    rank: usize,
    scale: f64,
    targets: Vec<Proj>,
}

impl LoraParams {
    /// PEFT's initialisation: `A` Kaiming-uniform (`bound = 1/√in`), `B` zero, so the adapted
    /// model starts as the base.
    pub fn init(cfg: &Config, ft: &FinetuneConfig) -> Result<LoraParams> {
        let targets = ft.target_modules.resolve()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ft.seed);
        let (mut pairs, mut named) = (Vec::new(), Vec::new());
        for layer in 0..cfg.num_hidden_layers {
            for &proj in &targets {
                let (inp, out) = proj.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..ft.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (ft.r, inp), &Device::Cpu)?)?;
                let bt = Var::zeros((ft.r, out), DType::F32, &Device::Cpu)?;
                let name = proj.peft_name(layer);
                named.push((format!("{name}.lora_A.weight"), a.clone()));
                named.push((format!("{name}.lora_B.weight"), bt.clone()));
                pairs.push(((layer, proj), a, bt));
            }
        }
        Ok(LoraParams {
            params: Params::from_vars(named),
            pairs,
            rank: ft.r,
            scale: ft.scale(),
            targets,
        })
    }

    /// Sets the variables from a PEFT adapter directory written by [`LoraParams::save_peft`]
    /// for the same base and settings (a checkpoint's).
    pub fn restore(&self, dir: &Path) -> Result<()> {
        let path = dir.join("adapter_model.safetensors");
        let tensors =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::Format {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for ((layer, proj), a, bt) in &self.pairs {
            let name = proj.peft_name(*layer);
            let get = |suffix: &str, shape: &[usize]| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| Error::Format {
                    path: path.clone(),
                    message: format!("no {key}"),
                })?;
                if t.dims() != shape {
                    return Err(Error::Format {
                        path: path.clone(),
                        message: format!("{key} is {:?}, expected {shape:?}", t.dims()),
                    });
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let (r, inp) = a.as_tensor().dims2()?;
            let out = bt.as_tensor().dim(1)?;
            a.set(&get("lora_A.weight", &[r, inp])?)?;
            bt.set(&get("lora_B.weight", &[out, r])?.t()?.contiguous()?)?;
        }
        Ok(())
    }

    /// The adapter over the variables (a forward pass through it records their gradients).
    pub fn adapter(&self) -> Result<Arc<LoraAdapter>> {
        let map: HashMap<(usize, Proj), (Tensor, Tensor)> = self
            .pairs
            .iter()
            .map(|(k, a, bt)| (*k, (a.as_tensor().clone(), bt.as_tensor().clone())))
            .collect();
        Ok(Arc::new(LoraAdapter::from_tensors(
            self.rank, self.scale, map,
        )?))
    }

    /// Writes a PEFT adapter directory: `adapter_model.safetensors` (`lora_A.weight` `(r, in)`,
    /// `lora_B.weight` `(out, r)`), then `adapter_config.json` for the settings `ft` and `base`.
    pub fn save_peft(&self, dir: &Path, ft: &FinetuneConfig, base: &str) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for ((layer, proj), a, bt) in &self.pairs {
            let name = proj.peft_name(*layer);
            tensors.insert(format!("{name}.lora_A.weight"), a.as_tensor().clone());
            tensors.insert(
                format!("{name}.lora_B.weight"),
                bt.as_tensor().t()?.contiguous()?,
            );
        }
        let config = PeftConfig {
            target_modules: TargetModules::of(&self.targets),
            ..ft.peft_config(base)?
        };
        fount_model::peft::write_adapter(dir, &config, &tensors)?;
        Ok(())
    }
}
