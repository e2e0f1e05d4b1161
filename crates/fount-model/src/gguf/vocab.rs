//! A GGUF file's vocabulary (`tokenizer.ggml.*`) as a `tokenizers` tokenizer.
//!
//! - Byte-level BPE (`gpt2`: Llama 3, Qwen2, fount's own files) goes through candle's
//!   conversion.
//! - SentencePiece (`llama`: Llama 2, Mistral, TinyLlama) becomes what Hugging Face's fast Llama
//!   tokenizer is: a BPE model whose merges are every pair of pieces that make a piece, ranked by
//!   the merged piece's score, with byte fallback; spaces as `▁` and one prepended to each run of
//!   text; `<s>` added by the post-processor when `add_bos_token` says so. llama.cpp's
//!   SentencePiece tokenizer merges the adjacent pair whose piece scores highest, so both give the
//!   same tokens wherever scores are distinct (SentencePiece's BPE gives every piece its own).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use super::Gguf;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// SentencePiece's piece types, as `tokenizer.ggml.token_type` stores them.
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const BYTE: i64 = 6;

impl Gguf {
    /// The tokenizer in the file's metadata (`tokenizer.ggml.*`): byte-level BPE (`gpt2`) and
    /// SentencePiece (`llama`) vocabularies convert; others need `--tokenizer`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        let inner = match self.string("tokenizer.ggml.model").unwrap_or("none") {
            "gpt2" => tokenizers::Tokenizer::from_gguf(&self.content())
                .map_err(|e| self.tokenizer_error(&e.to_string()))?,
            "llama" => self.sentencepiece()?,
            kind => {
                return Err(self.tokenizer_error(&format!(
                    "tokenizer.ggml.model is {kind:?}; fount converts byte-level BPE (\"gpt2\") \
                     and SentencePiece (\"llama\") vocabularies; give a tokenizer.json with \
                     --tokenizer"
                )))
            }
        };
        Ok(Tokenizer::from_inner(inner))
    }

    fn tokenizer_error(&self, reason: &str) -> Error {
        Error::Tokenizer(format!("{}: {reason}", self.path.display()))
    }

    /// A numeric array of `len` entries under `key`, if the file has it.
    fn numbers(
        &self,
        key: &str,
        len: usize,
        num: fn(&Value) -> Option<f64>,
    ) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let values = v.to_vec().map_err(|_| self.bad_meta(key, "not an array"))?;
        if values.len() != len {
            return Err(self.bad_meta(key, &format!("{} entries for {len} tokens", values.len())));
        }
        values
            .iter()
            .map(|x| num(x).ok_or_else(|| self.bad_meta(key, "not a number")))
            .collect::<Result<Vec<f64>>>()
            .map(Some)
    }

    fn flag(&self, key: &str, default: bool) -> bool {
        match self.get(key) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        }
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = llama`) as Hugging Face's fast Llama
    /// tokenizer.
    fn sentencepiece(&self) -> Result<tokenizers::Tokenizer> {
        let key = "tokenizer.ggml.tokens";
        let tokens: Vec<String> = self
            .get(key)
            .ok_or_else(|| self.bad_meta(key, "missing"))?
            .to_vec()
            .map_err(|_| self.bad_meta(key, "not an array"))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.bad_meta(key, "not strings"))
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        let scores = self
            .numbers("tokenizer.ggml.scores", n, |v| {
                v.to_f32().ok().map(f64::from)
            })?
            .unwrap_or_else(|| (0..n).map(|i| -(i as f64)).collect());
        let types = self
            .numbers("tokenizer.ggml.token_type", n, |v| {
                v.to_i32().ok().map(f64::from)
            })?
            .map(|t| t.into_iter().map(|x| x as i64).collect::<Vec<_>>())
            .unwrap_or_else(|| vec![1; n]);
        let token_of = |key: &str| -> Result<Option<String>> {
            Ok(self.opt_usize(key)?.and_then(|id| tokens.get(id).cloned()))
        };

        // the merges: every split of a piece into two pieces, the best-scoring piece's first
        let mut ids: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.as_str()).or_insert(i as u32);
        }
        let mergeable = |i: usize| !matches!(types[i], UNKNOWN | CONTROL | BYTE);
        let mut merges: Vec<(usize, &str, &str)> = Vec::new();
        for (i, piece) in tokens.iter().enumerate().filter(|(i, _)| mergeable(*i)) {
            for (cut, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(cut);
                let known = |s: &str| ids.get(s).is_some_and(|&j| mergeable(j as usize));
                if known(left) && known(right) {
                    merges.push((i, left, right));
                }
            }
        }
        merges.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]).then(a.0.cmp(&b.0)));
        let merges = merges
            .into_iter()
            .map(|(_, l, r)| (l.to_string(), r.to_string()))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = token_of("tokenizer.ggml.unknown_token_id")? {
            bpe = bpe.unk_token(unk);
        }
        let bpe = bpe
            .build()
            .map_err(|e| self.tokenizer_error(&e.to_string()))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);

        let space_prefix = self.flag("tokenizer.ggml.add_space_prefix", true);
        let replace = |from: &str, to: &str| {
            Replace::new(from, to).map_err(|e| self.tokenizer_error(&e.to_string()))
        };
        let mut normalizers = Vec::new();
        if space_prefix {
            normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
        }
        normalizers.push(NormalizerWrapper::Replace(replace(" ", "▁")?));
        tok.with_normalizer(Some(NormalizerSequence::new(normalizers)))
            .map_err(|e| self.tokenizer_error(&e.to_string()))?;
        let mut decoders = vec![
            DecoderWrapper::Replace(replace("▁", " ")?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        if space_prefix {
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));

        // control and unknown pieces are special; user-defined ones are matched as written
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, UNKNOWN | CONTROL | USER_DEFINED))
            .map(|(s, t)| AddedToken::from(s.clone(), *t != USER_DEFINED).normalized(false))
            .collect();
        tok.add_tokens(added)
            .map_err(|e| self.tokenizer_error(&e.to_string()))?;

        let mut ends = Vec::new();
        for (name, id_key, add_key, default) in [
            (
                "bos",
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.add_bos_token",
                true,
            ),
            (
                "eos",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_eos_token",
                false,
            ),
        ] {
            let (Some(id), true) = (self.opt_usize(id_key)?, self.flag(add_key, default)) else {
                continue;
            };
            let text = tokens
                .get(id)
                .ok_or_else(|| self.bad_meta(id_key, &format!("{id} is past the vocabulary")))?;
            let token = SpecialToken::new(name.into(), vec![id as u32], vec![text.clone()])
                .map_err(|e| self.tokenizer_error(&e.to_string()))?;
            ends.push((name, token));
        }
        let has = |n: &str| ends.iter().any(|(name, _)| *name == n);
        let mut single = Vec::new();
        single.extend(has("bos").then_some("bos"));
        single.push("$A");
        single.extend(has("eos").then_some("eos"));
        let specials: Vec<SpecialToken> = ends.into_iter().map(|(_, t)| t).collect();
        let template = TemplateProcessing::builder()
            .try_single(single)
            .map_err(|e| self.tokenizer_error(&e))?
            .special_tokens(specials)
            .build()
            .map_err(|e| self.tokenizer_error(&e.to_string()))?;
        tok.with_post_processor(Some(template));
        Ok(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file with no tensors and `meta` as its metadata.
    fn file(dir: &std::path::Path, meta: Vec<(&str, Value)>) -> Gguf {
        let path = dir.join("vocab.gguf");
        let meta: Vec<(String, Value)> = meta.into_iter().map(|(k, v)| (k.into(), v)).collect();
        let mut f = fs_err::File::create(&path).unwrap();
        super::super::write(&mut f, &meta, &[], |_| Ok(Vec::new())).unwrap();
        Gguf::open(&path).unwrap()
    }

    fn strings(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    const PIECES: [&str; 9] = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁a", "▁ab"];

    #[test]
    fn pieces_merge_best_score_first_and_unknown_characters_fall_back_to_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut pieces: Vec<String> = PIECES.iter().map(|s| s.to_string()).collect();
        pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let n = pieces.len();
        // "▁a" outscores "ab", so "▁ab" is reached through "▁a" + "b"; every byte is a piece
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -5.0, -4.0, -6.0];
        let scores = (0..n).map(|i| Value::F32(*scores.get(i).unwrap_or(&-9.0)));
        let types = (0..n).map(|i| {
            Value::I32(
                [2, 3, 3]
                    .get(i)
                    .copied()
                    .unwrap_or(if i < 9 { 1 } else { 6 }),
            )
        });
        let g = file(
            dir.path(),
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(pieces.iter().map(|s| Value::String(s.clone())).collect()),
                ),
                ("tokenizer.ggml.scores", Value::Array(scores.collect())),
                ("tokenizer.ggml.token_type", Value::Array(types.collect())),
                ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
                ("tokenizer.ggml.bos_token_id", Value::U32(1)),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ],
        );
        let tok = g.tokenizer().unwrap();
        // BOS, then "▁ab"; "é" is two bytes; "</s>" is parsed as the special token
        assert_eq!(
            tok.encode("ab é</s>", true).unwrap(),
            vec![1, 8, 3, 9 + 0xC3, 9 + 0xA9, 2]
        );
        assert_eq!(tok.encode("ab", false).unwrap(), vec![8]);
        assert_eq!(
            tok.decode(&[1, 8, 3, 9 + 0xC3, 9 + 0xA9, 2], true).unwrap(),
            "ab é"
        );
    }

    #[test]
    fn a_vocabulary_that_does_not_add_up_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let g = file(
            dir.path(),
            vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.tokens", strings(&PIECES)),
                (
                    "tokenizer.ggml.scores",
                    Value::Array(vec![Value::F32(0.0); 3]),
                ),
            ],
        );
        let e = g.tokenizer().unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.ggml.scores") && e.contains("3 entries for 9 tokens"),
            "{e}"
        );

        let g = file(
            dir.path(),
            vec![("tokenizer.ggml.model", Value::String("bert".into()))],
        );
        let e = g.tokenizer().unwrap_err().to_string();
        assert!(e.contains("\"bert\"") && e.contains("--tokenizer"), "{e}");

        let g = file(
            dir.path(),
            vec![("tokenizer.ggml.model", Value::String("llama".into()))],
        );
        let e = g.tokenizer().unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.ggml.tokens") && e.contains("missing"),
            "{e}"
        );
    }
}
