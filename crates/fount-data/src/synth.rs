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

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::error::Result;

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

const SUBJECTS: &[&str] = &[
    "the city council",
    "our team",
    "the new library",
    "a local farmer",
    "the research group",
    "the committee",
    "my neighbour",
    "the company",
    "the school board",
    "a small bakery",
    "the museum",
    "the river authority",
    "the hospital",
    "a young engineer",
    "the orchestra",
    "the football club",
    "the old bridge",
    "the village",
    "the startup",
    "the government",
    "the volunteers",
    "the author",
    "the students",
    "the garden centre",
    "the railway",
];
const VERBS: &[&str] = &[
    "announced",
    "built",
    "improved",
    "discussed",
    "opened",
    "planned",
    "reviewed",
    "finished",
    "described",
    "repaired",
    "celebrated",
    "tested",
    "measured",
    "questioned",
    "supported",
    "explained",
    "changed",
    "visited",
    "published",
    "designed",
    "expanded",
    "replaced",
];
const OBJECTS: &[&str] = &[
    "a new cycling path",
    "the annual budget",
    "the water supply",
    "a community garden",
    "the winter schedule",
    "an old factory",
    "the public transport plan",
    "a summer festival",
    "the reading programme",
    "the local market",
    "a wind farm",
    "the harbour wall",
    "the energy report",
    "a new playground",
    "the history of the town",
    "the flood defences",
    "a mobile clinic",
    "the opening hours",
    "a recycling scheme",
    "the concert series",
];
const ADVERBIALS: &[&str] = &[
    "last week",
    "after a long debate",
    "with help from residents",
    "despite the rain",
    "for the first time",
    "earlier this year",
    "in the spring",
    "on Tuesday morning",
    "without much fuss",
    "ahead of the holidays",
    "at the end of the month",
    "in record time",
    "under a tight budget",
    "with great care",
    "to everyone's surprise",
    "once again",
];
const ADJECTIVES: &[&str] = &[
    "important",
    "difficult",
    "careful",
    "popular",
    "expensive",
    "modest",
    "ambitious",
    "useful",
    "quiet",
    "remarkable",
    "practical",
    "surprising",
    "welcome",
    "overdue",
    "generous",
];
const CONNECTORS: &[&str] = &[
    "However,",
    "Meanwhile,",
    "In addition,",
    "As a result,",
    "For many people,",
    "According to the report,",
    "At the same time,",
    "In the end,",
    "Still,",
    "Fortunately,",
];
const TOPICS: &[&str] = &[
    "Local news",
    "Community update",
    "Weekend report",
    "Notes from the council",
    "A look back",
    "Planning ahead",
    "What changed this year",
    "Questions and answers",
];
const NAV: &[&str] = &[
    "Home | About | Contact",
    "Skip to content",
    "Menu",
    "Search",
    "Log in",
    "Sign up",
    "Share this:",
    "Facebook",
    "Twitter",
    "Related posts",
    "Read more",
    "Back to top",
    "Copyright 2024 All rights reserved",
    "Subscribe to our newsletter",
];
const POLICY: &[&str] = &[
    "This website uses cookies to improve your experience on every page we serve.",
    "By continuing to browse you agree to our terms of use and all related conditions.",
    "Please read our privacy policy before you submit the form below.",
    "Enable JavaScript in your browser settings to view the interactive map.",
];
const SPAM: &[&str] = &[
    "cheap", "best", "deal", "buy", "online", "free", "shipping", "discount", "offer", "sale",
];

const ZH_SUBJECTS: &[&str] = &[
    "市政府",
    "我们的团队",
    "这家公司",
    "当地的农民",
    "研究小组",
    "学校",
    "图书馆",
    "医院",
    "年轻的工程师",
    "志愿者们",
    "博物馆",
    "委员会",
    "村里的老人",
    "这座城市",
    "作者",
    "铁路局",
    "足球俱乐部",
    "面包店",
    "交响乐团",
    "环保组织",
    "大学生们",
    "出版社",
    "社区中心",
    "记者",
];
const ZH_VERBS: &[&str] = &[
    "宣布了",
    "完成了",
    "讨论了",
    "改进了",
    "建设了",
    "发布了",
    "支持了",
    "介绍了",
    "参观了",
    "设计了",
    "测试了",
    "修复了",
    "扩大了",
    "调整了",
    "庆祝了",
    "检查了",
    "批准了",
    "推迟了",
    "研究了",
    "报道了",
    "组织了",
    "更新了",
];
const ZH_ADJ: &[&str] = &[
    "新的",
    "重要的",
    "大型的",
    "小型的",
    "昂贵的",
    "实用的",
    "有名的",
    "古老的",
    "现代的",
    "环保的",
    "公共的",
    "免费的",
    "",
];
const ZH_OBJECTS: &[&str] = &[
    "自行车道",
    "年度预算",
    "供水系统",
    "社区花园",
    "冬季时间表",
    "公共交通计划",
    "音乐节",
    "阅读计划",
    "本地市场",
    "风力发电场",
    "能源报告",
    "游乐场",
    "防洪工程",
    "回收计划",
    "音乐会",
    "桥梁",
    "停车场",
    "体育馆",
    "展览",
    "网站",
    "培训课程",
    "农产品市场",
];
const ZH_ADVERBIALS: &[&str] = &[
    "上周",
    "经过长时间的讨论",
    "在居民的帮助下",
    "尽管下着雨",
    "第一次",
    "今年早些时候",
    "在春天",
    "星期二上午",
    "在节日之前",
    "在月底",
    "在有限的预算下",
    "去年秋天",
    "最近",
    "昨天下午",
    "在市中心",
    "在河边",
    "在郊区",
];
const ZH_ADVERBS: &[&str] = &[
    "终于",
    "已经",
    "正式",
    "顺利地",
    "再次",
    "悄悄地",
    "迅速",
    "",
];
const ZH_SPEAKERS: &[&str] = &[
    "居民们认为",
    "专家表示",
    "记者了解到",
    "负责人说",
    "有人担心",
    "大多数人觉得",
    "报告指出",
    "老师们希望",
    "游客们发现",
];
const ZH_CLAUSES: &[&str] = &[
    "这是一件好事",
    "这对当地的发展很重要",
    "问题已经讨论了很久",
    "有关部门也给予了支持",
    "明年能够继续",
    "结果比预想的要好",
    "费用还是太高",
    "时间安排得不太合理",
    "效果非常明显",
    "还需要更多的志愿者",
    "天气会影响进度",
    "孩子们特别喜欢",
];

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
            let mut t = g.zh_article();
            if g.chance(0.15) {
                pii = g.plant_pii(&mut t, true);
            }
            let kind = if g.chance(0.1) {
                // A Chinese page that is mostly a repeated slogan.
                let line = g.zh_sentence();
                t = std::iter::repeat_n(line, 12).collect::<Vec<_>>().join("\n");
                "zh_repetition"
            } else if g.chance(0.08) {
                t = g.zh_sentence();
                "zh_short"
            } else {
                "zh_article"
            };
            (kind, t)
        } else {
            match g.rng.random_range(0..100) {
                0..=54 => {
                    let mut t = g.article();
                    if g.chance(0.18) {
                        pii = g.plant_pii(&mut t, false);
                    }
                    ("article", t)
                }
                55..=64 => {
                    let mut lines: Vec<String> = (0..g.rng.random_range(2..6))
                        .map(|_| g.pick(NAV).to_string())
                        .collect();
                    lines.push(g.article());
                    for _ in 0..g.rng.random_range(1..3) {
                        lines.push(g.pick(POLICY).to_string());
                    }
                    for _ in 0..g.rng.random_range(1..6) {
                        lines.push(g.pick(NAV).to_string());
                    }
                    ("boilerplate", lines.join("\n"))
                }
                65..=69 => {
                    let mut lines = vec![format!("{}:", g.pick(TOPICS))];
                    let bullet = if g.chance(0.5) { "- " } else { "• " };
                    for _ in 0..g.rng.random_range(4..14) {
                        lines.push(format!("{bullet}{}", g.sentence()));
                    }
                    ("list", lines.join("\n"))
                }
                70..=74 => ("short", g.sentence()),
                75..=79 => {
                    let mut words = Vec::new();
                    for _ in 0..g.rng.random_range(60..200) {
                        let w = g.pick(SPAM);
                        words.push(if g.chance(0.3) {
                            format!("#{w}")
                        } else {
                            w.to_string()
                        });
                    }
                    ("spam", words.join(" "))
                }
                80..=82 => {
                    let mut t = g.paragraph(3);
                    t.push_str("\n\nfunction init() { var x = document.getElementById('app'); x.innerHTML = 'ready'; }\n\n");
                    t.push_str(&g.paragraph(3));
                    ("code", t)
                }
                83..=84 => {
                    let mut t = g.paragraph(2);
                    t.push_str("\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n\n");
                    t.push_str(&g.paragraph(4));
                    ("lorem_ipsum", t)
                }
                85..=89 => {
                    let line = g.sentence();
                    let mut lines = Vec::new();
                    for _ in 0..g.rng.random_range(6..16) {
                        if g.chance(0.6) {
                            lines.push(line.clone());
                        } else {
                            lines.push(g.sentence());
                        }
                    }
                    ("repeated_lines", lines.join("\n"))
                }
                90..=93 => {
                    let mut lines = Vec::new();
                    for _ in 0..g.rng.random_range(8..30) {
                        let cells: Vec<String> = (0..g.rng.random_range(2..6))
                            .map(|_| format!("{:.2}", g.rng.random_range(0.0..1000.0)))
                            .collect();
                        lines.push(cells.join(" | "));
                    }
                    ("table", lines.join("\n"))
                }
                94..=96 => {
                    let mut lines = Vec::new();
                    for _ in 0..g.rng.random_range(5..20) {
                        lines.push(format!("{}...", g.sentence().trim_end_matches(['.', '?'])));
                    }
                    ("ellipsis", lines.join("\n"))
                }
                _ => {
                    let mut t = String::new();
                    for _ in 0..g.rng.random_range(3..8) {
                        t.push_str(&g.paragraph(1));
                        t.push('\n');
                    }
                    ("one_line_paragraphs", t)
                }
            }
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
    let (chat_train, chat_test) = synth_chat(&chat_dir, opts.chat_examples, opts.seed)?;
    Ok(SynthSummary {
        corpus_files: files,
        text_bytes,
        chat_train,
        chat_test,
    })
}

/// The instruction of the chat task for one date.
pub fn chat_prompt(date: &str) -> String {
    format!("Rewrite the date {date} in the format DD/MM/YYYY.")
}

/// The correct answer of the chat task for a `YYYY-MM-DD` date.
pub fn chat_answer(date: &str) -> Option<String> {
    let mut it = date.split('-');
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    Some(format!("{d}/{m}/{y}"))
}

fn synth_chat(dir: &Path, n: usize, seed: u64) -> Result<(PathBuf, PathBuf)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0c4a_7000);
    let mut seen = std::collections::HashSet::new();
    let mut dates = Vec::new();
    while dates.len() < n {
        let date = format!(
            "{}-{:02}-{:02}",
            rng.random_range(1950..2040),
            rng.random_range(1..13),
            rng.random_range(1..29)
        );
        if seen.insert(date.clone()) {
            dates.push(date);
        }
    }
    let test_n = (n / 6).max(1).min(n);
    let train_path = dir.join("train.jsonl");
    let test_path = dir.join("test.jsonl");
    let mut train = std::io::BufWriter::new(fs_err::File::create(&train_path)?);
    let mut test = std::io::BufWriter::new(fs_err::File::create(&test_path)?);
    for (i, date) in dates.iter().enumerate() {
        let answer = chat_answer(date).unwrap_or_default();
        let rec = json!({ "messages": [
            { "role": "user", "content": chat_prompt(date) },
            { "role": "assistant", "content": answer },
        ]});
        let w = if i < test_n { &mut test } else { &mut train };
        serde_json::to_writer(&mut *w, &rec)?;
        w.write_all(b"\n")?;
    }
    train.flush()?;
    test.flush()?;
    Ok((train_path, test_path))
}
