//! RFC 6962 / RFC 9162 Merkle trees: hashing, the stored hashes of complete subtrees, inclusion
//! and consistency proofs and their verification.
//!
//! A tree of `n` leaves is never held whole. Every complete, aligned subtree has one stored hash,
//! named by its level and index ([`Node`]): leaves are level 0, and node `(l, k)` covers leaves
//! `k·2^l … (k+1)·2^l − 1`. Any hash a proof needs is a fold of at most `2·log n` of them
//! ([`range_nodes`]), which is also exactly what C2SP tiles serve.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// A complete subtree: `(level, index)`.
pub type Node = (u8, u64);

/// The hash of an entry: `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// The hash of an interior node: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The complete subtrees that together hold leaves `[a, b)`, left to right: the largest aligned
/// block at each step.
pub fn range_nodes(mut a: u64, b: u64) -> Vec<Node> {
    let mut out = Vec::new();
    while a < b {
        let mut level = if a == 0 { 63 } else { a.trailing_zeros() };
        while level > 0 && (1u64 << level) > b - a {
            level -= 1;
        }
        out.push((level as u8, a >> level));
        a += 1 << level;
    }
    out
}

/// The hash of leaves `[a, b)` from the hashes of [`range_nodes`]`(a, b)`, folded right to left
/// as RFC 6962's MTH does for a range that starts on a boundary of its size.
pub fn fold(hashes: &[Hash]) -> Hash {
    let mut it = hashes.iter().rev();
    let Some(last) = it.next() else {
        return empty_root();
    };
    it.fold(*last, |acc, left| node_hash(left, &acc))
}

/// The subtrees whose hashes are the root of a tree of `size` leaves (its right frontier), left
/// to right.
pub fn frontier(size: u64) -> Vec<Node> {
    range_nodes(0, size)
}

/// The stored hashes that appending the leaf hash `leaf` at index `index` completes, leaf first;
/// `get` gives the left siblings (already stored or earlier in the same batch).
pub fn completed(
    index: u64,
    leaf: Hash,
    mut get: impl FnMut(Node) -> Option<Hash>,
) -> Vec<(Node, Hash)> {
    let mut out = vec![((0, index), leaf)];
    let (mut level, mut k, mut h) = (0u8, index, leaf);
    while k & 1 == 1 {
        let Some(left) = get((level, k - 1)) else {
            break;
        };
        h = node_hash(&left, &h);
        level += 1;
        k >>= 1;
        out.push(((level, k), h));
    }
    out
}

/// The ranges whose hashes make the inclusion proof of leaf `m` in a tree of `n` leaves
/// (RFC 9162 §2.1.3.1), leaf side first.
pub fn inclusion_ranges(m: u64, n: u64) -> Vec<(u64, u64)> {
    fn path(m: u64, lo: u64, hi: u64, out: &mut Vec<(u64, u64)>) {
        if hi - lo <= 1 {
            return;
        }
        let k = split(hi - lo);
        if m < lo + k {
            path(m, lo, lo + k, out);
            out.push((lo + k, hi));
        } else {
            path(m, lo + k, hi, out);
            out.push((lo, lo + k));
        }
    }
    let mut out = Vec::new();
    if m < n {
        path(m, 0, n, &mut out);
    }
    out
}

/// The ranges whose hashes make the consistency proof from `m` leaves to `n` (RFC 9162
/// §2.1.4.1); empty when `m` is 0 or `m == n`.
pub fn consistency_ranges(m: u64, n: u64) -> Vec<(u64, u64)> {
    fn sub(m: u64, lo: u64, hi: u64, whole: bool, out: &mut Vec<(u64, u64)>) {
        let n = hi - lo;
        if m == n {
            if !whole {
                out.push((lo, hi));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, lo, lo + k, whole, out);
            out.push((lo + k, hi));
        } else {
            sub(m - k, lo + k, hi, false, out);
            out.push((lo, lo + k));
        }
    }
    let mut out = Vec::new();
    if m > 0 && m < n {
        sub(m, 0, n, true, &mut out);
    }
    out
}

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The index or sizes cannot be proven (an index past the end, a shrinking tree).
    #[error("{0}")]
    Bounds(String),
    /// The proof has too many or too few hashes for the sizes.
    #[error("the proof has the wrong number of hashes")]
    Length,
    /// The proof recomputes a different root.
    #[error("the proof does not lead to the root")]
    Mismatch,
}

/// Checks that `leaf` (a leaf hash) is leaf `index` of the tree of `size` leaves whose root is
/// `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::Bounds(format!(
            "entry {index} is not in a tree of {size} entries"
        )));
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::Length);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::Length);
    }
    if r != *root {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

/// Checks that the tree of `size2` leaves with root `root2` extends the tree of `size1` leaves
/// with root `root1` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> Result<(), ProofError> {
    if size2 < size1 {
        return Err(ProofError::Bounds(format!(
            "a tree of {size2} entries cannot extend one of {size1}"
        )));
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(ProofError::Length);
        }
        return if root1 == root2 {
            Ok(())
        } else {
            Err(ProofError::Mismatch)
        };
    }
    if size1 == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::Length)
        };
    }
    let Some((first, rest)) = proof.split_first() else {
        return Err(ProofError::Length);
    };
    // when size1 is a power of two its root is the first hash of the path, implied
    let (start, path) = if size1.is_power_of_two() {
        (root1, proof)
    } else {
        (first, rest)
    };
    let (mut f, mut s) = (size1 - 1, size2 - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in path {
        if s == 0 {
            return Err(ProofError::Length);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::Length);
    }
    if fr != *root1 || sr != *root2 {
        return Err(ProofError::Mismatch);
    }
    Ok(())
}

/// A whole tree in memory, every stored hash kept: for verifying a log from its entries, for
/// usage commitments, and for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    /// An empty tree.
    pub fn new() -> MemoryTree {
        MemoryTree::default()
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let index = self.size();
        let levels = &self.levels;
        let done = completed(index, leaf, |(l, k)| {
            levels
                .get(usize::from(l))
                .and_then(|v| v.get(k as usize))
                .copied()
        });
        for ((level, _), h) in done {
            let l = usize::from(level);
            if self.levels.len() <= l {
                self.levels.push(Vec::new());
            }
            self.levels[l].push(h);
        }
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |v| v.len() as u64)
    }

    /// A stored hash.
    pub fn node(&self, (level, index): Node) -> Option<Hash> {
        self.levels
            .get(usize::from(level))?
            .get(index as usize)
            .copied()
    }

    /// The hash of leaves `[a, b)` (`b` at most the size).
    pub fn range(&self, a: u64, b: u64) -> Hash {
        let hs: Vec<Hash> = range_nodes(a, b)
            .into_iter()
            .filter_map(|n| self.node(n))
            .collect();
        fold(&hs)
    }

    /// The root of the first `size` leaves.
    pub fn root(&self, size: u64) -> Hash {
        self.range(0, size)
    }

    /// The inclusion proof of leaf `m` in the first `n` leaves.
    pub fn inclusion(&self, m: u64, n: u64) -> Vec<Hash> {
        inclusion_ranges(m, n)
            .into_iter()
            .map(|(a, b)| self.range(a, b))
            .collect()
    }

    /// The consistency proof from the first `m` leaves to the first `n`.
    pub fn consistency(&self, m: u64, n: u64) -> Vec<Hash> {
        consistency_ranges(m, n)
            .into_iter()
            .map(|(a, b)| self.range(a, b))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_nodes_cover_ranges_with_aligned_blocks() {
        assert_eq!(range_nodes(0, 6), vec![(2, 0), (1, 2)]);
        assert_eq!(range_nodes(4, 7), vec![(1, 2), (0, 6)]);
        assert_eq!(range_nodes(8, 16), vec![(3, 1)]);
        assert_eq!(range_nodes(0, 0), vec![]);
        assert_eq!(frontier(13), vec![(3, 0), (2, 2), (0, 12)]);
    }
}
