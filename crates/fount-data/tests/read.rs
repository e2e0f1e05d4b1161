//! Readers and bad input.

use std::io::Write;
use std::path::Path;

use fount_data::read::{
    expand_inputs, parse_json_line, InputReader, OnError, ReaderConfig, Record,
};
use fount_data::Error;

fn docs_of(path: &Path, cfg: &ReaderConfig) -> Vec<(String, String)> {
    InputReader::open(path, cfg)
        .unwrap()
        .map(|r| match r.unwrap() {
            Record::JsonLine(line, bytes) => {
                let d = parse_json_line(path, line, &bytes, cfg).unwrap();
                (d.id, d.text)
            }
            Record::Doc(d) => (d.id, d.text),
            Record::Unreadable(e) => panic!("{e}"),
        })
        .collect()
}

const JSONL: &str = "{\"id\":\"a\",\"text\":\"first\",\"url\":\"u\"}\n\n{\"text\":\"second\"}\n{\"id\":7,\"text\":\"third\"}\n";

#[test]
fn jsonl_plain_gzip_zstd_agree() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("d.jsonl");
    std::fs::write(&plain, JSONL).unwrap();
    let gz = dir.path().join("d.jsonl.gz");
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    e.write_all(JSONL.as_bytes()).unwrap();
    e.finish().unwrap();
    let zst = dir.path().join("d.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(JSONL.as_bytes(), 3).unwrap()).unwrap();
    let cfg = ReaderConfig::default();
    let want = vec![
        ("a".to_string(), "first".to_string()),
        ("d:3".to_string(), "second".to_string()),
        ("7".to_string(), "third".to_string()),
    ];
    for p in [&plain, &gz, &zst] {
        assert_eq!(docs_of(p, &cfg), want, "{}", p.display());
    }
    // metadata is kept
    let d = parse_json_line(&plain, 1, JSONL.lines().next().unwrap().as_bytes(), &cfg).unwrap();
    assert_eq!(d.meta["url"], "u");
    // the digest covers the stored bytes
    let mut r = InputReader::open(&gz, &cfg).unwrap();
    for _ in r.by_ref() {}
    assert_eq!(
        r.digest().unwrap().bytes,
        std::fs::metadata(&gz).unwrap().len()
    );
}

#[test]
fn text_files_directories_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("b.txt"), "second file").unwrap();
    std::fs::write(dir.path().join("sub/a.md"), "first file").unwrap();
    std::fs::write(dir.path().join("ignored.bin"), [0u8, 1, 2]).unwrap();
    let files = expand_inputs(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(files.len(), 2);
    let texts: Vec<String> = files
        .iter()
        .flat_map(|f| docs_of(f, &ReaderConfig::default()))
        .map(|(_, t)| t)
        .collect();
    assert_eq!(texts, ["second file", "first file"]);

    let pq = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/docs.parquet");
    let cfg = ReaderConfig {
        text_field: "content".into(),
        ..Default::default()
    };
    let mut docs = Vec::new();
    for r in InputReader::open(&pq, &cfg).unwrap() {
        let Record::Doc(d) = r.unwrap() else {
            panic!("parquet rows are documents")
        };
        docs.push(d);
    }
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[1].id, "pq-2");
    assert_eq!(docs[1].text, "第二个文档是中文的。");
    assert_eq!(docs[0].meta["url"], "https://a.example.com/1");
    assert_eq!(docs[2].meta["score"], 1.0);
    // a column that is not there
    let e = InputReader::open(&pq, &ReaderConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no string field `text`"), "{e}");
}

#[test]
fn bad_lines_are_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    let cfg = ReaderConfig::default();
    let check = |content: &[u8], want: &str| {
        std::fs::write(&p, content).unwrap();
        let mut errors = Vec::new();
        for r in InputReader::open(&p, &cfg).unwrap() {
            if let Record::JsonLine(line, bytes) = r.unwrap() {
                if let Err(e) = parse_json_line(&p, line, &bytes, &cfg) {
                    errors.push(e.to_string());
                }
            }
        }
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(&format!("{}:2:", p.display())) && errors[0].contains(want),
            "{}",
            errors[0]
        );
    };
    check(b"{\"text\":\"ok\"}\n{\"text\": oops}\n", "malformed JSON");
    check(
        b"{\"text\":\"ok\"}\n{\"body\":\"no text\"}\n",
        "no string field `text`",
    );
    check(
        b"{\"text\":\"ok\"}\n{\"text\":\"\xff\xfe\"}\n",
        "invalid UTF-8",
    );
    check(b"{\"text\":\"ok\"}\n[1,2]\n", "not a JSON object");
    // invalid UTF-8 in a text file: stop, or skip when asked
    let t = dir.path().join("bad.txt");
    std::fs::write(&t, b"abc\xff").unwrap();
    let e = InputReader::open(&t, &cfg)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::InvalidUtf8 { offset: 3, .. }), "{e}");
    let skip = ReaderConfig {
        on_error: OnError::Skip,
        ..Default::default()
    };
    assert!(matches!(
        InputReader::open(&t, &skip)
            .unwrap()
            .next()
            .unwrap()
            .unwrap(),
        Record::Unreadable(_)
    ));
}

#[test]
fn missing_and_unknown_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let e = expand_inputs(&[dir.path().join("nope.jsonl")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.jsonl"), "{e}");
    std::fs::write(dir.path().join("x.csv"), "a,b").unwrap();
    let e = expand_inputs(&[dir.path().join("x.csv")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown format"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = expand_inputs(&[empty]).unwrap_err().to_string();
    assert!(e.contains("holds no"), "{e}");
}
