//! Verification sets scored during (and after) training, through `mfn-eval`.

use std::path::Path;

use candle_core::Device;
use mfn_data::{ImageFolder, VerificationSet};
use mfn_eval::PairScores;
use mfn_model::MobileFaceNet;
use serde::Serialize;

use crate::Result;

/// A set of labelled face pairs to score a model on.
pub struct EvalSet {
    set: VerificationSet,
}

/// What a model scores on an [`EvalSet`].
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    /// The set's file or folder.
    pub set: String,
    /// Number of pairs.
    pub pairs: usize,
    /// Area under the ROC curve.
    pub auc: f64,
    /// Mean k-fold accuracy, insightface's protocol, when the set has folds.
    pub accuracy: Option<f64>,
    /// Mean k-fold accuracy, exact protocol, when the set has folds.
    pub accuracy_exact: Option<f64>,
}

impl EvalSet {
    /// An insightface `.bin` file, split into `folds` folds of consecutive pairs.
    pub fn bin(path: &Path, folds: usize) -> Result<Self> {
        Ok(Self {
            set: VerificationSet::bin(path, folds)?,
        })
    }

    /// An LFW-style `pairs.txt` over a folder of aligned images, with its folds.
    pub fn pairs(pairs: &Path, root: &Path, ext: &str) -> Result<Self> {
        Ok(Self {
            set: VerificationSet::pairs(pairs, root, ext)?,
        })
    }

    /// Every pair of images among the identities of `folder` (a held-out set): AUC only,
    /// as such pairs have no folds.
    pub fn all_pairs(folder: &ImageFolder) -> Result<Self> {
        Ok(Self {
            set: VerificationSet::all_pairs(folder)?,
        })
    }

    /// The set's file or folder.
    pub fn name(&self) -> String {
        self.set.source().display().to_string()
    }

    /// Embeds every image once (with the flip test when `flip`) and scores the pairs.
    pub fn evaluate(&self, model: &MobileFaceNet, batch: usize, flip: bool) -> Result<EvalResult> {
        let [h, w] = model.config().input_size;
        let embeddings = self.set.embed(
            batch,
            [w, h],
            &Device::Cpu,
            |x| -> Result<candle_core::Tensor> {
                Ok(model.embed(&x.to_device(model.device())?, flip)?)
            },
            |_| {},
        )?;
        let scores = mfn_eval::pair_cosines(&embeddings, self.set.pair_index())?;
        let labels = self.set.labels().to_vec();
        let pairs = scores.len();
        let (auc, accuracy, accuracy_exact) = match self.set.folds() {
            Some(folds) => {
                let scores = PairScores::new(scores, labels, folds.to_vec())?;
                let report = mfn_eval::evaluate(&scores, &[])?;
                (
                    report.auc,
                    Some(report.insightface.mean),
                    Some(report.exact.mean),
                )
            }
            None => (mfn_eval::roc(&scores, &labels)?.auc, None, None),
        };
        Ok(EvalResult {
            set: self.name(),
            pairs,
            auc,
            accuracy,
            accuracy_exact,
        })
    }
}
