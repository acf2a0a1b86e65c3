//! Deterministic randomness and slow reference implementations for tests.

use crate::kfold::{between, next_down};

/// Knuth's MMIX linear congruential generator: tiny, deterministic, good enough for test data.
pub(crate) struct Lcg(u64);

impl Lcg {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        // The low bits of an LCG have short periods; only the high half is used.
        (self.0 >> 32) as u32
    }

    /// Uniform in `0..n` (with negligible modulo bias for small `n`).
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32()) << 21;
        let lo = u64::from(self.next_u32() >> 11);
        (hi | lo) as f64 / (1u64 << 53) as f64
    }
}

/// O(n²) version of the exact protocol's fit: try every candidate, keep the first best.
pub(crate) fn brute_force_exact(train: &[(f64, bool)]) -> (f64, f64) {
    let mut distinct: Vec<f64> = train.iter().map(|p| p.0).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    let mut candidates = vec![next_down(distinct[0])];
    candidates.extend(distinct.windows(2).map(|w| between(w[0], w[1])));
    candidates.push(*distinct.last().unwrap());
    let mut best = (f64::NAN, 0usize);
    for (i, &t) in candidates.iter().enumerate() {
        let correct = train.iter().filter(|p| (p.0 > t) == p.1).count();
        if i == 0 || correct > best.1 {
            best = (t, correct);
        }
    }
    (best.0, best.1 as f64 / train.len() as f64)
}

/// Mann–Whitney U over all positive/negative pairs, ties counting one half.
pub(crate) fn brute_force_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let pos: Vec<f64> = (0..scores.len())
        .filter(|&i| labels[i])
        .map(|i| scores[i])
        .collect();
    let neg: Vec<f64> = (0..scores.len())
        .filter(|&i| !labels[i])
        .map(|i| scores[i])
        .collect();
    let mut twice_u = 0u64;
    for &p in &pos {
        for &n in &neg {
            twice_u += match p.total_cmp(&n) {
                std::cmp::Ordering::Greater => 2,
                std::cmp::Ordering::Equal => 1,
                std::cmp::Ordering::Less => 0,
            };
        }
    }
    twice_u as f64 / (2 * pos.len() * neg.len()) as f64
}
