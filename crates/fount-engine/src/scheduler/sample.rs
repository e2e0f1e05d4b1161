//! Sampling one token of a sequence, streaming it, and deciding whether the sequence ends.

use std::sync::atomic::Ordering;

use fount_model::sampling::log_softmax;
use fount_model::Tokenizer;

use crate::request::{Event, FinishReason, TokenLogprob, Usage};

use super::Seq;

/// Samples the next token of `s` from its logits, streams it, and says whether `s` finished.
pub(super) fn sample_one(
    s: &mut Seq,
    logits: &mut [f32],
    tok: &Tokenizer,
    default_stops: &[u32],
    max_ctx: usize,
) -> bool {
    let logprob_of = |logits: &[f32], k: usize| -> (Vec<f32>, Vec<(u32, f32)>) {
        let mut lp = Vec::new();
        log_softmax(logits, &mut lp);
        let mut order: Vec<u32> = (0..lp.len() as u32).collect();
        let k = k.min(order.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
            order.truncate(k);
            order.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
        } else {
            order.clear();
        }
        let top = order.iter().map(|&t| (t, lp[t as usize])).collect();
        (lp, top)
    };
    let lp = s.req.logprobs.map(|k| logprob_of(logits, k));
    let next = s.sampler.sample(logits, &s.history);
    let stops = if s.req.stop_token_ids.is_empty() {
        default_stops
    } else {
        &s.req.stop_token_ids
    };
    let usage = |s: &Seq| Usage {
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated,
        cached_tokens: s.cached_tokens,
    };
    if stops.contains(&next) {
        let text = flush(s, tok);
        let _ = s.tx.send(Event::Finished {
            choice: s.choice,
            reason: FinishReason::Stop,
            text: text.0,
            usage: usage(s),
        });
        return true;
    }
    s.tokens.push(next);
    s.history.push(next);
    s.generated += 1;
    if let Some(meter) = &s.req.meter {
        meter.completion_tokens.fetch_add(1, Ordering::SeqCst);
    }
    let logprob = lp.map(|(all, top)| TokenLogprob {
        logprob: all.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top,
    });
    let (text, stopped) = match s.text.push(tok, next) {
        Ok(t) => t,
        Err(e) => {
            let _ =
                s.tx.send(Event::Error(format!("decoding token {next}: {e}")));
            return true;
        }
    };
    let _ = s.tx.send(Event::Token {
        choice: s.choice,
        token: next,
        text,
        logprob,
    });
    let length = s.generated >= s.req.max_tokens || s.tokens.len() >= max_ctx;
    if stopped || length {
        let (text, stop_in_flush) = if stopped {
            (String::new(), true)
        } else {
            flush(s, tok)
        };
        let reason = if stopped || stop_in_flush {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let _ = s.tx.send(Event::Finished {
            choice: s.choice,
            reason,
            text,
            usage: usage(s),
        });
        return true;
    }
    false
}

/// The text still held back at the end; whether it completed a stop string.
pub(super) fn flush(s: &mut Seq, tok: &Tokenizer) -> (String, bool) {
    match s.text.finish(tok) {
        Ok(t) => t,
        Err(e) => {
            let _ =
                s.tx.send(Event::Error(format!("decoding the last tokens: {e}")));
            (String::new(), false)
        }
    }
}
