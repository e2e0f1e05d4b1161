//! The trained tokenizer reads text as Hugging Face transformers reads a Qwen2 model's tokenizer
//! (recorded by tools/golden/qwen2_pretokenizer.py).

use fount_tokenizer::{train, BpeConfig};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

#[test]
fn the_trained_tokenizer_splits_text_as_transformers_reads_qwen2() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/qwen2_pretokenizer.json"
    );
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let texts = ["the date 2018-06-21 is a date", "北京欢迎你 café"].repeat(20);
    let cfg = BpeConfig {
        vocab_size: 300,
        ..BpeConfig::default()
    };
    let tok = train(texts.iter(), &cfg).unwrap();
    let json: serde_json::Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    assert_eq!(json["normalizer"], golden["normalizer"]);
    assert_eq!(json["pre_tokenizer"], golden["pre_tokenizer"]);
    // and the pieces themselves, as transformers cut them
    let strings = golden["strings"].as_array().unwrap();
    for (s, want) in strings.iter().zip(golden["pieces"].as_array().unwrap()) {
        let mut normalized = tokenizers::NormalizedString::from(s.as_str().unwrap());
        if let Some(n) = tok.get_normalizer() {
            tokenizers::Normalizer::normalize(n, &mut normalized).unwrap();
        }
        let mut pre = PreTokenizedString::from(normalized);
        tok.get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut pre)
            .unwrap();
        let got: Vec<String> = pre
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect();
        let want: Vec<String> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(got, want, "{s}");
    }
}
