//! Quality and repetition filters: Gopher, C4 and FineWeb, computed as datatrove computes them.
//!
//! Sources (datatrove 0.10.1, `src/datatrove/pipeline/filters/`): `gopher_quality_filter.py`,
//! `gopher_repetition_filter.py`, `c4_filters.py` (with FineWeb's `filter_no_terminal_punct=False`)
//! and `fineweb_quality_filter.py`. Lengths are counted in Unicode code points, lines and
//! paragraphs split as Python's `splitlines`/`re.split` do, and words as spaCy does (see
//! [`crate::words`]), so the decisions agree document by document; reasons carry datatrove's names.
//!
//! Chinese and Japanese documents (language `zh`/`ja` from the language-id stage) are split into
//! words with jieba. Rules that measure the same thing in any script keep their thresholds; the
//! ones that do not transfer are replaced (each documented on its field): mean word length,
//! stop words, the words-per-line minimum of C4 (which splits on spaces) and FineWeb's short-line
//! length.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::tables::{PUNCTUATION_SET, TERMINAL_PUNCTUATION};
use crate::words::{
    count_sentences_in, py_is_alpha, py_is_space, py_splitlines, py_strip, words_for, Lang,
};

/// A filter's decision on one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The document passes (possibly with its text changed, as C4 removes lines).
    Keep,
    /// The document is dropped for the named reason.
    Drop(&'static str),
}

/// Number of Unicode code points (Python's `len`).
pub fn py_len(s: &str) -> usize {
    if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    }
}

fn in_sorted(table: &[char], c: char) -> bool {
    table.binary_search(&c).is_ok()
}

/// Whether `c` is in datatrove's `PUNCTUATION_SET`.
pub fn is_datatrove_punct(c: char) -> bool {
    in_sorted(&PUNCTUATION_SET, c)
}

/// Whether `c` is one of datatrove's terminal punctuation marks.
pub fn is_terminal_punct(c: char) -> bool {
    in_sorted(&TERMINAL_PUNCTUATION, c)
}

/// Python's `str.count` (non-overlapping).
fn count_sub(text: &str, pat: &str) -> usize {
    text.matches(pat).count()
}

/// `find_duplicates` of datatrove: (duplicate elements, characters in duplicate elements).
fn find_duplicates(items: &[&str]) -> (usize, usize) {
    let mut seen: HashSet<&str> = HashSet::with_capacity(items.len());
    let (mut dup, mut chars) = (0, 0);
    for &it in items {
        if !seen.insert(it) {
            dup += 1;
            chars += py_len(it);
        }
    }
    (dup, chars)
}

/// Gopher quality rules (Rae et al. 2021, table A1; datatrove `GopherQualityFilter`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GopherQuality {
    /// Minimum number of non-symbol words.
    pub min_doc_words: usize,
    /// Maximum number of non-symbol words.
    pub max_doc_words: usize,
    /// Minimum mean length of non-symbol words.
    pub min_avg_word_length: f64,
    /// Maximum mean length of non-symbol words.
    pub max_avg_word_length: f64,
    /// CJK: minimum mean word length in characters (jieba words are 1–4 characters; text that
    /// segments into single characters is not language).
    pub cjk_min_avg_word_length: f64,
    /// CJK: maximum mean word length in characters.
    pub cjk_max_avg_word_length: f64,
    /// Maximum `#` per word, and maximum ellipses per word.
    pub max_symbol_word_ratio: f64,
    /// Maximum fraction of lines starting with a bullet (`•`, `-`).
    pub max_bullet_lines_ratio: f64,
    /// Maximum fraction of lines ending with an ellipsis.
    pub max_ellipsis_lines_ratio: f64,
    /// Minimum fraction of words containing a letter.
    pub min_alpha_words_ratio: f64,
    /// CJK: minimum fraction of words containing a letter (jieba splits every `，` and `。` off
    /// as a word, and CJK text has more of them per word than English).
    pub cjk_min_alpha_words_ratio: f64,
    /// Minimum number of distinct stop words present.
    pub min_stop_words: usize,
    /// Stop words for space-separated languages.
    pub stop_words: Vec<String>,
    /// CJK: stop words (the commonest function words of Chinese and Japanese).
    pub cjk_stop_words: Vec<String>,
}

impl Default for GopherQuality {
    fn default() -> Self {
        GopherQuality {
            min_doc_words: 50,
            max_doc_words: 100_000,
            min_avg_word_length: 3.0,
            max_avg_word_length: 10.0,
            cjk_min_avg_word_length: 1.2,
            cjk_max_avg_word_length: 4.0,
            max_symbol_word_ratio: 0.1,
            max_bullet_lines_ratio: 0.9,
            max_ellipsis_lines_ratio: 0.3,
            min_alpha_words_ratio: 0.8,
            cjk_min_alpha_words_ratio: 0.7,
            min_stop_words: 2,
            stop_words: ["the", "be", "to", "of", "and", "that", "have", "with"]
                .map(String::from)
                .to_vec(),
            cjk_stop_words: [
                "的", "了", "是", "在", "和", "有", "也", "就", "都", "不", "这", "我们", "の",
                "に", "は", "を", "が", "と", "で", "た",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl GopherQuality {
    /// Applies the rules to `text`.
    pub fn check(&self, text: &str, lang: Lang) -> Verdict {
        let mut words = Vec::new();
        words_for(text, lang, &mut words);
        self.check_words(text, &words, lang)
    }

    /// Applies the rules to `text` split into `words` (as [`words_for`] splits it).
    pub fn check_words(&self, text: &str, words: &[&str], lang: Lang) -> Verdict {
        let n_words = words.len();
        let mut n_non_symbol = 0usize;
        let mut non_symbol_chars = 0usize;
        for w in words {
            if w.chars().any(|c| !is_datatrove_punct(c)) {
                n_non_symbol += 1;
                non_symbol_chars += py_len(w);
            }
        }
        if n_non_symbol < self.min_doc_words {
            return Verdict::Drop("gopher_short_doc");
        }
        if n_non_symbol > self.max_doc_words {
            return Verdict::Drop("gopher_long_doc");
        }
        let (min_avg, max_avg) = match lang {
            Lang::Latin => (self.min_avg_word_length, self.max_avg_word_length),
            Lang::Cjk => (self.cjk_min_avg_word_length, self.cjk_max_avg_word_length),
        };
        if n_non_symbol > 0 {
            let avg = non_symbol_chars as f64 / n_non_symbol as f64;
            if avg < min_avg {
                return Verdict::Drop("gopher_below_avg_threshold");
            }
            if avg > max_avg {
                return Verdict::Drop("gopher_above_avg_threshold");
            }
        }
        let nw = n_words as f64;
        if count_sub(text, "#") as f64 / nw > self.max_symbol_word_ratio {
            return Verdict::Drop("gopher_too_many_hashes");
        }
        if (count_sub(text, "...") + count_sub(text, "…")) as f64 / nw > self.max_symbol_word_ratio
        {
            return Verdict::Drop("gopher_too_many_ellipsis");
        }
        let lines = py_splitlines(text);
        let n_lines = lines.len().max(1) as f64;
        let bullets = lines
            .iter()
            .filter(|l| {
                let l = l.trim_start_matches(py_is_space);
                l.starts_with('•') || l.starts_with('-')
            })
            .count();
        if bullets as f64 / n_lines > self.max_bullet_lines_ratio {
            return Verdict::Drop("gopher_too_many_bullets");
        }
        let ellipsis_lines = lines
            .iter()
            .filter(|l| {
                let l = l.trim_end_matches(py_is_space);
                l.ends_with("...") || l.ends_with('…')
            })
            .count();
        if ellipsis_lines as f64 / n_lines > self.max_ellipsis_lines_ratio {
            return Verdict::Drop("gopher_too_many_end_ellipsis");
        }
        let alpha = words.iter().filter(|w| w.chars().any(py_is_alpha)).count();
        let min_alpha = match lang {
            Lang::Latin => self.min_alpha_words_ratio,
            Lang::Cjk => self.cjk_min_alpha_words_ratio,
        };
        if (alpha as f64 / nw) < min_alpha {
            return Verdict::Drop("gopher_below_alpha_threshold");
        }
        let stop = match lang {
            Lang::Latin => &self.stop_words,
            Lang::Cjk => &self.cjk_stop_words,
        };
        let present: HashSet<&str> = words
            .iter()
            .copied()
            .filter(|w| stop.iter().any(|s| s == w))
            .collect();
        if present.len() < self.min_stop_words {
            return Verdict::Drop("gopher_enough_stop_words");
        }
        Verdict::Keep
    }
}

/// Gopher repetition rules (datatrove `GopherRepetitionFilter`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GopherRepetition {
    /// Maximum fraction of duplicated lines.
    pub dup_line_frac: f64,
    /// Maximum fraction of duplicated paragraphs.
    pub dup_para_frac: f64,
    /// Maximum fraction of characters in duplicated lines.
    pub dup_line_char_frac: f64,
    /// Maximum fraction of characters in duplicated paragraphs.
    pub dup_para_char_frac: f64,
    /// `(n, max fraction)`: characters covered by the most frequent n-gram.
    pub top_n_grams: Vec<(usize, f64)>,
    /// `(n, max fraction)`: characters covered by repeated n-grams.
    pub dup_n_grams: Vec<(usize, f64)>,
}

impl Default for GopherRepetition {
    fn default() -> Self {
        GopherRepetition {
            dup_line_frac: 0.3,
            dup_para_frac: 0.3,
            dup_line_char_frac: 0.2,
            dup_para_char_frac: 0.2,
            top_n_grams: vec![(2, 0.20), (3, 0.18), (4, 0.16)],
            dup_n_grams: vec![
                (5, 0.15),
                (6, 0.14),
                (7, 0.13),
                (8, 0.12),
                (9, 0.11),
                (10, 0.10),
            ],
        }
    }
}

fn top_reason(n: usize) -> &'static str {
    match n {
        2 => "top_2_gram",
        3 => "top_3_gram",
        4 => "top_4_gram",
        _ => "top_n_gram",
    }
}

fn dup_reason(n: usize) -> &'static str {
    match n {
        5 => "duplicated_5_n_grams",
        6 => "duplicated_6_n_grams",
        7 => "duplicated_7_n_grams",
        8 => "duplicated_8_n_grams",
        9 => "duplicated_9_n_grams",
        10 => "duplicated_10_n_grams",
        _ => "duplicated_n_grams",
    }
}

/// Splits at every run of at least `min_run` newlines, dropping the run: `min_run = 2` is
/// `re.split(r"\n{2,}", text)` (paragraphs), `1` is `re.split("\n+", text)` (lines).
fn split_newline_runs(text: &str, min_run: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        if b[i] == b'\n' {
            let run = b[i..].iter().take_while(|&&x| x == b'\n').count();
            if run >= min_run {
                out.push(&text[start..i]);
                start = i + run;
            }
            i += run;
        } else {
            i += 1;
        }
    }
    out.push(&text[start..]);
    out
}

/// Hashes an n-gram from its words' hashes. Words never contain whitespace, so a sequence of
/// word hashes identifies `" ".join(words)` exactly (up to 64-bit collisions). For the repeated
/// n-gram rule datatrove joins without a separator, which also equates `["ab", "c"]` with
/// `["a", "bc"]`; such coincidences are not reproduced (they need adjacent words that re-split
/// into other words, and only ever make datatrove find more repetition).
fn hash_ngram(word_hashes: &[u64]) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    for &w in word_hashes {
        h = (h.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    h ^ (h >> 29)
}

/// A hasher for keys that are already hashes.
#[derive(Default, Clone, Copy)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PreHashedMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<PreHashed>>;
type PreHashedSet = HashSet<u64, std::hash::BuildHasherDefault<PreHashed>>;

impl GopherRepetition {
    /// Applies the rules to `text`.
    pub fn check(&self, text: &str, lang: Lang) -> Verdict {
        match self.check_lines(text) {
            Verdict::Keep => {}
            drop => return drop,
        }
        let mut words = Vec::new();
        words_for(text, lang, &mut words);
        self.check_ngrams(text, &words)
    }

    /// The line and paragraph rules.
    fn check_lines(&self, text: &str) -> Verdict {
        if text.is_empty() {
            return Verdict::Drop("empty");
        }
        let len = py_len(text) as f64;
        let paragraphs = split_newline_runs(py_strip(text), 2);
        let (dup, chars) = find_duplicates(&paragraphs);
        if dup as f64 / paragraphs.len() as f64 > self.dup_para_frac {
            return Verdict::Drop("dup_para_frac");
        }
        if chars as f64 / len > self.dup_para_char_frac {
            return Verdict::Drop("dup_para_char_frac");
        }
        let lines = split_newline_runs(text, 1);
        let (dup, chars) = find_duplicates(&lines);
        if dup as f64 / lines.len() as f64 > self.dup_line_frac {
            return Verdict::Drop("dup_line_frac");
        }
        if chars as f64 / len > self.dup_line_char_frac {
            return Verdict::Drop("dup_line_char_frac");
        }
        Verdict::Keep
    }

    /// Applies the rules to `text` split into `words` (as [`words_for`] splits it).
    pub fn check_words(&self, text: &str, words: &[&str]) -> Verdict {
        match self.check_lines(text) {
            Verdict::Keep => {}
            drop => return drop,
        }
        self.check_ngrams(text, words)
    }

    fn check_ngrams(&self, text: &str, words: &[&str]) -> Verdict {
        let len = py_len(text) as f64;
        let word_chars: Vec<usize> = words.iter().map(|w| py_len(w)).collect();
        let word_hashes: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
        for &(n, frac) in &self.top_n_grams {
            if n == 0 || words.len() < n {
                continue;
            }
            // Counter.most_common(1): the highest count, first inserted among equals.
            let mut counts: PreHashedMap<(usize, usize)> =
                PreHashedMap::with_capacity_and_hasher(words.len(), Default::default());
            let mut best: Option<(usize, usize, usize)> = None; // (count, order, start)
            for i in 0..=words.len() - n {
                let h = hash_ngram(&word_hashes[i..i + n]);
                let next_order = counts.len();
                let e = counts.entry(h).or_insert((0, next_order));
                e.0 += 1;
                let (count, order) = *e;
                let better = match best {
                    None => true,
                    Some((bc, bo, _)) => count > bc || (count == bc && order < bo),
                };
                if better {
                    best = Some((count, order, i));
                }
            }
            if let Some((count, _, start)) = best {
                let chars: usize = word_chars[start..start + n].iter().sum::<usize>() + n - 1;
                if (chars * count) as f64 / len > frac {
                    return Verdict::Drop(top_reason(n));
                }
            }
        }
        for &(n, frac) in &self.dup_n_grams {
            if n == 0 {
                continue;
            }
            let mut seen = PreHashedSet::with_capacity_and_hasher(words.len(), Default::default());
            let (mut repeated, mut idx) = (0usize, 0usize);
            while idx + n <= words.len() {
                if !seen.insert(hash_ngram(&word_hashes[idx..idx + n])) {
                    repeated += word_chars[idx..idx + n].iter().sum::<usize>();
                    idx += n;
                } else {
                    idx += 1;
                }
            }
            if repeated as f64 / len > frac {
                return Verdict::Drop(dup_reason(n));
            }
        }
        Verdict::Keep
    }
}

/// C4 rules as FineWeb runs them (datatrove `C4QualityFilter(filter_no_terminal_punct=False)`):
/// removes bad lines and may rewrite the text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct C4 {
    /// Drop lines that do not end in terminal punctuation (off in FineWeb).
    pub filter_no_terminal_punct: bool,
    /// Minimum sentences left after line filtering.
    pub min_num_sentences: usize,
    /// Minimum words in a line (space-separated; for CJK, jieba words).
    pub min_words_per_line: usize,
    /// Lines with a longer word are removed.
    pub max_word_length: usize,
    /// Remove Wikipedia-style citation marks (`[1]`, `[edit]`, `[citation needed]`).
    pub remove_citations: bool,
    /// Drop documents containing "lorem ipsum".
    pub filter_lorem_ipsum: bool,
    /// Remove lines mentioning javascript.
    pub filter_javascript: bool,
    /// Drop documents containing `{`.
    pub filter_curly_bracket: bool,
    /// Remove lines with cookie and terms-of-use phrases.
    pub filter_policy: bool,
}

impl Default for C4 {
    fn default() -> Self {
        C4 {
            filter_no_terminal_punct: false,
            min_num_sentences: 5,
            min_words_per_line: 3,
            max_word_length: 1000,
            remove_citations: true,
            filter_lorem_ipsum: true,
            filter_javascript: true,
            filter_curly_bracket: true,
            filter_policy: true,
        }
    }
}

const POLICY_SUBSTRINGS: [&str; 6] = [
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
];

/// Case-insensitive substring search without allocating for ASCII lines.
enum Lower<'a> {
    Ascii(&'a str),
    Owned(String),
}

impl<'a> Lower<'a> {
    fn new(s: &'a str) -> Lower<'a> {
        if s.is_ascii() {
            Lower::Ascii(s)
        } else {
            Lower::Owned(s.to_lowercase())
        }
    }

    /// Whether the lower-cased text contains `needle` (lower-case ASCII).
    fn contains(&self, needle: &str) -> bool {
        match self {
            Lower::Owned(s) => s.contains(needle),
            Lower::Ascii(s) => {
                let (h, n) = (s.as_bytes(), needle.as_bytes());
                h.len() >= n.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
            }
        }
    }
}

/// Removes `[123]`, `[]`, `[edit]` and `[citation needed]`.
fn remove_citations(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(p) = rest.find('[') {
        out.push_str(&rest[..p]);
        let after = &rest[p + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let skip = if after[digits..].starts_with(']') {
            Some(digits + 1)
        } else if after.starts_with("edit]") {
            Some(5)
        } else if after.starts_with("citation needed]") {
            Some(16)
        } else {
            None
        };
        match skip {
            Some(n) => rest = &after[n..],
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

impl C4 {
    /// Applies the rules; on [`Verdict::Keep`] `text` holds the kept lines.
    pub fn check(&self, text: &mut String, lang: Lang) -> Verdict {
        let mut kept: Vec<String> = Vec::new();
        let mut sentences = 0usize;
        let mut words = Vec::new();
        for line in py_splitlines(text) {
            let line = py_strip(line);
            words.clear();
            match lang {
                Lang::Latin => words.extend(line.split(py_is_space).filter(|w| !w.is_empty())),
                Lang::Cjk => words_for(line, lang, &mut words),
            }
            if words.iter().any(|w| py_len(w) > self.max_word_length) {
                continue;
            }
            let line: std::borrow::Cow<str> = if self.remove_citations && line.contains('[') {
                std::borrow::Cow::Owned(remove_citations(line))
            } else {
                std::borrow::Cow::Borrowed(line)
            };
            if self.filter_no_terminal_punct
                && (!line.ends_with(['.', '?', '!', '"', '\'']) || line.ends_with("..."))
            {
                continue;
            }
            let n_words = match lang {
                Lang::Latin => words.len(),
                Lang::Cjk => words
                    .iter()
                    .filter(|w| w.chars().any(|c| !is_datatrove_punct(c)))
                    .count(),
            };
            if n_words < self.min_words_per_line {
                continue;
            }
            let lower = Lower::new(&line);
            if self.filter_lorem_ipsum && lower.contains("lorem ipsum") {
                return Verdict::Drop("lorem_ipsum");
            }
            if self.filter_javascript && lower.contains("javascript") {
                continue;
            }
            if self.filter_curly_bracket && line.contains('{') {
                return Verdict::Drop("curly_bracket");
            }
            if self.filter_policy && POLICY_SUBSTRINGS.iter().any(|p| lower.contains(p)) {
                continue;
            }
            // only whether the minimum is reached matters: stop counting there
            if sentences < self.min_num_sentences {
                let mut toks = Vec::new();
                words_for(&line, lang, &mut toks);
                sentences += count_sentences_in(&toks);
            }
            kept.push(line.into_owned());
        }
        if sentences < self.min_num_sentences {
            return Verdict::Drop("too_few_sentences");
        }
        let joined = kept.join("\n");
        let stripped = py_strip(&joined);
        if stripped.len() != text.len() || stripped != text.as_str() {
            *text = stripped.to_string();
        }
        Verdict::Keep
    }
}

/// FineWeb's own rules (datatrove `FineWebQualityFilter`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FineWeb {
    /// Minimum fraction of lines ending in terminal punctuation.
    pub line_punct_thr: f64,
    /// Maximum fraction of short lines.
    pub short_line_thr: f64,
    /// A line this long or shorter (characters) is short.
    pub short_line_length: usize,
    /// CJK: short-line length in characters (a CJK word is ~1.7 characters against ~5 plus a
    /// space in English, so 30 English characters are about 10 CJK ones).
    pub cjk_short_line_length: usize,
    /// Maximum fraction of characters in duplicated lines.
    pub char_duplicates_ratio: f64,
    /// Maximum newlines per word.
    pub new_line_ratio: f64,
}

impl Default for FineWeb {
    fn default() -> Self {
        FineWeb {
            line_punct_thr: 0.12,
            short_line_thr: 0.67,
            short_line_length: 30,
            cjk_short_line_length: 10,
            char_duplicates_ratio: 0.01,
            new_line_ratio: 0.3,
        }
    }
}

impl FineWeb {
    /// Applies the rules to `text`.
    pub fn check(&self, text: &str, lang: Lang) -> Verdict {
        match self.check_lines(text, lang) {
            Verdict::Keep => {}
            drop => return drop,
        }
        let mut words = Vec::new();
        words_for(text, lang, &mut words);
        self.check_newlines(text, &words)
    }

    fn check_lines(&self, text: &str, lang: Lang) -> Verdict {
        let lines: Vec<&str> = text
            .split('\n')
            .filter(|l| !py_strip(l).is_empty())
            .collect();
        if lines.is_empty() {
            return Verdict::Drop("empty");
        }
        let n = lines.len() as f64;
        let punct = lines
            .iter()
            .filter(|l| l.chars().next_back().is_some_and(is_terminal_punct))
            .count();
        if (punct as f64 / n) < self.line_punct_thr {
            return Verdict::Drop("line_punct_ratio");
        }
        let short_len = match lang {
            Lang::Latin => self.short_line_length,
            Lang::Cjk => self.cjk_short_line_length,
        };
        let short = lines.iter().filter(|l| py_len(l) <= short_len).count();
        if short as f64 / n > self.short_line_thr {
            return Verdict::Drop("short_line_ratio");
        }
        let (_, dup_chars) = find_duplicates(&lines);
        let no_nl = py_len(text) - count_sub(text, "\n");
        if no_nl > 0 && dup_chars as f64 / no_nl as f64 > self.char_duplicates_ratio {
            return Verdict::Drop("char_dup_ratio");
        }
        Verdict::Keep
    }

    /// Applies the rules to `text` split into `words` (as [`words_for`] splits it).
    pub fn check_words(&self, text: &str, words: &[&str], lang: Lang) -> Verdict {
        match self.check_lines(text, lang) {
            Verdict::Keep => self.check_newlines(text, words),
            drop => drop,
        }
    }

    fn check_newlines(&self, text: &str, words: &[&str]) -> Verdict {
        if !words.is_empty()
            && count_sub(text, "\n") as f64 / words.len() as f64 > self.new_line_ratio
        {
            return Verdict::Drop("list_ratio");
        }
        Verdict::Keep
    }
}
