//! Each rule just inside and just outside its threshold, in English and (where the rule applies)
//! Chinese.

use fount_data::filters::{FineWeb, GopherQuality, GopherRepetition, Verdict, C4};
use fount_data::words::{count_sentences, english_words, Lang};

const FILL: [&str; 8] = [
    "garden", "behind", "house", "green", "quiet", "river", "stone", "window",
];

/// `n` non-stop words of 5–6 letters, no punctuation.
fn fill(n: usize) -> Vec<String> {
    (0..n).map(|i| FILL[i % FILL.len()].to_string()).collect()
}

fn quality(text: &str) -> Verdict {
    GopherQuality::default().check(text, Lang::Latin)
}

fn drop(reason: &'static str) -> Verdict {
    Verdict::Drop(reason)
}

#[test]
fn gopher_word_count() {
    let doc = |n: usize| {
        let mut w = fill(n - 2);
        w.extend(["the".to_string(), "and".to_string()]);
        w.join(" ")
    };
    assert_eq!(quality(&doc(50)), Verdict::Keep);
    assert_eq!(quality(&doc(49)), drop("gopher_short_doc"));
    let q = GopherQuality {
        max_doc_words: 60,
        ..Default::default()
    };
    assert_eq!(q.check(&doc(60), Lang::Latin), Verdict::Keep);
    assert_eq!(q.check(&doc(61), Lang::Latin), drop("gopher_long_doc"));
}

#[test]
fn gopher_mean_word_length() {
    // 60 three-letter words (the stop words included): mean exactly 3.0
    let mut w: Vec<&str> = ["the", "and", "cat", "dog", "sun"]
        .iter()
        .cycle()
        .take(60)
        .copied()
        .collect();
    assert_eq!(quality(&w.join(" ")), Verdict::Keep);
    w[2] = "ox";
    assert_eq!(quality(&w.join(" ")), drop("gopher_below_avg_threshold"));
    // ten-letter words: mean 10.0 is kept, 10.05 is not
    let mut w: Vec<String> = (0..60).map(|_| "abcdefghij".to_string()).collect();
    assert_ne!(quality(&w.join(" ")), drop("gopher_above_avg_threshold"));
    w[0] = "abcdefghijklm".into();
    assert_eq!(quality(&w.join(" ")), drop("gopher_above_avg_threshold"));
}

#[test]
fn gopher_symbol_ratios() {
    // spaCy splits "#tag" into "#" and "tag": k tags add 2k words and k hashes
    let doc = |k: usize, sym: &str| {
        let mut w = fill(78);
        w.extend(["the".to_string(), "and".to_string()]);
        for _ in 0..k {
            w.insert(10, format!("{sym}tag"));
        }
        w.join(" ")
    };
    assert_eq!(quality(&doc(10, "#")), Verdict::Keep); // 10 / 100
    assert_eq!(quality(&doc(11, "#")), drop("gopher_too_many_hashes")); // 11 / 102
    assert_eq!(quality(&doc(10, "...")), Verdict::Keep);
    assert_eq!(quality(&doc(11, "...")), drop("gopher_too_many_ellipsis"));
    assert_eq!(quality(&doc(11, "…")), drop("gopher_too_many_ellipsis"));
}

#[test]
fn gopher_line_shapes() {
    let lines = |bullets: usize, ellipses: usize| {
        (0..10)
            .map(|i| {
                let mut l = format!("the garden and house {}", fill(4).join(" "));
                if i < bullets {
                    l = format!("{} {l}", if i % 2 == 0 { "-" } else { "•" });
                }
                if i >= 10 - ellipses {
                    l.push_str("...");
                }
                l
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(quality(&lines(9, 0)), Verdict::Keep);
    assert_eq!(quality(&lines(10, 0)), drop("gopher_too_many_bullets"));
    assert_eq!(quality(&lines(0, 3)), Verdict::Keep);
    assert_eq!(quality(&lines(0, 4)), drop("gopher_too_many_end_ellipsis"));
}

#[test]
fn gopher_alpha_and_stop_words() {
    let doc = |numbers: usize, stop: &[&str]| {
        let mut w = fill(80 - stop.len());
        w.extend(stop.iter().map(|s| s.to_string()));
        w.extend((0..numbers).map(|i| format!("{}", 1000 + i)));
        w.join(" ")
    };
    assert_eq!(quality(&doc(20, &["the", "and"])), Verdict::Keep); // 80 / 100
    assert_eq!(
        quality(&doc(21, &["the", "and"])),
        drop("gopher_below_alpha_threshold")
    );
    assert_eq!(quality(&doc(0, &["the", "the", "and"])), Verdict::Keep);
    assert_eq!(
        quality(&doc(0, &["the", "the"])),
        drop("gopher_enough_stop_words")
    );
}

fn repetition(text: &str) -> Verdict {
    GopherRepetition::default().check(text, Lang::Latin)
}

/// Pseudo-random lower-case words of 4–8 letters (no repeated n-grams to speak of).
fn random_words(n: usize, seed: u64) -> Vec<String> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 4 + (x >> 60) as usize % 5;
            (0..len)
                .map(|k| (b'a' + ((x >> (k * 5 + 3)) % 26) as u8) as char)
                .collect()
        })
        .collect()
}

/// Distinct sentences of six random words, `n` of them.
fn sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let w = random_words(6, i as u64 + 100);
            format!("The {} and {}.", w[..3].join(" "), w[3..].join(" "))
        })
        .collect()
}

fn words_for(i: usize) -> String {
    const D: [&str; 10] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    format!("{}{}", D[i / 10 % 10], D[i % 10])
}

#[test]
fn repetition_lines_and_paragraphs() {
    // 10 lines, 3 of them repeats: fraction 0.3 is kept by the line-count rule
    let mut lines = sentences(7);
    lines.extend(std::iter::repeat_n(lines[0].clone(), 3));
    let text = lines.join("\n");
    assert_ne!(repetition(&text), drop("dup_line_frac"));
    lines.push(lines[0].clone());
    lines.remove(1);
    lines.push(lines[1].clone());
    assert_eq!(repetition(&lines.join("\n")), drop("dup_line_frac"));
    // the same with blank lines between: paragraphs
    let mut paras = sentences(7);
    paras.extend(std::iter::repeat_n(paras[0].clone(), 3));
    assert_ne!(repetition(&paras.join("\n\n")), drop("dup_para_frac"));
    paras.push(paras[0].clone());
    assert_eq!(repetition(&paras.join("\n\n")), drop("dup_para_frac"));
}

#[test]
fn repetition_character_fractions() {
    // one duplicated short line among long ones: characters decide
    let long: Vec<String> = sentences(40);
    let text = long.join("\n");
    let dup = "Short repeated line here.";
    let with = |k: usize| {
        let mut l = long.clone();
        l.extend(std::iter::repeat_n(dup.to_string(), k + 1));
        l.join("\n")
    };
    assert_eq!(repetition(&text), Verdict::Keep);
    assert_eq!(repetition(&with(1)), Verdict::Keep);
    // many repeats of a short line cross 0.2 of the characters before 0.3 of the lines
    let mut l = sentences(60);
    l.extend(std::iter::repeat_n(long[0].clone(), 20));
    assert_eq!(repetition(&l.join("\n")), drop("dup_line_char_frac"));
}

#[test]
fn repetition_n_grams() {
    // a top 2-gram covering more than 20% of the characters
    let mut w = random_words(100, 1);
    w.extend(std::iter::repeat_n("aa bb".to_string(), 2));
    assert_eq!(repetition(&w.join(" ")), Verdict::Keep);
    let spam = std::iter::repeat_n("cheap deal", 30)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        repetition(&format!("{} {spam}", random_words(100, 1).join(" "))),
        drop("top_2_gram")
    );
    // a repeated 5-gram run that is not the top 2-, 3- or 4-gram enough to trip them
    let unique: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
    let mut text = unique.join(" ");
    let rep = unique[..60].join(" ");
    text.push(' ');
    text.push_str(&rep);
    let v = repetition(&text);
    assert!(
        matches!(v, Verdict::Drop(r) if r.starts_with("duplicated_") || r.starts_with("top_")),
        "{v:?}"
    );
    assert_eq!(repetition(&unique.join(" ")), Verdict::Keep);
}

fn c4(text: &str) -> (Verdict, String) {
    let mut t = text.to_string();
    let v = C4::default().check(&mut t, Lang::Latin);
    (v, t)
}

#[test]
fn c4_rules() {
    let five = sentences(5).join("\n");
    assert_eq!(c4(&five).0, Verdict::Keep);
    assert_eq!(c4(&sentences(4).join("\n")).0, drop("too_few_sentences"));
    // lines with fewer than three words go, and do not count
    let (v, t) = c4(&format!("Menu\nTwo words\n{five}"));
    assert_eq!(v, Verdict::Keep);
    assert!(!t.contains("Menu") && !t.contains("Two words"));
    // javascript and policy lines are removed, not the document
    let (v, t) = c4(&format!(
        "{five}\nPlease enable JavaScript to continue.\nThis site uses cookies for tracking."
    ));
    assert_eq!(v, Verdict::Keep);
    assert!(!t.contains("JavaScript") && !t.contains("cookies"));
    // lorem ipsum and curly brackets drop the document
    assert_eq!(
        c4(&format!("{five}\nLorem ipsum dolor sit amet.")).0,
        drop("lorem_ipsum")
    );
    assert_eq!(
        c4(&format!("{five}\nvar x = {{ a: 1 }};")).0,
        drop("curly_bracket")
    );
    // a bracket on a line that is removed anyway does not count
    assert_eq!(c4(&format!("{five}\n{{x}}")).0, Verdict::Keep);
    // a word over 1000 characters removes its line
    let (v, t) = c4(&format!("{five}\nsee this {} now", "x".repeat(1001)));
    assert_eq!(v, Verdict::Keep);
    assert!(!t.contains("xxxx"));
    // citation marks are removed
    let (_, t) = c4(&format!(
        "{five}\nThe bridge opened in 1890.[3] It is long.[citation needed]"
    ));
    assert!(
        t.contains("opened in 1890. It is long.") && !t.contains('['),
        "{t}"
    );
    // several sentences on one line count separately
    assert_eq!(
        c4("One two three. Four five six. Seven eight nine.\nAb bc cd. De ef fg.").0,
        Verdict::Keep
    );
    // as in spaCy, a single letter with a period is one token (an initial), not a sentence end
    assert_eq!(count_sentences("A b c. D e f."), 1);
    assert_eq!(count_sentences("One two three. Four five six! Seven?"), 3);
}

fn fineweb(text: &str) -> Verdict {
    FineWeb::default().check(text, Lang::Latin)
}

#[test]
fn fineweb_rules() {
    let long = "a line that is comfortably longer than thirty characters";
    // terminal punctuation: 12 of 100 lines is the minimum
    let doc = |punct: usize| {
        (0..100)
            .map(|i| {
                format!(
                    "{long} {}{}",
                    words_for(i),
                    if i < punct { "." } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(fineweb(&doc(12)), Verdict::Keep);
    assert_eq!(fineweb(&doc(11)), drop("line_punct_ratio"));
    // short lines: 67 of 100 allowed
    let doc = |short: usize| {
        (0..100)
            .map(|i| {
                if i < short {
                    format!("tiny {}.", words_for(i))
                } else {
                    format!("{long} {}.", words_for(i))
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(fineweb(&doc(67)), Verdict::Keep);
    assert_eq!(fineweb(&doc(68)), drop("short_line_ratio"));
    // duplicated-line characters: at most 1% of the non-newline characters
    let lines: Vec<String> = (0..100)
        .map(|i| format!("{long} {}.", words_for(i)))
        .collect();
    let mut with_dup = lines.clone();
    with_dup.push(lines[0].clone());
    assert_eq!(fineweb(&with_dup.join("\n")), Verdict::Keep);
    with_dup.push(lines[1].clone());
    assert_eq!(fineweb(&with_dup.join("\n")), drop("char_dup_ratio"));
    // newlines per word
    let list = (0..40)
        .map(|i| format!("{} item {}.", long, words_for(i)))
        .collect::<Vec<_>>();
    assert_eq!(fineweb(&list.join("\n")), Verdict::Keep);
    let list = (0..40)
        .map(|i| format!("Item {}.", words_for(i)))
        .collect::<Vec<_>>();
    let v = fineweb(&list.join("\n\n\n"));
    assert!(
        v == drop("list_ratio") || v == drop("short_line_ratio"),
        "{v:?}"
    );
    assert_eq!(fineweb("\n\n  \n"), drop("empty"));
}

#[test]
fn spacy_compatible_words() {
    let cases: [(&str, &[&str]); 6] = [
        (
            "don't can't I'm everyone's",
            &["do", "n't", "ca", "n't", "I", "'m", "everyone", "'s"],
        ),
        (
            "$500 10% 5km. 2024-03-05 3.5",
            &[
                "$", "500", "10", "%", "5", "km", ".", "2024", "-", "03", "-", "05", "3.5",
            ],
        ),
        (
            "(a step). well-known e.g. U.S. Mr. Smith",
            &[
                "(", "a", "step", ")", ".", "well", "-", "known", "e.g.", "U.S.", "Mr.", "Smith",
            ],
        ),
        (
            "user1@example.org https://site1.example.com/2",
            &["user1@example.org", "https://site1.example.com/2"],
        ),
        (
            "#cheap end... word...word AB.",
            &["#", "cheap", "end", "...", "word", "...", "word", "AB", "."],
        ),
        (
            "“quoted,” he said—then left…",
            &[
                "“", "quoted", ",", "”", "he", "said", "—", "then", "left", "…",
            ],
        ),
    ];
    for (text, want) in cases {
        let mut got = Vec::new();
        english_words(text, &mut got);
        assert_eq!(got, want, "{text}");
    }
}

// ---- Chinese ----

fn zh_sentence(i: usize) -> String {
    const S: [&str; 6] = [
        "市政府",
        "我们的团队",
        "当地的农民",
        "研究小组",
        "图书馆",
        "志愿者们",
    ];
    const V: [&str; 5] = ["宣布了", "完成了", "讨论了", "改进了", "建设了"];
    const O: [&str; 7] = [
        "新的自行车道",
        "年度预算",
        "供水系统",
        "社区花园",
        "音乐节",
        "防洪工程",
        "体育馆",
    ];
    const T: [&str; 9] = [
        "这是大家都关心的事情",
        "居民们觉得效果很好",
        "专家认为还需要时间",
        "孩子们特别喜欢",
        "费用比预想的要高",
        "明年还会继续",
        "天气影响了进度",
        "记者了解到了一些情况",
        "有人提出了意见",
    ];
    format!(
        "{}{}{}，{}。",
        S[i % 6],
        V[(i * 3) % 5],
        O[(i * 5) % 7],
        T[(i * 7) % 9]
    )
}

#[test]
fn chinese_quality() {
    let q = GopherQuality::default();
    let text: String = (0..12).map(zh_sentence).collect();
    assert_eq!(
        q.check(&text, Lang::Cjk),
        Verdict::Keep,
        "Chinese prose is kept"
    );
    // the English rules on the same text would drop all of it (no spaces: one "word")
    assert_eq!(q.check(&text, Lang::Latin), drop("gopher_short_doc"));
    let short: String = (0..2).map(zh_sentence).collect();
    assert_eq!(q.check(&short, Lang::Cjk), drop("gopher_short_doc"));
    // no function words at all
    let no_stop = "市政府宣布新自行车道。".repeat(20);
    assert_eq!(
        q.check(&no_stop, Lang::Cjk),
        drop("gopher_enough_stop_words")
    );
    // random single characters: mean word length near 1
    let junk: String = "丁七万丈三上下不与丐丑专且丕世丘丙业丛东丝"
        .chars()
        .cycle()
        .take(300)
        .map(|c| format!("{c} "))
        .collect();
    assert_eq!(
        q.check(&junk, Lang::Cjk),
        drop("gopher_below_avg_threshold")
    );
}

#[test]
fn chinese_repetition_c4_fineweb() {
    let prose: Vec<String> = (0..12).map(zh_sentence).collect();
    let r = GopherRepetition::default();
    assert_eq!(r.check(&prose.join("\n"), Lang::Cjk), Verdict::Keep);
    let slogan = std::iter::repeat_n(prose[0].clone(), 8)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(r.check(&slogan, Lang::Cjk), drop("dup_line_frac"));
    // C4 counts jieba words per line and 。 as sentence ends
    let mut t = format!("首页\n{}", prose[..5].join("\n"));
    assert_eq!(C4::default().check(&mut t, Lang::Cjk), Verdict::Keep);
    assert!(!t.contains("首页"), "a one-word line is removed");
    let mut t = prose[..4].join("\n");
    assert_eq!(
        C4::default().check(&mut t, Lang::Cjk),
        drop("too_few_sentences")
    );
    let mut t = prose[..5].join("");
    assert_eq!(
        C4::default().check(&mut t, Lang::Cjk),
        Verdict::Keep,
        "five sentences on one line"
    );
    // FineWeb: short CJK lines are 10 characters or fewer
    let f = FineWeb::default();
    assert_eq!(f.check(&prose.join("\n"), Lang::Cjk), Verdict::Keep);
    let menu: Vec<String> = (0..20).map(|i| format!("栏目{i}。")).collect();
    assert_eq!(
        f.check(&menu.join("\n"), Lang::Cjk),
        drop("short_line_ratio")
    );
}
