//! A deterministic generator of a realistic synthetic web corpus and of a small chat dataset.
//!
//! The corpus mixes English and Chinese prose built from sentence templates with the things a real
//! crawl contains: navigation boilerplate, cookie banners, bullet lists, keyword spam, code, lorem
//! ipsum, documents that are too short, repeated lines, exact and near duplicates of earlier
//! documents, and personal data (e-mail addresses, IP addresses, phone numbers, mainland-China
//! resident ID numbers). Every document records what was planted in it (`synth_kind`,
//! `synth_dup_of`, `synth_pii`), so tests can check what the pipeline did with it.
//!
//! The chat dataset is a date-reformatting task (`YYYY-MM-DD` → `DD/MM/YYYY`), in OpenAI chat JSONL,
//! with a held-out split of dates never seen in training: its accuracy is exact match.

mod chat;
mod words;

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::error::Result;

pub use chat::{chat_answer, chat_prompt};
use words::*;

/// Options for [`synth_corpus`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Number of documents to write.
    pub docs: usize,
    /// Seed of the generator: the same seed writes the same bytes.
    pub seed: u64,
    /// Documents per output file (`corpus/part-NNNNN.jsonl`).
    pub docs_per_file: usize,
    /// Fraction of documents in Chinese.
    pub chinese_fraction: f64,
    /// Number of chat examples (train and held-out together).
    pub chat_examples: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            docs: 2000,
            seed: 0,
            docs_per_file: 500,
            chinese_fraction: 0.12,
            chat_examples: 1200,
        }
    }
}

/// What [`synth_corpus`] wrote.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    /// The corpus files, in order.
    pub corpus_files: Vec<PathBuf>,
    /// Total bytes of document text.
    pub text_bytes: u64,
    /// The chat training file.
    pub chat_train: PathBuf,
    /// The chat held-out file.
    pub chat_test: PathBuf,
}

struct Gen {
    rng: ChaCha8Rng,
}

impl Gen {
    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs.choose(&mut self.rng).copied().unwrap_or_default()
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p.clamp(0.0, 1.0))
    }

    fn capitalise(s: &str) -> String {
        let mut c = s.chars();
        match c.next() {
            Some(f) => f.to_uppercase().chain(c).collect(),
            None => String::new(),
        }
    }

    fn sentence(&mut self) -> String {
        let mut s = String::new();
        if self.chance(0.25) {
            s.push_str(self.pick(CONNECTORS));
            s.push(' ');
            s.push_str(self.pick(SUBJECTS));
        } else {
            s.push_str(&Self::capitalise(self.pick(SUBJECTS)));
        }
        s.push(' ');
        s.push_str(self.pick(VERBS));
        s.push(' ');
        s.push_str(self.pick(OBJECTS));
        if self.chance(0.6) {
            s.push(' ');
            s.push_str(self.pick(ADVERBIALS));
        }
        match self.rng.random_range(0..10) {
            0 => {
                s.push_str(", and it was ");
                s.push_str(self.pick(ADJECTIVES));
            }
            1 => {
                let n: u32 = self.rng.random_range(2..500);
                s.push_str(&format!(", which cost {n} thousand dollars"));
            }
            2 => s.push_str(" that didn't go unnoticed"),
            3 => {
                s.push_str(" (a ");
                s.push_str(self.pick(ADJECTIVES));
                s.push_str(" step)");
            }
            _ => {}
        }
        s.push(if self.chance(0.06) { '?' } else { '.' });
        s
    }

    fn paragraph(&mut self, sentences: usize) -> String {
        (0..sentences)
            .map(|_| self.sentence())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn article(&mut self) -> String {
        let mut parts = vec![format!(
            "{}: {}",
            self.pick(TOPICS),
            Self::capitalise(self.pick(OBJECTS))
        )];
        let paras = self.rng.random_range(2..7);
        for _ in 0..paras {
            let n = self.rng.random_range(2..6);
            parts.push(self.paragraph(n));
        }
        parts.join("\n\n")
    }

    fn zh_sentence(&mut self) -> String {
        let mut s = String::new();
        if self.chance(0.5) {
            s.push_str(self.pick(ZH_ADVERBIALS));
            s.push('，');
        }
        s.push_str(self.pick(ZH_SUBJECTS));
        s.push_str(self.pick(ZH_ADVERBS));
        s.push_str(self.pick(ZH_VERBS));
        s.push_str(self.pick(ZH_ADJ));
        s.push_str(self.pick(ZH_OBJECTS));
        if self.chance(0.6) {
            s.push('，');
            s.push_str(self.pick(ZH_SPEAKERS));
            s.push_str(self.pick(ZH_CLAUSES));
        }
        s.push(if self.chance(0.08) { '！' } else { '。' });
        s
    }

    fn zh_article(&mut self) -> String {
        let paras = self.rng.random_range(2..6);
        (0..paras)
            .map(|_| {
                let n = self.rng.random_range(3..7);
                (0..n).map(|_| self.zh_sentence()).collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    fn email(&mut self) -> String {
        let users = [
            "anna.lee", "j.smith", "info", "support", "wang.wei", "contact", "m_rossi",
        ];
        let hosts = [
            "example.org",
            "mail.example.com",
            "corp.test",
            "qq.example.cn",
        ];
        format!(
            "{}{}@{}",
            self.pick(&users),
            self.rng.random_range(1..99),
            self.pick(&hosts)
        )
    }

    fn public_ipv4(&mut self) -> String {
        loop {
            let a: u8 = self.rng.random_range(1..224);
            if matches!(a, 10 | 127 | 100 | 169 | 172 | 192 | 198 | 203) {
                continue;
            }
            return format!(
                "{a}.{}.{}.{}",
                self.rng.random_range(0..256u16),
                self.rng.random_range(0..256u16),
                self.rng.random_range(1..255u16)
            );
        }
    }

    fn phone(&mut self) -> String {
        match self.rng.random_range(0..3) {
            0 => format!(
                "+1 ({}) {}-{:04}",
                self.rng.random_range(201..989),
                self.rng.random_range(200..999),
                self.rng.random_range(0..10000)
            ),
            1 => format!(
                "+44 20 {:04} {:04}",
                self.rng.random_range(0..10000),
                self.rng.random_range(0..10000)
            ),
            _ => self.cn_mobile(),
        }
    }

    fn cn_mobile(&mut self) -> String {
        let prefix = ["13", "15", "17", "18", "19"];
        format!(
            "{}{:09}",
            self.pick(&prefix),
            self.rng.random_range(0..1_000_000_000u64)
        )
    }

    fn cn_id(&mut self, valid: bool) -> String {
        let region = ["110101", "310104", "440305", "510107", "330106"];
        let mut s = format!(
            "{}{}{:02}{:02}{:03}",
            self.pick(&region),
            self.rng.random_range(1950..2005),
            self.rng.random_range(1..13),
            self.rng.random_range(1..29),
            self.rng.random_range(0..1000)
        );
        let check = crate::pii::cn_id_check_char(&s).unwrap_or('0');
        let check = if valid {
            check
        } else {
            // any other check character makes the number invalid
            if check == '1' {
                '2'
            } else {
                '1'
            }
        };
        s.push(check);
        s
    }

    /// Plants personal data into an article; returns the planted values.
    fn plant_pii(&mut self, text: &mut String, zh: bool) -> Vec<Value> {
        let mut planted = Vec::new();
        let n = self.rng.random_range(1..4);
        for _ in 0..n {
            let (kind, value) = match self.rng.random_range(0..5) {
                0 => ("email", self.email()),
                1 => ("ip_address", self.public_ipv4()),
                2 => ("phone", if zh { self.cn_mobile() } else { self.phone() }),
                3 => ("cn_id", self.cn_id(true)),
                _ => ("phone", self.cn_mobile()),
            };
            let line = if zh {
                match kind {
                    "email" => format!("如有问题，请发邮件至 {value} 联系我们。"),
                    "ip_address" => format!("服务器地址是 {value} ，请不要随意公开。"),
                    "cn_id" => format!("申请人的身份证号码为 {value} ，已经核实。"),
                    _ => format!("联系电话：{value} ，工作日可以拨打。"),
                }
            } else {
                match kind {
                    "email" => format!("For questions, write to {value} and the team will answer within a day."),
                    "ip_address" => format!("The old server at {value} was switched off after the migration to the new site."),
                    "cn_id" => format!("The registration form listed the identity number {value} for the applicant."),
                    _ => format!("You can call the office on {value} during the opening hours of the week."),
                }
            };
            text.push_str("\n\n");
            text.push_str(&line);
            planted.push(json!({ "kind": kind, "value": value }));
        }
        // Things that look like PII but are not: left alone by the redactor.
        if self.chance(0.5) {
            let decoy = if self.chance(0.5) {
                format!(
                    "The release notes for version {}.{}.{}.{} list many small changes to the tools.",
                    self.rng.random_range(1..10),
                    self.rng.random_range(0..20),
                    self.rng.random_range(0..20),
                    self.rng.random_range(0..200)
                )
            } else {
                let id = self.cn_id(false);
                format!("The reference number {id} on the parcel was printed twice by mistake.")
            };
            text.push_str("\n\n");
            text.push_str(&decoy);
        }
        planted
    }

    /// Changes a few words of `text` (a near duplicate).
    fn perturb(&mut self, text: &str) -> String {
        let mut words: Vec<String> = text.split(' ').map(str::to_string).collect();
        let edits = (words.len() / 40).max(1);
        for _ in 0..edits {
            let i = self.rng.random_range(0..words.len());
            match self.rng.random_range(0..3) {
                0 => words[i] = self.pick(ADJECTIVES).to_string(),
                1 => {
                    words.remove(i);
                    if words.is_empty() {
                        words.push(self.pick(ADJECTIVES).to_string());
                    }
                }
                _ => words.insert(i, self.pick(ADJECTIVES).to_string()),
            }
        }
        words.join(" ")
    }

    /// A Chinese page: mostly articles (some with personal data planted), some a repeated
    /// slogan, some too short. Returns its kind, its text and the planted personal data.
    fn zh_page(&mut self) -> (&'static str, String, Vec<Value>) {
        let mut pii = Vec::new();
        let mut t = self.zh_article();
        if self.chance(0.15) {
            pii = self.plant_pii(&mut t, true);
        }
        let kind = if self.chance(0.1) {
            // A Chinese page that is mostly a repeated slogan.
            let line = self.zh_sentence();
            t = std::iter::repeat_n(line, 12).collect::<Vec<_>>().join("\n");
            "zh_repetition"
        } else if self.chance(0.08) {
            t = self.zh_sentence();
            "zh_short"
        } else {
            "zh_article"
        };
        (kind, t, pii)
    }

    /// An English page of one of the kinds the filters must keep or catch (articles, some with
    /// personal data planted, boilerplate, lists, spam, code, tables, …). Returns its kind, its
    /// text and the planted personal data.
    fn en_page(&mut self) -> (&'static str, String, Vec<Value>) {
        let mut pii = Vec::new();
        let (kind, text) = match self.rng.random_range(0..100) {
            0..=54 => {
                let mut t = self.article();
                if self.chance(0.18) {
                    pii = self.plant_pii(&mut t, false);
                }
                ("article", t)
            }
            55..=64 => {
                let mut lines: Vec<String> = (0..self.rng.random_range(2..6))
                    .map(|_| self.pick(NAV).to_string())
                    .collect();
                lines.push(self.article());
                for _ in 0..self.rng.random_range(1..3) {
                    lines.push(self.pick(POLICY).to_string());
                }
                for _ in 0..self.rng.random_range(1..6) {
                    lines.push(self.pick(NAV).to_string());
                }
                ("boilerplate", lines.join("\n"))
            }
            65..=69 => {
                let mut lines = vec![format!("{}:", self.pick(TOPICS))];
                let bullet = if self.chance(0.5) { "- " } else { "• " };
                for _ in 0..self.rng.random_range(4..14) {
                    lines.push(format!("{bullet}{}", self.sentence()));
                }
                ("list", lines.join("\n"))
            }
            70..=74 => ("short", self.sentence()),
            75..=79 => {
                let mut words = Vec::new();
                for _ in 0..self.rng.random_range(60..200) {
                    let w = self.pick(SPAM);
                    words.push(if self.chance(0.3) {
                        format!("#{w}")
                    } else {
                        w.to_string()
                    });
                }
                ("spam", words.join(" "))
            }
            80..=82 => {
                let mut t = self.paragraph(3);
                t.push_str("\n\nfunction init() { var x = document.getElementById('app'); x.innerHTML = 'ready'; }\n\n");
                t.push_str(&self.paragraph(3));
                ("code", t)
            }
            83..=84 => {
                let mut t = self.paragraph(2);
                t.push_str("\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n\n");
                t.push_str(&self.paragraph(4));
                ("lorem_ipsum", t)
            }
            85..=89 => {
                let line = self.sentence();
                let mut lines = Vec::new();
                for _ in 0..self.rng.random_range(6..16) {
                    if self.chance(0.6) {
                        lines.push(line.clone());
                    } else {
                        lines.push(self.sentence());
                    }
                }
                ("repeated_lines", lines.join("\n"))
            }
            90..=93 => {
                let mut lines = Vec::new();
                for _ in 0..self.rng.random_range(8..30) {
                    let cells: Vec<String> = (0..self.rng.random_range(2..6))
                        .map(|_| format!("{:.2}", self.rng.random_range(0.0..1000.0)))
                        .collect();
                    lines.push(cells.join(" | "));
                }
                ("table", lines.join("\n"))
            }
            94..=96 => {
                let mut lines = Vec::new();
                for _ in 0..self.rng.random_range(5..20) {
                    lines.push(format!(
                        "{}...",
                        self.sentence().trim_end_matches(['.', '?'])
                    ));
                }
                ("ellipsis", lines.join("\n"))
            }
            _ => {
                let mut t = String::new();
                for _ in 0..self.rng.random_range(3..8) {
                    t.push_str(&self.paragraph(1));
                    t.push('\n');
                }
                ("one_line_paragraphs", t)
            }
        };
        (kind, text, pii)
    }
}

/// Writes a synthetic corpus to `out/corpus/` and a chat dataset to `out/chat/`.
pub fn synth_corpus(out: &Path, opts: &SynthOptions) -> Result<SynthSummary> {
    let corpus_dir = out.join("corpus");
    let chat_dir = out.join("chat");
    fs_err::create_dir_all(&corpus_dir)?;
    fs_err::create_dir_all(&chat_dir)?;
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
    };
    // Earlier documents that later ones duplicate (a bounded reservoir).
    let mut pool: Vec<(String, String)> = Vec::new();
    let mut files = Vec::new();
    let mut text_bytes = 0u64;
    let per_file = opts.docs_per_file.max(1);
    let mut writer: Option<std::io::BufWriter<fs_err::File>> = None;
    for i in 0..opts.docs {
        if i % per_file == 0 {
            if let Some(mut w) = writer.take() {
                w.flush()?;
            }
            let path = corpus_dir.join(format!("part-{:05}.jsonl", i / per_file));
            writer = Some(std::io::BufWriter::new(fs_err::File::create(&path)?));
            files.push(path);
        }
        let id = format!("synth-{:07}", i);
        let zh = g.chance(opts.chinese_fraction);
        let roll: f64 = g.rng.random();
        let mut dup_of = Value::Null;
        let mut pii = Vec::new();
        let (kind, text) = if !pool.is_empty() && roll < 0.05 {
            let (src, t) = pool.choose(&mut g.rng).cloned().unwrap_or_default();
            dup_of = Value::String(src);
            ("exact_duplicate", t)
        } else if !pool.is_empty() && roll < 0.10 {
            let (src, t) = pool.choose(&mut g.rng).cloned().unwrap_or_default();
            dup_of = Value::String(src);
            ("near_duplicate", g.perturb(&t))
        } else if zh {
            let (kind, t, planted) = g.zh_page();
            pii = planted;
            (kind, t)
        } else {
            let (kind, t, planted) = g.en_page();
            pii = planted;
            (kind, t)
        };
        if dup_of.is_null() && (kind == "article" || kind == "zh_article") && pool.len() < 200 {
            pool.push((id.clone(), text.clone()));
        } else if dup_of.is_null() && (kind == "article" || kind == "zh_article") && g.chance(0.05)
        {
            let j = g.rng.random_range(0..pool.len());
            pool[j] = (id.clone(), text.clone());
        }
        text_bytes += text.len() as u64;
        let rec = json!({
            "id": id,
            "text": text,
            "url": format!("https://site{}.example.com/{}", i % 97, i),
            "synth_kind": kind,
            "synth_dup_of": dup_of,
            "synth_pii": pii,
        });
        if let Some(w) = writer.as_mut() {
            serde_json::to_writer(&mut *w, &rec)?;
            w.write_all(b"\n")?;
        }
    }
    if let Some(mut w) = writer.take() {
        w.flush()?;
    }
    let (chat_train, chat_test) = chat::synth_chat(&chat_dir, opts.chat_examples, opts.seed)?;
    Ok(SynthSummary {
        corpus_files: files,
        text_bytes,
        chat_train,
        chat_test,
    })
}
