//! AdamW with f32 moments and decoupled weight decay (as `torch.optim.AdamW`), gradient clipping
//! by global norm, and the learning-rate schedule.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::params::Params;

/// Elements per parallel task of the optimizer and the gradient norm.
const CHUNK: usize = 1 << 15;

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// β₁.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// β₂.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// ε.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices and embeddings, never to norms and biases.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
        }
    }
}

/// Whether weight decay applies to a parameter: not to norms and biases.
pub fn decays(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias"))
}

/// Per-parameter optimizer state.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

/// AdamW over a set of named parameters.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// Moments by parameter name, in the order of [`Params::iter`] (`None`: trained without).
    pub state: Vec<(String, Moments)>,
}

impl AdamW {
    /// A fresh optimizer over the parameters named `names` (each of `sizes[i]` scalars).
    pub fn new(cfg: AdamWConfig, params: &[(String, usize)]) -> AdamW {
        AdamW {
            cfg,
            step: 0,
            state: params
                .iter()
                .map(|(n, size)| {
                    (
                        n.clone(),
                        Moments {
                            m: vec![0.0; *size],
                            v: vec![0.0; *size],
                        },
                    )
                })
                .collect(),
        }
    }

    /// The settings.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// One step at learning rate `lr` with the gradients in `grads` (already clipped and
    /// averaged), for every parameter of `params` the optimizer holds state for.
    ///
    /// The update follows `torch.optim.AdamW` (single-tensor path) operation for operation:
    /// `p ← p·(1 − lr·wd)`, moments updated, then `p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)`.
    pub fn update(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.cfg.eps as f32;
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        for (name, mo) in &mut self.state {
            let var = params
                .get(name)
                .ok_or_else(|| Error::Optimizer(format!("no parameter {name:?} to update")))?;
            let Some(g) = grads.get(name) else {
                continue; // no gradient this step: torch skips the parameter
            };
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if g.len() != p.len() || mo.m.len() != p.len() {
                return Err(Error::Optimizer(format!(
                    "state of {name:?} does not fit the parameter"
                )));
            }
            let decay = if decays(name) {
                (1.0 - lr * self.cfg.weight_decay) as f32
            } else {
                1.0
            };
            // elementwise, so splitting it across threads changes no result
            p.par_chunks_mut(CHUNK)
                .zip(mo.m.par_chunks_mut(CHUNK))
                .zip(mo.v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| {
                    for i in 0..p.len() {
                        p[i] *= decay;
                        m[i] = m[i] * b1f + (1.0 - b1f) * g[i];
                        v[i] = v[i] * b2f + (1.0 - b2f) * g[i] * g[i];
                        let denom = v[i].sqrt() / bc2_sqrt + eps;
                        p[i] -= step_size * (m[i] / denom);
                    }
                });
            set(var, p)?;
        }
        Ok(())
    }
}

fn set(var: &Var, values: Vec<f32>) -> Result<()> {
    let t = Tensor::from_vec(values, var.shape(), var.device())?;
    var.set(&t)?;
    Ok(())
}

/// Gradients on the host, by parameter name: summed over micro-batches, then averaged, clipped
/// and handed to the optimizer.
#[derive(Debug, Clone, Default)]
pub struct Grads {
    by_name: Vec<(String, Vec<f32>)>,
}

impl Grads {
    /// Adds the gradients of `store` for every parameter of `params`, times `scale`.
    pub fn accumulate(&mut self, params: &Params, store: &GradStore, scale: f32) -> Result<()> {
        for (name, var) in params.iter() {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            match self.by_name.iter_mut().find(|(n, _)| n == name) {
                Some((_, acc)) => {
                    for (a, x) in acc.iter_mut().zip(&g) {
                        *a += scale * x;
                    }
                }
                None => self
                    .by_name
                    .push((name.to_string(), g.into_iter().map(|x| scale * x).collect())),
            }
        }
        Ok(())
    }

    /// The gradient of `name`.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.by_name
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, g)| g.as_slice())
    }

    /// Every gradient by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[f32])> {
        self.by_name.iter().map(|(n, g)| (n.as_str(), g.as_slice()))
    }

    /// Every gradient, mutably (for an all-reduce).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Vec<f32>)> {
        self.by_name.iter_mut().map(|(n, g)| (n.as_str(), g))
    }

    /// The global L2 norm, summed in f64: over fixed chunks of each gradient in parallel, then
    /// the chunks' sums in parameter order (the same result whatever the thread count).
    pub fn norm(&self) -> f64 {
        let mut total = 0f64;
        for (_, g) in &self.by_name {
            let parts: Vec<f64> = g
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
                .collect();
            total += parts.iter().sum::<f64>();
        }
        total.sqrt()
    }

    /// Scales every gradient so that the global norm is at most `max_norm`
    /// (`torch.nn.utils.clip_grad_norm_`: by `max_norm / (norm + 1e-6)` when that is below 1).
    /// Returns the norm before clipping.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.norm();
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let c = coef as f32;
            for (_, g) in &mut self.by_name {
                g.par_chunks_mut(CHUNK)
                    .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
            }
        }
        norm
    }

    /// Forgets every gradient.
    pub fn clear(&mut self) {
        self.by_name.clear();
    }
}

/// The learning rate at `step` (0-based): linear warmup from 0 to `peak` over `warmup` steps,
/// then cosine decay to `min` at `total`.
pub fn learning_rate(step: u64, peak: f64, min: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    if step >= total || total <= warmup {
        return min;
    }
    let progress = (step - warmup) as f64 / (total - warmup) as f64;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}
