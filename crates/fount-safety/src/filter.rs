//! Applying a policy to text: redacting personal data, and the output filter a stream runs its
//! generated text through.
//!
//! A stream never sends text it would have to take back. It holds back only the end of the text
//! that may begin a match: for terms, an end that begins a term (`kil` while `kill` is a term);
//! for personal data, the trailing run of the characters it is written with (`jane.doe@exa`,
//! `+1 415 `). Clean prose leaves a word at a time. Patterns, whose matches have no known
//! alphabet, make it hold back the last `hold_chars` characters; nothing ever waits longer than
//! that, so a match up to that length is seen whole before any of it leaves. When a blocking category matches, the text before the match is released and the
//! answer ends (`finish_reason: "content_filter"`); with `redact_pii`, personal data is replaced
//! by its placeholder before release.

use crate::policy::{Action, Decision, Side};
use crate::rules::{pii_placeholder, Hit, Rules};

/// What the filter asks of the classifiers.
pub trait Matcher {
    /// Every match in `text`.
    fn hits(&self, text: &str) -> Vec<Hit>;
    /// How many bytes at the end of `text` may begin a match still being generated; `None`
    /// when that cannot be told (patterns): the filter then holds back its fixed amount.
    fn pending(&self, text: &str) -> Option<usize>;
}

/// Rule sets (the operator's, a tenant's) and whether personal data counts.
#[derive(Debug, Clone)]
pub struct RuleMatcher<'a> {
    /// The rules, the first also looking for personal data when `pii`.
    pub rules: Vec<&'a Rules>,
    /// Look for personal data.
    pub pii: bool,
}

impl Matcher for RuleMatcher<'_> {
    fn hits(&self, text: &str) -> Vec<Hit> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            r.scan(text, self.pii && i == 0, &mut out);
        }
        out
    }

    fn pending(&self, text: &str) -> Option<usize> {
        if self.rules.iter().any(|r| r.has_patterns()) {
            return None;
        }
        let terms = self
            .rules
            .iter()
            .map(|r| r.pending(text))
            .max()
            .unwrap_or(0);
        let pii = if self.pii { pii_pending(text) } else { 0 };
        Some(terms.max(pii))
    }
}

/// Characters personal data is written with: e-mail addresses, phone numbers, IP addresses and
/// resident IDs are ASCII letters, digits and these.
fn pii_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._%+-@:()[]".contains(c)
}

/// How many bytes at the end of `text` may be part of personal data still being written: the
/// trailing run of the characters it is written with, spaces included where they separate digit
/// groups (`+1 415 555 0100`) or may be about to. Looks back 256 characters at most (the filter
/// caps what it holds anyway).
fn pii_pending(text: &str) -> usize {
    let tail: Vec<(usize, char)> = text.char_indices().rev().take(256).collect();
    let digitish =
        |c: Option<&(usize, char)>| c.is_some_and(|(_, c)| c.is_ascii_digit() || ")+".contains(*c));
    let mut start = text.len();
    for (k, &(i, c)) in tail.iter().enumerate() {
        let left = tail.get(k + 1);
        let right = k.checked_sub(1).and_then(|r| tail.get(r));
        let keep = pii_char(c)
            || (c == ' '
                && digitish(left)
                && (right.is_none()
                    || right.is_some_and(|(_, r)| r.is_ascii_digit() || *r == '(')));
        if !keep {
            break;
        }
        start = i;
    }
    text.len() - start
}

/// `text` with every personal-data hit replaced by its placeholder (`<EMAIL>`, `<PHONE>`, …).
pub fn redact(text: &str, hits: &[Hit]) -> String {
    redact_range(text, 0, text.len(), hits)
}

/// `text[from..to]` with the personal-data hits inside it replaced.
fn redact_range(text: &str, from: usize, to: usize, hits: &[Hit]) -> String {
    let mut spans: Vec<(usize, usize, &str)> = hits
        .iter()
        .filter(|h| h.start >= from && h.end <= to)
        .filter_map(|h| pii_placeholder(&h.rule).map(|p| (h.start, h.end, p)))
        .collect();
    spans.sort_by_key(|&(s, e, _)| (s, std::cmp::Reverse(e)));
    let mut out = String::with_capacity(to - from);
    let mut at = from;
    for (s, e, placeholder) in spans {
        if s < at {
            continue;
        }
        out.push_str(&text[at..s]);
        out.push_str(placeholder);
        at = e;
    }
    out.push_str(&text[at..to]);
    out
}

/// What the filter lets through after a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Text the client may see now (possibly empty).
    pub text: String,
    /// Set when a blocking category matched: the answer ends here.
    pub blocked: Option<Decision>,
}

/// The output side of a policy over one generated answer.
#[derive(Debug, Clone)]
pub struct OutputFilter {
    text: String,
    /// Bytes of `text` released.
    sent: usize,
    hold: usize,
    blocked: bool,
    /// Categories and rules that matched a logging category, for the audit record.
    logged: Option<Decision>,
}

impl OutputFilter {
    /// A filter that holds back `hold_chars` characters.
    pub fn new(hold_chars: usize) -> OutputFilter {
        OutputFilter {
            text: String::new(),
            sent: 0,
            hold: hold_chars.max(1),
            blocked: false,
            logged: None,
        }
    }

    /// Adds generated text; `m` finds the matches. Returns what may be sent.
    pub fn push(&mut self, piece: &str, side: &Side, m: &dyn Matcher) -> Release {
        self.text.push_str(piece);
        self.release(false, side, m)
    }

    /// The end of the answer: everything left is checked and released.
    pub fn finish(&mut self, side: &Side, m: &dyn Matcher) -> Release {
        self.release(true, side, m)
    }

    /// The whole answer as generated (before redaction).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// What matched a logging category, if anything did.
    pub fn logged(&self) -> Option<&Decision> {
        self.logged.as_ref()
    }

    fn release(&mut self, end: bool, side: &Side, m: &dyn Matcher) -> Release {
        if self.blocked {
            return Release {
                text: String::new(),
                blocked: None,
            };
        }
        // matches may reach back into released text by up to `hold` characters
        let from = back_chars(&self.text, self.sent, self.hold);
        let hits: Vec<Hit> = m
            .hits(&self.text[from..])
            .into_iter()
            .map(|h| Hit {
                start: h.start + from,
                end: h.end + from,
                ..h
            })
            .collect();
        let decision = side.decide(&hits, None);
        match decision.action {
            Action::Block => {
                let blocking: Vec<&Hit> = hits
                    .iter()
                    .filter(|h| decision.categories.contains(&h.category))
                    .collect();
                let cut = blocking
                    .iter()
                    .map(|h| h.start)
                    .min()
                    .unwrap_or(self.sent)
                    .max(self.sent);
                let text = self.take(cut, side, &hits);
                self.blocked = true;
                return Release {
                    text,
                    blocked: Some(decision),
                };
            }
            Action::Log => match &mut self.logged {
                None => self.logged = Some(decision),
                Some(l) => {
                    l.categories.extend(decision.categories);
                    l.categories.sort();
                    l.categories.dedup();
                    l.rules.extend(decision.rules);
                    l.rules.sort();
                    l.rules.dedup();
                }
            },
            Action::Allow => {}
        }
        let len = self.text.len();
        // never more than `hold` characters wait
        let cap = back_chars(&self.text, len, self.hold);
        let mut upto = match (end, m.pending(&self.text[self.sent..])) {
            (true, _) => len,
            (false, Some(pending)) => (len - pending).max(cap),
            (false, None) => cap,
        }
        .max(self.sent);
        if side.redact_pii {
            // never cut personal data in two
            for h in hits.iter().filter(|h| pii_placeholder(&h.rule).is_some()) {
                if h.start < upto && h.end > upto {
                    upto = h.start.max(self.sent);
                }
            }
        }
        Release {
            text: self.take(upto, side, &hits),
            blocked: None,
        }
    }

    /// Releases `text[sent..upto]`, redacted as the side asks.
    fn take(&mut self, upto: usize, side: &Side, hits: &[Hit]) -> String {
        if upto <= self.sent {
            return String::new();
        }
        let out = if side.redact_pii {
            redact_range(&self.text, self.sent, upto, hits)
        } else {
            self.text[self.sent..upto].to_string()
        };
        self.sent = upto;
        out
    }
}

/// The byte offset `n` characters before `at` in `text` (0 at the start).
fn back_chars(text: &str, at: usize, n: usize) -> usize {
    text[..at]
        .char_indices()
        .rev()
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::rules::{RuleFile, Rules};

    fn setup(policy: &str) -> (Policy, Rules) {
        let p = Policy::parse(policy).unwrap();
        let r = Rules::compile(
            &RuleFile::parse(
                "[[rules]]\ncategory = \"violence\"\nterms = [\"kill you\", \"杀了你\"]",
            )
            .unwrap()
            .rules,
        )
        .unwrap();
        (p, r)
    }

    /// Streams `pieces` through the filter; returns what was sent and whether it was blocked.
    fn stream(p: &Policy, r: &Rules, pieces: &[&str]) -> (Vec<String>, bool) {
        let scan = RuleMatcher {
            rules: vec![r],
            pii: p.output.wants_pii(),
        };
        let mut f = OutputFilter::new(p.hold_chars.max(r.longest_term()));
        let mut sent = Vec::new();
        for piece in pieces {
            let rel = f.push(piece, &p.output, &scan);
            sent.push(rel.text);
            if rel.blocked.is_some() {
                return (sent, true);
            }
        }
        let rel = f.finish(&p.output, &scan);
        sent.push(rel.text);
        (sent, rel.blocked.is_some())
    }

    #[test]
    fn a_stream_never_sends_what_a_block_would_retract() {
        let (p, r) = setup("hold_chars = 4\n[output]\nblock = [\"violence\"]\n");
        let (sent, blocked) = stream(&p, &r, &["I ", "will ", "kil", "l you", " now"]);
        assert!(blocked);
        assert_eq!(sent.concat(), "I will ");
        let (sent, blocked) = stream(&p, &r, &["我", "要", "杀", "了", "你"]);
        assert!(blocked);
        assert_eq!(sent.concat(), "我要");
        // clean text leaves at once; only an end that may begin a term waits ("kill " may
        // begin "kill you"; "skill you" is not the word "kill")
        let (sent, blocked) = stream(&p, &r, &["a skill ", "you ", "kill time", ".", " ki"]);
        assert!(!blocked);
        assert_eq!(sent, ["a s", "kill you ", "kill time", ".", " ", "ki"]);
    }

    #[test]
    fn personal_data_is_redacted_whole_and_never_split() {
        let (p, r) = setup("[output]\nredact_pii = true\n");
        let (sent, blocked) = stream(
            &p,
            &r,
            &[
                "Write to jane",
                ".doe@exam",
                "ple.com or call 138",
                "0013",
                "8000 today.",
            ],
        );
        assert!(!blocked);
        assert_eq!(sent.concat(), "Write to <EMAIL> or call <PHONE> today.");
        assert!(sent
            .iter()
            .all(|s| !s.contains("jane") && !s.contains("138")));
        assert_eq!(
            redact("ID 11010519491231002X.", &{
                let mut h = Vec::new();
                r.scan("ID 11010519491231002X.", true, &mut h);
                h
            }),
            "ID <CN_ID>."
        );
    }

    #[test]
    fn what_may_still_become_personal_data_waits_and_prose_does_not() {
        assert_eq!(pii_pending("Write to jane.doe@exa"), "jane.doe@exa".len());
        assert_eq!(pii_pending("call +1 415 "), "+1 415 ".len());
        assert_eq!(pii_pending("call +1 415 555 0100"), "+1 415 555 0100".len());
        assert_eq!(pii_pending("我的手机号是138"), 3);
        assert_eq!(pii_pending("The well is open. "), 0);
        assert_eq!(pii_pending("It is open on Sun"), 3);
        // prose goes out a word at a time under a PII policy
        let (p, r) = setup("[output]\nredact_pii = true\n");
        let (sent, _) = stream(&p, &r, &["The well ", "is open ", "on Sundays."]);
        assert_eq!(sent, ["The well ", "is open ", "on ", "Sundays."]);
    }

    #[test]
    fn logged_categories_are_kept_for_the_record() {
        let (p, r) = setup("[output]\nlog = [\"violence\"]\n");
        let scan = RuleMatcher {
            rules: vec![&r],
            pii: false,
        };
        let mut f = OutputFilter::new(8);
        let a = f.push("I will kill you.", &p.output, &scan);
        let b = f.finish(&p.output, &scan);
        assert_eq!(a.text + &b.text, "I will kill you.");
        assert_eq!(
            f.logged().unwrap().categories,
            vec![crate::Category::Violence]
        );
    }
}
