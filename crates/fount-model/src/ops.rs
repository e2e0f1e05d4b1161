//! Which kernel runs each op of a forward pass, decided in one place.
//!
//! A forward pass states once what it runs on, as [`Kernels`]: whether fount's own CPU kernels
//! apply (the model is f32 on the CPU: the fused training kernels of [`crate::kernels`] and the
//! memory-bound products for a few rows), and whether a row's result must not depend on the rest
//! of the batch (the engine's batch-invariant mode). The layers call the functions here and name
//! no kernel.
//!
//! What only the autograd graph knows, whether a gradient flows through an operand, is read from
//! the operands here, op by op, because it changes along the graph: training the weights, every
//! activation carries a gradient; training an adapter over a frozen base, the input of the first
//! adapted projection carries none and every later one does; serving, none does. It picks
//!
//! | op | serving | training an adapter (frozen base) | training the weights |
//! |---|---|---|---|
//! | projection | few rows or invariant: per-row product; else candle's matmul | a product with an input-only backward; the adapter's pair fused in | a product whose weight gradient comes out in the weight's layout |
//! | RMSNorm | candle's kernel | fused, with its backward | fused, with its backward |
//! | SwiGLU gate | composed | fused | fused |
//! | attention | invariant on the CPU: every sequence and key/value head in one pass over the cache; else per sequence through the KV view; equal-length sequences with no cache in one batched product | whole sequences as one op that recomputes its probabilities backward | the same |
//! | softmax | candle's kernel | fused masked softmax | fused masked softmax |
//!
//! On other devices and dtypes the composed, differentiable candle ops run instead of the fused
//! ones.

use candle_core::{DType, Device, Tensor, D};

use crate::batch::Batch;
use crate::blocks::BlockMatrix;
use crate::error::Result;
use crate::kernels::{self, AttnShape, FrozenMatmul, SmallMatmul};
use crate::kv::KvView;
use crate::layers::Weight;
use crate::lora::{LoraBatch, Proj};

/// Up to this many rows (decoding steps), a projection uses the memory-bound per-row kernel.
const SMALL_ROWS: usize = 8;

/// What a forward pass runs on, decided once per pass and handed to every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// f32 on the CPU: fount's own kernels apply.
    cpu_f32: bool,
    /// Every row computed by the same per-row kernels whatever the batch (bit for bit).
    invariant: bool,
}

impl Kernels {
    /// The kernels of a model of `dtype` on `device`; `invariant` asks for batch invariance.
    pub fn new(dtype: DType, device: &Device, invariant: bool) -> Kernels {
        Kernels {
            cpu_f32: device.is_cpu() && dtype == DType::F32,
            invariant,
        }
    }

    /// The kernels for tensors like `t`, not batch-invariant (a layer called on its own).
    pub fn of(t: &Tensor) -> Kernels {
        Kernels::new(t.dtype(), t.device(), false)
    }

    /// Whether rows must not depend on the rest of the batch.
    pub fn invariant(&self) -> bool {
        self.invariant
    }
}

/// `y = x Wᵀ + b` for `W` `(out, in)`.
///
/// # Shapes
/// - `x`: `(tokens, in)`, `weight`: `(out, in)`, `bias`: `(out)` → `(tokens, out)`
pub(crate) fn linear(
    k: Kernels,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x_grad, w_grad) = (x.track_op(), weight.track_op());
    let y = if k.cpu_f32 && !w_grad && !x_grad && (k.invariant || x.dim(0)? <= SMALL_ROWS) {
        // serving a few rows, or any rows batch-invariantly: the per-row product
        x.contiguous()?.apply_op2_no_bwd(weight, &SmallMatmul)?
    } else if k.cpu_f32 && x_grad && !w_grad {
        // training an adapter over a frozen base: no gradient for the weight
        x.contiguous()?.apply_op1(FrozenMatmul {
            weight: weight.clone(),
        })?
    } else if k.cpu_f32 && w_grad {
        // training the weight: its gradient comes out in its own layout
        kernels::linear(x, weight)?
    } else {
        x.matmul(&weight.t()?)?
    };
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `y = x Wᵀ + b` for a weight of either kind: [`linear`] for a dense one, the block kernels
/// for ggml blocks.
pub(crate) fn weight_linear(
    k: Kernels,
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    match weight {
        Weight::Dense(w) => linear(k, x, w, bias),
        Weight::Blocks(q) => {
            let y = block_linear(k, x, q)?;
            Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        }
    }
}

/// `x Wᵀ` for a weight of ggml blocks ([`BlockMatrix::matmul`]). Batch-invariant passes take
/// the kernels that compute every row as the row alone ([`BlockMatrix::matmul_rows`]), which
/// still read each weight block once for all the rows.
fn block_linear(k: Kernels, x: &Tensor, q: &BlockMatrix) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let y = if k.invariant {
        q.matmul_rows(&x)?
    } else {
        q.matmul(&x)?
    };
    // the model's activations stay in its dtype (f16 or bf16 models keep theirs)
    Ok(y.to_dtype(dtype)?)
}

/// A projection of layer `layer` with the adapters of `lora`: [`linear`] plus each row range's
/// LoRA update, or, when one adapter that is being trained covers the whole batch over a frozen
/// base, the fused LoRA projection with its own backward pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn project(
    k: Kernels,
    lora: &LoraBatch,
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    layer: usize,
    proj: Proj,
) -> Result<Tensor> {
    if let Weight::Dense(weight) = weight {
        if k.cpu_f32 && !lora.is_empty() && !weight.track_op() {
            if let Some((a, bt, scale)) = lora.whole_batch_pair(x.dim(0)?, layer, proj) {
                if a.track_op() || bt.track_op() {
                    return Ok(kernels::lora_linear(x, weight, bias, &a, &bt, scale)?);
                }
            }
        }
    }
    let y = weight_linear(k, x, weight, bias)?;
    if lora.is_empty() {
        return Ok(y);
    }
    lora.apply(x, y, layer, proj)
}

/// RMSNorm, `x / √(mean(x²) + eps) · w` in f32 as `transformers` computes it.
///
/// # Shapes
/// - `x`: `(tokens, size)`, `weight`: `(size)` → `(tokens, size)`
pub(crate) fn rms_norm(k: Kernels, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.track_op() && !weight.track_op() {
        // serving: candle's kernel (it does not backpropagate, and need not here)
        return Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            weight,
            eps as f32,
        )?);
    }
    if k.cpu_f32 {
        return Ok(kernels::rms_norm(x, weight, eps)?);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)?;
    Ok(x.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// SwiGLU's gate, `silu(gate) · up`.
pub(crate) fn silu_mul(k: Kernels, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if k.cpu_f32 && gate.track_op() {
        return Ok(kernels::silu_mul(gate, up)?);
    }
    Ok((gate.silu()? * up)?)
}

/// Attention over whole sequences with no past as one op (RoPE included) that recomputes its
/// probabilities in the backward pass, when a training forward allows it; `None` otherwise.
///
/// # Shapes
/// - `q`: `(tokens, heads · head_dim)`, `k`, `v`: `(tokens, kv_heads · head_dim)`
/// - `cos`, `sin`: `(tokens, head_dim / 2)`
/// - returns `(tokens, heads · head_dim)`
#[allow(clippy::too_many_arguments)]
pub(crate) fn whole_sequence_attention(
    kn: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    batch: &Batch,
    kv: &dyn KvView,
    shape: impl FnOnce() -> AttnShape,
) -> Result<Option<Tensor>> {
    let training = q.track_op() || k.track_op() || v.track_op();
    let no_past = !kv.stores() && (0..batch.seq_lens.len()).all(|seq| kv.past_len(seq) == 0);
    if !(kn.cpu_f32 && training && !kn.invariant && no_past) {
        return Ok(None);
    }
    Ok(Some(kernels::attention(q, k, v, cos, sin, &shape())?))
}

/// `softmax(scale · scores + mask)` of `(heads, groups · queries, keys)` scores, where the
/// additive mask `(queries, keys)` is shared by every head and every query group.
pub(crate) fn attention_probs(
    k: Kernels,
    scores: Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    groups: usize,
) -> Result<Tensor> {
    if k.cpu_f32 && scores.track_op() {
        // training: one pass each way instead of the five ops below
        return Ok(kernels::masked_softmax(&scores, mask, scale)?);
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

pub(crate) use kernels::CachedSeq;

/// Whether attention over the cache runs as [`cached_attention`]: serving on the CPU in f32 in
/// batch-invariant mode (`q` untracked).
pub(crate) fn serving_attention(k: Kernels, q: &Tensor) -> bool {
    k.cpu_f32 && k.invariant && !q.track_op()
}

/// Attention over the cache for every sequence and key/value head of a batch as one parallel
/// pass ([`kernels::cached_attention`]), each query row computed from its own row and the keys
/// it may see, so it is batch- and chunk-invariant.
///
/// # Shapes
/// - per sequence, `q`: `(kv_heads, groups · len, head_dim)`; `keys`, `values`:
///   `(kv_heads, past + len, head_dim)` → `(kv_heads, groups · len, head_dim)`
pub(crate) fn cached_attention(
    seqs: &[CachedSeq],
    groups: usize,
    window: Option<usize>,
    scale: f64,
) -> Result<Vec<Tensor>> {
    Ok(kernels::cached_attention(
        seqs,
        groups,
        window,
        scale as f32,
    )?)
}

/// Numerically stable softmax over the last dimension: differentiable ops when autograd tracks
/// `x`, candle's kernel otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?);
    }
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}
