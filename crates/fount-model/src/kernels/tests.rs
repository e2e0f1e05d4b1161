//! The fused kernels against candle's composed ops: values and gradients.

use candle_core::{Device, Tensor, Var, D};

use super::*;

fn rand(shape: &[usize], seed: u64) -> Var {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (host(a), host(b));
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "{what}[{i}]: fused {x}, composed {y}"
        );
    }
}

/// Checks `fused` against `composed`: values, and the gradients of every input under the
/// same (random) upstream gradient.
fn same(
    inputs: &[Var],
    fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    composed: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    what: &str,
) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let a = fused(&ts).unwrap_or_else(|e| panic!("{e}"));
    let b = composed(&ts).unwrap_or_else(|e| panic!("{e}"));
    close(&a, &b, what);
    let up = rand(a.dims(), 99);
    let ga = (a * up.as_tensor())
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .unwrap_or_else(|e| panic!("{e}"));
    let gb = (b * up.as_tensor())
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .unwrap_or_else(|e| panic!("{e}"));
    for (i, v) in inputs.iter().enumerate() {
        let (Some(x), Some(y)) = (ga.get(v), gb.get(v)) else {
            panic!("{what}: no gradient for input {i}");
        };
        close(x, y, &format!("{what}: gradient of input {i}"));
    }
}

#[test]
fn rms_norm_matches_the_composed_norm() {
    same(
        &[rand(&[37, 48], 1), rand(&[48], 2)],
        |t| rms_norm(&t[0], &t[1], 1e-6),
        |t| {
            let inv = (t[0].sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?
                .sqrt()?
                .recip()?;
            t[0].broadcast_mul(&inv)?.broadcast_mul(&t[1])
        },
        "rms_norm",
    );
}

#[test]
fn rope_matches_the_composed_rotation() {
    let (heads, n, d) = (3, 5, 8);
    let cos = rand(&[n, d / 2], 3)
        .as_tensor()
        .cos()
        .unwrap_or_else(|e| panic!("{e}"));
    let sin = rand(&[n, d / 2], 3)
        .as_tensor()
        .sin()
        .unwrap_or_else(|e| panic!("{e}"));
    same(
        &[rand(&[heads, n, d], 4)],
        |t| rope(&t[0], &cos, &sin),
        |t| {
            let (c, s) = (cos.reshape((1, n, d / 2))?, sin.reshape((1, n, d / 2))?);
            let x1 = t[0].narrow(2, 0, d / 2)?;
            let x2 = t[0].narrow(2, d / 2, d / 2)?;
            let r1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
            let r2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
            Tensor::cat(&[r1, r2], 2)
        },
        "rope",
    );
}

#[test]
fn masked_softmax_matches_the_composed_softmax() {
    // two heads × three queries of a causal mask over three keys, and no mask
    let mask = Tensor::from_vec(
        vec![
            0f32,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            0.,
            0.,
            f32::NEG_INFINITY,
            0.,
            0.,
            0.,
        ],
        (3, 3),
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let composed = |s: &Tensor, m: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let s = (s * 0.125)?;
        let s = match m {
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    };
    same(
        &[rand(&[2, 3, 3], 5)],
        |t| masked_softmax(&t[0], Some(&mask), 0.125),
        |t| composed(&t[0], Some(&mask)),
        "masked softmax",
    );
    same(
        &[rand(&[4, 7], 6)],
        |t| masked_softmax(&t[0], None, 0.125),
        |t| composed(&t[0], None),
        "softmax",
    );
}

#[test]
fn cross_entropy_matches_the_composed_loss() {
    let targets = [3u32, 0, 9, 9, 4];
    let weights = [0.25f32, 0.0, 0.25, 0.25, 0.25];
    let w = Tensor::new(&weights, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let idx = Tensor::from_slice(&targets, (5, 1), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    same(
        &[rand(&[5, 10], 10)],
        |t| cross_entropy(&t[0], &targets, &weights),
        |t| {
            let logp = candle_nn::ops::log_softmax(&t[0], D::Minus1)?;
            logp.gather(&idx, 1)?.squeeze(1)?.mul(&w)?.sum_all()?.neg()
        },
        "cross_entropy",
    );
}

#[test]
fn lora_linear_matches_the_composed_projection() {
    let w = rand(&[6, 10], 11).as_tensor().clone();
    let b = rand(&[6], 12).as_tensor().clone();
    for bias in [None, Some(&b)] {
        same(
            &[rand(&[7, 10], 13), rand(&[3, 10], 14), rand(&[3, 6], 15)],
            |t| lora_linear(&t[0], &w, bias, &t[1], &t[2], 0.5),
            |t| {
                let y = t[0].matmul(&w.t()?)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                y + (t[0].matmul(&t[1].t()?)? * 0.5)?.matmul(&t[2])?
            },
            "lora_linear",
        );
    }
}

#[test]
fn linear_matches_the_composed_product() {
    same(
        &[rand(&[7, 10], 16), rand(&[6, 10], 17)],
        |t| linear(&t[0], &t[1]),
        |t| t[0].matmul(&t[1].t()?),
        "linear",
    );
    // an untracked input gets no gradient; the weight still does, in its own layout
    let x = rand(&[7, 10], 18).as_tensor().detach();
    let w = rand(&[6, 10], 19);
    let grads = linear(&x, w.as_tensor())
        .and_then(|y| y.sum_all())
        .and_then(|y| y.backward())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(grads.get(&x).is_none());
    let dw = grads
        .get(w.as_tensor())
        .map(|g| (g.dims().to_vec(), g.is_contiguous()));
    assert_eq!(dw, Some((vec![6, 10], true)));
}

/// Attention composed of candle ops: per sequence, RoPE, `q kᵀ` per key/value head with its
/// query heads stacked, the causal (windowed) mask, softmax, and `p v`.
fn composed_attention(t: &[Tensor], shape: &AttnShape) -> candle_core::Result<Tensor> {
    let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let rotate = |x: &Tensor, cos: &Tensor, sin: &Tensor| -> candle_core::Result<Tensor> {
        let half = d / 2;
        let (x1, x2) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
        let (cos, sin) = (cos.unsqueeze(0)?, sin.unsqueeze(0)?);
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Tensor::cat(&[r1, r2], 2)
    };
    let mut outs = Vec::new();
    let mut start = 0;
    for &len in &shape.seq_lens {
        let rows = |x: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
            x.narrow(0, start, len)?
                .reshape((len, heads, d))?
                .transpose(0, 1)
        };
        let (cos, sin) = (t[3].narrow(0, start, len)?, t[4].narrow(0, start, len)?);
        let q = rotate(&rows(&t[0], h)?, &cos, &sin)?.contiguous()?;
        let k = rotate(&rows(&t[1], kvh)?, &cos, &sin)?.contiguous()?;
        let v = rows(&t[2], kvh)?.contiguous()?;
        let q = q.reshape((kvh, h / kvh * len, d))?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let scores = match crate::layers::attention_mask(len, 0, len, shape.window) {
            Some(m) => {
                let m = Tensor::from_vec(m, (len, len), &Device::Cpu)?;
                scores
                    .reshape((kvh, h / kvh, len, len))?
                    .broadcast_add(&m)?
                    .reshape((kvh, h / kvh * len, len))?
            }
            None => scores,
        };
        let p = crate::ops::softmax_last_dim(&scores)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let out = p.matmul(&v)?.reshape((h, len, d))?.transpose(0, 1)?;
        outs.push(out.reshape((len, h * d))?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}

#[test]
fn attention_matches_the_composed_attention() {
    // two query heads per key/value head; sequences of unequal lengths; with and without a
    // sliding window that bites
    let (h, kvh, d) = (4, 2, 6);
    for window in [None, Some(3)] {
        let shape = AttnShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            seq_lens: vec![5, 1, 7],
            window,
        };
        let n = 13;
        let (cos, sin) = (
            rand(&[n, d / 2], 20).as_tensor().detach(),
            rand(&[n, d / 2], 21).as_tensor().detach(),
        );
        same(
            &[
                rand(&[n, h * d], 22),
                rand(&[n, kvh * d], 23),
                rand(&[n, kvh * d], 24),
            ],
            |t| attention(&t[0], &t[1], &t[2], &cos, &sin, &shape),
            |t| {
                let all = [
                    t[0].clone(),
                    t[1].clone(),
                    t[2].clone(),
                    cos.clone(),
                    sin.clone(),
                ];
                composed_attention(&all, &shape)
            },
            "attention",
        );
    }
}

#[test]
fn attention_refuses_shapes_that_do_not_fit() {
    let shape = AttnShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
        seq_lens: vec![5, 7],
        window: None,
    };
    let t = |rows: usize, cols: usize| rand(&[rows, cols], 25).as_tensor().clone();
    let (cos, sin) = (t(12, 3), t(12, 3));
    assert!(attention(&t(12, 24), &t(12, 12), &t(12, 12), &cos, &sin, &shape).is_ok());
    for (q, k, v) in [
        (t(11, 24), t(12, 12), t(12, 12)),
        (t(12, 24), t(12, 24), t(12, 12)),
    ] {
        let err = attention(&q, &k, &v, &cos, &sin, &shape).map(|_| ());
        assert!(err.is_err_and(|e| e.to_string().contains("do not fit")));
    }
}

#[test]
fn silu_mul_matches_the_composed_product() {
    same(
        &[rand(&[9, 40], 7), rand(&[9, 40], 8)],
        |t| silu_mul(&t[0], &t[1]),
        |t| t[0].silu()? * &t[1],
        "silu_mul",
    );
}
