//! The categories a decision names: OpenAI's moderation categories (the keys of a
//! `/v1/moderations` result), fount's `pii`, and the Llama Guard 3 hazards that have no OpenAI
//! name. Each Llama Guard 3 code (`S1`–`S14`) maps to one of them.

use serde::{Deserialize, Serialize};

/// A moderation category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Category {
    /// Harassing language towards any target.
    #[serde(rename = "harassment")]
    Harassment,
    /// Harassment that also includes violence or serious harm.
    #[serde(rename = "harassment/threatening")]
    HarassmentThreatening,
    /// Hate based on race, gender, ethnicity, religion, nationality, sexual orientation,
    /// disability or caste.
    #[serde(rename = "hate")]
    Hate,
    /// Hateful content that also includes violence or serious harm.
    #[serde(rename = "hate/threatening")]
    HateThreatening,
    /// Advice or instruction on committing wrongdoing.
    #[serde(rename = "illicit")]
    Illicit,
    /// Illicit content that also involves violence or weapons.
    #[serde(rename = "illicit/violent")]
    IllicitViolent,
    /// Promoting or depicting self-harm.
    #[serde(rename = "self-harm")]
    SelfHarm,
    /// The speaker intends to harm themselves.
    #[serde(rename = "self-harm/intent")]
    SelfHarmIntent,
    /// Instructions for self-harm.
    #[serde(rename = "self-harm/instructions")]
    SelfHarmInstructions,
    /// Sexual content.
    #[serde(rename = "sexual")]
    Sexual,
    /// Sexual content involving minors.
    #[serde(rename = "sexual/minors")]
    SexualMinors,
    /// Violence.
    #[serde(rename = "violence")]
    Violence,
    /// Graphic violence.
    #[serde(rename = "violence/graphic")]
    ViolenceGraphic,
    /// Personal data: e-mail addresses, phone numbers, public IP addresses, mainland-China
    /// resident IDs (fount's; Llama Guard's S7, privacy).
    #[serde(rename = "pii")]
    Pii,
    /// Llama Guard S5.
    #[serde(rename = "defamation")]
    Defamation,
    /// Llama Guard S6: specialised financial, medical or legal advice.
    #[serde(rename = "specialized-advice")]
    SpecializedAdvice,
    /// Llama Guard S8.
    #[serde(rename = "intellectual-property")]
    IntellectualProperty,
    /// Llama Guard S13.
    #[serde(rename = "elections")]
    Elections,
    /// Llama Guard S14.
    #[serde(rename = "code-interpreter-abuse")]
    CodeInterpreterAbuse,
}

impl Category {
    /// Every category, OpenAI's first, in the order a moderation result lists them.
    pub const ALL: [Category; 19] = [
        Category::Harassment,
        Category::HarassmentThreatening,
        Category::Hate,
        Category::HateThreatening,
        Category::Illicit,
        Category::IllicitViolent,
        Category::SelfHarm,
        Category::SelfHarmIntent,
        Category::SelfHarmInstructions,
        Category::Sexual,
        Category::SexualMinors,
        Category::Violence,
        Category::ViolenceGraphic,
        Category::Pii,
        Category::Defamation,
        Category::SpecializedAdvice,
        Category::IntellectualProperty,
        Category::Elections,
        Category::CodeInterpreterAbuse,
    ];

    /// The category's name, as policies and moderation results spell it.
    pub fn name(self) -> &'static str {
        match self {
            Category::Harassment => "harassment",
            Category::HarassmentThreatening => "harassment/threatening",
            Category::Hate => "hate",
            Category::HateThreatening => "hate/threatening",
            Category::Illicit => "illicit",
            Category::IllicitViolent => "illicit/violent",
            Category::SelfHarm => "self-harm",
            Category::SelfHarmIntent => "self-harm/intent",
            Category::SelfHarmInstructions => "self-harm/instructions",
            Category::Sexual => "sexual",
            Category::SexualMinors => "sexual/minors",
            Category::Violence => "violence",
            Category::ViolenceGraphic => "violence/graphic",
            Category::Pii => "pii",
            Category::Defamation => "defamation",
            Category::SpecializedAdvice => "specialized-advice",
            Category::IntellectualProperty => "intellectual-property",
            Category::Elections => "elections",
            Category::CodeInterpreterAbuse => "code-interpreter-abuse",
        }
    }

    /// The category named `name`.
    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The category a Llama Guard 3 hazard code (`S1`–`S14`) stands for.
    pub fn from_llama_guard(code: &str) -> Option<Category> {
        LLAMA_GUARD
            .iter()
            .find(|(c, _, _)| c.eq_ignore_ascii_case(code))
            .map(|&(_, _, cat)| cat)
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Llama Guard 3's hazard taxonomy (the MLCommons hazards): code, the name its prompt lists,
/// and fount's category.
pub const LLAMA_GUARD: [(&str, &str, Category); 14] = [
    ("S1", "Violent Crimes", Category::Violence),
    ("S2", "Non-Violent Crimes", Category::Illicit),
    ("S3", "Sex Crimes", Category::Sexual),
    ("S4", "Child Exploitation", Category::SexualMinors),
    ("S5", "Defamation", Category::Defamation),
    ("S6", "Specialized Advice", Category::SpecializedAdvice),
    ("S7", "Privacy", Category::Pii),
    (
        "S8",
        "Intellectual Property",
        Category::IntellectualProperty,
    ),
    ("S9", "Indiscriminate Weapons", Category::IllicitViolent),
    ("S10", "Hate", Category::Hate),
    ("S11", "Self-Harm", Category::SelfHarm),
    ("S12", "Sexual Content", Category::Sexual),
    ("S13", "Elections", Category::Elections),
    (
        "S14",
        "Code Interpreter Abuse",
        Category::CodeInterpreterAbuse,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_parse() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.name()), Some(c));
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.name())
            );
        }
        assert_eq!(Category::parse("violent"), None);
        assert_eq!(Category::from_llama_guard("s10"), Some(Category::Hate));
        assert_eq!(Category::from_llama_guard("S15"), None);
    }
}
