//! Exact and MinHash-LSH near dedup over the whole corpus in bounded memory.
//!
//! As datatrove's MinHash stages do, signatures are not held in memory: every document contributes
//! one record per band (`band`, 128-bit band key, part, index) plus one for its exact content hash,
//! buffered up to a fixed number of records, sorted and written as a *run* file. Clustering then
//! merges all runs (a k-way merge over sorted files, so memory is one buffered reader per run),
//! and every two consecutive records with the same band and key are a duplicate pair, joined in a
//! union-find over document numbers (4 bytes a document). Each cluster keeps its first document in
//! corpus order; the others are removed as `exact_duplicate` (same content hash as an earlier
//! document) or `minhash_duplicate`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::minhash::{band_key, Signature, BANDS};

/// The band number used for exact content hashes.
pub const EXACT_BAND: u8 = 255;
const RECORD: usize = 1 + 16 + 4 + 4;

/// One signature record: sorted by band, key, part, index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SigRecord {
    /// Band number (`EXACT_BAND` for content hashes).
    pub band: u8,
    /// Band key (or content hash).
    pub key: u128,
    /// Input part number.
    pub part: u32,
    /// Document index within the part.
    pub index: u32,
}

impl SigRecord {
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&[self.band])?;
        w.write_all(&self.key.to_le_bytes())?;
        w.write_all(&self.part.to_le_bytes())?;
        w.write_all(&self.index.to_le_bytes())
    }

    fn read(r: &mut impl Read) -> std::io::Result<Option<SigRecord>> {
        let mut b = [0u8; RECORD];
        match r.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[1..17]);
        let mut part = [0u8; 4];
        part.copy_from_slice(&b[17..21]);
        let mut index = [0u8; 4];
        index.copy_from_slice(&b[21..25]);
        Ok(Some(SigRecord {
            band: b[0],
            key: u128::from_le_bytes(key),
            part: u32::from_le_bytes(part),
            index: u32::from_le_bytes(index),
        }))
    }
}

/// The records of one document: its 14 bands (when it has a signature) and its content hash.
pub fn doc_records(
    part: u32,
    index: u32,
    sig: Option<&Signature>,
    content_hash: u128,
) -> Vec<SigRecord> {
    let mut out = Vec::with_capacity(BANDS + 1);
    if let Some(sig) = sig {
        for band in 0..BANDS {
            out.push(SigRecord {
                band: band as u8,
                key: band_key(sig, band),
                part,
                index,
            });
        }
    }
    out.push(SigRecord {
        band: EXACT_BAND,
        key: content_hash,
        part,
        index,
    });
    out
}

/// Buffers records and writes them as sorted run files `<dir>/<prefix>-NNNN.run`.
pub struct RunWriter {
    dir: PathBuf,
    prefix: String,
    buf: Vec<SigRecord>,
    max_records: usize,
    runs: Vec<PathBuf>,
}

impl RunWriter {
    /// A writer that spills every `max_records` records.
    pub fn new(dir: &Path, prefix: &str, max_records: usize) -> RunWriter {
        RunWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            buf: Vec::new(),
            max_records: max_records.max(1),
            runs: Vec::new(),
        }
    }

    /// Adds records, spilling a run when the buffer is full.
    pub fn extend(&mut self, recs: impl IntoIterator<Item = SigRecord>) -> Result<()> {
        for r in recs {
            self.buf.push(r);
            if self.buf.len() >= self.max_records {
                self.spill()?;
            }
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.buf.sort_unstable();
        let path = self
            .dir
            .join(format!("{}-{:04}.run", self.prefix, self.runs.len()));
        let mut w = BufWriter::with_capacity(1 << 20, fs_err::File::create(&path)?);
        for r in &self.buf {
            r.write(&mut w)?;
        }
        w.flush()?;
        self.buf.clear();
        self.runs.push(path);
        Ok(())
    }

    /// Writes what is left and returns the run files.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.spill()?;
        Ok(self.runs)
    }
}

/// A union-find whose roots are the smallest member (so each cluster keeps its first document).
#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    /// `n` singletons.
    pub fn new(n: usize) -> UnionFind {
        UnionFind {
            parent: (0..n as u32).collect(),
        }
    }

    /// The root (smallest member) of `x`'s set.
    pub fn find(&mut self, x: u32) -> u32 {
        let mut root = x;
        while self.parent[root as usize] != root {
            root = self.parent[root as usize];
        }
        let mut cur = x;
        while self.parent[cur as usize] != root {
            let next = self.parent[cur as usize];
            self.parent[cur as usize] = root;
            cur = next;
        }
        root
    }

    /// Joins the sets of `a` and `b`.
    pub fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }
}

/// Why a document is removed by dedup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DupKind {
    /// Kept: the first of its cluster, or in no cluster.
    Unique,
    /// The same content as an earlier document.
    Exact,
    /// A near duplicate of an earlier document.
    Near,
}

/// The result of clustering.
#[derive(Debug, Clone)]
pub struct Clusters {
    /// Exact-content clusters.
    pub exact: UnionFind,
    /// MinHash clusters (exact duplicates included: their signatures are equal).
    pub near: UnionFind,
}

impl Clusters {
    /// The decision for document `gid`.
    pub fn kind(&mut self, gid: u32) -> DupKind {
        if self.exact.find(gid) != gid {
            DupKind::Exact
        } else if self.near.find(gid) != gid {
            DupKind::Near
        } else {
            DupKind::Unique
        }
    }
}

struct RunCursor {
    reader: BufReader<fs_err::File>,
}

/// Merges sorted run files and clusters the documents. `part_offsets[p]` is the global number of
/// part `p`'s first document; `total` the number of documents.
pub fn cluster_runs(
    runs: &[PathBuf],
    part_offsets: &[u64],
    total: usize,
    exact: bool,
    near: bool,
) -> Result<Clusters> {
    let mut clusters = Clusters {
        exact: UnionFind::new(total),
        near: UnionFind::new(total),
    };
    let mut cursors = Vec::with_capacity(runs.len());
    let mut heap = BinaryHeap::new();
    for (i, path) in runs.iter().enumerate() {
        let mut reader = BufReader::with_capacity(1 << 16, fs_err::File::open(path)?);
        if let Some(r) = SigRecord::read(&mut reader)? {
            heap.push(Reverse((r, i)));
        }
        cursors.push(RunCursor { reader });
    }
    let gid = |r: &SigRecord| {
        part_offsets.get(r.part as usize).copied().unwrap_or(0) + u64::from(r.index)
    };
    let mut last: Option<SigRecord> = None;
    while let Some(Reverse((rec, i))) = heap.pop() {
        if let Some(prev) = last {
            if prev.band == rec.band && prev.key == rec.key {
                let (a, b) = (gid(&prev) as u32, gid(&rec) as u32);
                if rec.band == EXACT_BAND {
                    if exact {
                        clusters.exact.union(a, b);
                    }
                } else if near {
                    clusters.near.union(a, b);
                }
            }
        }
        last = Some(rec);
        if let Some(next) = SigRecord::read(&mut cursors[i].reader)? {
            heap.push(Reverse((next, i)));
        }
    }
    Ok(clusters)
}

/// Clusters signatures held in memory (for tests and small corpora); same result as writing them
/// as runs and calling [`cluster_runs`].
pub fn cluster_in_memory(sigs: &[Option<Signature>]) -> UnionFind {
    let mut uf = UnionFind::new(sigs.len());
    for band in 0..BANDS {
        let mut keys: Vec<(u128, u32)> = sigs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (band_key(s, band), i as u32)))
            .collect();
        keys.sort_unstable();
        for w in keys.windows(2) {
            if w[0].0 == w[1].0 {
                uf.union(w[0].1, w[1].1);
            }
        }
    }
    uf
}
