//! A tenant's (or a key's) policy: for what goes in and for what comes out, which categories
//! block and which are only logged, and whether personal data is redacted; the tenant's own
//! rules beside the operator's; a guard model; and whether audit records keep the content.
//!
//! ```toml
//! [input]
//! block = ["violence", "self-harm"]   # refused before admission (400 content_policy_violation)
//! log = ["harassment"]                # recorded, served
//! redact_pii = true                   # placeholders replace personal data before the model reads it
//!
//! [output]
//! block = ["pii"]                     # the answer ends with finish_reason "content_filter"
//! redact_pii = false
//!
//! guard = "llama-guard"               # a served model or adapter asked in the Llama Guard 3 format
//! keep_content = false                # audit records hold a hash of the content, not the content
//!
//! [[rules]]                           # the tenant's own terms, beside the operator's
//! category = "illicit"
//! terms = ["counterfeit banknotes", "假钞"]
//! ```
//!
//! A category names itself and its subcategories: `self-harm` covers `self-harm/intent`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::category::Category;
use crate::error::{Error, Result};
use crate::guard::GuardVerdict;
use crate::rules::{Hit, RuleSpec, Rules};

/// The most text a stream holds back by default, in characters: a pattern's or personal data's
/// match up to this length is seen whole before any of it is sent.
pub const DEFAULT_HOLD_CHARS: usize = 64;
/// The most a policy may ask a stream to hold back.
pub const MAX_HOLD_CHARS: usize = 4096;

/// One direction of a policy, as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideSpec {
    /// Categories that block.
    #[serde(default)]
    pub block: Vec<String>,
    /// Categories that are recorded only.
    #[serde(default)]
    pub log: Vec<String>,
    /// Replace personal data with placeholders.
    #[serde(default)]
    pub redact_pii: bool,
}

/// A policy as written (TOML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// What goes in: prompts and messages.
    #[serde(default)]
    pub input: SideSpec,
    /// What comes out: generated text.
    #[serde(default)]
    pub output: SideSpec,
    /// A served model or adapter asked in the Llama Guard 3 format; its verdicts join the rules'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<String>,
    /// Audit records keep the content itself, not only its hash.
    #[serde(default)]
    pub keep_content: bool,
    /// The most a stream holds back on output, in characters ([`DEFAULT_HOLD_CHARS`]); all of
    /// it when patterns are checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_chars: Option<usize>,
    /// The tenant's own rules.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// One direction of a resolved policy.
#[derive(Debug, Clone, Default)]
pub struct Side {
    /// Categories that block.
    pub block: BTreeSet<Category>,
    /// Categories that are recorded only.
    pub log: BTreeSet<Category>,
    /// Replace personal data with placeholders.
    pub redact_pii: bool,
}

impl Side {
    fn resolve(spec: &SideSpec) -> Result<Side> {
        let set = |names: &[String]| -> Result<BTreeSet<Category>> {
            names
                .iter()
                .map(|n| Category::parse(n).ok_or_else(|| Error::UnknownCategory(n.clone())))
                .collect()
        };
        Ok(Side {
            block: set(&spec.block)?,
            log: set(&spec.log)?,
            redact_pii: spec.redact_pii,
        })
    }

    /// Whether anything is checked on this side.
    pub fn active(&self) -> bool {
        !self.block.is_empty() || !self.log.is_empty() || self.redact_pii
    }

    /// Whether this side needs the personal-data detectors.
    pub fn wants_pii(&self) -> bool {
        self.redact_pii
            || self
                .block
                .iter()
                .chain(&self.log)
                .any(|c| c.covers(Category::Pii))
    }

    /// What this side decides on `hits` and a guard's verdict.
    pub fn decide(&self, hits: &[Hit], guard: Option<&GuardVerdict>) -> Decision {
        let mut found: Vec<(Category, String)> =
            hits.iter().map(|h| (h.category, h.rule.clone())).collect();
        if let Some(v) = guard {
            found.extend(
                v.categories
                    .iter()
                    .map(|&c| (c, format!("guard:{}", v.model))),
            );
        }
        let matching = |set: &BTreeSet<Category>| -> Vec<(Category, String)> {
            found
                .iter()
                .filter(|(c, _)| set.iter().any(|s| s.covers(*c)))
                .cloned()
                .collect()
        };
        let (action, named) = match matching(&self.block) {
            b if !b.is_empty() => (Action::Block, b),
            _ => match matching(&self.log) {
                l if !l.is_empty() => (Action::Log, l),
                _ => (Action::Allow, Vec::new()),
            },
        };
        let mut categories: Vec<Category> = named.iter().map(|(c, _)| *c).collect();
        categories.sort();
        categories.dedup();
        let mut rules: Vec<String> = named.into_iter().map(|(_, r)| r).collect();
        rules.sort();
        rules.dedup();
        Decision {
            action,
            categories,
            rules,
        }
    }
}

/// What a policy does with a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing matched.
    Allow,
    /// Matched categories that are only recorded.
    Log,
    /// Matched a blocking category.
    Block,
}

/// A policy's decision on one text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// What happens.
    pub action: Action,
    /// The categories that decided it.
    pub categories: Vec<Category>,
    /// The rules (or `guard:MODEL`) that matched them.
    pub rules: Vec<String>,
}

/// A resolved policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// As written.
    pub spec: PolicySpec,
    /// What goes in.
    pub input: Side,
    /// What comes out.
    pub output: Side,
    /// The tenant's own rules.
    pub rules: Rules,
    /// How much a stream holds back, in characters.
    pub hold_chars: usize,
}

impl Policy {
    /// Parses and checks a policy file: unknown categories, invalid patterns and unknown fields
    /// are errors naming them. (Whether the guard model is served is the server's to check.)
    pub fn parse(text: &str) -> Result<Policy> {
        let spec: PolicySpec = toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))?;
        Policy::resolve(spec)
    }

    /// Resolves a parsed policy.
    pub fn resolve(spec: PolicySpec) -> Result<Policy> {
        let hold_chars = spec.hold_chars.unwrap_or(DEFAULT_HOLD_CHARS);
        if !(1..=MAX_HOLD_CHARS).contains(&hold_chars) {
            return Err(Error::Invalid(format!(
                "hold_chars is {hold_chars}; it must be between 1 and {MAX_HOLD_CHARS}"
            )));
        }
        if spec.guard.as_deref().is_some_and(str::is_empty) {
            return Err(Error::Invalid("guard names no model".into()));
        }
        Ok(Policy {
            input: Side::resolve(&spec.input)?,
            output: Side::resolve(&spec.output)?,
            rules: Rules::compile(&spec.rules)?,
            hold_chars,
            spec,
        })
    }

    /// The policy as TOML (what is stored).
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.spec).unwrap_or_default()
    }
}

impl Category {
    /// Whether a policy naming `self` covers `other`: itself and its subcategories.
    pub fn covers(self, other: Category) -> bool {
        self == other
            || other
                .name()
                .strip_prefix(self.name())
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(category: Category, rule: &str) -> Hit {
        Hit {
            category,
            rule: rule.into(),
            start: 0,
            end: 1,
        }
    }

    #[test]
    fn a_side_blocks_logs_or_allows() {
        let p = Policy::parse(
            "[input]\nblock = [\"self-harm\"]\nlog = [\"pii\"]\n[output]\nredact_pii = true\n",
        )
        .unwrap();
        let d = p.input.decide(
            &[
                hit(Category::SelfHarmIntent, "r1"),
                hit(Category::Pii, "pii:email"),
            ],
            None,
        );
        assert_eq!(d.action, Action::Block);
        assert_eq!(d.categories, vec![Category::SelfHarmIntent]);
        let d = p.input.decide(&[hit(Category::Pii, "pii:email")], None);
        assert_eq!(
            (d.action, d.rules.clone()),
            (Action::Log, vec!["pii:email".to_string()])
        );
        assert_eq!(
            p.input.decide(&[hit(Category::Hate, "h")], None).action,
            Action::Allow
        );
        let v = GuardVerdict {
            model: "guard".into(),
            unsafe_: true,
            categories: vec![Category::SelfHarm],
        };
        let d = p.input.decide(&[], Some(&v));
        assert_eq!(
            (d.action, d.rules),
            (Action::Block, vec!["guard:guard".to_string()])
        );
        assert!(p.output.active() && p.output.wants_pii() && p.input.wants_pii());
        // a policy reads back as it was written
        assert_eq!(Policy::parse(&p.to_toml()).unwrap().spec, p.spec);
    }

    #[test]
    fn bad_policies_are_errors_that_name_the_problem() {
        let e = |t: &str| Policy::parse(t).unwrap_err().to_string();
        assert!(e("[input]\nblock = [\"violent\"]").contains("\"violent\""));
        assert!(e("[inputs]\nblock = []").contains("inputs"));
        assert!(e("[[rules]]\ncategory = \"hate\"\npatterns = [\"[a-\"]").contains("[a-"));
        assert!(e("hold_chars = 0").contains("hold_chars"));
        assert!(e("guard = \"\"").contains("guard"));
        assert!(!Category::Hate.covers(Category::Harassment));
        assert!(Category::Hate.covers(Category::HateThreatening));
        assert!(!Category::Sexual.covers(Category::SelfHarm));
    }
}
