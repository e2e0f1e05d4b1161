//! `fount-tokenizer`: the one byte-level BPE trainer of fount.
//!
//! `fount data` trains a tokenizer on the curated corpus and `fount-model`'s `init` trains one
//! for a new model; both call [`train`], so both write tokenizers that Hugging Face transformers
//! reads exactly as fount does:
//!
//! 1. NFC normalisation;
//! 2. [`SPLIT_PATTERN`], Qwen2's pre-tokenizer split (contractions, letter runs with one leading
//!    non-letter, single digits, punctuation runs, newlines and spaces);
//! 3. byte-level symbols (no unknown tokens), merged by a BPE trained with the `tokenizers`
//!    crate;
//! 4. optionally a BOS token prepended to every encoding (Llama's and Mistral's families).
//!
//! ```
//! use fount_tokenizer::{train, BpeConfig};
//! # fn main() -> Result<(), fount_tokenizer::Error> {
//! let texts = ["the date 2018-06-21 is a date"; 8];
//! let cfg = BpeConfig { vocab_size: 280, ..BpeConfig::default() };
//! let tok = train(texts.iter(), &cfg)?;
//! assert!(tok.token_to_id("<|endoftext|>").is_some());
//! # Ok(()) }
//! ```

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// What training a tokenizer can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vocabulary cannot hold the byte symbols and the special tokens.
    #[error("vocab_size {vocab_size} is smaller than the 256 byte symbols plus {specials} special tokens")]
    VocabTooSmall {
        /// The vocabulary size asked for.
        vocab_size: usize,
        /// Special tokens asked for.
        specials: usize,
    },
    /// The BOS token named is not among the trained vocabulary.
    #[error("{0} missing after training")]
    MissingBos(String),
    /// The `tokenizers` crate failed.
    #[error("{0}")]
    Tokenizers(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a tokenizer is trained (the `[tokenizer]` table of a `fount data` pipeline file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BpeConfig {
    /// Target vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// Special tokens, in id order from 0; the first one separates documents in shards (EOS).
    pub special_tokens: Vec<String>,
    /// Pairs seen fewer times than this are not merged.
    pub min_frequency: u64,
    /// A special token prepended to every encoding (`<s> $A`), when the model family has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos: Option<String>,
}

impl Default for BpeConfig {
    fn default() -> Self {
        BpeConfig {
            vocab_size: 8192,
            special_tokens: vec![
                "<|endoftext|>".into(),
                "<|im_start|>".into(),
                "<|im_end|>".into(),
            ],
            min_frequency: 2,
            bos: None,
        }
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizers(e.to_string())
}

/// Trains a byte-level BPE tokenizer on `texts` with Qwen2's pre-tokenizer.
pub fn train<I, S>(texts: I, cfg: &BpeConfig) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    if cfg.vocab_size < 256 + cfg.special_tokens.len() {
        return Err(Error::VocabTooSmall {
            vocab_size: cfg.vocab_size,
            specials: cfg.special_tokens.len(),
        });
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
    if let Some(bos) = &cfg.bos {
        let id = tok
            .token_to_id(bos)
            .ok_or_else(|| Error::MissingBos(bos.clone()))?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
            .map_err(tok_err)?
            .special_tokens(vec![(bos.clone(), id)])
            .build()
            .map_err(tok_err)?;
        tok.with_post_processor(Some(post));
    }
    Ok(tok)
}

/// The pre-tokenizer of Qwen2 (and, with digits in runs of up to three, of Llama 3): contractions,
/// letter runs with one leading non-letter, single digits, punctuation runs, newlines and spaces
/// split apart, then byte-level. Hugging Face transformers rebuilds a Qwen2 model's tokenizer with
/// exactly this (and NFC), whatever `tokenizer.json` says, so a tokenizer trained with anything
/// else would be read differently there.
pub const SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
    tok.with_normalizer(Some(NFC))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), bytes.into()])));
    Ok(())
}
