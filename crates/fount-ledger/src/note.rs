//! C2SP `signed-note` with Ed25519 keys, and C2SP `tlog-cosignature` (Ed25519, `cosignature/v1`).
//!
//! A note is UTF-8 text ending in a newline, a blank line, then one line per signature:
//! `— <key name> <base64(4-byte key hash ‖ signature)>`. The key hash is the first four bytes
//! of `SHA-256(name ‖ "\n" ‖ type ‖ public key)`, type `0x01` for a note signer and `0x04` for
//! a witness's cosignature (whose signature is prefixed with an 8-byte big-endian timestamp and
//! signs `cosignature/v1\ntime <t>\n` followed by the note's text). Keys are written as Go's
//! `sumdb/note` writes them: `<name>+<hash hex>+<base64(type ‖ key)>`, private keys with a
//! `PRIVATE+KEY+` prefix.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Signature type of a note signer's Ed25519 key.
pub const ED25519: u8 = 0x01;
/// Signature type of a witness's Ed25519 cosignature key.
pub const COSIGNATURE: u8 = 0x04;

const DASH: &str = "\u{2014} ";

/// Key names: non-empty, no `+`, no white space.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
        return Err(Error::Key(format!(
            "{name:?}: a key name is non-empty with no '+' and no spaces"
        )));
    }
    Ok(())
}

/// The 4-byte key hash.
pub fn key_hash(name: &str, kind: u8, public: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([kind]);
    h.update(public);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A private key that signs notes (type `0x01`) or cosigns checkpoints (type `0x04`).
#[derive(Clone)]
pub struct Signer {
    name: String,
    kind: u8,
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.verifier_key())
    }
}

impl Signer {
    /// A new random key named `name`.
    pub fn generate(name: &str, kind: u8) -> Result<Signer> {
        check_name(name)?;
        let seed: [u8; 32] = rand::random();
        Ok(Signer {
            name: name.to_string(),
            kind,
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Parses `PRIVATE+KEY+<name>+<hash>+<base64(type ‖ seed)>`.
    pub fn parse(skey: &str) -> Result<Signer> {
        let bad = || Error::Key("not a private key (PRIVATE+KEY+name+hash+key)".into());
        let rest = skey.trim().strip_prefix("PRIVATE+KEY+").ok_or_else(bad)?;
        let (name, hash, key) = split_key(rest).ok_or_else(bad)?;
        check_name(name)?;
        let raw = B64.decode(key).map_err(|_| bad())?;
        let (&kind, seed) = raw.split_first().ok_or_else(bad)?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| bad())?;
        let signer = Signer {
            name: name.to_string(),
            kind,
            key: SigningKey::from_bytes(&seed),
        };
        if signer.hash() != hash || !matches!(kind, ED25519 | COSIGNATURE) {
            return Err(bad());
        }
        Ok(signer)
    }

    /// The private key as text (keep it secret).
    pub fn private_key(&self) -> String {
        let mut raw = vec![self.kind];
        raw.extend_from_slice(&self.key.to_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.hash(),
            B64.encode(raw)
        )
    }

    /// The key's name (a log's origin, or a witness's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    fn hash(&self) -> u32 {
        key_hash(&self.name, self.kind, &self.public())
    }

    /// The verifier key, `<name>+<hash>+<base64(type ‖ public key)>`.
    pub fn verifier_key(&self) -> String {
        let mut raw = vec![self.kind];
        raw.extend_from_slice(&self.public());
        format!("{}+{:08x}+{}", self.name, self.hash(), B64.encode(raw))
    }

    /// The verifier of this key.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            name: self.name.clone(),
            kind: self.kind,
            hash: self.hash(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `text` (which must end in a newline) as a note: the text, a blank line, one
    /// signature line.
    pub fn sign(&self, text: &str) -> Result<String> {
        check_text(text)?;
        let sig = self.signature_line(text, None);
        Ok(format!("{text}\n{sig}"))
    }

    /// The signature line over `text`; for a cosignature key, `time` is its timestamp (Unix
    /// seconds).
    pub fn signature_line(&self, text: &str, time: Option<u64>) -> String {
        let mut raw = self.hash().to_be_bytes().to_vec();
        match (self.kind, time) {
            (COSIGNATURE, Some(t)) => {
                let msg = format!("cosignature/v1\ntime {t}\n{text}");
                raw.extend_from_slice(&t.to_be_bytes());
                raw.extend_from_slice(&self.key.sign(msg.as_bytes()).to_bytes());
            }
            _ => raw.extend_from_slice(&self.key.sign(text.as_bytes()).to_bytes()),
        }
        format!("{DASH}{} {}\n", self.name, B64.encode(raw))
    }
}

fn split_key(s: &str) -> Option<(&str, u32, &str)> {
    let mut parts = s.splitn(3, '+');
    let name = parts.next()?;
    let hash = parts.next()?;
    let key = parts.next()?;
    if hash.len() != 8 {
        return None;
    }
    Some((name, u32::from_str_radix(hash, 16).ok()?, key))
}

fn check_text(text: &str) -> Result<()> {
    if !text.ends_with('\n') || text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::Note(
            "a note's text ends in a newline and has no control characters".into(),
        ));
    }
    Ok(())
}

/// A public key that checks notes or cosignatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    kind: u8,
    hash: u32,
    key: VerifyingKey,
}

impl Verifier {
    /// Parses `<name>+<hash>+<base64(type ‖ public key)>`.
    pub fn parse(vkey: &str) -> Result<Verifier> {
        let bad = || Error::Key(format!("{vkey:?} is not a verifier key (name+hash+key)"));
        let (name, hash, key) = split_key(vkey.trim()).ok_or_else(bad)?;
        check_name(name)?;
        let raw = B64.decode(key).map_err(|_| bad())?;
        let (&kind, public) = raw.split_first().ok_or_else(bad)?;
        let public: [u8; 32] = public.try_into().map_err(|_| bad())?;
        if !matches!(kind, ED25519 | COSIGNATURE) || key_hash(name, kind, &public) != hash {
            return Err(bad());
        }
        Ok(Verifier {
            name: name.to_string(),
            kind,
            hash,
            key: VerifyingKey::from_bytes(&public).map_err(|_| bad())?,
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The verifier key as text.
    pub fn to_key(&self) -> String {
        let mut raw = vec![self.kind];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.hash, B64.encode(raw))
    }

    /// Whether this is a cosignature (witness) key.
    pub fn is_cosigner(&self) -> bool {
        self.kind == COSIGNATURE
    }

    /// Checks one signature (the base64 part of a line) over `text`; returns the cosignature's
    /// timestamp for a cosigner.
    fn check(&self, text: &str, sig: &[u8]) -> Result<Option<u64>> {
        let bad = || Error::Note(format!("the signature of {} does not verify", self.name));
        match self.kind {
            COSIGNATURE => {
                if sig.len() != 8 + 64 {
                    return Err(bad());
                }
                let (t, s) = sig.split_at(8);
                let t = u64::from_be_bytes(t.try_into().map_err(|_| bad())?);
                let msg = format!("cosignature/v1\ntime {t}\n{text}");
                let s = ed25519_dalek::Signature::from_slice(s).map_err(|_| bad())?;
                self.key.verify(msg.as_bytes(), &s).map_err(|_| bad())?;
                Ok(Some(t))
            }
            _ => {
                let s = ed25519_dalek::Signature::from_slice(sig).map_err(|_| bad())?;
                self.key.verify(text.as_bytes(), &s).map_err(|_| bad())?;
                Ok(None)
            }
        }
    }
}

/// A signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The key's name.
    pub name: String,
    /// The key hash.
    pub hash: u32,
    /// The signature bytes after the key hash.
    pub sig: Vec<u8>,
    /// The line as written, with its newline.
    pub line: String,
}

/// A note split into its text and signature lines (nothing verified yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The text, with its final newline.
    pub text: String,
    /// The signature lines.
    pub sigs: Vec<Signature>,
}

/// The most signature lines a note may carry.
const MAX_SIGS: usize = 100;

impl Note {
    /// Splits a signed note; refuses a malformed one.
    pub fn parse(msg: &str) -> Result<Note> {
        let bad = |why: &str| Error::Note(format!("malformed note: {why}"));
        let Some(split) = msg.rfind("\n\n") else {
            return Err(bad("no blank line before the signatures"));
        };
        let text = &msg[..=split];
        check_text(text)?;
        let mut sigs = Vec::new();
        let rest = &msg[split + 2..];
        if !rest.ends_with('\n') {
            return Err(bad("the last signature line has no newline"));
        }
        for line in rest.split_inclusive('\n') {
            let body = line
                .strip_prefix(DASH)
                .ok_or_else(|| bad("a signature line starts with '— '"))?
                .trim_end_matches('\n');
            let (name, b64) = body
                .split_once(' ')
                .ok_or_else(|| bad("a signature line is '— name signature'"))?;
            check_name(name)?;
            let raw = B64
                .decode(b64)
                .map_err(|_| bad("a signature is not base64"))?;
            if raw.len() < 5 {
                return Err(bad("a signature is too short"));
            }
            sigs.push(Signature {
                name: name.to_string(),
                hash: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
                sig: raw[4..].to_vec(),
                line: line.to_string(),
            });
            if sigs.len() > MAX_SIGS {
                return Err(bad("more than 100 signatures"));
            }
        }
        if sigs.is_empty() {
            return Err(bad("no signatures"));
        }
        Ok(Note {
            text: text.to_string(),
            sigs,
        })
    }

    /// The signatures made by `known` keys, each checked (a known key's bad signature is an
    /// error; unknown keys' lines are ignored). Returns the names that verified with their
    /// cosignature timestamps.
    pub fn verify(&self, known: &[Verifier]) -> Result<Vec<(String, Option<u64>)>> {
        let mut ok = Vec::new();
        for s in &self.sigs {
            if let Some(v) = known.iter().find(|v| v.name == s.name && v.hash == s.hash) {
                ok.push((s.name.clone(), v.check(&self.text, &s.sig)?));
            }
        }
        Ok(ok)
    }

    /// Checks the note carries a valid signature by `verifier`.
    pub fn verify_by(&self, verifier: &Verifier) -> Result<()> {
        if self.verify(std::slice::from_ref(verifier))?.is_empty() {
            return Err(Error::Note(format!("no signature by {}", verifier.name)));
        }
        Ok(())
    }

    /// The note with `lines` (signature lines) added after its own, each once.
    pub fn with_signatures(&self, lines: &[String]) -> String {
        let mut out = format!("{}\n", self.text);
        let mut seen = std::collections::HashSet::new();
        for l in self.sigs.iter().map(|s| &s.line).chain(lines) {
            if seen.insert(l.clone()) {
                out.push_str(l);
            }
        }
        out
    }
}
