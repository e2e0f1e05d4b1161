//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until it is decided, so a client never sees part of a stop string.

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
