//! Measuring an adapter: loss and token accuracy on held-out examples, and exact-match accuracy
//! of greedy answers.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use fount_model::{
    GenerateOptions, Logits, LoraAdapter, LoraBatch, Model, NoCache, SamplingParams,
};

use super::data::{open_chat_base, pack, steps_of, ChatBase, ChatLine, Example};
use crate::error::{Error, Result};
use crate::loss::{correct_tokens, cross_entropy};

/// Validation loss and token accuracy on held-out examples.
pub fn evaluate(
    model: &Model,
    adapter: Option<&Arc<LoraAdapter>>,
    examples: &[Example],
    budget: usize,
) -> Result<(f64, f64)> {
    let order: Vec<usize> = (0..examples.len()).collect();
    let (mut loss_sum, mut counted, mut correct) = (0.0, 0usize, 0usize);
    for group in steps_of(examples, &order, budget) {
        let (batch, targets, mask) = pack(&group);
        let mut lora = LoraBatch::none();
        if let Some(a) = adapter {
            lora.push(0..batch.len(), a.clone());
        }
        let out = model.forward_lora(&batch, &mut NoCache, Logits::All, &lora, false)?;
        let logits = out.logits.detach();
        let (loss, n) = cross_entropy(&logits, &targets, &mask)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * n as f64;
        counted += n;
        correct += correct_tokens(&logits, &targets, &mask)?;
    }
    if counted == 0 {
        return Err(Error::Batch("no held-out tokens to evaluate".into()));
    }
    Ok((loss_sum / counted as f64, correct as f64 / counted as f64))
}

/// Exact-match accuracy of greedy answers on a chat file: for each conversation, the messages
/// before its last assistant turn are the prompt and that turn's content the expected answer.
/// Returns (correct, total).
pub fn chat_accuracy(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &Path,
    limit: usize,
) -> Result<(usize, usize)> {
    let ChatBase {
        files,
        tokenizer,
        template,
        model,
    } = open_chat_base(model_dir)?;
    let adapter = match adapter {
        Some(dir) => Some(Arc::new(LoraAdapter::load(
            dir,
            model.config(),
            DType::F32,
            &Device::Cpu,
        )?)),
        None => None,
    };
    let stop_ids = files.generation_config()?.eos_token_ids;
    let text = fs_err::read_to_string(data)?;
    let (mut correct, mut total) = (0, 0);
    for (i, line) in text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(limit)
        .enumerate()
    {
        let chat: ChatLine = serde_json::from_str(line).map_err(|e| Error::Data {
            path: data.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        let Some(last) = chat.messages.iter().rposition(|m| m.role == "assistant") else {
            continue;
        };
        let expected = chat.messages[last]
            .content
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        let prompt = template.render(&chat.messages[..last], true)?;
        let ids = tokenizer.encode(&prompt, false)?;
        let opts = GenerateOptions {
            max_tokens: tokenizer.encode(&expected, false)?.len() + 8,
            stop_ids: stop_ids.clone(),
            stop_strings: Vec::new(),
            sampling: SamplingParams::default(),
            adapter: adapter.clone(),
        };
        let mut answer = String::new();
        fount_model::generate(&model, &tokenizer, &ids, &opts, |t| answer.push_str(t))?;
        total += 1;
        if answer.trim() == expected {
            correct += 1;
        }
    }
    Ok((correct, total))
}
