//! Choosing the next token from logits: penalties, logit bias, temperature, top-k, top-p, min-p,
//! and a seeded random draw, so the same seed gives the same tokens.
//!
//! Order of the steps follows `transformers`' logits processors: penalties and bias act on raw
//! logits, then temperature, then the truncations (top-k, top-p, min-p), then the draw.
//! Repetition penalty (Keskar et al., 2019) covers prompt and output, as `transformers` does;
//! presence and frequency penalties cover the output, as OpenAI defines them.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How to pick tokens. The defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens seen in prompt or output (1: off).
    pub repetition_penalty: f32,
    /// Subtract from the logit of every token already in the output (OpenAI, −2…2).
    pub presence_penalty: f32,
    /// Subtract, times its count in the output, from each token's logit (OpenAI, −2…2).
    pub frequency_penalty: f32,
    /// Added to the logits of given token ids (OpenAI `logit_bias`, −100…100).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |param: &'static str, reason: String| Err(Error::Sampling { param, reason });
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return bad(
                "temperature",
                format!("{} is not between 0 and 2", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} is not in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("{} must be positive", self.repetition_penalty),
            );
        }
        for (param, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(param, format!("{v} is not between -2 and 2"));
            }
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(
                "logit_bias",
                format!("bias {b} for token {id} is not between -100 and 100"),
            );
        }
        Ok(())
    }

    /// Whether decoding is greedy.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The tokens a sequence has seen, for penalties.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// Count of each token in the output.
    output: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: std::collections::HashSet<u32>,
}

impl TokenHistory {
    /// A history starting from `prompt`.
    pub fn new(prompt: &[u32]) -> Self {
        TokenHistory {
            output: HashMap::new(),
            prompt: prompt.iter().copied().collect(),
        }
    }

    /// Records a generated token.
    pub fn push(&mut self, token: u32) {
        *self.output.entry(token).or_insert(0) += 1;
    }
}

/// Picks tokens for one sequence. Holds its RNG and scratch space, so a decode step allocates
/// nothing.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            scratch: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies penalties and logit bias to `logits` in place (the log-probabilities reported to
    /// clients are computed after this step, as OpenAI's are).
    pub fn adjust(&self, logits: &mut [f32], history: &TokenHistory) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let penalise = |l: &mut f32| {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                }
            };
            for &t in history.prompt.iter().chain(
                history
                    .output
                    .keys()
                    .filter(|t| !history.prompt.contains(t)),
            ) {
                if let Some(l) = logits.get_mut(t as usize) {
                    penalise(l);
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &history.output {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }

    /// Chooses the next token from `logits` (one row of the model's output), which it modifies.
    pub fn sample(&mut self, logits: &mut [f32], history: &TokenHistory) -> u32 {
        self.adjust(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        // Softmax over the survivors.
        let max = cand.first().map_or(0.0, |c| c.0);
        let mut sum = 0.0f32;
        for c in cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        for c in cand.iter_mut() {
            c.0 /= sum;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.0;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = cand.first().map_or(0.0, |c| c.0) * p.min_p;
            let keep = cand.iter().take_while(|c| c.0 >= floor).count();
            cand.truncate(keep.max(1));
        }
        let total: f32 = cand.iter().map(|c| c.0).sum();
        let mut r = self.rng.random::<f32>() * total;
        for c in cand.iter() {
            r -= c.0;
            if r <= 0.0 {
                return c.1;
            }
        }
        cand.last().map_or(0, |c| c.1)
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row, into `out` (reused across steps).
pub fn log_softmax(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    out.clear();
    out.extend(logits.iter().map(|&l| l - lse));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn greedy_takes_argmax_first_on_ties() {
        let mut s = sampler(SamplingParams::default());
        let mut l = vec![1.0, 3.0, 3.0, -1.0];
        assert_eq!(s.sample(&mut l, &TokenHistory::default()), 1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..64)
                .map(|_| s.sample(&mut logits.clone(), &TokenHistory::default()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_min_p_one_is_greedy() {
        let logits: Vec<f32> = vec![0.1, 2.0, 1.9, -3.0];
        for p in [
            SamplingParams {
                temperature: 1.5,
                top_k: 1,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.5,
                min_p: 1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.5,
                top_p: 0.01,
                ..Default::default()
            },
        ] {
            let mut s = sampler(p);
            for _ in 0..20 {
                assert_eq!(s.sample(&mut logits.clone(), &TokenHistory::default()), 1);
            }
        }
    }

    #[test]
    fn top_k_never_leaves_the_top_set() {
        let logits: Vec<f32> = vec![5.0, 4.9, 4.8, 0.0, 0.0, 0.0];
        let mut s = sampler(SamplingParams {
            temperature: 2.0,
            top_k: 3,
            seed: 3,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&mut logits.clone(), &TokenHistory::default()) < 3);
        }
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: vec![(3, -100.0)],
            ..Default::default()
        });
        let mut h = TokenHistory::new(&[0]);
        h.push(1);
        h.push(1);
        let mut l = vec![4.0, -4.0, 1.0, 9.0];
        s.adjust(&mut l, &h);
        // token 0: prompt only → 4 / 2; token 1: output twice → (-4 · 2) − 0.5 − 0.25·2
        assert_eq!(l, vec![2.0, -9.0, 1.0, -91.0]);
    }

    #[test]
    fn invalid_parameters_are_named() {
        let e = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .err();
        assert!(matches!(e, Some(Error::Sampling { param: "top_p", .. })));
        let e = Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .err();
        assert!(matches!(
            e,
            Some(Error::Sampling {
                param: "temperature",
                ..
            })
        ));
    }
}
