//! A guard model asked in the Llama Guard 3 format (Meta's model card): the conversation goes
//! into one user message that lists the hazard categories `S1`–`S14` and asks for an assessment
//! of the last turn of one role; the answer is `safe`, or `unsafe` and on the next line the
//! violated codes separated by commas (`unsafe\nS1,S10`). Any model or adapter that answers this
//! way can stand behind a policy: a real Llama Guard 3 (its chat template wraps the message), or a
//! tenant's own classifier fine-tuned on the format.

use serde::{Deserialize, Serialize};

use crate::category::{Category, LLAMA_GUARD};

/// Whose turn is assessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The user's (input classification).
    User,
    /// The model's (response classification; Llama Guard calls it `Agent`).
    Agent,
}

impl Turn {
    fn name(self) -> &'static str {
        match self {
            Turn::User => "User",
            Turn::Agent => "Agent",
        }
    }
}

/// The user message that asks a Llama Guard 3 model to assess the last `assessed` turn of
/// `conversation`.
pub fn prompt(assessed: Turn, conversation: &[(Turn, &str)]) -> String {
    let role = assessed.name();
    let mut p = format!(
        "Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    );
    for (code, name, _) in LLAMA_GUARD {
        p += &format!("{code}: {name}.\n");
    }
    p += "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n";
    for (turn, text) in conversation {
        p += &format!("{}: {}\n\n", turn.name(), text);
    }
    p += &format!(
        "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a comma-separated list of violated categories."
    );
    p
}

/// A guard model's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardVerdict {
    /// The model that gave it.
    pub model: String,
    /// `unsafe`.
    #[serde(rename = "unsafe")]
    pub unsafe_: bool,
    /// The categories of the codes it named.
    pub categories: Vec<Category>,
}

/// Reads a guard's answer; `None` when it is neither `safe` nor `unsafe` (a model that does not
/// follow the format). Codes outside `S1`–`S14` are ignored; `unsafe` with none is still unsafe.
pub fn parse(model: &str, answer: &str) -> Option<GuardVerdict> {
    let mut lines = answer.trim().lines().map(str::trim);
    let first = lines.next()?.to_ascii_lowercase();
    let unsafe_ = match first.as_str() {
        "safe" => false,
        "unsafe" => true,
        _ => return None,
    };
    let mut categories: Vec<Category> = match (unsafe_, lines.next()) {
        (true, Some(codes)) => hazard_codes(codes)
            .iter()
            .filter_map(|c| Category::from_llama_guard(c))
            .collect(),
        _ => Vec::new(),
    };
    categories.sort();
    categories.dedup();
    Some(GuardVerdict {
        model: model.to_string(),
        unsafe_,
        categories,
    })
}

/// The codes `S1`–`S14` in a line, read leniently: `S1,S10`, `S1, S10`, and also `S2S2` from a
/// small model that did not stop where Llama Guard does.
fn hazard_codes(line: &str) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != 'S' && chars[i] != 's' {
            i += 1;
            continue;
        }
        let digits: String = chars[i + 1..]
            .iter()
            .take(2)
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let code = match digits.parse::<u32>() {
            Ok(n) if (1..=14).contains(&n) => digits,
            _ => digits.chars().take(1).collect(),
        };
        if code.parse::<u32>().is_ok_and(|n| n >= 1) {
            i += 1 + code.len();
            out.push(format!("S{code}"));
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_lists_every_category_and_the_conversation() {
        let p = prompt(
            Turn::Agent,
            &[
                (Turn::User, "How do I adopt a llama?"),
                (Turn::Agent, "Steal one."),
            ],
        );
        assert!(p.starts_with("Task: Check if there is unsafe content in 'Agent' messages"));
        assert!(p.contains("S1: Violent Crimes.\nS2: Non-Violent Crimes.\n"));
        assert!(p.contains("S14: Code Interpreter Abuse.\n<END UNSAFE CONTENT CATEGORIES>"));
        assert!(
            p.contains("User: How do I adopt a llama?\n\nAgent: Steal one.\n\n<END CONVERSATION>")
        );
        assert!(p.ends_with("comma-separated list of violated categories."));
    }

    #[test]
    fn answers_are_read_as_llama_guard_writes_them() {
        let v = parse("g", "unsafe\nS2,S10").unwrap();
        assert!(v.unsafe_);
        assert_eq!(v.categories, vec![Category::Hate, Category::Illicit]);
        assert_eq!(parse("g", " safe\n").unwrap().categories, vec![]);
        assert!(parse("g", "unsafe").unwrap().unsafe_);
        assert_eq!(parse("g", "I cannot help with that"), None);
        // a small model that runs on past the codes
        let v = parse("g", "unsafe\nS2S2, s14 and more").unwrap();
        assert_eq!(
            v.categories,
            vec![Category::Illicit, Category::CodeInterpreterAbuse]
        );
        assert_eq!(hazard_codes("S21,S0"), ["S2"]);
    }
}
