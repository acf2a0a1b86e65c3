use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::kfold::{kfold_accuracy, KFoldReport, Protocol};
use crate::pairs::PairScores;
use crate::roc::{roc, tar_at_far, TarAtFar};

/// Everything [`evaluate`] measures, ready to serialise as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Number of pairs.
    pub pairs: usize,
    /// Number of cross-validation folds.
    pub folds: usize,
    /// Number of same-person pairs.
    pub positives: usize,
    /// Number of different-person pairs.
    pub negatives: usize,
    /// k-fold accuracy under [`Protocol::Insightface`], comparable with published numbers.
    pub insightface: KFoldReport,
    /// k-fold accuracy under [`Protocol::Exact`].
    pub exact: KFoldReport,
    /// Area under the ROC curve over all pairs.
    pub auc: f64,
    /// Equal error rate over all pairs.
    pub eer: f64,
    /// Cosine threshold at the equal error rate.
    pub eer_threshold: f64,
    /// True accept rate at each requested false accept rate, in request order.
    pub tar_at_far: Vec<TarAtFar>,
}

impl Report {
    /// The k-fold warnings (see [`KFoldReport::warnings`]), once each: both protocols
    /// share the folds, so they warn alike.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for w in self.insightface.warnings.iter().chain(&self.exact.warnings) {
            if !out.contains(w) {
                out.push(w.clone());
            }
        }
        out
    }
}

/// Runs both k-fold protocols, the ROC analysis and TAR@FAR for every entry of `fars`.
///
/// # Errors
/// Anything [`kfold_accuracy`], [`crate::roc()`] or [`tar_at_far`] rejects:
/// invalid pair scores, fewer than two folds, a missing class, or a FAR
/// outside `[0, 1]`.
pub fn evaluate(scores: &PairScores, fars: &[f64]) -> Result<Report> {
    let folds = scores.validate()?;
    let insightface = kfold_accuracy(scores, Protocol::Insightface)?;
    let exact = kfold_accuracy(scores, Protocol::Exact)?;
    let curve = roc(&scores.scores, &scores.labels)?;
    let tar_at_far = fars
        .iter()
        .map(|&far| tar_at_far(&curve, far))
        .collect::<Result<Vec<_>>>()?;
    Ok(Report {
        pairs: scores.len(),
        folds,
        positives: curve.positives,
        negatives: curve.negatives,
        insightface,
        exact,
        auc: curve.auc,
        eer: curve.eer,
        eer_threshold: curve.eer_threshold,
        tar_at_far,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Lcg;
    use crate::Error;

    fn lfw_like() -> PairScores {
        let mut rng = Lcg::new(5);
        let labels: Vec<bool> = (0..6000).map(|i| (i / 300) % 2 == 0).collect();
        let scores = labels
            .iter()
            .map(|&same| {
                let u = rng.next_f64();
                if same {
                    0.25 + 0.75 * u
                } else {
                    -0.2 + 0.6 * u
                }
            })
            .collect();
        PairScores::contiguous_folds(scores, labels, 10).unwrap()
    }

    #[test]
    fn evaluate_combines_everything() {
        let p = lfw_like();
        let r = evaluate(&p, &[1e-3, 1e-2, 0.1]).unwrap();
        assert_eq!(
            (r.pairs, r.folds, r.positives, r.negatives),
            (6000, 10, 3000, 3000)
        );
        assert_eq!(r.insightface.protocol, Protocol::Insightface);
        assert_eq!(r.exact.protocol, Protocol::Exact);
        assert_eq!(r.insightface.folds.len(), 10);
        assert!(r.insightface.folds.iter().all(|f| f.pairs == 600));
        let curve = roc(&p.scores, &p.labels).unwrap();
        assert_eq!((r.auc, r.eer), (curve.auc, curve.eer));
        assert_eq!(r.tar_at_far.len(), 3);
        assert!(r.tar_at_far[0].false_accepts <= 3);
        assert!(r.tar_at_far[0].tar <= r.tar_at_far[1].tar);
        assert!(r.tar_at_far[1].tar <= r.tar_at_far[2].tar);
        // Overlap 0.25..0.4 holds 1/5 of negatives and 1/5 of positives.
        assert!(
            r.exact.mean > 0.85 && r.exact.mean < 0.97,
            "{}",
            r.exact.mean
        );
        assert!((r.insightface.mean - r.exact.mean).abs() < 0.02);
        assert!(r.auc > 0.95 && r.auc < 1.0);
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = evaluate(&lfw_like(), &[1e-3]).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"protocol\":\"insightface\""));
        assert!(json.contains("\"mean_threshold_cosine\""));
        let back: Report = serde_json::from_str(&json).unwrap();
        // serde_json's default float parser may be one ulp off, so compare loosely.
        assert_eq!(
            (back.pairs, back.folds, back.negatives),
            (r.pairs, r.folds, r.negatives)
        );
        assert_eq!(back.exact.protocol, Protocol::Exact);
        assert_eq!(back.insightface.folds.len(), r.insightface.folds.len());
        assert_eq!(
            back.tar_at_far[0].false_accepts,
            r.tar_at_far[0].false_accepts
        );
        assert!((back.exact.mean - r.exact.mean).abs() < 1e-15);
        assert!((back.auc - r.auc).abs() < 1e-15);
    }

    #[test]
    fn warnings_come_once_from_both_protocols() {
        assert!(evaluate(&lfw_like(), &[]).unwrap().warnings().is_empty());
        // Two folds, each one class.
        let p = PairScores::contiguous_folds(
            vec![0.9, 0.8, 0.1, 0.2],
            vec![true, true, false, false],
            2,
        )
        .unwrap();
        let r = evaluate(&p, &[]).unwrap();
        assert_eq!(r.warnings().len(), 4);
        assert_eq!(r.warnings(), r.exact.warnings);
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.warnings(), r.warnings());
    }

    #[test]
    fn evaluate_errors() {
        let p = lfw_like();
        assert!(matches!(
            evaluate(&p, &[2.0]),
            Err(Error::InvalidFar { .. })
        ));
        let one_class =
            PairScores::contiguous_folds(vec![0.1, 0.2, 0.3, 0.4], vec![true; 4], 2).unwrap();
        assert!(matches!(
            evaluate(&one_class, &[]),
            Err(Error::MissingClass { .. })
        ));
        let mut bad = p;
        bad.folds[17] = 42;
        assert!(matches!(
            evaluate(&bad, &[]),
            Err(Error::EmptyFold { fold: 10, .. })
        ));
    }
}
