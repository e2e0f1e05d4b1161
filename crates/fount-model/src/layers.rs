//! The small layers of a Llama-family decoder: linear projections, RMSNorm, the SwiGLU MLP and
//! grouped-query attention over a packed batch.
//!
//! Every op is differentiable, so the same code trains and serves. Which kernel runs each op is
//! [`crate::ops`]'s decision, made once per forward pass ([`Kernels`]) and handed down in
//! [`LayerCtx`]; the layers here name no kernel.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};

use crate::batch::Batch;
use crate::blocks::{BlockMatrix, Bytes};
use crate::config::Config;
use crate::error::Result;
use crate::kernels::AttnShape;
use crate::kv::KvView;
use crate::lora::{LoraBatch, Proj};
use crate::ops::{self, Kernels};
use crate::rope;
use crate::weights::Weights;

/// A projection's weight `(out, in)`: a dense tensor, or ggml blocks (quantised or half
/// precision) read from a GGUF file.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A tensor in the model's dtype.
    Dense(Tensor),
    /// Rows of ggml blocks, multiplied by [`crate::ops`]'s block kernels.
    Blocks(Arc<BlockMatrix>),
}

impl Weight {
    /// A matrix of ggml blocks as a weight: F32 blocks become a dense tensor (fount's f32
    /// kernels), every other type stays blocks.
    pub fn from_blocks(b: BlockMatrix) -> Result<Weight> {
        Ok(if b.dtype() == GgmlDType::F32 {
            Weight::Dense(b.dequantize()?)
        } else {
            Weight::Blocks(Arc::new(b))
        })
    }

    /// A weight as loaded: f16 and bf16 matrices on the CPU that no gradient flows into go to
    /// the half-precision kernels ([`crate::kernels::half`]: the values as they are, half the
    /// bytes per token of f32, none of candle's slow half-precision matmul); anything else
    /// stays a tensor.
    pub fn from_tensor(t: Tensor) -> Result<Weight> {
        let half = match t.dtype() {
            DType::F16 => GgmlDType::F16,
            DType::BF16 => GgmlDType::BF16,
            _ => return Ok(Weight::Dense(t)),
        };
        if !t.device().is_cpu() || t.track_op() || t.rank() != 2 {
            return Ok(Weight::Dense(t));
        }
        let (rows, cols) = t.dims2()?;
        let flat = t.flatten_all()?;
        let bytes: Vec<u8> = match half {
            GgmlDType::F16 => flat
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
            _ => flat
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
        };
        Ok(Weight::Blocks(Arc::new(BlockMatrix::from_bytes(
            half,
            Bytes::Owned(bytes),
            rows,
            cols,
        )?)))
    }
}

/// `y = x Wᵀ + b`, with `W` of shape `(out, in)` as checkpoints store it.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias {
            Some(w.get(&[out_dim], "bias")?)
        } else {
            None
        };
        let weight = match w.half_matrices() {
            Some(half) => weight.to_dtype(half)?,
            None => weight,
        };
        Ok(Linear {
            weight: Weight::from_tensor(weight)?,
            bias,
        })
    }

    /// Builds from tensors (weight `(out, in)`), kept as they are (see [`Weight::from_tensor`]
    /// for the kernels a loaded weight gets).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// Builds from a weight of either kind.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// `y = x Wᵀ + b` with the kernels of `k` (see [`crate::ops`]); batch-invariant kernels
    /// compute every row by the same per-row kernel whatever the number of rows.
    ///
    /// # Shapes
    /// - `x`: `(tokens, in)` → `(tokens, out)`
    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        ops::weight_linear(k, x, &self.weight, self.bias.as_ref())
    }
}

/// Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in f32 as `transformers` does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `{prefix}.weight`.
    pub fn load(w: &Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&[size], "weight")?,
            eps,
        })
    }

    /// Builds from the weight `(size)`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// # Shapes
    /// - `x`: `(tokens, size)` → `(tokens, size)`
    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        ops::rms_norm(k, x, &self.weight, self.eps)
    }
}

/// The SwiGLU feed-forward: `down(silu(gate(x)) · up(x))` (Shazeer, 2020).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj`, `down_proj` under `w`.
    pub fn load(w: &Weights, hidden: usize, intermediate: usize, bias: bool) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(&w.pp("gate_proj"), hidden, intermediate, bias)?,
            up_proj: Linear::load(&w.pp("up_proj"), hidden, intermediate, bias)?,
            down_proj: Linear::load(&w.pp("down_proj"), intermediate, hidden, bias)?,
        })
    }

    /// Builds from the three projections.
    pub fn from_parts(gate_proj: Linear, up_proj: Linear, down_proj: Linear) -> Self {
        Mlp {
            gate_proj,
            up_proj,
            down_proj,
        }
    }

    /// An MoE expert: no adapters, and the gate composed of candle's ops (as the MoE
    /// reference computes it, in training too).
    ///
    /// # Shapes
    /// - `x`: `(tokens, hidden)` → `(tokens, hidden)`
    pub fn forward(&self, x: &Tensor, k: Kernels) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, k)?.silu()?;
        let up = self.up_proj.forward(x, k)?;
        self.down_proj.forward(&(gate * up)?, k)
    }

    /// A dense layer's feed-forward, layer `layer`, with the adapters and kernels of `ctx`.
    pub fn forward_ctx(&self, x: &Tensor, layer: usize, ctx: &LayerCtx) -> Result<Tensor> {
        let gate = ctx.project(&self.gate_proj, x, layer, Proj::Gate)?;
        let up = ctx.project(&self.up_proj, x, layer, Proj::Up)?;
        let h = ops::silu_mul(ctx.kernels, &gate, &up)?;
        ctx.project(&self.down_proj, &h, layer, Proj::Down)
    }
}

/// How a forward pass computes its layers: the LoRA adapters of each row range, and the kernels
/// it runs on (decided once per pass, see [`crate::ops`]).
#[derive(Debug, Clone, Copy)]
pub struct LayerCtx<'a> {
    /// Adapters per row range.
    pub lora: &'a LoraBatch,
    /// The kernels.
    pub kernels: Kernels,
}

impl LayerCtx<'_> {
    /// The one place every projection goes through, with its row ranges' adapters.
    fn project(&self, linear: &Linear, x: &Tensor, layer: usize, proj: Proj) -> Result<Tensor> {
        let bias = linear.bias.as_ref();
        ops::project(
            self.kernels,
            self.lora,
            x,
            &linear.weight,
            bias,
            layer,
            proj,
        )
    }
}

/// Grouped-query self-attention (Ainslie et al., 2023) with RoPE, over the packed tokens of a
/// batch, reading and extending each sequence's keys and values through a [`KvView`].
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    layer: usize,
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` of layer `layer`.
    pub fn load(w: &Weights, cfg: &Config, layer: usize) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q = cfg.num_attention_heads * d;
        let kv = cfg.num_key_value_heads * d;
        Ok(Attention {
            q_proj: Linear::load(&w.pp("q_proj"), h, q, cfg.qkv_bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), h, kv, cfg.qkv_bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), h, kv, cfg.qkv_bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), q, h, cfg.o_bias)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            window: cfg.window_of(layer),
            layer,
        })
    }

    /// Builds from the four projections of layer `layer`.
    pub fn from_parts(
        [q_proj, k_proj, v_proj, o_proj]: [Linear; 4],
        cfg: &Config,
        layer: usize,
    ) -> Self {
        Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            window: cfg.window_of(layer),
            layer,
        }
    }

    /// The layer's sliding window, if it has one.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// # Shapes
    /// - `x`: `(tokens, hidden)`, the packed tokens of every sequence in `batch`
    /// - `masks`: per sequence, the additive mask `(new tokens, past + new tokens)` from
    ///   [`Model::forward`](crate::Model::forward), or `None` when nothing is masked
    /// - `cos`, `sin`: `(tokens, head_dim / 2)`
    /// - returns `(tokens, hidden)`
    ///
    /// Each projection runs with the adapters of its rows and the kernels of `ctx`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_ctx(
        &self,
        x: &Tensor,
        batch: &Batch,
        masks: &[Option<Tensor>],
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut dyn KvView,
        ctx: &LayerCtx,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let groups = h / kvh;
        let layer = self.layer;
        let q = ctx.project(&self.q_proj, x, layer, Proj::Q)?;
        let k = ctx.project(&self.k_proj, x, layer, Proj::K)?;
        let v = ctx.project(&self.v_proj, x, layer, Proj::V)?;
        let nseq = batch.seq_lens.len();
        let shape = || AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            seq_lens: batch.seq_lens.clone(),
            window: self.window,
        };
        let kernels = ctx.kernels;
        if let Some(out) =
            ops::whole_sequence_attention(kernels, &q, &k, &v, cos, sin, batch, kv, shape)?
        {
            return ctx.project(&self.o_proj, &out, layer, Proj::O);
        }
        // Heads first: (heads, tokens, head_dim), so each sequence is a slice of dimension 1.
        let q = q.reshape((n, h, d))?.transpose(0, 1)?.contiguous()?;
        let k = k.reshape((n, kvh, d))?.transpose(0, 1)?.contiguous()?;
        let v = v.reshape((n, kvh, d))?.transpose(0, 1)?;
        let q = rope::apply(&q, cos, sin)?;
        let k = rope::apply(&k, cos, sin)?;
        let scale = 1.0 / (d as f64).sqrt();
        let len = batch.seq_lens.first().copied().unwrap_or(0);
        if !kv.stores()
            && !ctx.kernels.invariant()
            && nseq > 1
            && batch.seq_lens.iter().all(|&l| l == len)
        {
            // equal-length sequences with no past (training windows, packed examples of one
            // length): one batched attention over every sequence instead of one per sequence;
            // with no past the sequences' masks are all the same
            let per_seq = |t: &Tensor, heads: usize| -> Result<Tensor> {
                // (heads, nseq·len, d) → (nseq, heads, len, d)
                Ok(t.reshape((heads, nseq, len, d))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let q = per_seq(&q, h)?.reshape((nseq * kvh, groups * len, d))?;
            let k = per_seq(&k, kvh)?.reshape((nseq * kvh, len, d))?;
            let v = per_seq(&v, kvh)?.reshape((nseq * kvh, len, d))?;
            let mask = masks.first().and_then(Option::as_ref);
            let probs = ops::attention_probs(kernels, q.matmul(&k.t()?)?, mask, scale, groups)?;
            let out = probs
                .matmul(&v)? // (nseq·kvh, groups·len, d)
                .reshape((nseq, h, len, d))?
                .transpose(1, 2)?
                .reshape((nseq * len, h * d))?;
            return ctx.project(&self.o_proj, &out, layer, Proj::O);
        }

        if ops::serving_attention(kernels, &q) {
            // serving: every sequence and key/value head in one pass over the cache
            let mut seqs = Vec::with_capacity(nseq);
            let mut offset = 0;
            for (seq, &len) in batch.seq_lens.iter().enumerate() {
                let q = q.narrow(1, offset, len)?.contiguous()?; // (h, len, d)
                let k_new = k.narrow(1, offset, len)?;
                let v_new = v.narrow(1, offset, len)?;
                offset += len;
                let (keys, values) = kv.append(self.layer, seq, &k_new, &v_new)?;
                seqs.push(ops::CachedSeq {
                    q: q.reshape((kvh, groups * len, d))?,
                    keys: keys.contiguous()?,
                    values: values.contiguous()?,
                });
            }
            let outs = ops::cached_attention(&seqs, groups, self.window, scale)?;
            let mut rows = Vec::with_capacity(nseq);
            for (out, &len) in outs.iter().zip(&batch.seq_lens) {
                rows.push(
                    out.reshape((h, len, d))?
                        .transpose(0, 1)?
                        .reshape((len, h * d))?,
                );
            }
            return ctx.project(&self.o_proj, &Tensor::cat(&rows, 0)?, layer, Proj::O);
        }
        let mut outs = Vec::with_capacity(nseq);
        let mut offset = 0;
        for (seq, &len) in batch.seq_lens.iter().enumerate() {
            let q = q.narrow(1, offset, len)?.contiguous()?; // (h, len, d)
            let k_new = k.narrow(1, offset, len)?; // (kvh, len, d)
            let v_new = v.narrow(1, offset, len)?;
            offset += len;
            // (kvh, total, d)
            let (keys, values) = kv.append(self.layer, seq, &k_new, &v_new)?;
            // Query heads sharing a key/value head are stacked along the rows, so one batched
            // matmul per key/value head serves the whole group without copying keys.
            let q = q.reshape((kvh, groups * len, d))?;
            let scores = if kernels.invariant() {
                per_head(&q, &keys, |q, keys| ops::linear(kernels, &q, &keys, None))?
            } else {
                q.matmul(&keys.t()?)? // (kvh, groups·len, total)
            };
            let mask = masks.get(seq).and_then(Option::as_ref);
            let probs = ops::attention_probs(kernels, scores, mask, scale, groups)?;
            let out = if kernels.invariant() {
                let vt = values.transpose(1, 2)?.contiguous()?; // (kvh, d, total)
                per_head(&probs.contiguous()?, &vt, |p, v| {
                    ops::linear(kernels, &p, &v, None)
                })?
            } else {
                probs.matmul(&values.contiguous()?)? // (kvh, groups·len, d)
            };
            let out = out
                .reshape((h, len, d))?
                .transpose(0, 1)?
                .reshape((len, h * d))?;
            outs.push(out);
        }
        ctx.project(&self.o_proj, &Tensor::cat(&outs, 0)?, layer, Proj::O)
    }
}

/// Applies `f(a[i], b[i])` to each head `i` of `(heads, …)` tensors and stacks the results.
fn per_head(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(Tensor, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let heads = a.dim(0)?;
    let mut outs = Vec::with_capacity(heads);
    for i in 0..heads {
        outs.push(f(a.get(i)?.contiguous()?, b.get(i)?.contiguous()?)?);
    }
    Ok(Tensor::stack(&outs, 0)?)
}

/// The additive mask of `len` new tokens at cache offset `past` over `total` keys: causal, and
/// limited to the last `window` positions when the layer has a sliding window. `None` when
/// nothing is masked (a single decoded token with no window in reach).
pub(crate) fn attention_mask(
    len: usize,
    past: usize,
    total: usize,
    window: Option<usize>,
) -> Option<Vec<f32>> {
    let window_bites = window.is_some_and(|w| total > w);
    if len == 1 && !window_bites {
        return None;
    }
    let mut mask = vec![0f32; len * total];
    for i in 0..len {
        let qpos = past + i;
        for j in 0..total {
            let causal = j > qpos;
            let outside = window.is_some_and(|w| qpos - j.min(qpos) >= w);
            if causal || outside {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Some(mask)
}
