//! Losses: next-token cross-entropy over a packed batch, and the MoE load-balancing loss.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, D};
use fount_model::{Batch, Logits, LoraBatch, Model, NoCache};

use crate::error::{Error, Result};

/// Mean cross-entropy of `logits` `(N, vocab)` against `targets` (one per row), counting only
/// rows whose `mask` is true: the loss of a packed batch where each sequence's last token, and
/// any token not trained on, predicts nothing. Returns the loss and the rows counted.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], mask: &[bool]) -> Result<(Tensor, usize)> {
    let n = logits.dim(0)?;
    if targets.len() != n || mask.len() != n {
        return Err(Error::Batch(format!(
            "{n} rows of logits, {} targets, {} mask entries",
            targets.len(),
            mask.len()
        )));
    }
    let weights = row_weights(mask)?;
    let counted = mask.iter().filter(|&&m| m).count();
    Ok((weighted_cross_entropy(logits, targets, &weights)?, counted))
}

/// `−Σᵢ wᵢ · log softmax(logitsᵢ)[targetᵢ]` over the rows of `logits` `(N, vocab)`: the
/// cross-entropy of [`cross_entropy`] with each row's weight given (so a batch's rows can be
/// taken a few at a time, each weighted by the whole batch's count).
pub fn weighted_cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n || weights.len() != n {
        return Err(Error::Batch(format!(
            "{n} rows of logits, {} targets, {} weights",
            targets.len(),
            weights.len()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Batch(format!(
            "target {t} outside a vocabulary of {vocab}"
        )));
    }
    let logits = logits.to_dtype(DType::F32)?;
    if fount_model::kernels::applies(&logits) {
        // one pass forward and one back, and no vocabulary-sized intermediate kept
        return Ok(fount_model::kernels::cross_entropy(
            &logits, targets, weights,
        )?);
    }
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (n, 1), logits.device())?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let w = Tensor::from_slice(weights, n, logits.device())?;
    Ok(picked.mul(&w)?.sum_all()?.neg()?)
}

/// The weights [`cross_entropy`] gives the rows of a batch: `1 / counted` where `mask` holds.
pub fn row_weights(mask: &[bool]) -> Result<Vec<f32>> {
    let counted = mask.iter().filter(|&&m| m).count();
    if counted == 0 {
        return Err(Error::Batch("no token in the batch is trained on".into()));
    }
    let share = 1.0 / counted as f32;
    Ok(mask.iter().map(|&m| if m { share } else { 0.0 }).collect())
}

/// Rows of `logits` `(N, vocab)` whose most likely token is the target, among those `mask`
/// counts.
pub fn correct_tokens(logits: &Tensor, targets: &[u32], mask: &[bool]) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(targets)
        .zip(mask)
        .filter(|((p, t), m)| **m && p == t)
        .count())
}

/// What one forward and backward pass measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    /// The mean cross-entropy over the counted tokens.
    pub loss: f64,
    /// The fraction of counted tokens whose most likely prediction was the target, when
    /// asked for (it costs an argmax over the logits).
    pub accuracy: Option<f64>,
}

/// A dense model's forward and backward for the cross-entropy of `batch` (with `lora`'s
/// adapters), with activation recomputation or without, handing each store of gradients to
/// `on_grads`. Returns the loss, and the token accuracy when `accuracy` asks for it.
#[allow(clippy::too_many_arguments)]
pub fn backward_cross_entropy(
    model: &Model,
    batch: &Batch,
    lora: &LoraBatch,
    targets: &[u32],
    mask: &[bool],
    recompute: bool,
    accuracy: bool,
    on_grads: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<StepLoss> {
    let counted = mask.iter().filter(|&&m| m).count().max(1) as f64;
    if recompute {
        let weights = row_weights(mask)?;
        let mut correct = 0;
        let loss = model.backward_checkpointed(
            batch,
            lora,
            &mut |logits, rows| {
                if accuracy {
                    let (t, m) = (&targets[rows.clone()], &mask[rows.clone()]);
                    correct += correct_tokens(&logits.detach(), t, m)?;
                }
                weighted_cross_entropy(logits, &targets[rows.clone()], &weights[rows])
            },
            on_grads,
        )?;
        return Ok(StepLoss {
            loss,
            accuracy: accuracy.then(|| correct as f64 / counted),
        });
    }
    let logits = model
        .forward_lora(batch, &mut NoCache, Logits::All, lora, false)?
        .logits;
    let correct = if accuracy {
        Some(correct_tokens(&logits.detach(), targets, mask)?)
    } else {
        None
    };
    let (loss, _) = cross_entropy(&logits, targets, mask)?;
    on_grads(&loss.backward()?)?;
    Ok(StepLoss {
        loss: f64::from(loss.to_scalar::<f32>()?),
        accuracy: correct.map(|c| c as f64 / counted),
    })
}

/// The load-balancing auxiliary loss of Switch Transformers as HF transformers'
/// `load_balancing_loss_func` computes it (without an attention mask): over the router logits of
/// every layer, concatenated, `experts · Σₑ fₑ · Pₑ`, where `fₑ` is the fraction of (token, top-k
/// slot) pairs routed to expert `e` and `Pₑ` the mean router probability of `e`. Gradients flow
/// through `Pₑ` only. Also returns each expert's share of the routed slots.
pub fn load_balancing_loss(
    router_logits: &[Tensor],
    experts: usize,
    top_k: usize,
) -> Result<(Tensor, Vec<f64>)> {
    if router_logits.is_empty() {
        return Err(Error::Batch("no router logits (not an MoE model)".into()));
    }
    if top_k == 0 || top_k > experts {
        return Err(Error::Batch(format!("top-{top_k} of {experts} experts")));
    }
    let all = Tensor::cat(router_logits, 0)?.to_dtype(DType::F32)?;
    let (rows, e) = all.dims2()?;
    if e != experts {
        return Err(Error::Batch(format!(
            "router logits for {e} experts, expected {experts}"
        )));
    }
    // the composed softmax: candle's fused `softmax_last_dim` has no backward pass
    let probs = candle_nn::ops::softmax(&all, D::Minus1)?;
    // fₑ: counted on the host; no gradient flows through the choice
    let host = probs.to_vec2::<f32>()?;
    let mut routed = vec![0f64; experts];
    for row in &host {
        let mut order: Vec<usize> = (0..experts).collect();
        // torch.topk: largest first, ties to the lower index
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &x in &order[..top_k] {
            routed[x] += 1.0;
        }
    }
    // mean over (rows, k) of the one-hot masks, summed over k: each slot counts 1 / rows
    let f: Vec<f32> = routed.iter().map(|&c| (c / rows as f64) as f32).collect();
    let share: Vec<f64> = routed.iter().map(|&c| c / (rows * top_k) as f64).collect();
    let f = Tensor::from_vec(f, experts, all.device())?;
    let p = probs.mean(0)?;
    let loss = (f.mul(&p)?.sum_all()? * experts as f64)?;
    Ok((loss, share))
}
