//! The KV block manager: fixed-size blocks from a pool, reference counts, and a prefix cache of
//! full blocks keyed by a hash chain, evicted least recently used.
//!
//! A full block's key is `SHA-256(parent key ‖ cache salt ‖ adapter id and version ‖ its token
//! ids)`, truncated to 128 bits, where the parent key is the previous block's key (zero for the
//! first block). Two sequences share a block only if everything before it and in it is equal
//! *and* they have the same salt and adapter: the caller derives the salt from the tenant, so a
//! cached prefix never crosses tenants or adapters, and a cryptographic hash means no one can
//! construct a colliding prompt to read another sequence's keys and values.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// A block's prefix-cache key.
pub type BlockHash = [u8; 16];

/// The hash of a full block given its parent's.
pub fn block_hash(
    parent: Option<&BlockHash>,
    salt: &str,
    adapter: &str,
    tokens: &[u32],
) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.copied().unwrap_or([0; 16]));
    h.update((salt.len() as u64).to_le_bytes());
    h.update(salt.as_bytes());
    h.update((adapter.len() as u64).to_le_bytes());
    h.update(adapter.as_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Allocates blocks and shares full ones between sequences with the same prefix.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    free: Vec<usize>,
    cached: HashMap<BlockHash, usize>,
    /// Blocks with no users that still hold a cached prefix, by last use.
    evictable: BTreeMap<u64, usize>,
    last_use: Vec<u64>,
    tick: u64,
    /// Prefix-cache lookups (blocks asked for) and hits, since creation.
    pub lookups: u64,
    /// See `lookups`.
    pub hits: u64,
}

impl BlockManager {
    /// A pool of `blocks` blocks of `block_size` tokens.
    pub fn new(blocks: usize, block_size: usize) -> BlockManager {
        BlockManager {
            block_size,
            refs: vec![0; blocks],
            hash_of: vec![None; blocks],
            free: (0..blocks).rev().collect(),
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            last_use: vec![0; blocks],
            tick: 0,
            lookups: 0,
            hits: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks in use by at least one sequence.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// A fresh block (refcount 1), evicting the least recently used cached block if needed.
    pub fn allocate(&mut self) -> Option<usize> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.evictable.iter().next()?;
                self.evictable.remove(&tick);
                if let Some(h) = self.hash_of[b].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.refs[b] = 1;
        self.touch(b);
        Some(b)
    }

    fn touch(&mut self, b: usize) {
        self.tick += 1;
        self.last_use[b] = self.tick;
    }

    /// The cached block with key `h`, now shared (refcount + 1), if there is one.
    pub fn lookup(&mut self, h: &BlockHash) -> Option<usize> {
        self.lookups += 1;
        let b = *self.cached.get(h)?;
        if self.refs[b] == 0 {
            self.evictable.remove(&self.last_use[b]);
        }
        self.refs[b] += 1;
        self.touch(b);
        self.hits += 1;
        Some(b)
    }

    /// Another user of block `b`.
    pub fn share(&mut self, b: usize) {
        self.refs[b] += 1;
    }

    /// Records that block `b` is full with key `h`, so later sequences can reuse it. A block
    /// with the same key already cached stays the cached one.
    pub fn register(&mut self, b: usize, h: BlockHash) {
        if self.hash_of[b].is_some() || self.cached.contains_key(&h) {
            return;
        }
        self.hash_of[b] = Some(h);
        self.cached.insert(h, b);
    }

    /// Drops one user of block `b`; with no users left it becomes free, or evictable when it
    /// holds a cached prefix.
    pub fn release(&mut self, b: usize) {
        if self.refs[b] == 0 {
            return;
        }
        self.refs[b] -= 1;
        if self.refs[b] > 0 {
            return;
        }
        if self.hash_of[b].is_some() {
            self.touch(b);
            self.evictable.insert(self.last_use[b], b);
        } else {
            self.free.push(b);
        }
    }

    /// Users of block `b`.
    pub fn refs(&self, b: usize) -> u32 {
        self.refs[b]
    }
}
