//! Property tests on random trees: every inclusion and consistency proof verifies, and any
//! flipped bit (in the leaf, the proof, either root) or wrong size makes it fail.

use fount_ledger::merkle::{leaf_hash, verify_consistency, verify_inclusion, Hash, MemoryTree};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn flip(h: &Hash, rng: &mut ChaCha8Rng) -> Hash {
    let mut h = *h;
    let bit = rng.random_range(0..256);
    h[bit / 8] ^= 1 << (bit % 8);
    h
}

fn random_tree(rng: &mut ChaCha8Rng, n: u64) -> MemoryTree {
    let mut t = MemoryTree::new();
    for _ in 0..n {
        let len = rng.random_range(0..40);
        let e: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        t.push(leaf_hash(&e));
    }
    t
}

#[test]
fn every_inclusion_proof_verifies_and_any_flipped_bit_fails() {
    let mut rng = ChaCha8Rng::seed_from_u64(6962);
    for _ in 0..60 {
        let n = rng.random_range(1..600u64);
        let t = random_tree(&mut rng, n);
        for _ in 0..20 {
            let size = rng.random_range(1..=n);
            let i = rng.random_range(0..size);
            let leaf = t.node((0, i)).unwrap();
            let root = t.root(size);
            let proof = t.inclusion(i, size);
            verify_inclusion(&leaf, i, size, &proof, &root).unwrap();
            assert!(verify_inclusion(&flip(&leaf, &mut rng), i, size, &proof, &root).is_err());
            assert!(verify_inclusion(&leaf, i, size, &proof, &flip(&root, &mut rng)).is_err());
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let k = rng.random_range(0..bad.len());
                bad[k] = flip(&bad[k], &mut rng);
                assert!(verify_inclusion(&leaf, i, size, &bad, &root).is_err());
                assert!(verify_inclusion(&leaf, i, size, &proof[1..], &root).is_err());
            }
            if size > 1 {
                let j = (i + 1) % size;
                assert!(
                    verify_inclusion(&leaf, j, size, &proof, &root).is_err()
                        || t.node((0, j)) == Some(leaf)
                );
            }
            assert!(verify_inclusion(&leaf, size, size, &proof, &root).is_err());
        }
    }
}

#[test]
fn every_consistency_proof_verifies_and_any_flipped_bit_fails() {
    let mut rng = ChaCha8Rng::seed_from_u64(9162);
    for _ in 0..60 {
        let n = rng.random_range(1..600u64);
        let t = random_tree(&mut rng, n);
        for _ in 0..20 {
            let new = rng.random_range(1..=n);
            let old = rng.random_range(0..=new);
            let (r1, r2) = (t.root(old), t.root(new));
            let proof = t.consistency(old, new);
            verify_consistency(old, new, &proof, &r1, &r2).unwrap();
            if old == 0 {
                continue;
            }
            assert!(verify_consistency(old, new, &proof, &flip(&r1, &mut rng), &r2).is_err());
            assert!(verify_consistency(old, new, &proof, &r1, &flip(&r2, &mut rng)).is_err());
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let k = rng.random_range(0..bad.len());
                bad[k] = flip(&bad[k], &mut rng);
                assert!(verify_consistency(old, new, &bad, &r1, &r2).is_err());
            }
            assert!(verify_consistency(new, old, &proof, &r2, &r1).is_err() || old == new);
        }
    }
}
