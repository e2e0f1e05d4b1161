//! Text ↔ token ids through a Hugging Face `tokenizer.json` (the `tokenizers` crate), and
//! incremental detokenisation for streaming.

use std::path::Path;

use crate::error::{Error, Result};

/// A loaded tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "tokenizer.json (the Hugging Face tokenizer)",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a `tokenizers` tokenizer.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encodes `text`; `add_special_tokens` runs the post-processor (e.g. prepends BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids`, dropping special tokens when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The id of a token string (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes a token stands for: exact for byte-level BPE (GPT-2's byte-to-character map
    /// inverted) and for SentencePiece byte-fallback tokens (`<0x0A>`, `▁` as a space), the
    /// token decoded alone otherwise. A token may hold part of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        use tokenizers::DecoderWrapper;
        let Some(token) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let added = self
            .inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special);
        if added {
            return token.into_bytes();
        }
        if matches!(self.inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            if let Some(bytes) = token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
        }
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        match self.inner.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) | None => token.replace('▁', " ").into_bytes(),
            Some(_) => self
                .inner
                .decode(&[id], false)
                .unwrap_or(token)
                .into_bytes(),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The byte a character of a byte-level BPE token stands for (GPT-2's `bytes_to_unicode`,
/// inverted): printable Latin-1 bytes map to themselves, the other 68 to U+0100 upwards in byte
/// order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let code = c as u32;
    if code < 256 && printable(code) {
        return u8::try_from(code).ok();
    }
    let index = code.checked_sub(256)?;
    (0u32..256)
        .filter(|b| !printable(*b))
        .nth(index as usize)
        .and_then(|b| u8::try_from(b).ok())
}

/// Turns a stream of token ids into a stream of text pieces, emitting text only once it is
/// complete UTF-8 (a multi-byte character may span tokens) and stable under later tokens.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        TextStream::default()
    }

    /// Adds `id`; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            if let Some(delta) = text.get(prefix.len()..) {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(Some(delta));
            }
        }
        Ok(None)
    }

    /// Text held back at the end of the stream (an incomplete character is emitted as is).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text
            .get(prefix.len()..)
            .filter(|d| !d.is_empty())
            .map(str::to_string))
    }
}
