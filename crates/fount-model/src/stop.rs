//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until it is decided, so a client never sees part of a stop string.

use crate::error::Result;
use crate::tokenizer::{TextStream, Tokenizer};

/// Watches streamed text for any of a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to do with the text seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStep {
    /// Emit this text (possibly empty: all of it is held back).
    Emit(String),
    /// A stop string matched: emit this text (what came before it) and stop.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stops.is_empty() {
            return StopStep::Emit(text.to_string());
        }
        self.pending.push_str(text);
        // The earliest complete match wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopStep::Stop(before);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if tail.len() > hold && s.starts_with(tail) {
                    hold = tail.len();
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopStep::Emit(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_possible_stop_and_releases_it() {
        let mut m = StopMatcher::new(&["END".into()]);
        assert_eq!(m.push("abc E"), StopStep::Emit("abc ".into()));
        assert_eq!(m.push("N"), StopStep::Emit("".into()));
        assert_eq!(m.push("x"), StopStep::Emit("ENx".into()));
        assert_eq!(m.push("yyEN"), StopStep::Emit("yy".into()));
        assert_eq!(m.push("D and more"), StopStep::Stop("".into()));
    }

    #[test]
    fn earliest_match_wins_and_text_before_is_kept() {
        let mut m = StopMatcher::new(&["\n\n".into(), "xy".into()]);
        assert_eq!(m.push("hello xy\n\n"), StopStep::Stop("hello ".into()));
        let mut m = StopMatcher::new(&["é!".into()]);
        assert_eq!(m.push("caf"), StopStep::Emit("caf".into()));
        assert_eq!(m.push("é"), StopStep::Emit("".into()));
        assert_eq!(m.finish(), "é");
    }
}

/// Generated token ids to final text: incremental decoding ([`TextStream`]) followed by a
/// [`StopMatcher`], so what it returns is never part of a stop string or an incomplete character.
#[derive(Debug, Clone, Default)]
pub struct TextOutput {
    stream: TextStream,
    stops: StopMatcher,
}

impl TextOutput {
    /// Output that ends at any of `stops`.
    pub fn new(stops: &[String]) -> Self {
        TextOutput {
            stream: TextStream::new(),
            stops: StopMatcher::new(stops),
        }
    }

    /// Adds a token: the text now final, and whether a stop string ended the output.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<(String, bool)> {
        match self.stream.push(tokenizer, id)? {
            None => Ok((String::new(), false)),
            Some(piece) => Ok(step(self.stops.push(&piece))),
        }
    }

    /// At the end of generation: everything still held back, and whether it completed a stop
    /// string (then only the text before it is returned).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<(String, bool)> {
        let held = self.stream.finish(tokenizer)?.unwrap_or_default();
        Ok(match self.stops.push(&held) {
            StopStep::Emit(mut t) => {
                t.push_str(&self.stops.finish());
                (t, false)
            }
            StopStep::Stop(t) => (t, true),
        })
    }
}

fn step(s: StopStep) -> (String, bool) {
    match s {
        StopStep::Emit(t) => (t, false),
        StopStep::Stop(t) => (t, true),
    }
}
