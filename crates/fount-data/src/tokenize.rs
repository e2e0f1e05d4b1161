//! Tokenizer training: a byte-level BPE (Qwen2's pre-tokenizer, no unknown tokens) trained on
//! the curated text by `fount-tokenizer` and written as an HF `tokenizer.json`.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// How the tokenizer is trained: `fount-tokenizer`'s settings.
pub use fount_tokenizer::BpeConfig as TokenizerConfig;

/// Trains a byte-level BPE tokenizer on texts.
pub use fount_tokenizer::train;

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
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
