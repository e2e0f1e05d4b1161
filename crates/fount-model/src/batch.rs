//! The packed batch every forward takes: the new tokens of all sequences concatenated, with
//! their absolute positions, and how many of them belong to each sequence.

use crate::error::{Error, Result};

/// New tokens of several sequences, packed without padding.
///
/// Sequence `i` owns the `seq_lens[i]` tokens after those of sequences `0..i`. Its keys and
/// values before these tokens live in the [`KvView`](crate::KvView) passed beside the batch, at
/// index `i`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `[N]`.
    pub tokens: Vec<u32>,
    /// Absolute position of each token (for RoPE), `[N]`.
    pub positions: Vec<u32>,
    /// Tokens per sequence; sums to `N`.
    pub seq_lens: Vec<usize>,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last token of each sequence (decoding): `(sequences, vocab)`.
    Last,
    /// Every token (training, prompt log-probabilities): `(tokens, vocab)`.
    All,
}

impl Batch {
    /// A batch of one sequence whose new tokens start at position `start`.
    pub fn single(tokens: &[u32], start: usize) -> Self {
        let mut b = Batch::default();
        b.push(tokens, start);
        b
    }

    /// Appends a sequence whose new tokens start at position `start`.
    pub fn push(&mut self, tokens: &[u32], start: usize) {
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((start..start + tokens.len()).map(|p| p as u32));
        self.seq_lens.push(tokens.len());
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.seq_lens.clear();
    }

    /// Number of packed tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the batch has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks that the parts agree.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        if self.tokens.is_empty() || self.seq_lens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if self.positions.len() != self.tokens.len() {
            return Err(Error::Batch(format!(
                "{} tokens but {} positions",
                self.tokens.len(),
                self.positions.len()
            )));
        }
        let total: usize = self.seq_lens.iter().sum();
        if total != self.tokens.len() {
            return Err(Error::Batch(format!(
                "sequence lengths sum to {total}, but the batch has {} tokens",
                self.tokens.len()
            )));
        }
        if let Some(i) = self.seq_lens.iter().position(|&l| l == 0) {
            return Err(Error::Batch(format!("sequence {i} has no new tokens")));
        }
        if let Some(&t) = self.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::Batch(format!(
                "token id {t} is outside the vocabulary of {vocab_size}"
            )));
        }
        Ok(())
    }
}
