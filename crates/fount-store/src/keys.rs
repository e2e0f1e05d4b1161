//! API keys: 256 random bits, shown once, stored only as a SHA-256 hash with a short public
//! prefix that identifies the key in listings and logs.

use std::fmt;

use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Generation and model listing.
    Inference,
    /// Tenants, keys, quotas, usage of every tenant.
    Admin,
    /// File uploads (reserved).
    Files,
    /// Fine-tuning jobs (reserved).
    FineTuning,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [
        Scope::Inference,
        Scope::Admin,
        Scope::Files,
        Scope::FineTuning,
    ];

    /// The name used in the store and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Admin => "admin",
            Scope::Files => "files",
            Scope::FineTuning => "fine_tuning",
        }
    }

    /// Parses a scope name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// Characters of the public prefix after `fk-`.
const PREFIX_LEN: usize = 8;

/// A secret API key, `fk-<prefix>-<secret>`. `Debug` and `Display` show only the prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A new random key: 256 bits of secret after an 8-character public prefix.
    pub fn generate() -> ApiKey {
        let prefix: [u8; PREFIX_LEN / 2] = rand::random();
        let secret: [u8; 32] = rand::random();
        ApiKey(format!("fk-{}-{}", hex(&prefix), hex(&secret)))
    }

    /// Wraps a key as a client sent it (`Authorization: Bearer …`).
    pub fn from_secret(s: impl Into<String>) -> ApiKey {
        ApiKey(s.into())
    }

    /// The key itself, to show once to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The public prefix (`fk-1a2b3c4d`), or `None` for a string not shaped like a key.
    pub fn prefix(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("fk-")?;
        let (prefix, secret) = rest.split_once('-')?;
        (prefix.len() == PREFIX_LEN && secret.len() == 64).then(|| &self.0[..3 + PREFIX_LEN])
    }

    /// The SHA-256 of the key, hex: what the store keeps.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}-…)", self.prefix().unwrap_or("fk-?"))
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-…", self.prefix().unwrap_or("fk-?"))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A random id for a stored row.
pub(crate) fn new_id(kind: &str) -> String {
    let b: [u8; 12] = rand::random();
    format!("{kind}_{}", hex(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_redact_themselves() {
        let k = ApiKey::generate();
        let p = k.prefix().map(str::to_string).unwrap_or_default();
        assert_eq!(p.len(), 11);
        assert_eq!(k.expose().len(), 3 + 8 + 1 + 64);
        for shown in [format!("{k}"), format!("{k:?}")] {
            assert!(
                shown.contains(&p) && !shown.contains(&k.expose()[12..]),
                "{shown}"
            );
        }
        assert_ne!(k.hash(), ApiKey::generate().hash());
        assert_eq!(ApiKey::from_secret("nonsense").prefix(), None);
    }
}
