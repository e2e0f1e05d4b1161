use fount_model::{ChatTemplate, Message};

use crate::util::{fixture, REGENERATE};

#[test]
fn templates_render_byte_identically_to_transformers() {
    let text = std::fs::read_to_string(fixture("chat/cases.json"))
        .unwrap_or_else(|e| panic!("chat/cases.json: {e}; run `{REGENERATE}`"));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let conversations: Vec<Vec<Message>> =
        serde_json::from_value(json["conversations"].clone()).unwrap_or_else(|e| panic!("{e}"));
    let tools = json["tools"].clone();
    let cases = json["cases"].as_array().cloned().unwrap_or_default();
    assert!(cases.len() >= 30, "too few cases in the fixture");
    let mut checked = 0;
    for case in cases {
        let dir = case["dir"].as_str().unwrap_or_default();
        let template = ChatTemplate::from_dir(&fixture(&format!("chat/{dir}")))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .unwrap_or_else(|| panic!("{dir}: no template found"));
        let conv = &conversations[case["conversation"].as_u64().unwrap_or_default() as usize];
        let agp = case["add_generation_prompt"].as_bool().unwrap_or_default();
        let mut extra = serde_json::Map::new();
        if case["tools"].as_bool().unwrap_or_default() {
            extra.insert("tools".into(), tools.clone());
        }
        let got = template.render_with(conv, agp, &extra);
        match (case.get("text").and_then(|t| t.as_str()), got) {
            (Some(expected), Ok(actual)) => assert_eq!(actual, expected, "{case}"),
            (None, Err(e)) => {
                let expected = case["error"].as_str().unwrap_or_default();
                assert!(
                    e.to_string().contains(expected),
                    "{dir}: error {e} should contain {expected:?}"
                );
            }
            (Some(_), Err(e)) => panic!("{dir} failed where transformers rendered: {e}\n{case}"),
            (None, Ok(actual)) => {
                panic!("{dir} rendered {actual:?} where transformers raised\n{case}")
            }
        }
        checked += 1;
    }
    assert!(checked >= 30);
}

#[test]
fn a_template_that_does_not_compile_is_a_clear_error() {
    let err = ChatTemplate::new("{% for m in messages %}", Default::default()).err();
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("chat template") && msg.contains("does not compile"),
        "{msg}"
    );
}

#[test]
fn a_directory_without_a_template_has_none() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    assert!(ChatTemplate::from_dir(dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
}
