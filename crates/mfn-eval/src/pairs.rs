use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_same_len, Error, Result};

/// Similarity scores of verification pairs with their ground truth and fold.
///
/// Element `i` of each vector describes pair `i`: `scores[i]` is its cosine
/// similarity, `labels[i]` is `true` when both faces show the same person and
/// `folds[i]` is its 0-based cross-validation fold.
///
/// The fields are public for convenience; every function that consumes a
/// `PairScores` re-validates it, so editing them cannot cause a panic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairScores {
    /// One cosine similarity per pair.
    pub scores: Vec<f64>,
    /// `true` when the pair shows the same person.
    pub labels: Vec<bool>,
    /// 0-based fold index of each pair.
    pub folds: Vec<usize>,
}

impl PairScores {
    /// Builds validated pair scores.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] unless all three vectors have the same
    /// length, [`Error::Empty`] when they are empty, [`Error::NonFinite`] for
    /// a NaN or infinite score, and [`Error::EmptyFold`] when the fold
    /// indices leave a gap (some fold below the largest index has no pairs).
    pub fn new(scores: Vec<f64>, labels: Vec<bool>, folds: Vec<usize>) -> Result<Self> {
        let pairs = Self {
            scores,
            labels,
            folds,
        };
        pairs.validate()?;
        Ok(pairs)
    }

    /// Builds pair scores whose folds are `n_folds` contiguous blocks in input order.
    ///
    /// This matches scikit-learn's `KFold(n_splits=n_folds, shuffle=False)`,
    /// which insightface uses: the first `len % n_folds` folds get one extra
    /// pair. LFW's `pairs.txt` lists its ten 600-pair folds in this order.
    ///
    /// # Errors
    /// [`Error::TooFewFolds`] for `n_folds == 0`, [`Error::TooManyFolds`] when
    /// `n_folds` exceeds the number of pairs, plus everything [`PairScores::new`] rejects.
    pub fn contiguous_folds(scores: Vec<f64>, labels: Vec<bool>, n_folds: usize) -> Result<Self> {
        check_same_len("scores", scores.len(), "labels", labels.len())?;
        if n_folds == 0 {
            return Err(Error::TooFewFolds { n_folds, min: 1 });
        }
        let n = scores.len();
        if n == 0 {
            return Err(Error::Empty { what: "scores" });
        }
        if n_folds > n {
            return Err(Error::TooManyFolds { n_folds, pairs: n });
        }
        let (base, extra) = (n / n_folds, n % n_folds);
        let folds = (0..n_folds)
            .flat_map(|fold| std::iter::repeat_n(fold, base + usize::from(fold < extra)))
            .collect();
        Self::new(scores, labels, folds)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// `true` when there are no pairs (never the case for a validated value).
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// Number of same-person pairs.
    pub fn positives(&self) -> usize {
        self.labels.iter().filter(|&&l| l).count()
    }

    /// Number of different-person pairs.
    pub fn negatives(&self) -> usize {
        self.labels.len() - self.positives()
    }

    /// Checks the invariants documented on [`PairScores::new`] and returns the number of folds.
    ///
    /// # Errors
    /// The same as [`PairScores::new`].
    pub fn validate(&self) -> Result<usize> {
        let n = self.scores.len();
        check_same_len("scores", n, "labels", self.labels.len())?;
        check_same_len("scores", n, "folds", self.folds.len())?;
        if n == 0 {
            return Err(Error::Empty { what: "scores" });
        }
        check_finite("scores", &self.scores)?;
        let n_folds = self.folds.iter().max().map_or(0, |&m| m.saturating_add(1));
        // With n pairs at most n folds can be non-empty, so counting only
        // indices 0..=n both bounds the allocation (a stray usize::MAX index
        // must not allocate) and is guaranteed to find a gap when one exists.
        let mut counts = vec![0usize; n_folds.min(n + 1)];
        for &f in &self.folds {
            if let Some(c) = counts.get_mut(f) {
                *c += 1;
            }
        }
        if let Some(fold) = counts.iter().position(|&c| c == 0) {
            return Err(Error::EmptyFold { fold, n_folds });
        }
        Ok(n_folds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_folds_like_sklearn_kfold() {
        let p = PairScores::contiguous_folds(vec![0.0; 11], vec![true; 11], 3).unwrap();
        assert_eq!(p.folds, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(p.validate().unwrap(), 3);

        let lfw = PairScores::contiguous_folds(vec![0.5; 6000], vec![false; 6000], 10).unwrap();
        for fold in 0..10 {
            let members: Vec<usize> = (0..6000).filter(|&i| lfw.folds[i] == fold).collect();
            assert_eq!(members.len(), 600);
            assert_eq!(members[0], fold * 600);
            assert_eq!(*members.last().unwrap(), fold * 600 + 599);
        }
    }

    #[test]
    fn contiguous_folds_errors() {
        assert!(matches!(
            PairScores::contiguous_folds(vec![0.1, 0.2], vec![true, false], 0),
            Err(Error::TooFewFolds { n_folds: 0, .. })
        ));
        assert!(matches!(
            PairScores::contiguous_folds(vec![0.1, 0.2], vec![true, false], 3),
            Err(Error::TooManyFolds {
                n_folds: 3,
                pairs: 2
            })
        ));
        assert!(matches!(
            PairScores::contiguous_folds(vec![], vec![], 2),
            Err(Error::Empty { .. })
        ));
        assert!(matches!(
            PairScores::contiguous_folds(vec![0.1], vec![true, false], 1),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn new_validates() {
        assert!(matches!(
            PairScores::new(vec![], vec![], vec![]),
            Err(Error::Empty { what: "scores" })
        ));
        assert!(matches!(
            PairScores::new(vec![0.1, 0.2], vec![true], vec![0, 1]),
            Err(Error::LengthMismatch {
                right_name: "labels",
                left: 2,
                right: 1,
                ..
            })
        ));
        assert!(matches!(
            PairScores::new(vec![0.1, 0.2], vec![true, false], vec![0]),
            Err(Error::LengthMismatch {
                right_name: "folds",
                ..
            })
        ));
        assert!(matches!(
            PairScores::new(vec![0.1, f64::NAN], vec![true, false], vec![0, 1]),
            Err(Error::NonFinite {
                what: "scores",
                index: 1,
                ..
            })
        ));
        assert!(matches!(
            PairScores::new(vec![0.1, f64::INFINITY], vec![true, false], vec![0, 1]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        // Fold 1 has no pairs.
        assert!(matches!(
            PairScores::new(vec![0.1, 0.2, 0.3], vec![true, false, true], vec![0, 2, 2]),
            Err(Error::EmptyFold {
                fold: 1,
                n_folds: 3
            })
        ));
        // A huge index must be rejected without allocating a huge table.
        assert!(matches!(
            PairScores::new(vec![0.1, 0.2], vec![true, false], vec![0, usize::MAX]),
            Err(Error::EmptyFold { fold: 1, .. })
        ));
        let ok = PairScores::new(vec![0.1, 0.2], vec![true, false], vec![1, 0]).unwrap();
        assert_eq!((ok.len(), ok.positives(), ok.negatives()), (2, 1, 1));
        assert!(!ok.is_empty());
    }
}
