//! Checking a fine-tuning file before anything runs, with OpenAI's error codes and messages
//! (`../shared/POOL.md` A.6): every line a JSON object with a non-empty `messages` list; each
//! message a known role, known keys and string content; an assistant message in every example,
//! `weight` 0 or 1 and only on assistant messages; at least 10 examples in a training file.
//! Examples longer than the context are counted as `truncated` (training cuts them from the end,
//! as OpenAI does), and the tokens are counted for the bill.

use fount_model::{ChatTemplate, Message, Tokenizer};
use serde_json::Value;

/// The fewest examples a training file may have.
pub const MIN_EXAMPLES: usize = 10;

/// Why a file was refused: the job's `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `invalid_n_examples`, `invalid_file_format`, `invalid_training_file`, …
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// `training_file` or `validation_file`.
    pub param: &'static str,
}

/// What a valid file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileReport {
    /// Examples.
    pub examples: usize,
    /// Tokens over all examples, each counted up to the context.
    pub tokens: u64,
    /// Examples longer than the context (cut from the end in training).
    pub truncated: usize,
}

/// Which file is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// `training_file`.
    Training,
    /// `validation_file`.
    Validation,
}

impl Which {
    /// The request field naming the file.
    pub fn param(self) -> &'static str {
        match self {
            Which::Training => "training_file",
            Which::Validation => "validation_file",
        }
    }

    /// The code of a refusal of the file's contents (`invalid_training_file`, …).
    pub fn invalid(self) -> &'static str {
        match self {
            Which::Training => "invalid_training_file",
            Which::Validation => "invalid_validation_file",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Which::Training => "training",
            Which::Validation => "validation",
        }
    }
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant"];
const KEYS: &[&str] = &["role", "content", "name", "weight"];

/// Checks a JSONL file, read a line at a time from `reader` (a file of any size is never held
/// whole), for fine-tuning the model whose chat `template` and `tokenizer` are given, with
/// examples of at most `context` tokens.
pub fn check(
    reader: impl std::io::BufRead,
    which: Which,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    context: usize,
) -> Result<FileReport, Refusal> {
    let format = |msg: String| Refusal {
        code: "invalid_file_format",
        message: format!(
            "The job failed due to a file format error in the {} file. Invalid file format. {msg}",
            which.name()
        ),
        param: which.param(),
    };
    let invalid = |msg: String| Refusal {
        code: which.invalid(),
        message: format!(
            "The job failed due to an invalid {} file. Invalid file format. {msg}",
            which.name()
        ),
        param: which.param(),
    };
    let mut report = FileReport::default();
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| {
            format(format!(
                "Example {n} cannot be read as UTF-8 text: {e} (line {n})"
            ))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| {
            format(format!(
                "Example {n} cannot be parsed. Error: line contains invalid json: {e} (line {n})"
            ))
        })?;
        let Some(obj) = v.as_object() else {
            return Err(format(format!("Example {n} is not a JSON object.")));
        };
        let Some(messages) = obj.get("messages") else {
            return Err(invalid(format!("Example {n} is missing key 'messages'")));
        };
        let Some(messages) = messages.as_array().filter(|m| !m.is_empty()) else {
            return Err(invalid(format!(
                "Example {n} has 'messages' that is not a non-empty list"
            )));
        };
        if let Some(k) = obj.keys().find(|k| k.as_str() != "messages") {
            return Err(invalid(format!(
                "Example {n} contains the key '{k}', which this server does not train on (tools and functions are not supported)"
            )));
        }
        let mut parsed = Vec::with_capacity(messages.len());
        let mut trained = false;
        for (j, m) in messages.iter().enumerate() {
            let at = format!("Example {n}, message {}", j + 1);
            let Some(m) = m.as_object() else {
                return Err(invalid(format!("{at} is not an object")));
            };
            let Some(role) = m.get("role") else {
                return Err(invalid(format!(
                    "{at} Discriminator 'role' is missing in value"
                )));
            };
            let Some(role) = role.as_str().filter(|r| ROLES.contains(r)) else {
                return Err(invalid(format!("{at} has an unrecognized role: {role}")));
            };
            if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
                return Err(invalid(format!("{at} contains an unrecognized key: '{k}'")));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.as_str(),
                None | Some(Value::Null) => {
                    return Err(invalid(format!("{at} is missing content")));
                }
                Some(_) => {
                    return Err(invalid(format!(
                        "{at} has content that is not a string (images and parts are not supported by this base model)"
                    )));
                }
            };
            match m.get("weight") {
                None => trained |= role == "assistant",
                Some(_) if role != "assistant" => {
                    return Err(format(format!("Example {n} contains an extra \"weight\".")));
                }
                Some(w) => match w.as_i64() {
                    Some(0) => {}
                    Some(1) => trained = true,
                    _ => {
                        return Err(invalid(format!(
                            "{at} has an invalid weight: {w}; weight must be 0 or 1"
                        )));
                    }
                },
            }
            let mut msg = Message::new(role, content);
            if let Some(name) = m.get("name") {
                msg.extra.insert("name".into(), name.clone());
            }
            parsed.push(msg);
        }
        if !messages.iter().any(|m| m["role"] == "assistant") {
            return Err(invalid(format!(
                "Example {n} is missing an assistant message"
            )));
        }
        if !trained {
            return Err(invalid(format!(
                "Example {n} has no assistant message of weight 1 to train on"
            )));
        }
        let text = template
            .render(&parsed, false)
            .map_err(|e| invalid(format!("Example {n} cannot be rendered: {e}")))?;
        let tokens = tokenizer
            .encode(&text, false)
            .map_err(|e| invalid(format!("Example {n} cannot be tokenized: {e}")))?
            .len();
        if tokens > context {
            report.truncated += 1;
        }
        report.tokens += tokens.min(context) as u64;
        report.examples += 1;
    }
    if which == Which::Training && report.examples < MIN_EXAMPLES {
        return Err(Refusal {
            code: "invalid_n_examples",
            message: format!(
                "Training file has {} example(s), but must have at least {MIN_EXAMPLES} examples",
                report.examples
            ),
            param: "training_file",
        });
    }
    if report.examples == 0 {
        return Err(invalid("The file has no examples".into()));
    }
    Ok(report)
}

/// OpenAI's "auto" epochs for `n` examples (its cookbook's rule: 3, more for small files so
/// that about 100 examples are seen, fewer for large ones so that about 25,000 are).
pub fn auto_epochs(n: usize) -> u32 {
    let n = n.max(1);
    if n * 3 < 100 {
        (100 / n).min(25) as u32
    } else if n * 3 > 25_000 {
        (25_000 / n).max(1) as u32
    } else {
        3
    }
}

/// The "auto" batch size for `n` examples: about 0.2 % of them, from 1 to 256.
pub fn auto_batch_size(n: usize) -> u32 {
    n.div_ceil(500).clamp(1, 256) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_epochs_follow_openais_rule() {
        assert_eq!(auto_epochs(10), 10);
        assert_eq!(auto_epochs(3), 25);
        assert_eq!(auto_epochs(50), 3);
        assert_eq!(auto_epochs(20_000), 1);
        assert_eq!(auto_epochs(10_000), 2);
        assert_eq!(auto_batch_size(10), 1);
        assert_eq!(auto_batch_size(1_001), 3);
        assert_eq!(auto_batch_size(1_000_000), 256);
    }
}
