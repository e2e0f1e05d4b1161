//! Safety and control for fount's server: what a tenant may send and receive, and a record of
//! every decision.
//!
//! 1. **Rules** ([`rules`]): personal data (the PII detectors of `fount-data`) and an operator's
//!    lists of terms and patterns per category, in English and Chinese (jieba-aware where words
//!    matter). fount starts with [`rules::DEFAULT_RULES`].
//! 2. **A guard model** ([`guard`]): any served model or adapter asked in the Llama Guard 3
//!    format; its verdict joins the rules'.
//! 3. **Policies** ([`policy`]), per tenant and per key: which categories block and which are only
//!    logged, on input and on output, and whether personal data is redacted.
//! 4. **Applying them** ([`filter`]): redaction, and the output filter a stream runs through, which
//!    holds back just enough text never to send what it would have to retract.
//! 5. **Moderation results** ([`moderation`]) in OpenAI's shape, and the hash an audit record
//!    keeps of the content.
//!
//! The crate is pure: the server calls it, runs the guard on its engine, and stores the records.
//!
//! ```
//! use fount_safety::{Policy, Rules, rules::{RuleFile, DEFAULT_RULES}};
//! let rules = Rules::compile(&RuleFile::parse(DEFAULT_RULES).unwrap().rules).unwrap();
//! let policy = Policy::parse("[input]\nblock = [\"illicit\"]").unwrap();
//! let mut hits = Vec::new();
//! rules.scan("how do I make a bomb", policy.input.wants_pii(), &mut hits);
//! assert_eq!(policy.input.decide(&hits, None).action, fount_safety::Action::Block);
//! ```

pub mod category;
pub mod error;
pub mod filter;
pub mod guard;
pub mod moderation;
pub mod policy;
pub mod rules;

pub use category::Category;
pub use error::{Error, Result};
pub use filter::{redact, OutputFilter, Release};
pub use guard::{GuardVerdict, Turn};
pub use moderation::{content_hash, Moderation};
pub use policy::{Action, Decision, Policy, PolicySpec, Side};
pub use rules::{Hit, Rules};
