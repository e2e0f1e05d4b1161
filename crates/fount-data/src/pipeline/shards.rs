//! Phases 4 and 5: the tokenizer (trained on the kept text, or a given one) and the kept
//! documents tokenized into train and validation shards.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use tokenizers::Tokenizer;
use xxhash_rust::xxh3::xxh3_64;

use super::outputs::{kept_texts, read_zst_jsonl};
use super::{Event, RunOptions, TokenizerSource};
use crate::error::{Error, Result};
use crate::manifest::{TokenStats, TokenizerEntry};
use crate::shard::ShardWriter;
use crate::tokenize;

/// Phase 4: trains the tokenizer on the kept documents, or copies the given one, into
/// `tok_path`.
pub(super) fn tokenizer(
    opts: &RunOptions,
    kept_files: &[PathBuf],
    tok_path: &Path,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<(Tokenizer, TokenizerEntry)> {
    let cfg = &opts.config;
    match &opts.tokenizer {
        TokenizerSource::File(p) => {
            let tok = tokenize::load(p)?;
            let entry = TokenizerEntry {
                trained: false,
                source: p.display().to_string(),
                vocab_size: tok.get_vocab_size(true) as u64,
                eos_id: tokenize::eos_id(&tok, &cfg.tokenizer.special_tokens)?,
            };
            fs_err::copy(p, tok_path)?;
            Ok((tok, entry))
        }
        TokenizerSource::Train => {
            progress(Event::Phase("train tokenizer", None));
            let texts = kept_texts(kept_files);
            let tok = tokenize::train(texts, &cfg.tokenizer)?;
            tok.save(tok_path, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            let entry = TokenizerEntry {
                trained: true,
                source: "tokenizer.json".into(),
                vocab_size: tok.get_vocab_size(true) as u64,
                eos_id: tokenize::eos_id(&tok, &cfg.tokenizer.special_tokens)?,
            };
            Ok((tok, entry))
        }
    }
}

/// Phase 5: tokenizes the kept documents, `chunk_docs` at a time on all cores, into
/// `shards/{train,validation}-NNNNN.bin` (the split by a hash of each document's id); returns
/// the counts and the shard files.
pub(super) fn write_shards(
    opts: &RunOptions,
    kept_files: &[PathBuf],
    tok: &Tokenizer,
    eos_id: u32,
    kept_total: u64,
    progress: &(dyn Fn(Event) + Sync),
) -> Result<(TokenStats, Vec<PathBuf>)> {
    let cfg = &opts.config;
    progress(Event::Phase("tokenize", Some(kept_total)));
    let shard_dir = opts.out.join("shards");
    for e in fs_err::read_dir(&shard_dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "bin" || x == "partial") {
            fs_err::remove_file(p)?;
        }
    }
    let vocab = tok.get_vocab_size(true) as u32;
    let max_tokens = cfg.shards.max_tokens_per_shard;
    let mut train = ShardWriter::new(&shard_dir, "train", vocab, eos_id, max_tokens)?;
    let mut val = ShardWriter::new(&shard_dir, "validation", vocab, eos_id, max_tokens)?;
    let val_cut = (cfg.shards.validation_fraction.clamp(0.0, 1.0) * 1_000_000.0) as u64;
    for path in kept_files {
        let mut it = read_zst_jsonl(path)?;
        loop {
            let chunk: Vec<Value> = it
                .by_ref()
                .take(cfg.chunk_docs.max(1))
                .collect::<Result<_>>()?;
            if chunk.is_empty() {
                break;
            }
            let encoded: Vec<(bool, Vec<u32>)> = chunk
                .par_iter()
                .map(|rec| {
                    let field = |k: &str| rec.get(k).and_then(Value::as_str).unwrap_or_default();
                    let is_val = xxh3_64(field("id").as_bytes()) % 1_000_000 < val_cut;
                    tokenize::encode(tok, field("text")).map(|ids| (is_val, ids))
                })
                .collect::<Result<_>>()?;
            for (is_val, ids) in &encoded {
                if *is_val {
                    val.push(ids)?;
                } else {
                    train.push(ids)?;
                }
            }
            progress(Event::Advance(encoded.len() as u64, 0));
        }
    }
    let tokens = TokenStats {
        train_docs: train.docs,
        train_tokens: train.tokens,
        validation_docs: val.docs,
        validation_tokens: val.tokens,
    };
    let mut shard_files = train.finish()?;
    shard_files.extend(val.finish()?);
    Ok((tokens, shard_files))
}
