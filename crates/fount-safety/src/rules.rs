//! The rule classifiers: personal data (`fount-data`'s PII detectors, checksums included) and
//! lists of terms and regular expressions per category that an operator edits.
//!
//! - A term matches case-insensitively. A term with letters or digits at its ends matches only
//!   as whole words (`kill` is not found in `skill`); a Chinese term matches wherever its
//!   characters stand, or, in a rule with `words = true`, only where jieba's segmentation of the
//!   text puts word boundaries at both its ends (`自杀` is then not found in `自杀式` if jieba
//!   reads that as one word).
//! - A pattern is a regular expression (Rust's `regex` syntax: no look-around, linear time), at
//!   most [`MAX_PATTERN`] bytes.

use std::collections::BTreeSet;

use fount_data::pii::{find_pii, PiiConfig, PiiKind};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::category::Category;
use crate::error::{Error, Result};

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN: usize = 1024;
/// Most terms and patterns over all rules.
pub const MAX_ENTRIES: usize = 100_000;

/// A list of terms and patterns of one category, as a rule file or a policy writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The category a match counts for.
    pub category: String,
    /// A name for the audit records (default: the category and the rule's position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Words and phrases, in any language.
    #[serde(default)]
    pub terms: Vec<String>,
    /// Regular expressions.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Chinese terms match only on jieba word boundaries.
    #[serde(default)]
    pub words: bool,
}

/// A rule file: `[[rules]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// The rules.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// The operator's rules fount starts with (`rules/default.toml`; `docs/safety.md` lists them).
pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

impl RuleFile {
    /// Parses a rule file.
    pub fn parse(text: &str) -> Result<RuleFile> {
        toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))
    }
}

/// Where a rule matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The category it counts for.
    pub category: Category,
    /// The rule: its name, or `pii:email` and the like for personal data.
    pub rule: String,
    /// Byte range in the text.
    pub start: usize,
    /// End of the byte range.
    pub end: usize,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    category: Category,
    /// The terms as one alternation.
    terms: Option<Regex>,
    patterns: Vec<Regex>,
    words: bool,
}

/// Compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    /// The longest term, in characters (how much text a stream holds back for the terms).
    longest: usize,
    /// Every term, lowercased, as characters (for [`Rules::pending`]).
    lowered: Vec<Vec<char>>,
    /// Whether any rule has a pattern (whose matches have no length bound).
    patterns: bool,
}

fn is_cjk_text(s: &str) -> bool {
    s.chars().any(fount_data::words::is_cjk)
}

impl Rules {
    /// Compiles `specs`; an unknown category or an invalid pattern is an error naming it.
    pub fn compile(specs: &[RuleSpec]) -> Result<Rules> {
        let entries: usize = specs.iter().map(|s| s.terms.len() + s.patterns.len()).sum();
        if entries > MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "{entries} terms and patterns; at most {MAX_ENTRIES}"
            )));
        }
        let mut rules = Vec::with_capacity(specs.len());
        let mut longest = 0;
        let mut lowered = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let category = Category::parse(&spec.category)
                .ok_or_else(|| Error::UnknownCategory(spec.category.clone()))?;
            let name = spec
                .name
                .clone()
                .unwrap_or_else(|| format!("{}#{}", spec.category, i + 1));
            let mut alternatives = Vec::new();
            for term in spec
                .terms
                .iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
            {
                longest = longest.max(term.chars().count());
                lowered.push(term.chars().flat_map(char::to_lowercase).collect());
                let escaped = regex::escape(term);
                let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
                let bounded = !is_cjk_text(term);
                let (lead, tail) = if bounded {
                    (
                        if word(term.chars().next()) { r"\b" } else { "" },
                        if word(term.chars().last()) { r"\b" } else { "" },
                    )
                } else {
                    ("", "")
                };
                alternatives.push(format!("{lead}{escaped}{tail}"));
            }
            let terms = match alternatives.is_empty() {
                true => None,
                false => Some(
                    RegexBuilder::new(&alternatives.join("|"))
                        .case_insensitive(true)
                        .size_limit(64 << 20)
                        .build()
                        .map_err(|e| Error::Invalid(format!("rule {name:?}: {e}")))?,
                ),
            };
            let patterns = spec
                .patterns
                .iter()
                .map(|p| {
                    if p.len() > MAX_PATTERN {
                        return Err(Error::BadPattern {
                            pattern: p.chars().take(40).collect(),
                            reason: format!("longer than {MAX_PATTERN} bytes"),
                        });
                    }
                    RegexBuilder::new(p)
                        .size_limit(1 << 20)
                        .build()
                        .map_err(|e| Error::BadPattern {
                            pattern: p.clone(),
                            reason: e.to_string(),
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            rules.push(Rule {
                name,
                category,
                terms,
                patterns,
                words: spec.words,
            });
        }
        let patterns = rules.iter().any(|r| !r.patterns.is_empty());
        Ok(Rules {
            rules,
            longest,
            lowered,
            patterns,
        })
    }

    /// Whether any rule has a regular expression.
    pub fn has_patterns(&self) -> bool {
        self.patterns
    }

    /// How many bytes at the end of `text` may be the start of a term not yet complete: the
    /// longest end of `text` that begins some term (case-insensitively). A stream holds back
    /// only these.
    pub fn pending(&self, text: &str) -> usize {
        let tail: Vec<(usize, char)> = text
            .char_indices()
            .rev()
            .take(self.longest.saturating_sub(1))
            .collect();
        let mut best = 0;
        for term in &self.lowered {
            // the longest k < len(term) whose last k characters of `text` begin `term`
            for k in (1..term.len().min(tail.len() + 1)).rev() {
                if k <= best {
                    break;
                }
                let starts = tail[..k]
                    .iter()
                    .rev()
                    .flat_map(|(_, c)| c.to_lowercase())
                    .eq(term[..k].iter().copied());
                if starts {
                    best = k;
                    break;
                }
            }
        }
        match best {
            0 => 0,
            k => text.len() - tail[k - 1].0,
        }
    }

    /// The longest term, in characters.
    pub fn longest_term(&self) -> usize {
        self.longest
    }

    /// Appends the matches in `text` to `out`: personal data when `pii`, then every rule's.
    pub fn scan(&self, text: &str, pii: bool, out: &mut Vec<Hit>) {
        if pii {
            for (start, end, kind) in find_pii(text, &PiiConfig::default()) {
                out.push(Hit {
                    category: Category::Pii,
                    rule: format!("pii:{}", kind.name()),
                    start,
                    end,
                });
            }
        }
        let mut boundaries: Option<BTreeSet<usize>> = None;
        for rule in &self.rules {
            if let Some(re) = &rule.terms {
                for m in re.find_iter(text) {
                    if rule.words && is_cjk_text(m.as_str()) {
                        let b = boundaries.get_or_insert_with(|| word_boundaries(text));
                        if !(b.contains(&m.start()) && b.contains(&m.end())) {
                            continue;
                        }
                    }
                    out.push(Hit {
                        category: rule.category,
                        rule: rule.name.clone(),
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
            for re in &rule.patterns {
                for m in re.find_iter(text) {
                    out.push(Hit {
                        category: rule.category,
                        rule: rule.name.clone(),
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }
    }
}

/// The byte offsets where jieba's segmentation of `text` puts word boundaries.
fn word_boundaries(text: &str) -> BTreeSet<usize> {
    let mut words = Vec::new();
    fount_data::words::cjk_words(text, &mut words);
    let mut set = BTreeSet::from([0, text.len()]);
    for w in words {
        // each word is a slice of `text`
        let start = w.as_ptr() as usize - text.as_ptr() as usize;
        set.insert(start);
        set.insert(start + w.len());
    }
    set
}

/// The placeholder that replaces personal data of the rule `pii:KIND`.
pub fn pii_placeholder(rule: &str) -> Option<&'static str> {
    let kind = rule.strip_prefix("pii:")?;
    PiiKind::ALL
        .into_iter()
        .find(|k| k.name() == kind)
        .map(PiiKind::placeholder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> Rules {
        Rules::compile(&RuleFile::parse(toml_text).unwrap().rules).unwrap()
    }

    fn hits(r: &Rules, text: &str) -> Vec<(Category, String)> {
        let mut out = Vec::new();
        r.scan(text, true, &mut out);
        out.into_iter()
            .map(|h| (h.category, text[h.start..h.end].to_string()))
            .collect()
    }

    #[test]
    fn terms_match_whole_words_in_english_and_characters_in_chinese() {
        let r = rules(
            r#"
            [[rules]]
            category = "violence"
            terms = ["kill", "blow up", "杀了你"]
            [[rules]]
            category = "self-harm"
            terms = ["自杀"]
            words = true
            "#,
        );
        assert_eq!(
            hits(&r, "I will KILL the process"),
            vec![(Category::Violence, "KILL".into())]
        );
        assert!(hits(&r, "a useful skill").is_empty());
        assert_eq!(
            hits(&r, "they blow up"),
            vec![(Category::Violence, "blow up".into())]
        );
        assert_eq!(
            hits(&r, "我要杀了你。"),
            vec![(Category::Violence, "杀了你".into())]
        );
        assert_eq!(
            hits(&r, "他想自杀。"),
            vec![(Category::SelfHarm, "自杀".into())]
        );
        // jieba reads 自杀式 as one word: not a match where words matter
        assert!(
            hits(&r, "自杀式袭击").is_empty(),
            "{:?}",
            hits(&r, "自杀式袭击")
        );
        assert_eq!(r.longest_term(), 7);
    }

    #[test]
    fn only_an_end_that_may_begin_a_term_is_pending() {
        let r = rules("[[rules]]\ncategory = \"violence\"\nterms = [\"kill you\", \"杀了你\"]");
        assert_eq!(r.pending("I will KI"), 2);
        assert_eq!(r.pending("I will kill yo"), 7);
        assert_eq!(r.pending("I will kit"), 0);
        assert_eq!(r.pending("我要杀了"), "杀了".len());
        assert_eq!(r.pending(""), 0);
        assert!(!r.has_patterns());
    }

    #[test]
    fn personal_data_is_found_with_its_checksums() {
        let r = Rules::default();
        let h = hits(
            &r,
            "mail a.b@example.com or call +1 415 555 0100; ID 11010519491231002X",
        );
        let kinds: Vec<String> = h.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(
            kinds,
            ["a.b@example.com", "+1 415 555 0100", "11010519491231002X"]
        );
        // a resident ID with a wrong check digit is not personal data
        assert!(hits(&r, "ID 110105194912310021").is_empty());
        assert_eq!(pii_placeholder("pii:email"), Some("<EMAIL>"));
    }

    #[test]
    fn bad_rules_are_errors_that_name_the_problem() {
        let bad = |t: &str| {
            let file = RuleFile::parse(t);
            match file {
                Err(e) => e.to_string(),
                Ok(f) => Rules::compile(&f.rules).unwrap_err().to_string(),
            }
        };
        let e = bad("[[rules]]\ncategory = \"violent\"\nterms = [\"x\"]");
        assert!(e.contains("\"violent\""), "{e}");
        let e = bad("[[rules]]\ncategory = \"hate\"\npatterns = [\"(unclosed\"]");
        assert!(e.contains("(unclosed"), "{e}");
        let e = bad("[[rules]]\ncategory = \"hate\"\nterm = [\"x\"]");
        assert!(e.contains("term"), "{e}");
    }

    #[test]
    fn the_default_rules_compile() {
        let r = Rules::compile(&RuleFile::parse(DEFAULT_RULES).unwrap().rules).unwrap();
        assert!(!hits(&r, "how do I make a bomb at home").is_empty());
        assert!(!hits(&r, "教我怎么制造炸弹").is_empty());
        assert!(hits(&r, "The village well is open on Sundays.").is_empty());
    }
}
