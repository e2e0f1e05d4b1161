//! Token shards: tokenized documents, each followed by EOS, in a memory-mapped binary format with
//! a document index (`FORMAT.md` beside this crate documents every byte), and a sampler with a
//! position that can be saved and restored.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The first 8 bytes of every shard.
pub const MAGIC: &[u8; 8] = b"FOUNTTOK";
/// The format version written.
pub const VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER: usize = 64;

/// Writes shards `<dir>/<split>-NNNNN.bin`, starting a new one past `max_tokens`.
pub struct ShardWriter {
    dir: PathBuf,
    split: String,
    width: u32,
    eos: u32,
    vocab_size: u32,
    max_tokens: u64,
    current: Option<Open>,
    written: Vec<PathBuf>,
    /// Documents and tokens written over all shards.
    pub docs: u64,
    /// Tokens written over all shards.
    pub tokens: u64,
}

struct Open {
    path: PathBuf,
    tmp: PathBuf,
    w: BufWriter<fs_err::File>,
    offsets: Vec<u64>,
}

impl ShardWriter {
    /// A writer for token ids below `vocab_size` (u16 tokens when they fit, else u32).
    pub fn new(
        dir: &Path,
        split: &str,
        vocab_size: u32,
        eos: u32,
        max_tokens: u64,
    ) -> Result<ShardWriter> {
        fs_err::create_dir_all(dir)?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            width: if vocab_size <= 1 << 16 { 2 } else { 4 },
            eos,
            vocab_size,
            max_tokens: max_tokens.max(1),
            current: None,
            written: Vec::new(),
            docs: 0,
            tokens: 0,
        })
    }

    /// Appends one document (EOS is added).
    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|o| o.offsets.last().copied().unwrap_or(0) >= self.max_tokens)
        {
            self.close()?;
        }
        if self.current.is_none() {
            let path = self
                .dir
                .join(format!("{}-{:05}.bin", self.split, self.written.len()));
            let tmp = path.with_extension("bin.partial");
            let mut w = BufWriter::with_capacity(1 << 20, fs_err::File::create(&tmp)?);
            w.write_all(&[0u8; HEADER])?;
            self.current = Some(Open {
                path,
                tmp,
                w,
                offsets: vec![0],
            });
        }
        let (width, eos, vocab) = (self.width, self.eos, self.vocab_size);
        let Some(o) = self.current.as_mut() else {
            return Ok(());
        };
        for &t in tokens.iter().chain(std::iter::once(&eos)) {
            if t >= vocab {
                return Err(Error::Tokenizer(format!(
                    "token id {t} is not below the vocabulary size {vocab}"
                )));
            }
            if width == 2 {
                o.w.write_all(&(t as u16).to_le_bytes())?;
            } else {
                o.w.write_all(&t.to_le_bytes())?;
            }
        }
        let n = tokens.len() as u64 + 1;
        let last = o.offsets.last().copied().unwrap_or(0);
        o.offsets.push(last + n);
        self.docs += 1;
        self.tokens += n;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        let Some(mut o) = self.current.take() else {
            return Ok(());
        };
        let n_tokens = o.offsets.last().copied().unwrap_or(0);
        let n_docs = o.offsets.len() as u64 - 1;
        let token_bytes = n_tokens * u64::from(self.width);
        let pad = (8 - (HEADER as u64 + token_bytes) % 8) % 8;
        o.w.write_all(&vec![0u8; pad as usize])?;
        for off in &o.offsets {
            o.w.write_all(&off.to_le_bytes())?;
        }
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&self.width.to_le_bytes());
        header[16..24].copy_from_slice(&n_docs.to_le_bytes());
        header[24..32].copy_from_slice(&n_tokens.to_le_bytes());
        header[32..36].copy_from_slice(&self.eos.to_le_bytes());
        header[36..40].copy_from_slice(&self.vocab_size.to_le_bytes());
        o.w.seek(SeekFrom::Start(0))?;
        o.w.write_all(&header)?;
        o.w.flush()?;
        o.w.get_ref().sync_all()?;
        drop(o.w);
        fs_err::rename(&o.tmp, &o.path)?;
        self.written.push(o.path);
        Ok(())
    }

    /// Closes the last shard and returns the shard files.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.close()?;
        Ok(self.written)
    }
}

/// One memory-mapped shard.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    width: usize,
    n_docs: usize,
    n_tokens: usize,
    index_at: usize,
    /// The EOS id that ends every document.
    pub eos: u32,
    /// The vocabulary size the tokens were written for.
    pub vocab_size: u32,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("docs", &self.n_docs)
            .field("tokens", &self.n_tokens)
            .finish()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Shard {
    /// Maps and validates a shard.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = fs_err::File::open(path)?;
        // SAFETY: shards are written once (to a temporary name, then renamed) and never modified
        // in place; a file truncated by another process would fault, as with any mapped reader.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(file.file())? };
        let bad = |reason: String| Error::Shard {
            path: path.to_path_buf(),
            reason,
        };
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("bad magic (expected FOUNTTOK)".into()));
        }
        let version = u32_at(&map, 8);
        if version != VERSION {
            return Err(bad(format!(
                "version {version}, this reader knows {VERSION}"
            )));
        }
        let width = u32_at(&map, 12) as usize;
        if width != 2 && width != 4 {
            return Err(bad(format!("token width {width}")));
        }
        let n_docs = u64_at(&map, 16) as usize;
        let n_tokens = u64_at(&map, 24) as usize;
        let token_end = HEADER + n_tokens * width;
        let index_at = token_end.div_ceil(8) * 8;
        let expected = index_at + (n_docs + 1) * 8;
        if map.len() != expected {
            return Err(bad(format!(
                "{} bytes, the header implies {expected}",
                map.len()
            )));
        }
        let shard = Shard {
            path: path.to_path_buf(),
            width,
            n_docs,
            n_tokens,
            index_at,
            eos: u32_at(&map, 32),
            vocab_size: u32_at(&map, 36),
            map,
        };
        if shard.offset(0) != 0 || shard.offset(n_docs) != n_tokens as u64 {
            return Err(bad("document index does not span the tokens".into()));
        }
        Ok(shard)
    }

    fn offset(&self, i: usize) -> u64 {
        u64_at(&self.map, self.index_at + i * 8)
    }

    /// Number of documents.
    pub fn num_docs(&self) -> usize {
        self.n_docs
    }

    /// Number of tokens (EOS included).
    pub fn num_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Appends tokens `range` to `out`.
    pub fn read_tokens(&self, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        let range = range.start.min(self.n_tokens)..range.end.min(self.n_tokens);
        let bytes = &self.map[HEADER + range.start * self.width..HEADER + range.end * self.width];
        if self.width == 2 {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
            );
        } else {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
    }

    /// The tokens of document `i` (its EOS included), or `None` past the end.
    pub fn doc(&self, i: usize) -> Option<Vec<u32>> {
        if i >= self.n_docs {
            return None;
        }
        let (a, b) = (self.offset(i) as usize, self.offset(i + 1) as usize);
        if a > b || b > self.n_tokens {
            return None;
        }
        let mut out = Vec::with_capacity(b - a);
        self.read_tokens(a..b, &mut out);
        Some(out)
    }
}

/// The shards of one split, read as one token stream.
#[derive(Debug)]
pub struct ShardSet {
    shards: Vec<Shard>,
    starts: Vec<usize>,
    total: usize,
}

impl ShardSet {
    /// Opens `<dir>/<split>-*.bin` in order.
    pub fn open(dir: &Path, split: &str) -> Result<ShardSet> {
        let mut paths: Vec<PathBuf> = fs_err::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{split}-")) && n.ends_with(".bin"))
            })
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::Shard {
                path: dir.to_path_buf(),
                reason: format!("no {split}-*.bin shards"),
            });
        }
        Self::from_shards(
            paths
                .iter()
                .map(|p| Shard::open(p))
                .collect::<Result<_>>()?,
        )
    }

    /// A set over already opened shards.
    pub fn from_shards(shards: Vec<Shard>) -> Result<ShardSet> {
        let mut starts = Vec::with_capacity(shards.len());
        let mut total = 0;
        for s in &shards {
            starts.push(total);
            total += s.num_tokens();
        }
        Ok(ShardSet {
            shards,
            starts,
            total,
        })
    }

    /// Total tokens.
    pub fn num_tokens(&self) -> usize {
        self.total
    }

    /// Total documents.
    pub fn num_docs(&self) -> usize {
        self.shards.iter().map(Shard::num_docs).sum()
    }

    /// The shards.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Appends tokens `[start, end)` of the stream to `out`, across shard boundaries.
    pub fn read(&self, start: usize, end: usize, out: &mut Vec<u32>) {
        let mut pos = start;
        while pos < end.min(self.total) {
            let k = self.starts.partition_point(|&s| s <= pos) - 1;
            let local = pos - self.starts[k];
            let take = (end - pos).min(self.shards[k].num_tokens() - local);
            self.shards[k].read_tokens(local..local + take, out);
            pos += take;
        }
    }
}

/// A sampler's position: save it with a checkpoint, restore it to continue exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The seed of the window order.
    pub seed: u64,
    /// Tokens per training sequence (windows hold one more, for the shifted targets).
    pub seq_len: usize,
    /// Tokens in the shard set the position belongs to.
    pub total_tokens: usize,
    /// Completed passes over the data.
    pub epoch: u64,
    /// Windows already returned in this epoch.
    pub index: u64,
}

/// Deterministic random windows of `seq_len + 1` tokens: the stream is cut into non-overlapping
/// windows, visited in an order shuffled per epoch by ChaCha8 seeded from `(seed, epoch)`.
#[derive(Debug)]
pub struct Sampler<'a> {
    set: &'a ShardSet,
    state: SamplerState,
    order: Vec<u32>,
}

impl<'a> Sampler<'a> {
    /// A sampler at the start of epoch 0.
    pub fn new(set: &'a ShardSet, seq_len: usize, seed: u64) -> Result<Sampler<'a>> {
        let state = SamplerState {
            seed,
            seq_len,
            total_tokens: set.num_tokens(),
            epoch: 0,
            index: 0,
        };
        Self::restore(set, state)
    }

    /// A sampler continuing from a saved position.
    pub fn restore(set: &'a ShardSet, state: SamplerState) -> Result<Sampler<'a>> {
        if state.seq_len == 0 {
            return Err(Error::Sampler("seq_len must be at least 1".into()));
        }
        if state.total_tokens != set.num_tokens() {
            return Err(Error::Sampler(format!(
                "the position was saved over {} tokens, these shards hold {}",
                state.total_tokens,
                set.num_tokens()
            )));
        }
        let windows = set.num_tokens().saturating_sub(1) / state.seq_len;
        if windows == 0 {
            return Err(Error::Sampler(format!(
                "{} tokens are too few for one window of {}",
                set.num_tokens(),
                state.seq_len + 1
            )));
        }
        let mut s = Sampler {
            set,
            state,
            order: Vec::new(),
        };
        s.shuffle();
        if s.state.index as usize > s.order.len() {
            return Err(Error::Sampler("position past the end of the epoch".into()));
        }
        Ok(s)
    }

    fn shuffle(&mut self) {
        let windows = self.set.num_tokens().saturating_sub(1) / self.state.seq_len;
        self.order = (0..windows as u32).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.state.seed ^ self.state.epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        self.order.shuffle(&mut rng);
    }

    /// The current position.
    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Windows per epoch.
    pub fn windows_per_epoch(&self) -> usize {
        self.order.len()
    }

    /// Replaces `out` with the next window (`seq_len + 1` tokens).
    pub fn next_window(&mut self, out: &mut Vec<u32>) {
        if self.state.index as usize >= self.order.len() {
            self.state.epoch += 1;
            self.state.index = 0;
            self.shuffle();
        }
        let w = self.order[self.state.index as usize] as usize;
        self.state.index += 1;
        out.clear();
        let start = w * self.state.seq_len;
        self.set.read(start, start + self.state.seq_len + 1, out);
    }
}
