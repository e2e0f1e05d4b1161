//! The per-document stages and the chain that runs them.
//!
//! A pipeline file lists stages in order (`[[stages]]` tables with a `kind`); each document goes
//! through them until one drops it. The built-in default ([`default_stages`]) is FineWeb's order:
//! clean-up, language id, Gopher repetition, Gopher quality, C4, FineWeb, then PII redaction.

use serde::{Deserialize, Serialize};

use crate::doc::Document;
use crate::filters::{GopherQuality, GopherRepetition, Verdict, C4};
use crate::normalize;
use crate::pii::{self, PiiConfig};
use crate::words::{words_for, Lang};

/// Language identification (whatlang: trigram profiles for 69 languages, with Han and kana
/// scripts deciding Chinese and Japanese). The score is whatlang's confidence in `[0, 1]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageConfig {
    /// Languages to keep (ISO 639-1 codes; `zh` is Mandarin); empty keeps every language.
    pub languages: Vec<String>,
    /// Minimum score.
    pub threshold: f64,
    /// Characters of the document that are looked at (the start; bounded cost per document).
    pub sample_chars: usize,
}

impl Default for LanguageConfig {
    fn default() -> Self {
        LanguageConfig {
            languages: vec!["en".into(), "zh".into()],
            threshold: 0.65,
            sample_chars: 1000,
        }
    }
}

/// ISO 639-1 code for a whatlang language where one exists, else its ISO 639-3 code.
fn iso639_1(lang: whatlang::Lang) -> &'static str {
    use whatlang::Lang as L;
    match lang {
        L::Eng => "en",
        L::Cmn => "zh",
        L::Jpn => "ja",
        L::Kor => "ko",
        L::Deu => "de",
        L::Fra => "fr",
        L::Spa => "es",
        L::Por => "pt",
        L::Ita => "it",
        L::Nld => "nl",
        L::Rus => "ru",
        L::Ukr => "uk",
        L::Pol => "pl",
        L::Tur => "tr",
        L::Ara => "ar",
        L::Hin => "hi",
        L::Vie => "vi",
        L::Ind => "id",
        L::Swe => "sv",
        L::Dan => "da",
        L::Fin => "fi",
        L::Ces => "cs",
        L::Ell => "el",
        L::Heb => "he",
        L::Tha => "th",
        other => other.code(),
    }
}

/// Detects the language of `text`: `(code, score)`, or `None` when there is nothing to go on.
pub fn detect_language(text: &str, sample_chars: usize) -> Option<(&'static str, f64)> {
    let end = text
        .char_indices()
        .nth(sample_chars)
        .map_or(text.len(), |(i, _)| i);
    let info = whatlang::detect(&text[..end])?;
    Some((iso639_1(info.lang()), info.confidence()))
}

/// One stage of the per-document chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    /// Unicode NFC and clean-up ([`crate::normalize`]).
    Normalize,
    /// Language identification ([`LanguageConfig`]).
    Language(LanguageConfig),
    /// Gopher repetition rules.
    GopherRepetition(GopherRepetition),
    /// Gopher quality rules.
    GopherQuality(GopherQuality),
    /// C4 rules (removes lines).
    C4(C4),
    /// FineWeb's rules.
    #[serde(rename = "fineweb")]
    FineWeb(crate::filters::FineWeb),
    /// PII redaction (never drops).
    Pii(PiiConfig),
}

impl Stage {
    /// The stage's name in manifests and `dropped/` records.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Normalize => "normalize",
            Stage::Language(_) => "language",
            Stage::GopherRepetition(_) => "gopher_repetition",
            Stage::GopherQuality(_) => "gopher_quality",
            Stage::C4(_) => "c4",
            Stage::FineWeb(_) => "fineweb",
            Stage::Pii(_) => "pii",
        }
    }
}

/// FineWeb's chain (datatrove `examples/fineweb.py`, without URL filtering and HTML extraction,
/// which need web crawl input): the default when no pipeline file is given.
pub fn default_stages() -> Vec<Stage> {
    vec![
        Stage::Normalize,
        Stage::Language(LanguageConfig::default()),
        Stage::GopherRepetition(GopherRepetition::default()),
        Stage::GopherQuality(GopherQuality::default()),
        Stage::C4(C4::default()),
        Stage::FineWeb(crate::filters::FineWeb::default()),
        Stage::Pii(PiiConfig::default()),
    ]
}

/// What happened to one document in the chain.
#[derive(Debug)]
pub struct Outcome {
    /// The document as it left the chain (text possibly changed).
    pub doc: Document,
    /// `(stage index, reason)` when a stage dropped it.
    pub dropped: Option<(usize, &'static str)>,
    /// Text bytes entering and leaving each stage reached.
    pub trace: Vec<(u64, u64)>,
    /// PII replacements per kind ([`pii::PiiKind::ALL`] order).
    pub pii: [u64; 4],
}

/// The words of the current text as byte ranges, kept while the text does not change.
struct WordCache {
    ranges: Option<Vec<(usize, usize)>>,
    text_len: usize,
}

impl WordCache {
    fn get<'t>(&mut self, text: &'t str, lang: Lang) -> Vec<&'t str> {
        if self.text_len != text.len() {
            self.ranges = None;
        }
        if let Some(r) = &self.ranges {
            return r.iter().map(|&(a, b)| &text[a..b]).collect();
        }
        let mut words = Vec::new();
        words_for(text, lang, &mut words);
        let base = text.as_ptr() as usize;
        self.ranges = Some(
            words
                .iter()
                .map(|w| {
                    let a = w.as_ptr() as usize - base;
                    (a, a + w.len())
                })
                .collect(),
        );
        self.text_len = text.len();
        words
    }
}

/// Runs `doc` through `stages`.
pub fn run_chain(mut doc: Document, stages: &[Stage]) -> Outcome {
    let mut trace = Vec::with_capacity(stages.len());
    let mut pii_counts = [0u64; 4];
    let mut cache = WordCache {
        ranges: None,
        text_len: usize::MAX,
    };
    for (i, stage) in stages.iter().enumerate() {
        let before = doc.text.len() as u64;
        let lang = Lang::from_code(doc.lang.as_deref());
        if matches!(stage, Stage::Normalize | Stage::Language(_) | Stage::Pii(_)) {
            // these may change the text, or the language that decides the splitter
            cache.ranges = None;
        }
        let verdict = match stage {
            Stage::Normalize => {
                if let std::borrow::Cow::Owned(t) = normalize::clean(&doc.text) {
                    doc.text = t;
                }
                if doc.text.is_empty() {
                    Verdict::Drop("empty")
                } else {
                    Verdict::Keep
                }
            }
            Stage::Language(cfg) => match detect_language(&doc.text, cfg.sample_chars) {
                Some((code, score)) => {
                    doc.lang = Some(code.to_string());
                    doc.lang_score = score as f32;
                    if !cfg.languages.is_empty() && !cfg.languages.iter().any(|l| l == code) {
                        Verdict::Drop("language_not_kept")
                    } else if score < cfg.threshold {
                        Verdict::Drop("language_score_below_threshold")
                    } else {
                        Verdict::Keep
                    }
                }
                None => Verdict::Drop("language_unknown"),
            },
            Stage::GopherRepetition(f) => f.check_words(&doc.text, &cache.get(&doc.text, lang)),
            Stage::GopherQuality(f) => f.check_words(&doc.text, &cache.get(&doc.text, lang), lang),
            Stage::C4(f) => {
                let v = f.check(&mut doc.text, lang);
                if doc.text.len() as u64 != before {
                    cache.ranges = None;
                }
                v
            }
            Stage::FineWeb(f) => f.check_words(&doc.text, &cache.get(&doc.text, lang), lang),
            Stage::Pii(cfg) => {
                if let Some(t) = pii::redact(&doc.text, cfg, &mut pii_counts) {
                    doc.text = t;
                }
                Verdict::Keep
            }
        };
        trace.push((before, doc.text.len() as u64));
        if let Verdict::Drop(reason) = verdict {
            return Outcome {
                doc,
                dropped: Some((i, reason)),
                trace,
                pii: pii_counts,
            };
        }
    }
    Outcome {
        doc,
        dropped: None,
        trace,
        pii: pii_counts,
    }
}
