//! A moderation result in the shape of OpenAI's `/v1/moderations` (`flagged`, `categories`,
//! `category_scores`), from the rules' hits and a guard's verdict, and the content hash audit
//! records keep.

use sha2::{Digest, Sha256};

use crate::category::Category;
use crate::guard::GuardVerdict;
use crate::rules::Hit;

/// One input's moderation.
#[derive(Debug, Clone, PartialEq)]
pub struct Moderation {
    /// Whether any category is flagged.
    pub flagged: bool,
    /// Every category ([`Category::ALL`]) and whether it is flagged.
    pub categories: Vec<(Category, bool)>,
    /// Every category's score: 1 where a rule or the guard named it, 0 elsewhere (rules and
    /// guard answers are verdicts, not probabilities).
    pub scores: Vec<(Category, f64)>,
    /// The rules that matched (and `guard:MODEL`).
    pub rules: Vec<String>,
}

impl Moderation {
    /// The moderation of `hits` and a guard's verdict.
    pub fn of(hits: &[Hit], guard: Option<&GuardVerdict>) -> Moderation {
        let mut named: Vec<Category> = hits.iter().map(|h| h.category).collect();
        let mut rules: Vec<String> = hits.iter().map(|h| h.rule.clone()).collect();
        if let Some(v) = guard.filter(|v| v.unsafe_) {
            named.extend(&v.categories);
            rules.push(format!("guard:{}", v.model));
        }
        rules.sort();
        rules.dedup();
        let categories: Vec<(Category, bool)> = Category::ALL
            .iter()
            .map(|&c| (c, named.contains(&c)))
            .collect();
        Moderation {
            flagged: categories.iter().any(|(_, f)| *f) || guard.is_some_and(|v| v.unsafe_),
            scores: categories
                .iter()
                .map(|&(c, f)| (c, if f { 1.0 } else { 0.0 }))
                .collect(),
            categories,
            rules,
        }
    }
}

/// The SHA-256 of `content`, as lowercase hex: what an audit record keeps instead of the content.
pub fn content_hash(content: &str) -> String {
    Sha256::digest(content.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_is_listed_and_hits_flag_theirs() {
        let hits = [Hit {
            category: Category::Pii,
            rule: "pii:email".into(),
            start: 0,
            end: 3,
        }];
        let m = Moderation::of(&hits, None);
        assert!(m.flagged);
        assert_eq!(m.categories.len(), Category::ALL.len());
        assert!(m.categories.contains(&(Category::Pii, true)));
        assert!(m.scores.contains(&(Category::Hate, 0.0)));
        assert!(!Moderation::of(&[], None).flagged);
        // the SHA-256 of "abc" (FIPS 180-2, appendix B.1)
        assert_eq!(
            content_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
