use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pairs::PairScores;

/// Number of candidate distance thresholds in the insightface protocol
/// (`np.arange(0, 4, 0.01)`).
pub const INSIGHTFACE_THRESHOLDS: usize = 400;

/// How the decision threshold is chosen on the training folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// insightface's `verification.py` `calculate_roc`, reproduced exactly.
    ///
    /// Scores become squared distances between unit vectors, `d = 2 - 2cos`;
    /// a pair is predicted "same" when `d < t`, with `t` searched over the
    /// grid `i * 0.01` for `i in 0..400`. The first grid value reaching the
    /// best training accuracy wins (`np.argmax`), i.e. the smallest distance.
    /// Thresholds are reported as distances.
    Insightface,
    /// Exhaustive search over every threshold that changes a prediction.
    ///
    /// A pair is predicted "same" when `cos > t`. Candidates are the midpoints
    /// between consecutive distinct training scores, plus two end points: just
    /// below the smallest score (accept everything) and the largest score
    /// (reject everything). Among candidates with the best training accuracy
    /// the **smallest** threshold wins, mirroring insightface's first-maximum
    /// rule. The search is a sort plus one sweep, `O(n log n)` per fold.
    /// Thresholds are reported as cosines.
    Exact,
}

impl Protocol {
    fn predict_same(self, score: f64, threshold: f64) -> bool {
        match self {
            Protocol::Insightface => distance(score) < threshold,
            Protocol::Exact => score > threshold,
        }
    }

    fn threshold_to_cosine(self, threshold: f64) -> f64 {
        match self {
            Protocol::Insightface => 1.0 - threshold / 2.0,
            Protocol::Exact => threshold,
        }
    }
}

/// Squared L2 distance between unit vectors with cosine similarity `cos`.
fn distance(cos: f64) -> f64 {
    2.0 - 2.0 * cos
}

/// Outcome of one cross-validation fold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FoldResult {
    /// Accuracy on this fold using the threshold fitted on the other folds.
    pub accuracy: f64,
    /// The fitted threshold in the protocol's unit (distance for
    /// [`Protocol::Insightface`], cosine for [`Protocol::Exact`]).
    pub threshold: f64,
    /// The same threshold as a cosine similarity; a pair is "same" when its
    /// cosine exceeds it (up to the protocol's strict/non-strict comparison).
    pub threshold_cosine: f64,
    /// Accuracy of the fitted threshold on the training folds.
    pub train_accuracy: f64,
    /// Number of pairs in this (test) fold.
    pub pairs: usize,
}

/// k-fold cross-validated verification accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KFoldReport {
    /// The protocol used to fit thresholds.
    pub protocol: Protocol,
    /// Mean of the per-fold test accuracies.
    pub mean: f64,
    /// Population standard deviation (`ddof = 0`, like `np.std`) of the per-fold accuracies.
    pub std: f64,
    /// Mean fitted threshold in the protocol's unit.
    pub mean_threshold: f64,
    /// Mean fitted threshold as a cosine similarity, usable by a verifier.
    pub mean_threshold_cosine: f64,
    /// Per-fold results, indexed by fold.
    pub folds: Vec<FoldResult>,
    /// What makes these numbers mean less than they seem, one sentence each, for the
    /// caller to show: a test fold without same-person or without different-person pairs
    /// (its accuracy measures one class only), or training folds without one of the classes
    /// (the threshold fitted on them accepts or rejects everything). Empty for a sound
    /// layout such as LFW's.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// A fitted threshold and the number of training pairs it classifies correctly.
struct Fit {
    threshold: f64,
    correct: usize,
}

/// Cross-validated accuracy: for each fold, fit a threshold on all other
/// folds and measure accuracy on the held-out fold.
///
/// # Errors
/// Everything [`PairScores::validate`] rejects, and [`Error::TooFewFolds`]
/// with fewer than two folds (the training set would be empty).
pub fn kfold_accuracy(scores: &PairScores, protocol: Protocol) -> Result<KFoldReport> {
    let n_folds = scores.validate()?;
    if n_folds < 2 {
        return Err(Error::TooFewFolds { n_folds, min: 2 });
    }
    let mut folds = Vec::with_capacity(n_folds);
    let mut train = Vec::with_capacity(scores.len());
    for k in 0..n_folds {
        train.clear();
        train.extend(
            (0..scores.len())
                .filter(|&i| scores.folds[i] != k)
                .map(|i| (scores.scores[i], scores.labels[i])),
        );
        let fit = match protocol {
            Protocol::Insightface => fit_insightface(&train),
            Protocol::Exact => fit_exact(&mut train),
        };
        let (mut correct, mut pairs) = (0usize, 0usize);
        for i in (0..scores.len()).filter(|&i| scores.folds[i] == k) {
            pairs += 1;
            correct += usize::from(
                protocol.predict_same(scores.scores[i], fit.threshold) == scores.labels[i],
            );
        }
        folds.push(FoldResult {
            accuracy: correct as f64 / pairs as f64,
            threshold: fit.threshold,
            threshold_cosine: protocol.threshold_to_cosine(fit.threshold),
            train_accuracy: fit.correct as f64 / train.len() as f64,
            pairs,
        });
    }
    let mean_of = |f: fn(&FoldResult) -> f64| folds.iter().map(f).sum::<f64>() / n_folds as f64;
    let mean = mean_of(|f| f.accuracy);
    let variance = folds
        .iter()
        .map(|f| (f.accuracy - mean).powi(2))
        .sum::<f64>()
        / n_folds as f64;
    Ok(KFoldReport {
        protocol,
        mean,
        std: variance.sqrt(),
        mean_threshold: mean_of(|f| f.threshold),
        mean_threshold_cosine: mean_of(|f| f.threshold_cosine),
        folds,
        warnings: fold_warnings(scores, n_folds),
    })
}

/// The warnings of [`KFoldReport::warnings`] for `scores` in `n_folds` folds: folds whose
/// test or training pairs lack a class, listed together.
fn fold_warnings(scores: &PairScores, n_folds: usize) -> Vec<String> {
    // (positives, negatives) of each fold.
    let mut counts = vec![(0usize, 0usize); n_folds];
    for (&fold, &same) in scores.folds.iter().zip(&scores.labels) {
        if let Some(c) = counts.get_mut(fold) {
            if same {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
        }
    }
    let (pos, neg) = (scores.positives(), scores.negatives());
    let list = |which: &dyn Fn(&(usize, usize)) -> bool| -> Vec<usize> {
        (0..n_folds).filter(|&k| which(&counts[k])).collect()
    };
    let name = |folds: &[usize]| {
        let shown: Vec<String> = folds.iter().take(20).map(|k| k.to_string()).collect();
        let more = if folds.len() > 20 {
            format!(" and {} more", folds.len() - 20)
        } else {
            String::new()
        };
        let s = if folds.len() == 1 { "" } else { "s" };
        format!("fold{s} {}{more}", shown.join(", "))
    };
    let mut warnings = Vec::new();
    for (class, test_lacks, train_lacks) in [
        ("same-person", list(&|c| c.0 == 0), list(&|c| c.0 == pos)),
        (
            "different-person",
            list(&|c| c.1 == 0),
            list(&|c| c.1 == neg),
        ),
    ] {
        if !test_lacks.is_empty() {
            let one = test_lacks.len() == 1;
            warnings.push(format!(
                "test {} of {n_folds} {} no {class} pairs: {} accuracy measures one class only",
                name(&test_lacks),
                if one { "holds" } else { "hold" },
                if one { "its" } else { "their" }
            ));
        }
        if !train_lacks.is_empty() {
            warnings.push(format!(
                "the training pairs for test {} hold no {class} pairs: the threshold fitted \
                 on them can only accept or reject everything",
                name(&train_lacks)
            ));
        }
    }
    warnings
}

/// The insightface grid search, done with sorted distances and binary
/// searches so it costs `O(n log n)` instead of 400 full passes.
fn fit_insightface(train: &[(f64, bool)]) -> Fit {
    let mut pos: Vec<f64> = Vec::new();
    let mut neg: Vec<f64> = Vec::new();
    for &(score, same) in train {
        if same { &mut pos } else { &mut neg }.push(distance(score));
    }
    pos.sort_unstable_by(f64::total_cmp);
    neg.sort_unstable_by(f64::total_cmp);
    let mut best = Fit {
        threshold: 0.0,
        correct: 0,
    };
    for i in 0..INSIGHTFACE_THRESHOLDS {
        let t = grid_threshold(i);
        let true_accepts = pos.partition_point(|&d| d < t);
        let true_rejects = neg.len() - neg.partition_point(|&d| d < t);
        let correct = true_accepts + true_rejects;
        // Strict comparison keeps the first maximum, like np.argmax.
        if i == 0 || correct > best.correct {
            best = Fit {
                threshold: t,
                correct,
            };
        }
    }
    best
}

/// The `i`-th value of `np.arange(0, 4, 0.01)`.
fn grid_threshold(i: usize) -> f64 {
    // numpy fills an arange as `start + i * (a[1] - a[0])`, which is
    // `i * 0.01` here; accumulating `t += 0.01` would drift from its values.
    i as f64 * 0.01
}

/// Sort-and-sweep search over all thresholds that change a prediction.
///
/// Sorting ascending and moving the threshold upwards one group of equal
/// scores at a time turns that group's predictions from "same" to
/// "different", so each candidate's correct count is an O(1) update.
fn fit_exact(train: &mut [(f64, bool)]) -> Fit {
    train.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let positives = train.iter().filter(|p| p.1).count();
    let Some(&(lowest, _)) = train.first() else {
        // Unreachable from kfold_accuracy, which guarantees a non-empty training set.
        return Fit {
            threshold: 0.0,
            correct: 0,
        };
    };
    // Below the lowest score everything is accepted.
    let mut correct = positives;
    let mut best = Fit {
        threshold: next_down(lowest),
        correct,
    };
    let mut start = 0;
    while start < train.len() {
        let score = train[start].0;
        let mut end = start;
        while end < train.len() && train[end].0 == score {
            // The pair flips from accepted to rejected; a positive was
            // counted as correct until now, so this cannot underflow.
            if train[end].1 {
                correct -= 1;
            } else {
                correct += 1;
            }
            end += 1;
        }
        let threshold = match train.get(end) {
            Some(&(next, _)) => between(score, next),
            // At the largest score itself nothing is accepted, since the test is `cos > t`.
            None => score,
        };
        if correct > best.correct {
            best = Fit { threshold, correct };
        }
        start = end;
    }
    best
}

/// A threshold strictly separating `lo < hi` under `score > t`: their midpoint,
/// or `lo` itself when the two are adjacent floats and the midpoint rounds up to `hi`.
pub(crate) fn between(lo: f64, hi: f64) -> f64 {
    let mid = lo.midpoint(hi);
    if mid < hi {
        mid
    } else {
        lo
    }
}

/// The largest float below finite `x` (`f64::next_down` needs Rust 1.86).
pub(crate) fn next_down(x: f64) -> f64 {
    if x == 0.0 {
        -f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(x.to_bits() - 1)
    } else {
        f64::from_bits(x.to_bits() + 1)
    }
}

/// The smallest float above finite `x` (`f64::next_up` needs Rust 1.86).
pub(crate) fn next_up(x: f64) -> f64 {
    -next_down(-x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{brute_force_exact, Lcg};

    fn pairs(scores: &[f64], labels: &[u8], folds: &[usize]) -> PairScores {
        PairScores::new(
            scores.to_vec(),
            labels.iter().map(|&l| l == 1).collect(),
            folds.to_vec(),
        )
        .unwrap()
    }

    #[test]
    fn float_neighbours() {
        assert!(next_down(1.0) < 1.0 && next_up(1.0) > 1.0);
        assert_eq!(next_up(next_down(0.3)), 0.3);
        assert!(next_down(0.0) < 0.0 && next_up(0.0) > 0.0);
        assert!(next_down(-2.0) < -2.0);
        assert_eq!(between(0.2, 0.4), 0.30000000000000004);
        let lo = 0.5;
        let hi = next_up(lo);
        let t = between(lo, hi);
        assert!(lo <= t && t < hi);
    }

    /// Four folds of two pairs: one positive and one negative each.
    fn four_folds() -> PairScores {
        pairs(
            &[0.9, 0.1, 0.8, 0.3, 0.7, 0.75, 0.6, 0.2],
            &[1, 0, 1, 0, 1, 0, 1, 0],
            &[0, 0, 1, 1, 2, 2, 3, 3],
        )
    }

    #[test]
    fn exact_by_hand() {
        let r = kfold_accuracy(&four_folds(), Protocol::Exact).unwrap();
        assert_eq!(r.protocol, Protocol::Exact);
        // Training sets sorted, with correct counts as the threshold sweeps up
        // from "accept all" (3) to "reject all" (3):
        // fold 0: 0.2- 0.3- 0.6+ 0.7+ 0.75- 0.8+ -> 4 5 4 3 4 3: best at mid(0.3, 0.6);
        //         test 0.9+ 0.1- both right.
        // fold 1: 0.1- 0.2- 0.6+ 0.7+ 0.75- 0.9+ -> best 5 at mid(0.2, 0.6);
        //         test 0.8+ 0.3- both right.
        // fold 2: 0.1- 0.2- 0.3- 0.6+ 0.8+ 0.9+ -> 6 at mid(0.3, 0.6);
        //         test 0.7+ right, 0.75- wrongly accepted.
        // fold 3: 0.1- 0.3- 0.7+ 0.75- 0.8+ 0.9+ -> 4 5 4 5 4 3: 5 at mid(0.3, 0.7)
        //         and mid(0.75, 0.8), the smaller wins; test 0.6+ 0.2- both right.
        let expected = [
            (1.0, 0.3f64.midpoint(0.6), 5.0 / 6.0),
            (1.0, 0.2f64.midpoint(0.6), 5.0 / 6.0),
            (0.5, 0.3f64.midpoint(0.6), 1.0),
            (1.0, 0.3f64.midpoint(0.7), 5.0 / 6.0),
        ];
        for (fold, (acc, thr, train)) in r.folds.iter().zip(expected) {
            assert_eq!(fold.accuracy, acc, "{fold:?}");
            assert_eq!(fold.threshold, thr, "{fold:?}");
            assert_eq!(fold.threshold_cosine, thr);
            assert_eq!(fold.train_accuracy, train, "{fold:?}");
            assert_eq!(fold.pairs, 2);
        }
        assert_eq!(r.mean, 0.875);
        // Population std of [1, 1, 0.5, 1] = sqrt(0.1875 / 4).
        assert!((r.std - 0.216_506_350_946_109_66).abs() < 1e-15);
        let mean_thr = expected.iter().map(|e| e.1).sum::<f64>() / 4.0;
        assert!((r.mean_threshold_cosine - mean_thr).abs() < 1e-15);
        assert_eq!(r.mean_threshold, r.mean_threshold_cosine);
    }

    #[test]
    fn insightface_by_hand() {
        // Scores chosen so the distances d = 2 - 2cos sit halfway between grid
        // points, keeping the expected thresholds free of rounding doubt:
        // fold 0: 0.205+ 1.805-, fold 1: 0.405+ 1.405-, fold 2: 0.605+ 0.505-,
        // fold 3: 0.805+ 1.605-.
        let p = pairs(
            &[
                0.8975, 0.0975, 0.7975, 0.2975, 0.6975, 0.7475, 0.5975, 0.1975,
            ],
            &[1, 0, 1, 0, 1, 0, 1, 0],
            &[0, 0, 1, 1, 2, 2, 3, 3],
        );
        let r = kfold_accuracy(&p, Protocol::Insightface).unwrap();
        // "same if d < t", correct counts per threshold interval:
        // fold 0: + {0.405 0.605 0.805} - {0.505 1.405 1.605}: max 5 on (0.805, 1.405],
        //         first grid point 0.81; test 0.205+ 1.805- both right.
        // fold 1: + {0.205 0.605 0.805} - {0.505 1.605 1.805}: max 5 on (0.805, 1.605]
        //         -> 0.81; test 0.405+ 1.405- both right.
        // fold 2: + {0.205 0.405 0.805} - {1.405 1.605 1.805}: 6 from 0.81;
        //         test 0.605+ right, 0.505- wrongly accepted.
        // fold 3: + {0.205 0.405 0.605} - {0.505 1.405 1.805}: 5 on (0.405, 0.505]
        //         and (0.605, 1.405]; argmax takes 0.41; test 0.805+ wrongly rejected.
        let expected = [
            (1.0, 81.0 * 0.01, 5.0 / 6.0),
            (1.0, 81.0 * 0.01, 5.0 / 6.0),
            (0.5, 81.0 * 0.01, 1.0),
            (0.5, 41.0 * 0.01, 5.0 / 6.0),
        ];
        for (fold, (acc, thr, train)) in r.folds.iter().zip(expected) {
            assert_eq!(fold.accuracy, acc, "{fold:?}");
            assert_eq!(fold.threshold, thr, "{fold:?}");
            assert_eq!(fold.threshold_cosine, 1.0 - thr / 2.0);
            assert_eq!(fold.train_accuracy, train, "{fold:?}");
        }
        assert_eq!(r.mean, 0.75);
        assert_eq!(r.std, 0.25);
        assert!((r.mean_threshold - 0.71).abs() < 1e-12);
        assert!((r.mean_threshold_cosine - (1.0 - 0.71 / 2.0)).abs() < 1e-12);
    }

    #[test]
    fn insightface_comparison_is_strict() {
        // cos 0.75 and 0.5 give distances exactly 0.5 and 1.0, which are
        // themselves grid points; `d < t` must not accept d == t.
        assert_eq!((50.0 * 0.01, 100.0 * 0.01), (0.5, 1.0));
        let p = pairs(&[0.75, 0.5, 0.75, 0.5], &[1, 0, 1, 0], &[0, 0, 1, 1]);
        let r = kfold_accuracy(&p, Protocol::Insightface).unwrap();
        for f in &r.folds {
            assert_eq!(f.threshold, 51.0 * 0.01);
            assert_eq!((f.accuracy, f.train_accuracy), (1.0, 1.0));
        }
        // A positive at d = 0.495 is accepted from t = 0.50 on, where the
        // negative at exactly d = 0.5 is still rejected.
        let p = pairs(&[0.7525, 0.75, 0.7525, 0.75], &[1, 0, 1, 0], &[0, 0, 1, 1]);
        let r = kfold_accuracy(&p, Protocol::Insightface).unwrap();
        for f in &r.folds {
            assert_eq!(f.threshold, 0.5);
            assert_eq!((f.accuracy, f.train_accuracy), (1.0, 1.0));
        }
    }

    #[test]
    fn insightface_grid_matches_numpy_arange() {
        // The grid must hit the short decimals insightface logs, and stop below 4.
        assert_eq!(grid_threshold(0), 0.0);
        assert_eq!(grid_threshold(1), 0.01);
        assert_eq!(grid_threshold(7), 0.07);
        assert_eq!(grid_threshold(29), 0.29);
        assert_eq!(grid_threshold(INSIGHTFACE_THRESHOLDS - 1), 3.99);
    }

    #[test]
    fn perfect_separation() {
        let mut rng = Lcg::new(7);
        let n = 200;
        let labels: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let scores: Vec<f64> = labels
            .iter()
            .map(|&same| {
                if same {
                    0.6 + 0.4 * rng.next_f64()
                } else {
                    -0.2 + 0.5 * rng.next_f64()
                }
            })
            .collect();
        let p = PairScores::contiguous_folds(scores, labels, 10).unwrap();
        for protocol in [Protocol::Insightface, Protocol::Exact] {
            let r = kfold_accuracy(&p, protocol).unwrap();
            assert_eq!(r.mean, 1.0, "{protocol:?}");
            assert_eq!(r.std, 0.0);
            for f in &r.folds {
                assert_eq!(f.train_accuracy, 1.0);
                // The cosine threshold must separate the whole data set too.
                for (&s, &same) in p.scores.iter().zip(&p.labels) {
                    assert_eq!(s > f.threshold_cosine, same, "{protocol:?} {f:?} {s}");
                }
            }
        }
    }

    #[test]
    fn ties_in_scores() {
        // Both folds contain a positive and a negative with score 0.5.
        let p = pairs(
            &[0.5, 0.5, 0.9, 0.5, 0.5, 0.1],
            &[1, 0, 1, 1, 0, 0],
            &[0, 0, 0, 1, 1, 1],
        );
        let r = kfold_accuracy(&p, Protocol::Exact).unwrap();
        // Fold 0 train: 0.1- 0.5+ 0.5-: accept all 1/3, t between 0.1 and 0.5
        // -> 2/3, reject all -> 2/3; smallest best is 0.3. Test: 0.5+ 0.5- 0.9+ -> 2/3.
        assert_eq!(r.folds[0].threshold, 0.1f64.midpoint(0.5));
        assert_eq!(r.folds[0].train_accuracy, 2.0 / 3.0);
        assert_eq!(r.folds[0].accuracy, 2.0 / 3.0);
        // Fold 1 train: 0.5+ 0.5- 0.9+: accept all 2/3, midpoint 0.7 -> 2/3,
        // reject all 1/3; accept-all is smallest: just below 0.5.
        assert_eq!(r.folds[1].threshold, next_down(0.5));
        assert_eq!(r.folds[1].train_accuracy, 2.0 / 3.0);
        // Test 0.5+ 0.5- 0.1-: everything at 0.5 accepted -> 0.5+, 0.1- right.
        assert_eq!(r.folds[1].accuracy, 2.0 / 3.0);
    }

    #[test]
    fn identical_scores() {
        // Fold 0 is mostly positive, fold 1 mostly negative.
        let p = pairs(
            &[0.4025; 8],
            &[1, 1, 1, 0, 0, 0, 0, 1],
            &[0, 0, 0, 0, 1, 1, 1, 1],
        );
        let exact = kfold_accuracy(&p, Protocol::Exact).unwrap();
        // Training on fold 1 (3 negatives, 1 positive): reject all at 0.4.
        assert_eq!(exact.folds[0].threshold, 0.4025);
        assert_eq!(exact.folds[0].train_accuracy, 0.75);
        assert_eq!(exact.folds[0].accuracy, 0.25);
        // Training on fold 0 (3 positives): accept all, just below 0.4.
        assert_eq!(exact.folds[1].threshold, next_down(0.4025));
        assert_eq!(exact.folds[1].accuracy, 0.25);
        assert_eq!(exact.mean, 0.25);

        let insight = kfold_accuracy(&p, Protocol::Insightface).unwrap();
        // d = 1.195 for every pair: the grid rejects all up to 1.19 and accepts
        // all from 1.20, so argmax picks 0.0 or 1.20.
        assert_eq!(insight.folds[0].threshold, 0.0);
        assert_eq!(insight.folds[1].threshold, 120.0 * 0.01);
        assert_eq!(insight.mean, 0.25);
    }

    #[test]
    fn sound_folds_have_no_warnings() {
        for protocol in [Protocol::Insightface, Protocol::Exact] {
            let r = kfold_accuracy(&four_folds(), protocol).unwrap();
            assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        }
    }

    #[test]
    fn one_class_folds_are_warned_about() {
        // Each fold holds one class: 50% +- 50% that means nothing.
        let p = pairs(&[0.9, 0.8, 0.1, 0.2], &[1, 1, 0, 0], &[0, 0, 1, 1]);
        let r = kfold_accuracy(&p, Protocol::Insightface).unwrap();
        assert_eq!(
            r.warnings,
            [
                "test fold 1 of 2 holds no same-person pairs: its accuracy measures one class \
                 only",
                "the training pairs for test fold 0 hold no same-person pairs: the threshold \
                 fitted on them can only accept or reject everything",
                "test fold 0 of 2 holds no different-person pairs: its accuracy measures one \
                 class only",
                "the training pairs for test fold 1 hold no different-person pairs: the \
                 threshold fitted on them can only accept or reject everything",
            ]
        );
        let exact = kfold_accuracy(&p, Protocol::Exact).unwrap();
        assert_eq!(exact.warnings, r.warnings);

        // Ten folds, only the last holds negatives.
        let labels: Vec<u8> = (0..20).map(|i| u8::from(i < 18)).collect();
        let folds: Vec<usize> = (0..20).map(|i| i / 2).collect();
        let scores: Vec<f64> = (0..20).map(|i| i as f64 / 20.0).collect();
        let r = kfold_accuracy(&pairs(&scores, &labels, &folds), Protocol::Exact).unwrap();
        assert_eq!(
            r.warnings,
            [
                "test fold 9 of 10 holds no same-person pairs: its accuracy measures one class \
                 only",
                "test folds 0, 1, 2, 3, 4, 5, 6, 7, 8 of 10 hold no different-person pairs: \
                 their accuracy measures one class only",
                "the training pairs for test fold 9 hold no different-person pairs: the \
                 threshold fitted on them can only accept or reject everything",
            ]
        );
    }

    #[test]
    fn single_class_training_set() {
        let p = pairs(&[0.2, 0.9, 0.3, 0.8], &[1, 1, 0, 0], &[0, 0, 1, 1]);
        let r = kfold_accuracy(&p, Protocol::Exact).unwrap();
        assert_eq!(r.folds[0].threshold, 0.8);
        assert_eq!(r.folds[1].threshold, next_down(0.2));
        // Reject-all at 0.8 still accepts the held-out 0.9 positive.
        assert_eq!(r.folds[0].accuracy, 0.5);
        assert_eq!(r.folds[1].accuracy, 0.0);
    }

    #[test]
    fn exact_matches_brute_force() {
        let mut rng = Lcg::new(2024);
        for round in 0..40 {
            let n = 20 + rng.below(200) as usize;
            let n_folds = 2 + rng.below(9) as usize;
            // Coarse quantisation on odd rounds creates many ties.
            let levels = if round % 2 == 1 { 7 } else { 1 << 30 };
            let labels: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            let scores: Vec<f64> = labels
                .iter()
                .map(|&same| {
                    let noise = rng.below(levels) as f64 / levels as f64;
                    if same {
                        0.3 * noise + 0.25
                    } else {
                        0.3 * noise
                    }
                })
                .collect();
            let p = PairScores::contiguous_folds(scores, labels, n_folds.min(n)).unwrap();
            let fast = kfold_accuracy(&p, Protocol::Exact).unwrap();
            for (k, fold) in fast.folds.iter().enumerate() {
                let train: Vec<(f64, bool)> = (0..n)
                    .filter(|&i| p.folds[i] != k)
                    .map(|i| (p.scores[i], p.labels[i]))
                    .collect();
                let (threshold, train_accuracy) = brute_force_exact(&train);
                assert_eq!(fold.threshold, threshold, "round {round} fold {k}");
                assert_eq!(
                    fold.train_accuracy, train_accuracy,
                    "round {round} fold {k}"
                );
                let test: Vec<usize> = (0..n).filter(|&i| p.folds[i] == k).collect();
                let correct = test
                    .iter()
                    .filter(|&&i| (p.scores[i] > threshold) == p.labels[i])
                    .count();
                assert_eq!(fold.accuracy, correct as f64 / test.len() as f64);
            }
        }
    }

    #[test]
    fn insightface_matches_naive_grid() {
        let mut rng = Lcg::new(99);
        let n = 300;
        let labels: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
        let scores: Vec<f64> = labels
            .iter()
            .map(|&s| rng.next_f64() * 0.8 + if s { 0.1 } else { -0.2 })
            .collect();
        let p = PairScores::contiguous_folds(scores, labels, 10).unwrap();
        let fast = kfold_accuracy(&p, Protocol::Insightface).unwrap();
        for (k, fold) in fast.folds.iter().enumerate() {
            // Literal transcription of verification.py's loop over thresholds.
            let train: Vec<usize> = (0..n).filter(|&i| p.folds[i] != k).collect();
            let mut acc_train = Vec::new();
            for i in 0..400 {
                let t = i as f64 * 0.01;
                let correct = train
                    .iter()
                    .filter(|&&j| (2.0 - 2.0 * p.scores[j] < t) == p.labels[j])
                    .count();
                acc_train.push(correct as f64 / train.len() as f64);
            }
            let best = acc_train
                .iter()
                .enumerate()
                .fold(0, |b, (i, &a)| if a > acc_train[b] { i } else { b });
            assert_eq!(fold.threshold, best as f64 * 0.01);
            assert_eq!(fold.train_accuracy, acc_train[best]);
        }
    }

    #[test]
    fn kfold_errors() {
        let one_fold = pairs(&[0.1, 0.9], &[0, 1], &[0, 0]);
        assert!(matches!(
            kfold_accuracy(&one_fold, Protocol::Exact),
            Err(Error::TooFewFolds { n_folds: 1, min: 2 })
        ));
        let mut bad = four_folds();
        bad.scores[3] = f64::NAN;
        assert!(matches!(
            kfold_accuracy(&bad, Protocol::Insightface),
            Err(Error::NonFinite { index: 3, .. })
        ));
        let mut gap = four_folds();
        gap.folds = vec![0, 0, 2, 2, 3, 3, 3, 3];
        assert!(matches!(
            kfold_accuracy(&gap, Protocol::Exact),
            Err(Error::EmptyFold { fold: 1, .. })
        ));
        let mut short = four_folds();
        short.labels.pop();
        assert!(matches!(
            kfold_accuracy(&short, Protocol::Exact),
            Err(Error::LengthMismatch { .. })
        ));
        let empty = PairScores {
            scores: vec![],
            labels: vec![],
            folds: vec![],
        };
        assert!(matches!(
            kfold_accuracy(&empty, Protocol::Exact),
            Err(Error::Empty { .. })
        ));
    }

    #[test]
    fn protocol_serde_names() {
        assert_eq!(
            serde_json::to_string(&Protocol::Insightface).unwrap(),
            "\"insightface\""
        );
        assert_eq!(
            serde_json::to_string(&Protocol::Exact).unwrap(),
            "\"exact\""
        );
        let p: Protocol = serde_json::from_str("\"exact\"").unwrap();
        assert_eq!(p, Protocol::Exact);
    }
}
