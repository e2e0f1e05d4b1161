//! The small layers of a Llama-family decoder: linear projections, RMSNorm, the SwiGLU MLP and
//! grouped-query attention over a packed batch.
//!
//! Every op is differentiable, so the same code trains and serves: training on the CPU in f32
//! runs the fused kernels of [`crate::fused`], which carry their own backward passes.

use candle_core::{DType, Tensor, D};

use crate::batch::Batch;
use crate::config::Config;
use crate::error::Result;
use crate::kernels as fused;
use crate::kernels::{FrozenMatmul, SmallMatmul};
use crate::kv::KvView;
use crate::lora::{LoraBatch, Proj};
use crate::rope;
use crate::weights::Weights;

/// Up to this many rows (decoding steps), [`Linear::forward`] uses the memory-bound kernel of
/// [`crate::matvec`].
const SMALL_ROWS: usize = 8;

/// `y = x Wᵀ + b`, with `W` of shape `(out, in)` as checkpoints store it.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
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
        Ok(Linear { weight, bias })
    }

    /// Builds from tensors (weight `(out, in)`).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// # Shapes
    /// - `x`: `(tokens, in)` → `(tokens, out)`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_mode(x, false)
    }

    /// [`Linear::forward`]; with `invariant`, every row is computed by the same per-row kernel
    /// whatever the number of rows, so a row's result does not depend on what else is in the
    /// batch (bit for bit). Without it, more than a few rows go to candle's matmul.
    pub fn forward_mode(&self, x: &Tensor, invariant: bool) -> Result<Tensor> {
        let small = (invariant || x.dim(0)? <= SMALL_ROWS)
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && !self.weight.track_op()
            && !x.track_op();
        let frozen = x.track_op()
            && !self.weight.track_op()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32;
        let y = if small {
            x.contiguous()?
                .apply_op2_no_bwd(&self.weight, &SmallMatmul)?
        } else if frozen {
            // training an adapter over a frozen base: no gradient for the weight
            x.contiguous()?.apply_op1(FrozenMatmul {
                weight: self.weight.clone(),
            })?
        } else if self.weight.track_op() && fused::applies(x) && fused::applies(&self.weight) {
            // training the weight: its gradient comes out in its own layout
            fused::linear(x, &self.weight)?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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

    /// # Shapes
    /// - `x`: `(tokens, size)` → `(tokens, size)`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() && !self.weight.track_op() {
            // Inference: candle's fused kernel (it does not backpropagate, and need not here).
            return Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?);
        }
        if fused::applies(x) && fused::applies(&self.weight) {
            return Ok(fused::rms_norm(x, &self.weight, self.eps)?);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        Ok(x.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
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

    /// # Shapes
    /// - `x`: `(tokens, hidden)` → `(tokens, hidden)`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }

    /// [`Mlp::forward`] of layer `layer` with the adapters of `ctx`.
    pub fn forward_ctx(&self, x: &Tensor, layer: usize, ctx: &LayerCtx) -> Result<Tensor> {
        let gate = ctx.project(&self.gate_proj, x, layer, Proj::Gate)?;
        let up = ctx.project(&self.up_proj, x, layer, Proj::Up)?;
        let h = if gate.track_op() && fused::applies(&gate) {
            fused::silu_mul(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        ctx.project(&self.down_proj, &h, layer, Proj::Down)
    }
}

/// How a forward computes its projections: the LoRA adapters of each row range, and whether rows
/// must not depend on the rest of the batch (see [`Linear::forward_mode`]).
#[derive(Debug, Clone, Copy)]
pub struct LayerCtx<'a> {
    /// Adapters per row range.
    pub lora: &'a LoraBatch,
    /// Batch-invariant kernels.
    pub invariant: bool,
}

impl LayerCtx<'_> {
    fn project(&self, linear: &Linear, x: &Tensor, layer: usize, proj: Proj) -> Result<Tensor> {
        if !self.lora.is_empty()
            && fused::applies(x)
            && fused::applies(&linear.weight)
            && !linear.weight.track_op()
        {
            if let Some((a, bt, scale)) = self.lora.whole_batch_pair(x.dim(0)?, layer, proj) {
                if (a.track_op() || bt.track_op()) && fused::applies(&a) {
                    // training an adapter over a frozen base: the fused projection
                    let bias = linear.bias.as_ref();
                    return Ok(fused::lora_linear(x, &linear.weight, bias, &a, &bt, scale)?);
                }
            }
        }
        let y = linear.forward_mode(x, self.invariant)?;
        if self.lora.is_empty() {
            return Ok(y);
        }
        self.lora.apply(x, y, layer, proj)
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
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &Batch,
        masks: &[Option<Tensor>],
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut dyn KvView,
    ) -> Result<Tensor> {
        let none = LoraBatch::none();
        let ctx = LayerCtx {
            lora: &none,
            invariant: false,
        };
        self.forward_ctx(x, batch, masks, cos, sin, kv, &ctx)
    }

    /// [`Attention::forward`] with the adapters and kernels of `ctx`.
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
        let training = q.track_op() || k.track_op() || v.track_op();
        if training
            && !ctx.invariant
            && !kv.stores()
            && (0..nseq).all(|seq| kv.past_len(seq) == 0)
            && [&q, &k, &v, cos, sin].into_iter().all(fused::applies)
        {
            // whole sequences on the CPU in f32: one op with its own backward pass
            let shape = fused::AttnShape {
                heads: h,
                kv_heads: kvh,
                head_dim: d,
                seq_lens: batch.seq_lens.clone(),
                window: self.window,
            };
            let out = fused::attention(&q, &k, &v, cos, sin, &shape)?;
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
        if !kv.stores() && !ctx.invariant && nseq > 1 && batch.seq_lens.iter().all(|&l| l == len) {
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
            let probs = attention_probs(q.matmul(&k.t()?)?, masks.first(), scale, groups)?;
            let out = probs
                .matmul(&v)? // (nseq·kvh, groups·len, d)
                .reshape((nseq, h, len, d))?
                .transpose(1, 2)?
                .reshape((nseq * len, h * d))?;
            return ctx.project(&self.o_proj, &out, layer, Proj::O);
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
            let scores = if ctx.invariant {
                per_head(&q, &keys, |q, k| {
                    Linear::from_weights(k, None).forward_mode(&q, true)
                })?
            } else {
                q.matmul(&keys.t()?)? // (kvh, groups·len, total)
            };
            let probs = attention_probs(scores, masks.get(seq), scale, groups)?;
            let out = if ctx.invariant {
                let vt = values.transpose(1, 2)?.contiguous()?; // (kvh, d, total)
                per_head(&probs.contiguous()?, &vt, |p, v| {
                    Linear::from_weights(v, None).forward_mode(&p, true)
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

/// `softmax(scale · scores + mask)` of `(heads, groups · queries, keys)` scores, where the
/// additive mask `(queries, keys)` is shared by every head and every query group.
fn attention_probs(
    scores: Tensor,
    mask: Option<&Option<Tensor>>,
    scale: f64,
    groups: usize,
) -> Result<Tensor> {
    let mask = mask.and_then(Option::as_ref);
    if scores.track_op() && fused::applies(&scores) {
        // training: one pass each way instead of the five ops below
        return Ok(fused::masked_softmax(&scores, mask, scale)?);
    }
    let scores = (scores * scale)?;
    let scores = match mask {
        Some(mask) => {
            let (heads, rows, keys) = scores.dims3()?;
            scores
                .reshape((heads, groups, rows / groups, keys))?
                .broadcast_add(mask)?
                .reshape((heads, rows, keys))?
        }
        None => scores,
    };
    softmax_last_dim(&scores)
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

/// Numerically stable softmax over the last dimension: differentiable ops when autograd tracks
/// `x`, candle's fused kernel otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}
