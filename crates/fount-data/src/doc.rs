//! The document that flows through the pipeline.

use serde_json::{Map, Value};

/// One document: its text, a stable id and the metadata it came with.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The id from the input (`id` field) or one assigned as `<file stem>:<line>`.
    pub id: String,
    /// The text.
    pub text: String,
    /// Every other field of the input record, kept as it was.
    pub meta: Map<String, Value>,
    /// The language found by the language-id stage (ISO 639-1 where one exists).
    pub lang: Option<String>,
    /// The language-id score in `[0, 1]`.
    pub lang_score: f32,
}

impl Document {
    /// A document with no metadata.
    pub fn new(id: impl Into<String>, text: impl Into<String>) -> Document {
        Document {
            id: id.into(),
            text: text.into(),
            meta: Map::new(),
            lang: None,
            lang_score: 0.0,
        }
    }

    /// The record written to `kept/` and `dropped/` files: metadata first, then `id`, `text`,
    /// `lang`, `lang_score`, and `reason`/`stage` for dropped documents.
    pub fn to_record(&self, drop: Option<(&str, &str)>) -> Value {
        let mut m = self.meta.clone();
        m.insert("id".into(), Value::String(self.id.clone()));
        m.insert("text".into(), Value::String(self.text.clone()));
        if let Some(lang) = &self.lang {
            m.insert("lang".into(), Value::String(lang.clone()));
            m.insert(
                "lang_score".into(),
                serde_json::Number::from_f64(f64::from(self.lang_score))
                    .map_or(Value::Null, Value::Number),
            );
        }
        if let Some((stage, reason)) = drop {
            m.insert("stage".into(), Value::String(stage.into()));
            m.insert("reason".into(), Value::String(reason.into()));
        }
        Value::Object(m)
    }

    /// Reads a record written by [`Document::to_record`] back.
    pub fn from_record(v: Value) -> Option<Document> {
        let Value::Object(mut m) = v else { return None };
        let Some(Value::String(id)) = m.remove("id") else {
            return None;
        };
        let Some(Value::String(text)) = m.remove("text") else {
            return None;
        };
        let lang = match m.remove("lang") {
            Some(Value::String(l)) => Some(l),
            _ => None,
        };
        let lang_score = m
            .remove("lang_score")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0) as f32;
        m.remove("stage");
        m.remove("reason");
        Some(Document {
            id,
            text,
            meta: m,
            lang,
            lang_score,
        })
    }
}
