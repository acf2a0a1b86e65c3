//! Verification sets scored during (and after) training, through `mfn-eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use mfn_data::{BinSet, ImageFolder, Pairs};
use mfn_eval::PairScores;
use mfn_model::MobileFaceNet;
use serde::Serialize;

use crate::{Error, Result};

enum Source {
    /// An insightface `.bin` set, folds of consecutive pairs.
    Bin { set: BinSet, folds: usize },
    /// Images with a list of pairs and their folds.
    Files {
        images: Vec<PathBuf>,
        index: Vec<[usize; 2]>,
        labels: Vec<bool>,
        folds: Option<Vec<usize>>,
    },
}

/// A set of labelled face pairs.
pub struct EvalSet {
    name: String,
    source: Source,
}

/// What a model scores on an [`EvalSet`].
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    /// The set's name.
    pub set: String,
    /// Number of pairs.
    pub pairs: usize,
    /// Area under the ROC curve.
    pub auc: f64,
    /// Mean 10-fold accuracy, insightface's protocol, when the set has folds.
    pub accuracy: Option<f64>,
    /// Mean 10-fold accuracy, exact protocol, when the set has folds.
    pub accuracy_exact: Option<f64>,
}

impl EvalSet {
    /// An insightface `.bin` file, split into `folds` folds of consecutive pairs.
    pub fn bin(path: &Path, folds: usize) -> Result<Self> {
        Ok(Self {
            name: path.display().to_string(),
            source: Source::Bin {
                set: BinSet::read(path)?,
                folds,
            },
        })
    }

    /// An LFW-style `pairs.txt` over a folder of aligned images, with its folds.
    pub fn pairs(pairs: &Path, root: &Path, ext: &str) -> Result<Self> {
        let p = Pairs::read(pairs)?;
        let (unique, index) = p.index();
        let images: Vec<PathBuf> = unique.iter().map(|r| r.path(root, ext)).collect();
        let missing = mfn_data::missing_files(&images);
        if !missing.is_empty() {
            return Err(mfn_data::Error::MissingImages {
                root: root.to_path_buf(),
                paths: missing,
            }
            .into());
        }
        Ok(Self {
            name: pairs.display().to_string(),
            source: Source::Files {
                images,
                index,
                labels: p.labels(),
                folds: Some(p.fold_ids()),
            },
        })
    }

    /// Every pair of images among the identities of `folder` (a held-out set): AUC only,
    /// as such pairs have no folds.
    pub fn all_pairs(folder: &ImageFolder) -> Result<Self> {
        let samples = folder.samples();
        if folder.classes().len() < 2 {
            return Err(Error::Config(format!(
                "pairs among held-out identities of {} need at least 2 of them, for \
                 different-person pairs",
                folder.root().display()
            )));
        }
        let mut index = Vec::new();
        let mut labels = Vec::new();
        for a in 0..samples.len() {
            for b in a + 1..samples.len() {
                index.push([a, b]);
                labels.push(samples[a].1 == samples[b].1);
            }
        }
        Ok(Self {
            name: folder.root().display().to_string(),
            source: Source::Files {
                images: samples.iter().map(|(p, _)| p.clone()).collect(),
                index,
                labels,
                folds: None,
            },
        })
    }

    /// The set's name (its file or folder).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Embeds every image once (with the flip test when `flip`) and scores the pairs.
    pub fn evaluate(&self, model: &MobileFaceNet, batch: usize, flip: bool) -> Result<EvalResult> {
        let size = {
            let [h, w] = model.config().input_size;
            [w, h]
        };
        let device = Device::Cpu;
        let embed = |x: &candle_core::Tensor| -> Result<candle_core::Tensor> {
            Ok(model.embed(&x.to_device(model.device())?, flip)?)
        };
        let (embeddings, index, labels, folds): (Vec<Vec<f32>>, Vec<[usize; 2]>, Vec<bool>, _) =
            match &self.source {
                Source::Bin { set, folds } => {
                    let images: Arc<[Vec<u8>]> = set.images.clone().into();
                    let e = mfn_data::embed_encoded(
                        images,
                        Path::new(&self.name),
                        batch,
                        size,
                        &device,
                        embed,
                        |_| {},
                    )?;
                    let index = (0..set.issame.len()).map(|i| [2 * i, 2 * i + 1]).collect();
                    (e, index, set.issame.clone(), Err(*folds))
                }
                Source::Files {
                    images,
                    index,
                    labels,
                    folds,
                } => {
                    let e = mfn_data::embed_images(images, batch, size, &device, embed, |_| {})?;
                    (e, index.clone(), labels.clone(), Ok(folds.clone()))
                }
            };
        let scores = index
            .iter()
            .map(|&[a, b]| mfn_eval::cosine(&embeddings[a], &embeddings[b]))
            .collect::<mfn_eval::Result<Vec<f64>>>()?;
        let pairs = scores.len();
        let scores = match folds {
            Err(n) => Some(PairScores::contiguous_folds(scores, labels, n)?),
            Ok(Some(f)) => Some(PairScores::new(scores, labels, f)?),
            Ok(None) => {
                let roc = mfn_eval::roc(&scores, &labels)?;
                return Ok(EvalResult {
                    set: self.name.clone(),
                    pairs,
                    auc: roc.auc,
                    accuracy: None,
                    accuracy_exact: None,
                });
            }
        };
        let report = mfn_eval::evaluate(scores.as_ref().expect("set above"), &[])?;
        Ok(EvalResult {
            set: self.name.clone(),
            pairs,
            auc: report.auc,
            accuracy: Some(report.insightface.mean),
            accuracy_exact: Some(report.exact.mean),
        })
    }
}
