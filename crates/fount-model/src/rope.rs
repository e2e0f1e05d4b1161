//! Rotary position embeddings (Su et al., 2021, arXiv 2104.09864) with the frequency scalings
//! Hugging Face implements in `modeling_rope_utils.py`: `linear` (position interpolation) and
//! `llama3` (Llama 3.1's wavelength-dependent interpolation).
//!
//! Positions are given per token, so sequences at different offsets share one packed batch.

use candle_core::{Device, Tensor};

use crate::config::{Config, RopeScaling};
use crate::error::Result;

/// The inverse frequencies of one model, computed once at load.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `head_dim / 2` inverse frequencies, in f32 as `transformers` computes them.
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Computes the (scaled) inverse frequencies for `config`.
    pub fn new(config: &Config) -> Rope {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        match config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f /= factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old = original_max_position_embeddings as f32;
                let low_freq_wavelen = old / low;
                let high_freq_wavelen = old / high;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Rope { inv_freq }
    }

    /// Plain RoPE for `config` with each frequency divided by its factor (how GGUF files store
    /// Llama 3.1's scaling: `rope_freqs.weight`).
    pub fn with_factors(config: &Config, factors: &[f32]) -> Rope {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let inv_freq = (0..dim)
            .step_by(2)
            .zip(factors)
            .map(|(i, f)| 1.0 / base.powf(i as f32 / dim as f32) / f)
            .collect();
        Rope { inv_freq }
    }

    /// The inverse frequencies.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos` and `sin` tables for the given positions, each `(tokens, head_dim / 2)`.
    pub fn tables(&self, positions: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // f32 product, as `transformers` computes `inv_freq @ position_ids`.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

/// Applies RoPE in the "rotate half" layout of Llama checkpoints.
///
/// # Shapes
/// - `x`: `(heads, tokens, head_dim)`
/// - `cos`, `sin`: `(tokens, head_dim / 2)`
///
/// When autograd tracks `x`, it runs [`crate::kernels::rope`] (f32 on the CPU) or is composed of
/// differentiable ops; otherwise candle's fused kernel runs.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (heads, n, d) = x.dims3()?;
    let half = d / 2;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    if !x.track_op() {
        let x4 = x.contiguous()?.reshape((1, heads, n, d))?;
        let y = candle_nn::rotary_emb::rope(&x4, &cos.contiguous()?, &sin.contiguous()?)?;
        return Ok(y.reshape((heads, n, d))?);
    }
    if crate::kernels::applies(x) {
        return Ok(crate::kernels::rope(x, &cos, &sin)?);
    }
    let cos = cos.reshape((1, n, half))?;
    let sin = sin.reshape((1, n, half))?;
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[r1, r2], 2)?)
}
