use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_same_len, Error, Result};
use crate::kfold::next_up;

/// One operating point of a ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RocPoint {
    /// Pairs with `score >= threshold` are accepted as the same person.
    pub threshold: f64,
    /// False positive rate, i.e. false accept rate (FAR).
    pub fpr: f64,
    /// True positive rate, i.e. true accept rate (TAR).
    pub tpr: f64,
    /// Number of different-person pairs accepted at this threshold.
    pub false_accepts: usize,
    /// Number of same-person pairs accepted at this threshold.
    pub true_accepts: usize,
}

/// ROC curve over all pairs plus its summary numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roc {
    /// Operating points by decreasing threshold, from (0, 0) to (1, 1).
    pub points: Vec<RocPoint>,
    /// Area under the curve (ties count one half, like `sklearn.metrics.roc_auc_score`).
    pub auc: f64,
    /// Equal error rate: where FAR equals the false reject rate `1 - TAR`.
    pub eer: f64,
    /// Score threshold at the EER, linearly interpolated between points.
    pub eer_threshold: f64,
    /// Number of same-person pairs.
    pub positives: usize,
    /// Number of different-person pairs.
    pub negatives: usize,
}

/// True accept rate at a false accept rate budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TarAtFar {
    /// The requested false accept rate budget.
    pub far: f64,
    /// The best true accept rate whose false accept rate stays within `far`.
    pub tar: f64,
    /// Score threshold achieving it (accept when `score >= threshold`).
    pub threshold: f64,
    /// Different-person pairs accepted at that threshold.
    pub false_accepts: usize,
    /// Total different-person pairs, so `false_accepts / negatives` is the achieved FAR.
    pub negatives: usize,
}

/// Computes the ROC curve of `scores` against `labels` (`true` = same person), ignoring folds.
///
/// There is one point per distinct score, plus a first point at (0, 0)
/// whose threshold is the smallest float above the highest score. Pairs with
/// equal scores enter together, so ties draw a diagonal segment and the
/// trapezoid AUC equals the Mann–Whitney statistic with ties counted as one
/// half (the same value as `sklearn.metrics.roc_auc_score`).
///
/// The EER is found where `FAR - (1 - TAR)` changes sign along the curve,
/// interpolating linearly between the two points around the crossing; this
/// is the value of the common `brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1)`
/// recipe.
///
/// # Errors
/// [`Error::LengthMismatch`], [`Error::Empty`], [`Error::NonFinite`], and
/// [`Error::MissingClass`] when there are no positive or no negative pairs.
pub fn roc(scores: &[f64], labels: &[bool]) -> Result<Roc> {
    check_same_len("scores", scores.len(), "labels", labels.len())?;
    if scores.is_empty() {
        return Err(Error::Empty { what: "scores" });
    }
    check_finite("scores", scores)?;
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return Err(Error::MissingClass {
            positives,
            negatives,
        });
    }

    let mut order: Vec<(f64, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));

    let point = |threshold, tp: usize, fp: usize| RocPoint {
        threshold,
        fpr: fp as f64 / negatives as f64,
        tpr: tp as f64 / positives as f64,
        false_accepts: fp,
        true_accepts: tp,
    };
    let mut points = vec![point(next_up(order[0].0), 0, 0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    // Twice the area in units of 1 / (P * N), kept as an integer so the AUC
    // is exact up to one final rounding whatever the number of pairs.
    let mut twice_area: u128 = 0;
    let mut start = 0;
    while start < order.len() {
        let score = order[start].0;
        let (tp_before, fp_before) = (tp, fp);
        let mut end = start;
        while end < order.len() && order[end].0 == score {
            if order[end].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            end += 1;
        }
        twice_area += (fp - fp_before) as u128 * (tp_before + tp) as u128;
        points.push(point(score, tp, fp));
        start = end;
    }
    let auc = twice_area as f64 / (2 * positives as u128 * negatives as u128) as f64;
    let (eer, eer_threshold) = equal_error_rate(&points);
    Ok(Roc {
        points,
        auc,
        eer,
        eer_threshold,
        positives,
        negatives,
    })
}

/// Walks the curve to the first point where FAR >= FRR and interpolates back.
fn equal_error_rate(points: &[RocPoint]) -> (f64, f64) {
    // FAR + TAR - 1 rises from -1 at (0, 0) to 1 at (1, 1) and never
    // decreases, so its first non-negative value brackets the crossing.
    let gap = |p: &RocPoint| p.fpr + p.tpr - 1.0;
    let Some(i) = points.iter().position(|p| gap(p) >= 0.0) else {
        // Unreachable for curves from `roc`, which end at (1, 1).
        return (f64::NAN, f64::NAN);
    };
    let hi = points[i];
    if i == 0 || gap(&hi) == 0.0 {
        return (hi.fpr, hi.threshold);
    }
    let lo = points[i - 1];
    let alpha = -gap(&lo) / (gap(&hi) - gap(&lo));
    let lerp = |a: f64, b: f64| a + alpha * (b - a);
    let far = lerp(lo.fpr, hi.fpr);
    let frr = 1.0 - lerp(lo.tpr, hi.tpr);
    // Equal in exact arithmetic; averaging splits the rounding error.
    ((far + frr) / 2.0, lerp(lo.threshold, hi.threshold))
}

/// The highest true accept rate among ROC points with a false accept rate of at most `far`.
///
/// When several points reach that rate, the one with the fewest false
/// accepts (highest threshold) is reported. With 3,000 negative pairs,
/// `far = 1e-3` allows at most three false accepts; ties in scores can make
/// the achieved count lower than the budget.
///
/// # Errors
/// [`Error::InvalidFar`] unless `0 <= far <= 1`, and [`Error::Empty`] when
/// `roc` has no points (only possible for a hand-built [`Roc`]).
pub fn tar_at_far(roc: &Roc, far: f64) -> Result<TarAtFar> {
    if !(0.0..=1.0).contains(&far) {
        return Err(Error::InvalidFar { far });
    }
    let best = roc
        .points
        .iter()
        .filter(|p| p.fpr <= far)
        .fold(None::<&RocPoint>, |best, p| match best {
            Some(b) if b.tpr >= p.tpr => Some(b),
            _ => Some(p),
        });
    // Only a hand-built curve can lack a point at FAR 0.
    let p = best.ok_or(Error::Empty { what: "ROC points" })?;
    Ok(TarAtFar {
        far,
        tar: p.tpr,
        threshold: p.threshold,
        false_accepts: p.false_accepts,
        negatives: roc.negatives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{brute_force_auc, Lcg};

    fn labels(bits: &[u8]) -> Vec<bool> {
        bits.iter().map(|&b| b == 1).collect()
    }

    #[test]
    fn hand_curve() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2];
        let l = labels(&[1, 1, 0, 1, 0, 1, 0, 0]);
        let r = roc(&scores, &l).unwrap();
        assert_eq!((r.positives, r.negatives), (4, 4));
        let fpr: Vec<f64> = r.points.iter().map(|p| p.fpr).collect();
        let tpr: Vec<f64> = r.points.iter().map(|p| p.tpr).collect();
        assert_eq!(fpr, [0.0, 0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 1.0]);
        assert_eq!(tpr, [0.0, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(r.points[0].threshold, next_up(0.9));
        assert_eq!(r.points[3].threshold, 0.7);
        // Wrongly ordered pairs: (0.7-, 0.6+), (0.7-, 0.4+), (0.5-, 0.4+) -> 13/16.
        assert_eq!(r.auc, 13.0 / 16.0);
        // FAR + TAR - 1 is -0.25 at (0.25, 0.5) and 0 at (0.25, 0.75): EER 0.25 at 0.6.
        assert_eq!(r.eer, 0.25);
        assert_eq!(r.eer_threshold, 0.6);

        let t = tar_at_far(&r, 0.0).unwrap();
        assert_eq!(
            (t.tar, t.threshold, t.false_accepts, t.negatives),
            (0.5, 0.8, 0, 4)
        );
        // FAR 0.3 allows one false accept: reaching TAR 0.75 at 0.6.
        let t = tar_at_far(&r, 0.3).unwrap();
        assert_eq!((t.tar, t.threshold, t.false_accepts), (0.75, 0.6, 1));
        let t = tar_at_far(&r, 0.5).unwrap();
        assert_eq!((t.tar, t.threshold, t.false_accepts), (1.0, 0.4, 2));
        let t = tar_at_far(&r, 1.0).unwrap();
        assert_eq!((t.tar, t.threshold, t.false_accepts), (1.0, 0.4, 2));
    }

    #[test]
    fn eer_interpolates_on_tie_segment() {
        // 0.9+ 0.5+ 0.5- 0.1-: points (0,0) (0,0.5)@0.9 (0.5,1)@0.5 (1,1)@0.1.
        // FAR + TAR - 1 jumps from -0.5 to 0.5 across the diagonal tie
        // segment, so the crossing is halfway along it.
        let r = roc(&[0.9, 0.5, 0.5, 0.1], &labels(&[1, 1, 0, 0])).unwrap();
        assert_eq!(r.eer, 0.25);
        assert!((r.eer_threshold - 0.7).abs() < 1e-15);
        // Mann-Whitney: 2 + 2 + 1 (the tie) + 2 out of 2 * 4.
        assert_eq!(r.auc, 0.875);
    }

    #[test]
    fn eer_interpolates_on_horizontal_segment() {
        // 0.8+ 0.6- 0.2+: points (0,0) (0,0.5)@0.8 (1,0.5)@0.6 (1,1)@0.2, with
        // FAR + TAR - 1 going -0.5 -> 0.5 along the horizontal segment.
        let r = roc(&[0.8, 0.6, 0.2], &labels(&[1, 0, 1])).unwrap();
        assert_eq!(r.eer, 0.5);
        assert!((r.eer_threshold - 0.7).abs() < 1e-15);
        assert_eq!(r.auc, 0.5);
    }

    #[test]
    fn perfect_separation() {
        let r = roc(&[0.9, 0.8, 0.3, 0.1], &labels(&[1, 1, 0, 0])).unwrap();
        assert_eq!(r.auc, 1.0);
        assert_eq!(r.eer, 0.0);
        assert_eq!(r.eer_threshold, 0.8);
        let t = tar_at_far(&r, 0.0).unwrap();
        assert_eq!((t.tar, t.false_accepts), (1.0, 0));
    }

    #[test]
    fn all_identical_scores() {
        let r = roc(&[0.5; 6], &labels(&[1, 0, 1, 0, 0, 1])).unwrap();
        assert_eq!(r.points.len(), 2);
        assert_eq!((r.points[1].fpr, r.points[1].tpr), (1.0, 1.0));
        assert_eq!(r.auc, 0.5);
        assert_eq!(r.eer, 0.5);
        let t = tar_at_far(&r, 0.99).unwrap();
        assert_eq!((t.tar, t.false_accepts), (0.0, 0));
    }

    #[test]
    fn auc_matches_mann_whitney() {
        let mut rng = Lcg::new(12345);
        for round in 0..30 {
            let n = 2 + rng.below(400) as usize;
            let levels = if round % 3 == 0 { 5 } else { 1000 };
            let mut l: Vec<bool> = (0..n).map(|_| rng.below(3) == 0).collect();
            l[0] = true;
            l[1] = false;
            let scores: Vec<f64> = l
                .iter()
                .map(|&same| {
                    let q = f64::from(rng.below(levels)) / f64::from(levels);
                    if same {
                        q * 0.7 + 0.3
                    } else {
                        q * 0.7
                    }
                })
                .collect();
            let r = roc(&scores, &l).unwrap();
            assert_eq!(r.auc, brute_force_auc(&scores, &l), "round {round}");
            // The trapezoid rule over the points must agree as well.
            let trapezoid: f64 = r
                .points
                .windows(2)
                .map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0)
                .sum();
            assert!((trapezoid - r.auc).abs() < 1e-12, "round {round}");
            let first = r.points.first().unwrap();
            let last = r.points.last().unwrap();
            assert_eq!(
                (first.fpr, first.tpr, last.fpr, last.tpr),
                (0.0, 0.0, 1.0, 1.0)
            );
            assert!(r.points.windows(2).all(|w| w[0].threshold > w[1].threshold
                && w[0].fpr <= w[1].fpr
                && w[0].tpr <= w[1].tpr));
            assert!((0.0..=1.0).contains(&r.eer));
        }
    }

    #[test]
    fn tar_at_far_respects_false_accept_budget() {
        // 3,000 negatives; FAR 1e-3 must allow at most 3 false accepts.
        let mut scores = vec![0.0; 3000];
        let mut l = vec![false; 3000];
        scores[..5].copy_from_slice(&[0.95, 0.94, 0.93, 0.92, 0.91]);
        let positive = |i: usize| 0.5 + i as f64 * 0.0045;
        for i in 0..100 {
            scores.push(positive(i));
            l.push(true);
        }
        let r = roc(&scores, &l).unwrap();
        let t = tar_at_far(&r, 1e-3).unwrap();
        assert_eq!((t.false_accepts, t.negatives), (3, 3000));
        // With three false accepts the threshold can drop to just above the
        // fourth negative (0.92): the lowest positive above it is i = 94.
        assert_eq!(t.threshold, positive(94));
        assert_eq!(t.tar, 6.0 / 100.0);
        let strict = tar_at_far(&r, 0.5e-3).unwrap();
        assert_eq!(strict.false_accepts, 1);
        assert_eq!(strict.threshold, positive(98));
        assert_eq!(strict.tar, 2.0 / 100.0);
    }

    #[test]
    fn errors() {
        assert!(matches!(roc(&[], &[]), Err(Error::Empty { .. })));
        assert!(matches!(
            roc(&[0.1, 0.2], &[true]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            roc(&[0.1, f64::NAN], &[true, false]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            roc(&[0.1, 0.2], &[true, true]),
            Err(Error::MissingClass {
                positives: 2,
                negatives: 0
            })
        ));
        assert!(matches!(
            roc(&[0.1, 0.2], &[false, false]),
            Err(Error::MissingClass { positives: 0, .. })
        ));
        let r = roc(&[0.1, 0.2], &[false, true]).unwrap();
        for far in [f64::NAN, -0.1, 1.5] {
            assert!(matches!(tar_at_far(&r, far), Err(Error::InvalidFar { .. })));
        }
        let empty = Roc {
            points: vec![],
            ..r
        };
        assert!(matches!(tar_at_far(&empty, 0.1), Err(Error::Empty { .. })));
    }
}
