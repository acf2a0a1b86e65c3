//! Pair scores of a model on a verification set, in process: the same embedding and
//! protocol code `mfn-cli eval` runs, through the library crates.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use mfn_data::VerificationSet;
use mfn_eval::{PairScores, Protocol};
use mfn_model::{Checkpoint, MobileFaceNet};

/// Images per batch, as `mfn-cli eval` uses: small batches keep activations in cache.
const BATCH: usize = 8;

/// Where the pairs come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DataSet {
    /// An insightface `.bin` set, split into `folds` folds of consecutive pairs.
    Bin {
        /// The `.bin` file.
        path: PathBuf,
        /// Number of folds.
        folds: usize,
    },
    /// An LFW-style `pairs.txt` with its folder of aligned faces.
    Pairs {
        /// The pairs file.
        pairs: PathBuf,
        /// The image folder, `<Name>/<Name>_<NNNN>.<ext>`.
        images: PathBuf,
        /// Extension of the image files.
        ext: String,
    },
}

impl DataSet {
    /// The file that names the pairs, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Self::Bin { path, .. } => path,
            Self::Pairs { pairs, .. } => pairs,
        }
    }
}

/// Loads a checkpoint (any format [`Checkpoint::load`] reads) and builds it on the CPU.
pub fn load_model(path: &Path) -> Result<(Checkpoint, MobileFaceNet)> {
    let device = Device::Cpu;
    let ckpt = Checkpoint::load(path, None, &device)
        .with_context(|| format!("loading model {}", path.display()))?;
    let model = ckpt
        .build(&device)
        .with_context(|| format!("building model from {}", path.display()))?;
    Ok((ckpt, model))
}

/// Cosine scores of every pair of `data`, with their labels and folds; a progress bar on
/// standard error counts the images embedded.
pub fn score(model: &MobileFaceNet, data: &DataSet, flip: bool) -> Result<PairScores> {
    let set = match data {
        DataSet::Bin { path, folds } => VerificationSet::bin(path, *folds)
            .with_context(|| format!("reading the verification set {}", path.display()))?,
        DataSet::Pairs { pairs, images, ext } => VerificationSet::pairs(pairs, images, ext)
            .with_context(|| format!("reading {} and its images", pairs.display()))?,
    };
    let [h, w] = model.config().input_size;
    let bar = indicatif::ProgressBar::new(set.images() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} embedding {wide_bar} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let e = set.embed(
        BATCH,
        [w, h],
        &Device::Cpu,
        |x: &Tensor| -> Result<Tensor> { Ok(model.embed(x, flip)?) },
        |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let scores = mfn_eval::pair_cosines(&e, set.pair_index())?;
    let folds = set
        .folds()
        .with_context(|| format!("{} has no folds", data.path().display()))?;
    Ok(PairScores::new(
        scores,
        set.labels().to_vec(),
        folds.to_vec(),
    )?)
}

/// The 10-fold mean accuracy under `protocol`, with the mean fitted cosine threshold.
pub fn kfold(scores: &PairScores, protocol: Protocol) -> Result<(f64, f64)> {
    let r = mfn_eval::kfold_accuracy(scores, protocol)?;
    Ok((r.mean, r.mean_threshold_cosine))
}

/// Accuracy at a fixed cosine threshold: a pair is "same" when its cosine is at least the
/// threshold, the decision `mfn-cli verify` makes.
pub fn at_threshold(scores: &PairScores, threshold: f64) -> f64 {
    let correct = scores
        .scores
        .iter()
        .zip(&scores.labels)
        .filter(|(s, same)| (**s >= threshold) == **same)
        .count();
    correct as f64 / scores.len().max(1) as f64
}
