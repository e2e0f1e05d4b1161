//! The log: appends under the store's lock, signed checkpoints, proofs and tiles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use fount_store::{LedgerEntry, LedgerTx, Store};
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::merkle::{
    completed, consistency_ranges, empty_root, fold, frontier, inclusion_ranges, leaf_hash,
    range_nodes, Hash, Node,
};
use crate::note::{Signer, Verifier, ED25519};
use crate::statement::hex;
use crate::tiles::{Tile, HEIGHT, WIDTH};

/// The largest entry: entry bundles write each entry's length as a 16-bit number.
pub const MAX_ENTRY: usize = u16::MAX as usize;

/// Parses 64 hex digits.
pub fn unhex(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The key file in a data directory.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger.key")
}

/// The log's signing key at `path`, created (named `origin`, or `fount.local/ledger-<8 hex>`) when
/// missing. Two processes creating it at once end up with the same key: the file appears whole
/// or not at all.
pub fn load_or_create_key(path: &Path, origin: Option<&str>) -> Result<Signer> {
    key_file(path, origin, ED25519, "fount.local/ledger")
}

/// A private key file (mode 0600) of type `kind`, created when missing with the name given or
/// `<default_name>-<8 hex>`.
pub fn key_file(path: &Path, name: Option<&str>, kind: u8, default_name: &str) -> Result<Signer> {
    let origin = name;
    match fs_err::read_to_string(path) {
        Ok(text) => {
            let signer = Signer::parse(&text)?;
            if let Some(o) = origin.filter(|o| *o != signer.name()) {
                return Err(Error::Key(format!(
                    "{} is the key of the log {:?}, not {o:?}",
                    path.display(),
                    signer.name()
                )));
            }
            Ok(signer)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = match origin {
                Some(o) => o.to_string(),
                None => format!("{default_name}-{:08x}", rand::random::<u32>()),
            };
            let signer = Signer::generate(&name, kind)?;
            if let Some(dir) = path.parent() {
                fs_err::create_dir_all(dir)?;
            }
            let tmp = path.with_extension(format!("key.{}.tmp", std::process::id()));
            {
                use fs_err::os::unix::fs::OpenOptionsExt;
                use std::io::Write;
                let mut f = fs_err::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(format!("{}\n", signer.private_key()).as_bytes())?;
                f.sync_all()?;
            }
            // a link fails when another process made the key first: then that one is the key
            let linked = fs_err::hard_link(&tmp, path);
            fs_err::remove_file(&tmp)?;
            match linked {
                Ok(()) => Ok(signer),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Signer::parse(&fs_err::read_to_string(path)?)
                }
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// An append in progress, holding the log's lock (dropped unfinished, nothing is written).
#[derive(Debug)]
pub struct Appender<'a> {
    ledger: &'a Ledger,
    tx: LedgerTx,
    first: u64,
    known: HashMap<Node, Hash>,
    hashes: Vec<(Node, String)>,
    entries: Vec<(String, String)>,
}

impl Appender<'_> {
    /// The index the next pushed entry gets.
    pub fn next_index(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// The store's transaction, for rows that must commit with the entries.
    pub fn tx(&mut self) -> &mut LedgerTx {
        &mut self.tx
    }

    /// Adds an entry; returns its index.
    pub fn push(&mut self, entry: String, kind: &str) -> Result<u64> {
        if entry.len() > MAX_ENTRY {
            return Err(Error::Entry(format!(
                "an entry is {} bytes; the most is {MAX_ENTRY}",
                entry.len()
            )));
        }
        let index = self.next_index();
        let known = &self.known;
        let done = completed(index, leaf_hash(entry.as_bytes()), |n| {
            known.get(&n).copied()
        });
        for (n, h) in done {
            self.known.insert(n, h);
            self.hashes.push((n, hex(&h)));
        }
        self.entries.push((entry, kind.to_string()));
        Ok(index)
    }

    /// Signs the checkpoint over the new tree and commits everything at once.
    pub async fn finish(mut self) -> Result<Appended> {
        let size = self.next_index();
        let root = fold(
            &frontier(size)
                .into_iter()
                .map(|n| self.known.get(&n).copied().ok_or_else(|| missing(n)))
                .collect::<Result<Vec<_>>>()?,
        );
        let checkpoint = self.ledger.signer.sign(&self.ledger.body(size, root))?;
        let rows: Vec<(&str, &str)> = self
            .entries
            .iter()
            .map(|(e, k)| (e.as_str(), k.as_str()))
            .collect();
        if !rows.is_empty() {
            self.tx.append(&rows, &self.hashes, &checkpoint).await?;
        }
        self.tx.commit().await?;
        Ok(Appended {
            first: self.first,
            size,
            checkpoint,
        })
    }
}

/// What an append did.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The index of the first entry appended.
    pub first: u64,
    /// The tree size after it.
    pub size: u64,
    /// The checkpoint signed over that size.
    pub checkpoint: String,
}

/// The ledger: a transparency log in the store, signed by one key.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
    signer: Signer,
}

impl Ledger {
    /// The log in `store`, signed with `signer` (its name is the origin).
    pub fn new(store: Store, signer: Signer) -> Ledger {
        Ledger { store, signer }
    }

    /// The log in `store` with the key in `data_dir` (created when missing).
    pub fn open(store: Store, data_dir: &Path) -> Result<Ledger> {
        Ok(Ledger::new(
            store,
            load_or_create_key(&key_path(data_dir), None)?,
        ))
    }

    /// The store it lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The log's name.
    pub fn origin(&self) -> &str {
        self.signer.name()
    }

    /// The verifier key anyone checks checkpoints with.
    pub fn verifier_key(&self) -> String {
        self.signer.verifier_key()
    }

    /// The verifier of the log's key.
    pub fn verifier(&self) -> Verifier {
        self.signer.verifier()
    }

    /// Takes the log's lock for an append; entries pushed onto the [`Appender`] commit together
    /// with a checkpoint signed over them when it finishes.
    pub async fn begin(&self) -> Result<Appender<'_>> {
        let mut tx = self.store.ledger_begin().await?;
        let first = tx.size();
        let front = frontier(first);
        let stored = tx.hashes(&front).await?;
        let mut known: HashMap<Node, Hash> = HashMap::with_capacity(front.len());
        for (n, h) in front.iter().zip(stored) {
            let h = h.as_deref().and_then(unhex).ok_or_else(|| missing(*n))?;
            known.insert(*n, h);
        }
        Ok(Appender {
            ledger: self,
            tx,
            first,
            known,
            hashes: Vec::new(),
            entries: Vec::new(),
        })
    }

    /// Appends entries (each an exact byte string, with what it records) in one transaction and
    /// signs a checkpoint over the new tree in the same transaction.
    pub async fn append(&self, entries: &[(String, &str)]) -> Result<Appended> {
        let mut a = self.begin().await?;
        for (e, kind) in entries {
            a.push(e.clone(), kind)?;
        }
        a.finish().await
    }

    /// Appends one statement; returns its index.
    pub async fn log(&self, kind: &str, statement: &Value) -> Result<u64> {
        let body = serde_json::to_string(statement)?;
        Ok(self.append(&[(body, kind)]).await?.first)
    }

    fn body(&self, size: u64, root: Hash) -> String {
        Checkpoint {
            origin: self.origin().to_string(),
            size,
            root,
            extensions: Vec::new(),
        }
        .text()
    }

    /// The latest signed checkpoint (with any witnesses' cosignatures); an empty log's is signed
    /// on the spot.
    pub async fn checkpoint(&self) -> Result<String> {
        match self.store.ledger_checkpoint(None).await? {
            Some((_, note)) => Ok(note),
            None => self.signer.sign(&self.body(0, empty_root())),
        }
    }

    /// The checkpoint signed at `size`, if one was.
    pub async fn checkpoint_at(&self, size: u64) -> Result<Option<String>> {
        Ok(self
            .store
            .ledger_checkpoint(Some(size))
            .await?
            .map(|(_, n)| n))
    }

    /// Reads a checkpoint note signed by this log.
    pub fn open_checkpoint(&self, note: &str) -> Result<Checkpoint> {
        Checkpoint::open(note, &self.verifier())
    }

    async fn ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Hash>> {
        let nodes: Vec<Vec<Node>> = ranges.iter().map(|&(a, b)| range_nodes(a, b)).collect();
        let flat: Vec<Node> = nodes.iter().flatten().copied().collect();
        let got = self.store.ledger_hashes(&flat).await?;
        let mut map = HashMap::with_capacity(flat.len());
        for (n, h) in flat.iter().zip(got) {
            map.insert(*n, h.as_deref().and_then(unhex).ok_or_else(|| missing(*n))?);
        }
        Ok(nodes
            .iter()
            .map(|ns| fold(&ns.iter().map(|n| map[n]).collect::<Vec<_>>()))
            .collect())
    }

    /// The root of the first `size` entries, from the stored hashes.
    pub async fn root(&self, size: u64) -> Result<Hash> {
        Ok(self.ranges(&[(0, size)]).await?.remove(0))
    }

    /// The inclusion proof of entry `index` in the tree of `size` entries.
    pub async fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>> {
        if index >= size {
            return Err(Error::Entry(format!(
                "entry {index} is not in a tree of {size} entries"
            )));
        }
        self.ranges(&inclusion_ranges(index, size)).await
    }

    /// The consistency proof from the tree of `old` entries to the tree of `new`.
    pub async fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>> {
        if old > new {
            return Err(Error::Entry(format!(
                "a tree of {new} entries cannot extend one of {old}"
            )));
        }
        self.ranges(&consistency_ranges(old, new)).await
    }

    /// One entry.
    pub async fn entry(&self, index: u64) -> Result<LedgerEntry> {
        self.store
            .ledger_entries(index, 1)
            .await?
            .pop()
            .ok_or_else(|| Error::Entry(format!("no entry {index}")))
    }

    /// A tile's bytes, or `None` when the log does not have it yet (per C2SP `tlog-tiles`: 32
    /// bytes a hash; an entry bundle is each entry as a big-endian 16-bit length then its bytes).
    pub async fn tile(&self, tile: Tile) -> Result<Option<Vec<u8>>> {
        let size = self.store.ledger_size().await?;
        let start = tile.index.saturating_mul(WIDTH);
        match tile.level {
            None => {
                if start.saturating_add(tile.width) > size {
                    return Ok(None);
                }
                let entries = self.store.ledger_entries(start, tile.width).await?;
                if entries.len() as u64 != tile.width {
                    return Ok(None);
                }
                let mut out = Vec::new();
                for e in entries {
                    let len = u16::try_from(e.body.len())
                        .map_err(|_| Error::Entry(format!("entry {} is too long", e.index)))?;
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(e.body.as_bytes());
                }
                Ok(Some(out))
            }
            Some(l) => {
                let level = u32::from(l) * u32::from(HEIGHT);
                let Some(level) = u8::try_from(level).ok().filter(|&l| l < 64) else {
                    return Ok(None);
                };
                let available = size >> level;
                if start.saturating_add(tile.width) > available {
                    return Ok(None);
                }
                let hashes = self.store.ledger_hash_run(level, start, tile.width).await?;
                if hashes.len() as u64 != tile.width {
                    return Err(Error::Mismatch(format!(
                        "the log's hashes at level {level} from {start} are missing"
                    )));
                }
                let mut out = Vec::with_capacity(hashes.len() * 32);
                for h in hashes {
                    out.extend_from_slice(
                        &unhex(&h)
                            .ok_or_else(|| Error::Mismatch("a stored hash is not hex".into()))?,
                    );
                }
                Ok(Some(out))
            }
        }
    }

    /// A C2SP `tlog-proof` that entry `index` is in the log at its latest checkpoint.
    pub async fn proof(&self, index: u64) -> Result<String> {
        self.proof_at(index, &self.checkpoint().await?).await
    }

    /// A C2SP `tlog-proof` that entry `index` is in the log at the signed `checkpoint`.
    pub async fn proof_at(&self, index: u64, checkpoint: &str) -> Result<String> {
        let c = self.open_checkpoint(checkpoint)?;
        let path = self.inclusion_proof(index, c.size).await?;
        Ok(tlog_proof(index, &path, checkpoint))
    }

    /// Logs an administrative act ([`crate::statement::admin`]); returns the entry's index.
    pub async fn log_admin(&self, act: &str, subject: &str, details: Value) -> Result<u64> {
        self.log("admin", &crate::statement::admin(act, subject, details))
            .await
    }
}

fn missing((level, index): Node) -> Error {
    Error::Mismatch(format!(
        "the log's stored hash at level {level}, index {index} is missing or corrupt"
    ))
}

/// A C2SP `tlog-proof`: `c2sp.org/tlog-proof@v1`, `index N`, the inclusion proof's hashes, a
/// blank line, the checkpoint.
pub fn tlog_proof(index: u64, path: &[Hash], checkpoint: &str) -> String {
    format!(
        "c2sp.org/tlog-proof@v1\nindex {index}\n{}\n{checkpoint}",
        hash_lines(path)
    )
}

/// Hashes one per line in base64, each line ending in a newline: the proof lines of C2SP
/// `tlog-proof` and `tlog-witness`.
pub fn hash_lines(hashes: &[Hash]) -> String {
    hashes
        .iter()
        .map(|h| format!("{}\n", B64.encode(h)))
        .collect()
}

/// One base64 hash line (without its newline).
pub fn parse_hash_line(line: &str) -> Option<Hash> {
    B64.decode(line).ok().and_then(|h| Hash::try_from(h).ok())
}

/// A parsed `tlog-proof`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    /// The entry's index.
    pub index: u64,
    /// The inclusion proof.
    pub path: Vec<Hash>,
    /// The signed checkpoint, as written.
    pub checkpoint: String,
}

/// Parses a C2SP `tlog-proof`.
pub fn parse_tlog_proof(text: &str) -> Result<TlogProof> {
    let bad = |why: &str| Error::Mismatch(format!("malformed tlog-proof: {why}"));
    let (head, checkpoint) = text
        .split_once("\n\n")
        .ok_or_else(|| bad("no blank line before the checkpoint"))?;
    let mut lines = head.split('\n');
    if lines.next() != Some("c2sp.org/tlog-proof@v1") {
        return Err(bad("the first line is c2sp.org/tlog-proof@v1"));
    }
    let mut line = lines.next().ok_or_else(|| bad("no index line"))?;
    if line.starts_with("extra ") {
        line = lines.next().ok_or_else(|| bad("no index line"))?;
    }
    let index = line
        .strip_prefix("index ")
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| bad("no index line"))?;
    let path = lines
        .map(|l| parse_hash_line(l).ok_or_else(|| bad("a proof line is not a base64 hash")))
        .collect::<Result<Vec<_>>>()?;
    Ok(TlogProof {
        index,
        path,
        checkpoint: checkpoint.to_string(),
    })
}
