//! Tokenizer training: a byte-level BPE (Qwen2's pre-tokenizer, no unknown tokens) trained on
//! the curated text with the `tokenizers` crate and written as an HF `tokenizer.json`.

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// How the tokenizer is trained.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Target vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// Special tokens; the first one separates documents in shards (EOS).
    pub special_tokens: Vec<String>,
    /// Pairs seen fewer times than this are not merged.
    pub min_frequency: u64,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            vocab_size: 8192,
            special_tokens: vec![
                "<|endoftext|>".into(),
                "<|im_start|>".into(),
                "<|im_end|>".into(),
            ],
            min_frequency: 2,
        }
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Trains a byte-level BPE tokenizer on `texts`.
pub fn train<I, S>(texts: I, cfg: &TokenizerConfig) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if cfg.vocab_size < 256 + cfg.special_tokens.len() {
        return Err(Error::Tokenizer(format!(
            "vocab_size {} is smaller than the 256 byte symbols plus {} special tokens",
            cfg.vocab_size,
            cfg.special_tokens.len()
        )));
    }
    let specials: Vec<AddedToken> = cfg
        .special_tokens
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(cfg.vocab_size)
        .min_frequency(cfg.min_frequency)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    pre_tokenize(&mut tok).map_err(tok_err)?;
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tok.train(&mut trainer, texts).map_err(tok_err)?;
    Ok(tok)
}

/// Loads a `tokenizer.json`.
pub fn load(path: &std::path::Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::Tokenizer(format!(
            "{}: no such file",
            path.display()
        )));
    }
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// The EOS id: the first of `candidates` the tokenizer knows.
pub fn eos_id(tok: &Tokenizer, candidates: &[String]) -> Result<u32> {
    const FALLBACKS: [&str; 5] = [
        "<|endoftext|>",
        "</s>",
        "<|end_of_text|>",
        "<|im_end|>",
        "<eos>",
    ];
    candidates
        .iter()
        .map(String::as_str)
        .chain(FALLBACKS)
        .find_map(|t| tok.token_to_id(t))
        .ok_or_else(|| Error::Tokenizer("the tokenizer has no end-of-text token".into()))
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode_fast(text, false)
        .map_err(tok_err)?
        .get_ids()
        .to_vec())
}

/// The pre-tokenizer of Qwen2 (and, with digits in runs of up to three, of Llama 3): contractions,
/// letter runs with one leading non-letter, single digits, punctuation runs, newlines and spaces
/// split apart, then byte-level. Hugging Face transformers rebuilds a Qwen2 model's tokenizer with
/// exactly this (and NFC), whatever `tokenizer.json` says, so a tokenizer trained with anything
/// else would be read differently there.
const SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// NFC, then [`SPLIT_PATTERN`], then byte-level without its own regex.
fn pre_tokenize(tok: &mut Tokenizer) -> std::result::Result<(), tokenizers::Error> {
    use tokenizers::normalizers::unicode::NFC;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::SplitDelimiterBehavior;
    let split = Split::new(
        SplitPattern::Regex(SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )?;
    let bytes = ByteLevel::default()
        .add_prefix_space(false)
        .use_regex(false);
    tok.with_normalizer(Some(NFC));
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), bytes.into()])));
    Ok(())
}
