//! Generation for one sequence: prefill the prompt, then decode token by token into a
//! contiguous [`KvCache`], streaming text as it becomes final. `fount generate` runs this; the
//! engine batches many sequences with the same pieces (sampler, text stream, stop matcher).

use std::time::{Duration, Instant};

use crate::batch::{Batch, Logits};
use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams, TokenHistory};
use crate::stop::TextOutput;
use crate::tokenizer::Tokenizer;

/// What ends a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context, was reached.
    Length,
}

/// Options of [`generate`].
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token ids that end generation (not emitted).
    pub stop_ids: Vec<u32>,
    /// Strings that end generation (not emitted).
    pub stop_strings: Vec<String>,
    /// How to choose tokens.
    pub sampling: SamplingParams,
    /// A LoRA adapter applied to every token (PEFT format, [`crate::LoraAdapter::load`]).
    pub adapter: Option<std::sync::Arc<crate::LoraAdapter>>,
}

/// What a generation produced, with its timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated token ids (an EOS token that ended it is not included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Time for the prompt's forward and the first token.
    pub prefill: Duration,
    /// Time for the remaining tokens.
    pub decode: Duration,
}

/// Generates from `prompt`, calling `on_text` with each piece of final text.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let max_ctx = model.config().max_position_embeddings;
    if prompt.len() >= max_ctx {
        return Err(Error::ContextLength {
            tokens: prompt.len() + 1,
            max: max_ctx,
        });
    }
    let cfg = model.config();
    let mut cache = KvCache::new(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        model.dtype(),
        model.device(),
    );
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut history = TokenHistory::new(prompt);
    let mut text = TextOutput::new(&opts.stop_strings);
    let budget = opts.max_tokens.min(max_ctx - prompt.len());

    let start = Instant::now();
    let mut batch = Batch::single(prompt, 0);
    let mut tokens = Vec::with_capacity(budget);
    let mut prefill = Duration::ZERO;
    let mut finish = FinishReason::Length;
    let mut stopped_by_string = false;
    while tokens.len() < budget {
        let out = match &opts.adapter {
            None => model.forward(&batch, &mut cache, Logits::Last)?,
            Some(a) => {
                let mut lora = crate::LoraBatch::none();
                lora.push(0..batch.len(), a.clone());
                model.forward_lora(&batch, &mut cache, Logits::Last, &lora, false)?
            }
        };
        let mut logits = out.logits.squeeze(0)?.to_vec1::<f32>()?;
        let next = sampler.sample(&mut logits, &history);
        if tokens.is_empty() {
            prefill = start.elapsed();
        }
        if opts.stop_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        history.push(next);
        let (piece, stopped) = text.push(tokenizer, next)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stopped {
            finish = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }
        let position = prompt.len() + tokens.len() - 1;
        batch.clear();
        batch.push(&[next], position);
    }
    if !stopped_by_string {
        // Flush what the text stream and the stop matcher still hold (an incomplete
        // character, a possible stop-string prefix); it may yet complete a stop string.
        let (rest, stopped) = text.finish(tokenizer)?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        if stopped {
            finish = FinishReason::Stop;
        }
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        decode: start.elapsed().saturating_sub(prefill),
        tokens,
        finish,
        prefill,
    })
}
