//! Fine-tuning data: OpenAI chat JSONL rendered with the base model's chat template, assistant
//! tokens marked as the targets, and examples packed into steps.

use std::path::Path;

use candle_core::{DType, Device};
use fount_model::{Batch, ChatTemplate, Message, Model, ModelFiles, Tokenizer};
use serde::Deserialize;

use crate::error::{Error, Result};

/// One tokenized conversation: `trained[i]` when token `i` is an assistant token (a target).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Whether each token is predicted in the loss.
    pub trained: Vec<bool>,
}

/// What reading a chat file found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataReport {
    /// Conversations read.
    pub examples: usize,
    /// Cut to `max_len`.
    pub truncated: usize,
    /// Assistant tokens over all examples.
    pub trained_tokens: usize,
}

/// Renders and tokenizes one conversation, marking the assistant tokens.
pub fn tokenize_chat(
    messages: &[Message],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<Example> {
    let full = template.render(messages, false)?;
    // each assistant turn's text: from after the generation prompt to the end of its message
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        // OpenAI's `weight`: an assistant message of weight 0 is context, not a target
        let weight = m.extra.get("weight").and_then(|w| w.as_i64());
        if m.role != "assistant" || weight == Some(0) {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !(through.starts_with(&before) && full.starts_with(&through)) {
            return Err(Error::Conversation(
                "the chat template does not render conversations as prefixes of each other; assistant tokens cannot be located".into(),
            ));
        }
        spans.push(before.len()..through.len());
    }
    if spans.is_empty() {
        return Err(Error::Conversation(
            "no assistant turn to learn from".into(),
        ));
    }
    let enc = tokenizer
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| Error::Conversation(format!("tokenizing: {e}")))?;
    let tokens = enc.get_ids().to_vec();
    let trained = enc
        .get_offsets()
        .iter()
        .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
        .collect();
    Ok(Example { tokens, trained })
}

#[derive(Deserialize)]
pub(super) struct ChatLine {
    pub(super) messages: Vec<Message>,
}

/// Reads OpenAI chat JSONL (`{"messages": [...]}` per line). A line that is not such an
/// object, or has no assistant turn, is an error naming the line; so is one longer than
/// `max_len` unless `truncate`.
pub fn read_chat_file(
    path: &Path,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    max_len: usize,
    truncate: bool,
) -> Result<(Vec<Example>, DataReport)> {
    let text = fs_err::read_to_string(path)?;
    let mut out = Vec::new();
    let mut report = DataReport::default();
    let mut too_long = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |reason: String| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let chat: ChatLine = serde_json::from_str(line)
            .map_err(|e| at(format!("not a {{\"messages\": [...]}} object: {e}")))?;
        let mut ex =
            tokenize_chat(&chat.messages, template, tokenizer).map_err(|e| at(e.to_string()))?;
        if ex.tokens.len() > max_len {
            if !truncate {
                too_long.push((i + 1, ex.tokens.len()));
                continue;
            }
            ex.tokens.truncate(max_len);
            ex.trained.truncate(max_len);
            report.truncated += 1;
        }
        if ex.trained.iter().skip(1).any(|&t| t) {
            report.trained_tokens += ex.trained.iter().skip(1).filter(|&&t| t).count();
            out.push(ex);
        }
    }
    if let Some(&(line, len)) = too_long.first() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "{} example(s) longer than {max_len} tokens (the first: line {line}, {len} tokens); pass --truncate to cut them",
                too_long.len()
            ),
        });
    }
    report.examples = out.len();
    if out.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "no examples".into(),
        });
    }
    Ok((out, report))
}

/// One forward pass's worth of examples, packed as separate sequences.
pub(super) fn pack(examples: &[&Example]) -> (Batch, Vec<u32>, Vec<bool>) {
    let mut batch = Batch::default();
    let (mut targets, mut mask) = (Vec::new(), Vec::new());
    for ex in examples {
        batch.push(&ex.tokens, 0);
        for i in 0..ex.tokens.len() {
            targets.push(ex.tokens.get(i + 1).copied().unwrap_or(0));
            mask.push(ex.trained.get(i + 1).copied().unwrap_or(false));
        }
    }
    (batch, targets, mask)
}

/// Groups examples (in `order`) into steps of at most `budget` tokens.
pub(super) fn steps_of<'a>(
    examples: &'a [Example],
    order: &[usize],
    budget: usize,
) -> Vec<Vec<&'a Example>> {
    let mut out = Vec::new();
    let (mut cur, mut tokens) = (Vec::new(), 0);
    for &i in order {
        let ex = &examples[i];
        if !cur.is_empty() && tokens + ex.tokens.len() > budget {
            out.push(std::mem::take(&mut cur));
            tokens = 0;
        }
        tokens += ex.tokens.len();
        cur.push(ex);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A base model with what renders and tokenizes conversations for it.
pub(super) struct ChatBase {
    pub(super) files: ModelFiles,
    pub(super) tokenizer: Tokenizer,
    pub(super) template: ChatTemplate,
    pub(super) model: Model,
}

/// Opens the model directory `dir` in f32 on the CPU (plain tensors: a frozen base holds no
/// gradients) with its tokenizer and its chat template, which it must have.
pub(super) fn open_chat_base(dir: &Path) -> Result<ChatBase> {
    let files = ModelFiles::open(dir)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_path())?;
    let template = ChatTemplate::from_dir(dir)?.ok_or_else(|| Error::Input {
        path: dir.to_path_buf(),
        reason: "has no chat template to render conversations with".into(),
    })?;
    let model = Model::load(dir, DType::F32, &Device::Cpu)?;
    Ok(ChatBase {
        files,
        tokenizer,
        template,
        model,
    })
}
