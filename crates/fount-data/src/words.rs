//! Word and sentence splitting, as the reference filters count them.
//!
//! datatrove's Gopher and FineWeb filters count *words* with spaCy's blank English tokenizer, and
//! its C4 filter counts *sentences* with spaCy's `sentencizer`; agreement with those filters
//! depends on splitting text the same way. [`english_words`] reimplements the parts of spaCy's
//! tokenizer (spaCy 3.8, `spacy/lang/punctuation.py`, `spacy/lang/en/tokenizer_exceptions.py`) that
//! change word counts and lengths on web text:
//!
//! - text is split on whitespace; whitespace tokens are dropped (datatrove strips them);
//! - prefixes (`( [ " ' # $ … ..` and the other opening punctuation, currency and quotes) and
//!   suffixes (closing punctuation, `'s`, a trailing `.` after a lower-case letter, digit or
//!   punctuation, units and `%` after a number) are peeled one of each per round;
//! - infixes split `3-4` (arithmetic), `end.Next`, `a,b`, `well-known`, `a/b` and `...` inside words;
//! - special cases keep abbreviations (`e.g.`, `U.S.`, `Mr.`) whole and split contractions
//!   (`don't` → `do` `n't`, `I'm` → `I` `'m`);
//! - URLs and e-mail addresses stay one token.
//!
//! Known differences from spaCy: its exception table has ~1,000 entries (emoticons, rare
//! abbreviations, contractions without apostrophes such as `dont`); only the common ones are here.
//!
//! Chinese and Japanese have no spaces between words: [`cjk_words`] segments them with jieba (the
//! segmenter spaCy's Chinese pipeline uses), so word-based rules measure the same thing.

use std::sync::OnceLock;

use unicode_general_category::{get_general_category, GeneralCategory};

/// Python's `str.isspace` (Unicode whitespace plus the ASCII separators `\x1c`–`\x1f`).
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Python's `str.isalpha` for one character (categories Lu, Ll, Lt, Lm, Lo).
pub fn py_is_alpha(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    matches!(
        get_general_category(c),
        GeneralCategory::UppercaseLetter
            | GeneralCategory::LowercaseLetter
            | GeneralCategory::TitlecaseLetter
            | GeneralCategory::ModifierLetter
            | GeneralCategory::OtherLetter
    )
}

/// Whether every character is Unicode punctuation (spaCy's `is_punct`).
pub fn is_punct(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            if c.is_ascii() {
                return c.is_ascii_punctuation() && !"$+<=>^`|~".contains(c);
            }
            matches!(
                get_general_category(c),
                GeneralCategory::ConnectorPunctuation
                    | GeneralCategory::DashPunctuation
                    | GeneralCategory::OpenPunctuation
                    | GeneralCategory::ClosePunctuation
                    | GeneralCategory::InitialPunctuation
                    | GeneralCategory::FinalPunctuation
                    | GeneralCategory::OtherPunctuation
            )
        })
}

/// Python's `str.splitlines()`: splits on `\n`, `\r`, `\r\n`, `\v`, `\f`, `\x1c`–`\x1e`, `\x85`,
/// U+2028 and U+2029; no trailing empty line.
pub fn py_splitlines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = text.as_bytes();
    let mut it = text.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let is_break = matches!(
            c,
            '\n' | '\r'
                | '\x0b'
                | '\x0c'
                | '\x1c'
                | '\x1d'
                | '\x1e'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        );
        if is_break {
            out.push(&text[start..i]);
            let mut end = i + c.len_utf8();
            if c == '\r' && bytes.get(end) == Some(&b'\n') {
                end += 1;
                it.next();
            }
            start = end;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// Opening characters spaCy splits off the front of a token.
const PREFIX_CHARS: &str = "§%=—–…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧$£€¥฿₽₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₼₾";
/// Closing characters spaCy splits off the end of a token.
const SUFFIX_CHARS: &str =
    "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧—–";
/// Units split off after a number (`5km` → `5` `km`), longest first.
const UNITS: &[&str] = &[
    "km²", "km³", "km/h", "mbar", "kmh", "mph", "hPa", "m/s", "m²", "m³", "dm²", "dm³", "cm²",
    "cm³", "mm²", "mm³", "km", "dm", "cm", "mm", "ha", "µm", "nm", "yd", "in", "ft", "kg", "mg",
    "µg", "lb", "oz", "Pa", "mb", "MB", "kb", "KB", "gb", "GB", "tb", "TB", "m", "g", "t", "T",
    "G", "M", "K", "%",
];
const CURRENCY: &str = "$£€¥฿₽₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₼₾";
const QUOTES: &str = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧";
const HYPHENS: &[&str] = &["---", "--", "-", "–", "—", "~"];

/// Abbreviations and other tokens spaCy's English exceptions keep whole.
const ABBREVIATIONS: &[&str] = &[
    "Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Prof.", "Rev.", "Gen.", "Gov.", "Sen.",
    "Rep.", "Mt.", "vs.", "v.", "etc.", "e.g.", "i.e.", "a.m.", "p.m.", "Inc.", "Ltd.", "Co.",
    "Corp.", "Jan.", "Feb.", "Mar.", "Apr.", "Jun.", "Jul.", "Aug.", "Sep.", "Sept.", "Oct.",
    "Nov.", "Dec.", "U.S.", "U.K.", "U.S.A.", "e.g", "i.e", "No.", "Ph.D.", "Ala.", "Ariz.",
    "Calif.", "Colo.", "Conn.", "Fla.", "Ga.", "Ill.", "Ind.", "Kan.", "Ky.", "La.", "Md.",
    "Mich.", "Minn.", "Miss.", "Mo.", "Neb.", "Nev.", "Okla.", "Ore.", "Pa.", "Tenn.", "Va.",
    "Wash.", "Wis.", "'s", "'S", "’s", "n't", "'m", "'re", "'ve", "'ll", "'d", ":)", ":(", ":-)",
    "<3", "o.O", "^_^", "Adm.", "Bros.", "Capt.", "Col.", "Messrs.", "Sgt.", "Lt.", "a.", "b.",
    "c.", "d.", "e.", "f.", "g.", "h.", "i.", "j.", "k.", "l.", "m.", "n.", "o.", "p.", "q.", "r.",
    "s.", "t.", "u.", "v.", "w.", "x.", "y.", "z.",
];

fn is_lower(c: char) -> bool {
    c.is_lowercase()
}

fn is_upper(c: char) -> bool {
    c.is_uppercase()
}

fn is_alpha(c: char) -> bool {
    c.is_alphabetic()
}

fn abbreviations() -> &'static std::collections::HashSet<&'static str> {
    static SET: OnceLock<std::collections::HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| ABBREVIATIONS.iter().copied().collect())
}

/// Contraction endings split off an alphabetic base (`n't` first: `don't` → `do` `n't`).
const CONTRACTIONS: [&str; 14] = [
    "n't", "N'T", "n’t", "N’T", "'m", "'re", "'ve", "'ll", "'d", "’m", "’re", "’ve", "’ll", "’d",
];

/// Splits a special case into its pieces (one or two; the second is empty for one), if `s` is one.
fn special(s: &str) -> Option<[&str; 2]> {
    // every special case holds one of these characters
    if !s.contains(['.', '\'', '’', ':', '<', '^']) {
        return None;
    }
    if abbreviations().contains(s) {
        return Some([s, ""]);
    }
    for tail in CONTRACTIONS {
        if let Some(base) = s.strip_suffix(tail) {
            if !base.is_empty() && base.chars().all(is_alpha) {
                return Some([base, &s[base.len()..]]);
            }
        }
    }
    None
}

/// Length in bytes of the prefix spaCy splits off `s`, or 0.
fn find_prefix(s: &str) -> usize {
    for multi in ["US$", "C$", "A$", "……"] {
        if s.starts_with(multi) {
            return multi.len();
        }
    }
    let mut chars = s.chars();
    let Some(c) = chars.next() else { return 0 };
    if c == '.' {
        let dots = s.bytes().take_while(|&b| b == b'.').count();
        return if dots >= 2 { dots } else { 0 };
    }
    if c == '+' {
        return match chars.next() {
            Some(d) if d.is_ascii_digit() => 0,
            _ => 1,
        };
    }
    if PREFIX_CHARS.contains(c) {
        return c.len_utf8();
    }
    0
}

/// Length in bytes of the suffix spaCy splits off `s`, or 0 (the longest candidate, as a
/// left-to-right regex search over `(...)$` finds).
fn find_suffix(s: &str) -> usize {
    let mut best = 0;
    // an ellipsis of two or more dots
    let dots = s.bytes().rev().take_while(|&b| b == b'.').count();
    if dots >= 2 {
        best = dots;
    }
    if s.ends_with("……") {
        best = best.max("……".len());
    }
    for tail in ["'s", "'S", "’s", "’S"] {
        if s.ends_with(tail) {
            best = best.max(tail.len());
        }
    }
    let mut rev = s.chars().rev();
    let Some(last) = rev.next() else { return 0 };
    let before = rev.next();
    if SUFFIX_CHARS.contains(last) {
        best = best.max(last.len_utf8());
    }
    // after a number: `+`, currency and units
    let digit_before = |n: usize| {
        s[..s.len() - n]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_digit())
    };
    if last == '+' && digit_before(1) {
        best = best.max(1);
    }
    if CURRENCY.contains(last) && digit_before(last.len_utf8()) {
        best = best.max(last.len_utf8());
    }
    for unit in UNITS {
        if s.len() > unit.len() && s.ends_with(unit) && digit_before(unit.len()) {
            best = best.max(unit.len());
            break;
        }
    }
    if last == '.' {
        if let Some(b) = before {
            let punct_before = b.is_ascii_digit()
                || is_lower(b)
                || "%²-+".contains(b)
                || SUFFIX_CHARS.contains(b)
                || QUOTES.contains(b);
            let two_upper = is_upper(b)
                && s[..s.len() - 1 - b.len_utf8()]
                    .chars()
                    .next_back()
                    .is_some_and(is_upper);
            let temperature = "FfCcKk".contains(b) && s[..s.len() - 2].ends_with('°');
            if punct_before || two_upper || temperature {
                best = best.max(1);
            }
        }
    }
    best
}

/// Whether spaCy's URL matcher takes `s` whole (URLs, domains, e-mail addresses).
fn is_url(s: &str) -> bool {
    if s.contains("://") {
        return s.len() > 3;
    }
    let host = match s.split_once('@') {
        Some((user, host)) if !user.is_empty() => host,
        _ => s,
    };
    let host = host.split(['/', '?', '#']).next().unwrap_or(host);
    let host = host.split(':').next().unwrap_or(host);
    let mut labels = host.split('.');
    let Some(first) = labels.next() else {
        return false;
    };
    if first.is_empty() {
        return false;
    }
    let rest: Vec<&str> = labels.collect();
    let Some(tld) = rest.last() else { return false };
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
    };
    ok_label(first)
        && rest.iter().all(|l| ok_label(l))
        && tld.chars().count() >= 2
        && tld.chars().all(|c| c.is_lowercase() && c.is_alphabetic())
}

/// Splits `s` at infixes, pushing the pieces.
fn split_infixes<'a>(s: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let mut start = 0usize;
    let mut i = 0usize;
    while i < chars.len() {
        let (pos, c) = chars[i];
        let prev = if i > 0 { Some(chars[i - 1].1) } else { None };
        let next = chars.get(i + 1).map(|x| x.1);
        let mut len = 0usize; // length in chars of an infix starting at i
        if c == '.' && next == Some('.') {
            len = chars[i..].iter().take_while(|x| x.1 == '.').count();
        } else if c == '…' {
            len = 1;
        } else if let Some(p) = prev {
            let a_or_digit = is_alpha(p) || p.is_ascii_digit();
            let arithmetic = p.is_ascii_digit()
                && "+-*^".contains(c)
                && next.is_some_and(|n| n.is_ascii_digit() || n == '-');
            let sentence_join = c == '.'
                && (is_lower(p) || QUOTES.contains(p))
                && next.is_some_and(|n| is_upper(n) || QUOTES.contains(n));
            let comma = c == ',' && is_alpha(p) && next.is_some_and(is_alpha);
            let symbol = a_or_digit && ":<>=/".contains(c) && next.is_some_and(is_alpha);
            if arithmetic || sentence_join || comma || symbol {
                len = 1;
            } else if a_or_digit {
                for h in HYPHENS {
                    let hl = h.chars().count();
                    if s[pos..].starts_with(h) && chars.get(i + hl).is_some_and(|x| is_alpha(x.1)) {
                        len = hl;
                        break;
                    }
                }
            }
        }
        if len > 0 && (i > 0 || c == '.' || c == '…') {
            if pos > start {
                out.push(&s[start..pos]);
            }
            let end = chars.get(i + len).map_or(s.len(), |x| x.0);
            out.push(&s[pos..end]);
            start = end;
            i += len;
        } else {
            i += 1;
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
}

/// Tokenizes one whitespace-free chunk the way spaCy's tokenizer does.
fn tokenize_chunk<'a>(chunk: &'a str, out: &mut Vec<&'a str>) {
    // Fast path: letters and digits only (most words) have no affixes, infixes or specials.
    if chunk.bytes().all(|b| b.is_ascii_alphanumeric()) {
        out.push(chunk);
        return;
    }
    let mut s = chunk;
    let mut prefixes: Vec<&'a str> = Vec::new();
    let mut suffixes: Vec<&'a str> = Vec::new();
    let mut last_len = usize::MAX;
    while !s.is_empty() && s.len() != last_len {
        if special(s).is_some() {
            break;
        }
        last_len = s.len();
        let pre = find_prefix(s);
        if pre > 0 {
            let minus_pre = &s[pre..];
            if !minus_pre.is_empty() && special(minus_pre).is_some() {
                prefixes.push(&s[..pre]);
                s = minus_pre;
                break;
            }
        }
        let suf = find_suffix(&s[pre..]);
        if suf > 0 {
            let minus_suf = &s[..s.len() - suf];
            if !minus_suf.is_empty() && special(minus_suf).is_some() {
                suffixes.push(&s[s.len() - suf..]);
                s = minus_suf;
                break;
            }
        }
        if pre > 0 && suf > 0 && pre + suf <= s.len() {
            prefixes.push(&s[..pre]);
            suffixes.push(&s[s.len() - suf..]);
            s = &s[pre..s.len() - suf];
        } else if pre > 0 {
            prefixes.push(&s[..pre]);
            s = &s[pre..];
        } else if suf > 0 {
            suffixes.push(&s[s.len() - suf..]);
            s = &s[..s.len() - suf];
        }
        if !s.is_empty() && special(s).is_some() {
            break;
        }
    }
    out.extend(prefixes);
    if !s.is_empty() {
        if let Some(parts) = special(s) {
            out.extend(parts.into_iter().filter(|p| !p.is_empty()));
        } else if is_url(s) {
            out.push(s);
        } else {
            split_infixes(s, out);
        }
    }
    out.extend(suffixes.into_iter().rev());
}

/// Appends the words of English (or other space-separated) text to `out`, as datatrove's
/// `split_into_words` returns them with its spaCy tokenizer.
pub fn english_words<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    for chunk in text.split(py_is_space) {
        if !chunk.is_empty() {
            tokenize_chunk(chunk, out);
        }
    }
}

/// Sentence-ending characters of spaCy's `sentencizer`.
const SENT_END: &str =
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡。";

/// The number of sentences spaCy's `sentencizer` finds in `text` (0 for empty text).
pub fn count_sentences(text: &str) -> usize {
    let mut tokens = Vec::new();
    english_words(text, &mut tokens);
    count_sentences_in(&tokens)
}

/// Sentence count over already split tokens (see [`count_sentences`]).
pub fn count_sentences_in(tokens: &[&str]) -> usize {
    if tokens.is_empty() {
        return 0;
    }
    let mut sentences = 1;
    let mut seen_end = false;
    for t in tokens {
        let mut cs = t.chars();
        let single_end = matches!((cs.next(), cs.next()), (Some(c), None) if SENT_END.contains(c));
        if seen_end && !single_end && !is_punct(t) {
            sentences += 1;
            seen_end = false;
        } else if single_end {
            seen_end = true;
        }
    }
    sentences
}

fn jieba() -> &'static jieba_rs::Jieba {
    static JIEBA: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    JIEBA.get_or_init(jieba_rs::Jieba::new)
}

/// Appends the words of Chinese or Japanese text to `out`: jieba segmentation (with its HMM for
/// unknown words), whitespace dropped, as spaCy's Chinese pipeline with the jieba segmenter does.
pub fn cjk_words<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    for w in jieba().cut(text, true) {
        let w = py_strip(w);
        if !w.is_empty() {
            out.push(w);
        }
    }
}

/// Whether a character is a CJK ideograph, kana or CJK punctuation.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3000..=0x303F | 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF
        | 0xF900..=0xFAFF | 0xFF00..=0xFFEF | 0x20000..=0x2FA1F)
}

/// Splits text into words with the splitter for `lang` (`zh` and `ja`: jieba; otherwise spaCy
/// English rules).
pub fn words_for<'a>(text: &'a str, lang: Lang, out: &mut Vec<&'a str>) {
    match lang {
        Lang::Cjk => cjk_words(text, out),
        Lang::Latin => english_words(text, out),
    }
}

/// Which word splitter and thresholds apply to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Space-separated scripts: spaCy's English rules and the published thresholds.
    Latin,
    /// Chinese and Japanese: jieba segmentation and the CJK thresholds.
    Cjk,
}

impl Lang {
    /// The splitter for an ISO 639-1 language code.
    pub fn from_code(code: Option<&str>) -> Lang {
        match code {
            Some("zh" | "ja") => Lang::Cjk,
            _ => Lang::Latin,
        }
    }
}
