//! C2SP `tlog-checkpoint`: `<origin>\n<size>\n<base64 root>\n`, then optional extension lines.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::merkle::Hash;
use crate::note::{Note, Verifier};

/// A checkpoint's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name.
    pub origin: String,
    /// The number of entries.
    pub size: u64,
    /// The tree's root hash.
    pub root: Hash,
    /// Extension lines, each without its newline.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The body as signed.
    pub fn text(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            s.push_str(e);
            s.push('\n');
        }
        s
    }

    /// Opens a signed checkpoint of the log whose key is `log`: the note carries a valid
    /// signature by it, and the origin is its name.
    pub fn open(note: &str, log: &Verifier) -> Result<Checkpoint> {
        let n = Note::parse(note)?;
        n.verify_by(log)?;
        let c = Checkpoint::parse(&n.text)?;
        if c.origin != log.name() {
            return Err(Error::Checkpoint(format!(
                "it is of the log {:?}, not {:?}",
                c.origin,
                log.name()
            )));
        }
        Ok(c)
    }

    /// Parses a body (a note's text).
    pub fn parse(text: &str) -> Result<Checkpoint> {
        let bad = |why: &str| Error::Checkpoint(why.to_string());
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("the body ends in a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| bad("no origin line"))?;
        let size = lines.next().ok_or_else(|| bad("no size line"))?;
        if size.is_empty() || (size.len() > 1 && size.starts_with('0')) {
            return Err(bad("the size is a decimal with no leading zeroes"));
        }
        let size: u64 = size.parse().map_err(|_| bad("the size is not a number"))?;
        let root = lines.next().ok_or_else(|| bad("no root line"))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("the root is not a base64 SHA-256 hash"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(bad("an extension line is empty"));
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }
}
