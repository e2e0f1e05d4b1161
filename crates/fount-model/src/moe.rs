//! The sparse mixture-of-experts feed-forward of Mixtral (Jiang et al., 2024, arXiv 2401.04088),
//! as `transformers`' `MixtralSparseMoeBlock` computes it: router logits, softmax in f32, top-k,
//! weights renormalised to sum to one, and each expert run only on the tokens routed to it.

use candle_core::{DType, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layers::{Linear, Mlp};
use crate::ops::{softmax_last_dim, Kernels};
use crate::weights::Weights;

/// One sparse MoE feed-forward layer.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    gate: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
}

impl SparseMoe {
    /// Loads `gate` and `experts.{e}.w1/w2/w3` (gate, down, up) under `block_sparse_moe`.
    pub fn load(w: &Weights, cfg: &Config) -> Result<Self> {
        let moe = cfg.moe.ok_or(Error::Config {
            field: "num_local_experts",
            reason: "a sparse MoE layer needs the MoE fields".into(),
        })?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = Linear::load(&w.pp("gate"), h, moe.num_experts, false)?;
        let experts = (0..moe.num_experts)
            .map(|e| {
                let ew = w.pp(format!("experts.{e}"));
                Ok(Mlp::from_parts(
                    Linear::load(&ew.pp("w1"), h, i, false)?,
                    Linear::load(&ew.pp("w3"), h, i, false)?,
                    Linear::load(&ew.pp("w2"), i, h, false)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SparseMoe {
            gate,
            experts,
            top_k: moe.top_k,
        })
    }

    /// A layer from its router (`(experts, hidden)`) and experts, each token going to `top_k`.
    pub fn from_parts(gate: Linear, experts: Vec<Mlp>, top_k: usize) -> Self {
        SparseMoe {
            gate,
            experts,
            top_k,
        }
    }

    /// Returns the layer's output and its router logits (for the auxiliary loss and metrics).
    ///
    /// # Shapes
    /// - `x`: `(tokens, hidden)` → `(tokens, hidden)`, router logits `(tokens, experts)`
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = x.dim(0)?;
        // experts run on the rows routed to them, however many: the batch-dependent kernels (an
        // MoE model's tokens are not batch-invariant in the engine)
        let kernels = Kernels::of(x);
        let router_logits = self.gate.forward(x, kernels)?.to_dtype(DType::F32)?; // (n, experts)
        let probs = softmax_last_dim(&router_logits)?;
        let choice = top_k_rows(&probs.to_vec2::<f32>()?, self.top_k);
        let k = self.top_k;
        let idx: Vec<u32> = choice.iter().flatten().map(|&e| e as u32).collect();
        let idx = Tensor::from_vec(idx, (n, k), x.device())?;
        let weights = probs.gather(&idx, 1)?; // (n, k)
        let weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        let weights = weights.to_dtype(x.dtype())?.flatten_all()?; // (n·k)

        let mut out = x.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            let mut rows = Vec::new();
            let mut slots = Vec::new();
            for (t, chosen) in choice.iter().enumerate() {
                if let Some(s) = chosen.iter().position(|&c| c == e) {
                    rows.push(t as u32);
                    slots.push((t * k + s) as u32);
                }
            }
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            let rows = Tensor::from_vec(rows, m, x.device())?;
            let slots = Tensor::from_vec(slots, m, x.device())?;
            let y = expert.forward(&x.index_select(&rows, 0)?, kernels)?; // (m, hidden)
            let w = weights.index_select(&slots, 0)?.reshape((m, 1))?;
            out = out.index_add(&rows, &y.broadcast_mul(&w)?, 0)?;
        }
        Ok((out, router_logits))
    }
}

/// The indices of the `k` largest values of each row, largest first (ties: lower index first,
/// as `torch.topk` on CPU).
fn top_k_rows(rows: &[Vec<f32>], k: usize) -> Vec<Vec<usize>> {
    rows.iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.truncate(k);
            order
        })
        .collect()
}
