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
}
