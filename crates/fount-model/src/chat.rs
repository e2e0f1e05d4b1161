//! Chat templates rendered exactly as `transformers`' `apply_chat_template` renders them: Jinja
//! with `trim_blocks` and `lstrip_blocks`, `loopcontrols`, Python string and dict methods,
//! `raise_exception`, `strftime_now`, and a `tojson` that writes what Python's
//! `json.dumps(ensure_ascii=False)` writes.
//!
//! The template comes from `chat_template.jinja` beside `tokenizer_config.json` (what
//! `transformers` v5 writes) or from `tokenizer_config.json`'s `chat_template` (a string, or a
//! list of `{name, template}` of which `default` is used).

use std::path::Path;

use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::read_json_if_exists;

/// One chat message (`{"role": …, "content": …}`); other fields pass through to the template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The text (string content; lists of parts are passed through in `extra`).
    #[serde(default)]
    pub content: serde_json::Value,
    /// Any other fields (`name`, `tool_calls`, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with string content.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: serde_json::Value::String(content.into()),
            extra: Default::default(),
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: serde_json::Map<String, serde_json::Value>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` maps names such as `bos_token` to their strings.
    pub fn new(
        source: &str,
        special_tokens: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME.to_string(), source.to_string())
            .map_err(|e| Error::ChatTemplate(format!("does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            special_tokens,
        })
    }

    /// Loads the template of a model directory, or `None` if it has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        Ok(match ChatTemplate::source_in_dir(dir)? {
            Some((source, special)) => Some(ChatTemplate::new(&source, special)?),
            None => None,
        })
    }

    /// The template source of a model directory (`chat_template.jinja`, or `chat_template` in
    /// `tokenizer_config.json`) with the special tokens it may name, or `None`.
    pub fn source_in_dir(
        dir: &Path,
    ) -> Result<Option<(String, serde_json::Map<String, serde_json::Value>)>> {
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let mut special = serde_json::Map::new();
        if let Some(cfg) = &config {
            for key in [
                "bos_token",
                "eos_token",
                "unk_token",
                "pad_token",
                "sep_token",
                "cls_token",
                "mask_token",
            ] {
                if let Some(v) = cfg.get(key) {
                    let text = match v {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Object(o) => o
                            .get("content")
                            .and_then(|c| c.as_str())
                            .map(str::to_string),
                        _ => None,
                    };
                    if let Some(t) = text {
                        special.insert(key.into(), t.into());
                    }
                }
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(fs_err::read_to_string(&jinja)?)
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        Ok(source.map(|s| (s, special)))
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Renders with extra template variables (`tools`, `documents`, `date_string`, …), as the
    /// keyword arguments of `apply_chat_template`.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let mut ctx = self.special_tokens.clone();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| Error::ChatTemplate(e.to_string()))?,
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| Error::ChatTemplate(format!("rendering failed: {e:#}")))
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson(value, indent=None, sort_keys=False)`, byte-compatible with
/// `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => write_py_str(s, out),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_str(k, out);
                out.push_str(": ");
                write_py_json(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(secs, &format)
}

/// Formats a Unix time (UTC) with the `strftime` codes templates use.
pub(crate) fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:05:09 UTC
        assert_eq!(
            strftime(1_722_000_309, "%d %b %Y %H:%M:%S"),
            "26 Jul 2024 13:25:09"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %B %%"), "1970-01-01 January %");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let env = {
            let mut e = Environment::new();
            e.add_filter("tojson", tojson);
            e
        };
        let v = serde_json::json!({"a": [1, 2.5, "x\"y\n"], "é": null, "b": {}});
        let out = env
            .render_str(
                "{{ v | tojson }}|{{ v | tojson(indent=2) }}",
                minijinja::context! { v => Value::from_serialize(&v) },
            )
            .unwrap_or_default();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, \"x\\\"y\\n\"], \"é\": null, \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    \"x\\\"y\\n\"\n  ],\n  \"é\": null,\n  \"b\": {}\n}"
        );
    }
}
