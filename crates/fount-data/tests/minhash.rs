//! MinHash: the LSH S-curve and the text normalisation.

use fount_data::minhash::{candidate_probability, signature_of, simplify, BANDS, ROWS};
use rand::{Rng, SeedableRng};

fn shares_band(a: &[u64; 112], b: &[u64; 112]) -> bool {
    (0..BANDS).any(|k| a[k * ROWS..(k + 1) * ROWS] == b[k * ROWS..(k + 1) * ROWS])
}

#[test]
fn candidate_rate_follows_the_s_curve() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let trials = 300;
    let n = 100usize;
    for k in [100usize, 95, 90, 85, 80, 70, 50] {
        // two sets of `n` shingles sharing `k`: Jaccard k / (2n - k)
        let jaccard = k as f64 / (2 * n - k) as f64;
        let mut hits = 0;
        for _ in 0..trials {
            let common: Vec<u64> = (0..k).map(|_| rng.random()).collect();
            let mut a = common.clone();
            let mut b = common;
            a.extend((0..n - k).map(|_| rng.random::<u64>()));
            b.extend((0..n - k).map(|_| rng.random::<u64>()));
            if shares_band(&signature_of(&a), &signature_of(&b)) {
                hits += 1;
            }
        }
        let rate = hits as f64 / trials as f64;
        let p = candidate_probability(jaccard);
        let sd = (p * (1.0 - p) / trials as f64).sqrt();
        assert!(
            (rate - p).abs() <= 4.0 * sd + 0.01,
            "J={jaccard:.3}: rate {rate:.3}, S-curve {p:.3}"
        );
    }
    // the published points: threshold (1/14)^(1/8) ~ 0.72, P(0.8) = 0.92
    assert!((candidate_probability(0.8) - 0.924).abs() < 0.001);
    assert!(((1.0f64 / 14.0).powf(1.0 / 8.0) - 0.719).abs() < 0.001);
    assert!(candidate_probability(0.5) < 0.06 && candidate_probability(0.9) > 0.999);
}

#[test]
fn simplify_matches_datatrove() {
    assert_eq!(
        simplify("  Hello, World!  It's 3.14 or 1,000 —  café\n\tNAÏVE "),
        "hello world it s 0 or 0 cafe naive"
    );
    assert_eq!(simplify("第2章：开始。"), "第0章 开始");
}
