//! Serving attention over the key/value cache for every sequence and key/value head of a batch
//! as one parallel pass.
//!
//! The composed version runs, per sequence and per key/value head, a product for the scores, a
//! scale, a mask, a softmax and a product for the output, each a small tensor op of its own: a
//! few thousand ops per step at 32 streams. Here each task takes one key/value head of one
//! sequence and computes its query rows straight from the cached keys and values.
//!
//! A query row's result depends only on the row and the keys it may see: its scores are the
//! dot products with the keys from the window's start to its own position (never those the mask
//! would hide), its softmax sums them in key order, and its output adds the value rows in key
//! order. So a sequence's tokens are the same however its prompt was cut into chunks and
//! whatever else is in the batch.

use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

use super::{axpy, dot, values};

/// One sequence's operands for [`cached_attention`].
pub(crate) struct CachedSeq {
    /// `(kv_heads, groups · len, head_dim)`: the new tokens' query heads, those sharing a
    /// key/value head stacked along the rows (group by group, `len` rows each).
    pub q: Tensor,
    /// `(kv_heads, past + len, head_dim)`, the cache with the new tokens appended.
    pub keys: Tensor,
    /// As `keys`.
    pub values: Tensor,
}

/// `softmax(scale · q kᵀ + causal/window mask) v` for each sequence, `(kv_heads, groups · len,
/// head_dim)` each, in the layout of [`CachedSeq::q`].
pub(crate) fn cached_attention(
    seqs: &[CachedSeq],
    groups: usize,
    window: Option<usize>,
    scale: f32,
) -> candle_core::Result<Vec<Tensor>> {
    // the storages stay locked for reading while the tasks run
    let guards: Vec<_> = seqs
        .iter()
        .map(|s| {
            [&s.q, &s.keys, &s.values].map(|t| {
                let (storage, layout) = t.storage_and_layout();
                (storage, layout.clone())
            })
        })
        .collect();
    let mut operands = Vec::with_capacity(seqs.len());
    for (s, g) in seqs.iter().zip(&guards) {
        let (kvh, rows, d) = s.q.dims3()?;
        let total = s.keys.dim(1)?;
        let slice = |i: usize| -> candle_core::Result<&[f32]> {
            let Storage::Cpu(c) = &*g[i].0 else {
                candle_core::bail!("fount-cached-attention: CPU tensors only");
            };
            values(c, &g[i].1, "fount-cached-attention")
        };
        if groups == 0 || d == 0 {
            candle_core::bail!(
                "fount-cached-attention: {groups} query heads per key/value head of {d} dims"
            );
        }
        let len = rows / groups;
        if s.keys.dims3()? != (kvh, total, d) || s.values.dims3()? != (kvh, total, d) {
            candle_core::bail!("fount-cached-attention: keys and values do not match the queries");
        }
        if len * groups != rows || len > total {
            candle_core::bail!("fount-cached-attention: {rows} query rows for {total} keys");
        }
        operands.push((slice(0)?, slice(1)?, slice(2)?, kvh, len, total, d));
    }
    let mut outs: Vec<Vec<f32>> = operands
        .iter()
        .map(|&(_, _, _, kvh, len, _, d)| vec![0f32; kvh * groups * len * d])
        .collect();
    // one task per (sequence, key/value head)
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (s, out) in outs.iter_mut().enumerate() {
        let (.., len, _, d) = operands[s];
        if len == 0 {
            continue; // a sequence with no new token has no query rows
        }
        for (h, part) in out.chunks_mut(groups * len * d).enumerate() {
            tasks.push((s, h, part));
        }
    }
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scores, (s, h, out)| {
            let (q, k, v, _, len, total, d) = operands[s];
            let past = total - len;
            let q = &q[h * groups * len * d..(h + 1) * groups * len * d];
            let k = &k[h * total * d..(h + 1) * total * d];
            let v = &v[h * total * d..(h + 1) * total * d];
            for (r, (qr, or)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
                let pos = past + r % len;
                let hi = pos + 1;
                let lo = window.map_or(0, |w| hi.saturating_sub(w));
                scores.clear();
                scores.extend((lo..hi).map(|j| dot(qr, &k[j * d..(j + 1) * d]) * scale));
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in scores.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for (j, &p) in (lo..hi).zip(scores.iter()) {
                    axpy(p, &v[j * d..(j + 1) * d], or);
                }
                let inv = 1.0 / sum;
                for o in or.iter_mut() {
                    *o *= inv;
                }
            }
        });
    outs.into_iter()
        .zip(&operands)
        .map(|(out, &(_, _, _, kvh, len, _, d))| {
            Tensor::from_vec(out, (kvh, groups * len, d), &Device::Cpu)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, D};

    use super::*;
    use crate::layers::attention_mask;

    fn randn(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The composed reference: scores, mask, softmax and product as tensor ops.
    fn composed(s: &CachedSeq, groups: usize, window: Option<usize>, scale: f64) -> Tensor {
        let (kvh, rows, d) = s.q.dims3().unwrap_or_else(|e| panic!("{e}"));
        let total = s.keys.dim(1).unwrap_or_else(|e| panic!("{e}"));
        let len = rows / groups;
        let scores = (s.q.matmul(&s.keys.t().unwrap()).unwrap() * scale).unwrap();
        let scores = match attention_mask(len, total - len, total, window) {
            Some(m) => {
                let m = Tensor::from_vec(m, (len, total), &Device::Cpu).unwrap();
                scores
                    .reshape((kvh, groups, len, total))
                    .unwrap()
                    .broadcast_add(&m)
                    .unwrap()
                    .reshape((kvh, rows, total))
                    .unwrap()
            }
            None => scores,
        };
        let max = scores.max_keepdim(D::Minus1).unwrap();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let _ = d;
        p.matmul(&s.values).unwrap()
    }

    #[test]
    fn equals_the_composed_attention_and_ignores_how_the_prompt_was_cut() {
        let (kvh, groups, d) = (2, 3, 40);
        for window in [None, Some(4)] {
            // two sequences: 5 new tokens over 3 cached, 1 new over 8 cached
            let seqs: Vec<CachedSeq> = [(5usize, 8usize, 1u64), (1, 9, 2)]
                .iter()
                .map(|&(len, total, seed)| CachedSeq {
                    q: randn((kvh, groups * len, d), seed),
                    keys: randn((kvh, total, d), seed + 10),
                    values: randn((kvh, total, d), seed + 20),
                })
                .collect();
            let scale = 1.0 / (d as f64).sqrt();
            let ours = cached_attention(&seqs, groups, window, scale as f32)
                .unwrap_or_else(|e| panic!("{e}"));
            for (s, o) in seqs.iter().zip(&ours) {
                let want = composed(s, groups, window, scale);
                let diff = (o - &want)
                    .and_then(|t| t.abs())
                    .and_then(|t| t.max_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .unwrap_or(f32::INFINITY);
                assert!(diff < 1e-5, "{window:?}: {diff}");
            }
            // the first sequence's last token alone, over the same keys (as if the prompt had
            // been cut before it): the same bits
            let s = &seqs[0];
            let last: Vec<Tensor> = (0..groups)
                .map(|g| {
                    s.q.narrow(1, g * 5 + 4, 1)
                        .unwrap_or_else(|e| panic!("{e}"))
                })
                .collect();
            let alone = CachedSeq {
                q: Tensor::cat(&last, 1).unwrap_or_else(|e| panic!("{e}")),
                keys: s.keys.clone(),
                values: s.values.clone(),
            };
            let one = cached_attention(&[alone], groups, window, scale as f32)
                .unwrap_or_else(|e| panic!("{e}"));
            for g in 0..groups {
                let a = one[0].narrow(1, g, 1).and_then(|t| t.flatten_all());
                let b = ours[0]
                    .narrow(1, g * 5 + 4, 1)
                    .and_then(|t| t.flatten_all());
                let (a, b) = (
                    a.unwrap().to_vec1::<f32>().unwrap(),
                    b.unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(a, b, "{window:?}: group {g}");
            }
        }
    }
}
