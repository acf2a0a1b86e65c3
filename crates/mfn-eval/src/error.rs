#[cfg(feature = "plot")]
use std::path::PathBuf;

/// Everything that can go wrong in this crate.
///
/// Bad input (empty slices, mismatched lengths, non-finite scores, unusable
/// fold layouts) is reported here rather than by panicking, because scores
/// usually come from a long-running embedding job whose output should not be
/// lost to an `unwrap` deep inside the evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An input that must hold at least one element was empty.
    #[error("{what} is empty")]
    Empty {
        /// Which input was empty.
        what: &'static str,
    },
    /// Two inputs that must be parallel have different lengths.
    #[error("length mismatch: {left_name} has {left} elements but {right_name} has {right}")]
    LengthMismatch {
        /// Name of the first input.
        left_name: &'static str,
        /// Length of the first input.
        left: usize,
        /// Name of the second input.
        right_name: &'static str,
        /// Length of the second input.
        right: usize,
    },
    /// A value that must be finite was NaN or infinite.
    #[error("{what}[{index}] is not finite ({value})")]
    NonFinite {
        /// Which input held the value.
        what: &'static str,
        /// Position of the offending value.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A vector with zero L2 norm was given where a direction is needed.
    #[error("{what} has zero L2 norm, so its cosine similarity is undefined")]
    ZeroNorm {
        /// Which vector was zero.
        what: &'static str,
    },
    /// A pair names an embedding that does not exist.
    #[error("pair {pair} names embedding {index}, but there are {len} embeddings")]
    IndexOutOfRange {
        /// The pair, a position in the pair list.
        pair: usize,
        /// The embedding it names.
        index: usize,
        /// How many embeddings there are.
        len: usize,
    },
    /// A pair's two embeddings cannot be compared; `cause` says why in terms of the pair's
    /// `a` (its first embedding) and `b` (its second).
    #[error("pair {pair} (a = embedding {}, b = embedding {}): {cause}", embeddings[0], embeddings[1])]
    Pair {
        /// The pair, a position in the pair list.
        pair: usize,
        /// The positions of its two embeddings.
        embeddings: [usize; 2],
        /// What is wrong with them: [`Error::NonFinite`], [`Error::ZeroNorm`],
        /// [`Error::Empty`] or [`Error::LengthMismatch`].
        cause: Box<Error>,
    },
    /// Fewer folds than the operation needs.
    #[error("k-fold cross-validation needs at least {min} folds, got {n_folds}")]
    TooFewFolds {
        /// Number of folds found or requested.
        n_folds: usize,
        /// Minimum number of folds required.
        min: usize,
    },
    /// More folds requested than there are pairs, which would leave a fold empty.
    #[error("cannot split {pairs} pairs into {n_folds} non-empty folds")]
    TooManyFolds {
        /// Number of folds requested.
        n_folds: usize,
        /// Number of pairs available.
        pairs: usize,
    },
    /// A fold index in `0..=max_fold` has no pairs assigned to it.
    #[error("fold {fold} has no pairs; fold indices must cover 0..{n_folds} without gaps")]
    EmptyFold {
        /// The first fold index that has no pairs.
        fold: usize,
        /// Number of folds implied by the largest fold index.
        n_folds: usize,
    },
    /// ROC analysis needs both same-person and different-person pairs.
    #[error("ROC needs both classes, got {positives} same-person and {negatives} different-person pairs")]
    MissingClass {
        /// Number of same-person pairs.
        positives: usize,
        /// Number of different-person pairs.
        negatives: usize,
    },
    /// A false accept rate outside `[0, 1]` (or NaN).
    #[error("false accept rate must lie in [0, 1], got {far}")]
    InvalidFar {
        /// The offending rate.
        far: f64,
    },
    /// A probe's candidate list cannot be scored; `cause` says why, in terms of
    /// the positions in that list.
    #[error("probe {probe}: {cause}")]
    Probe {
        /// The probe, a position in the probe list.
        probe: usize,
        /// What is wrong with its candidates: [`Error::NonFinite`] or [`Error::NotBestFirst`].
        cause: Box<Error>,
    },
    /// A candidate scores higher than the one ranked before it.
    #[error(
        "candidate {index} scores {score}, above the candidate ranked before it ({previous}); \
         candidates must be sorted best first"
    )]
    NotBestFirst {
        /// Position of the out-of-order candidate in its list.
        index: usize,
        /// Its score.
        score: f32,
        /// The lower score of the candidate before it.
        previous: f32,
    },
    /// Rank-1 and CMC were asked for, but no probe has an identity in the gallery.
    #[error(
        "rank-1 and CMC need known probes (truth = Some(id)), but all {unknown} probes are unknown"
    )]
    NoKnownProbes {
        /// Number of unknown probes.
        unknown: usize,
    },
    /// DIR at a FAR was asked for, but there are no unknown probes to set its threshold with.
    #[error(
        "DIR at FAR {far} needs unknown probes (truth = None) to set its threshold, \
         but all {known} probes are known; request no FARs to get rank-1 and CMC alone"
    )]
    NoUnknownProbes {
        /// The first requested false alarm rate.
        far: f64,
        /// Number of known probes.
        known: usize,
    },
    /// The deepest CMC rank is zero or too large to allocate a curve for.
    #[error("max_rank must lie in 1..={max}, got {max_rank}")]
    InvalidRank {
        /// The requested rank.
        max_rank: usize,
        /// The largest rank accepted.
        max: usize,
    },
    /// The plot path has an extension other than `.svg` or `.png`.
    #[cfg(feature = "plot")]
    #[error("cannot plot to {}: the extension must be .svg or .png", path.display())]
    UnsupportedPlotFormat {
        /// The path that was given.
        path: PathBuf,
    },
    /// No TrueType font was found for rendering PNG text.
    #[cfg(feature = "plot")]
    #[error(
        "PNG plots need a TrueType font but none was found (searched: {}); \
         write an .svg instead, or set {} to the path of a .ttf file",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        crate::plot::FONT_ENV
    )]
    FontNotFound {
        /// Every path that was tried.
        searched: Vec<PathBuf>,
    },
    /// A font file exists but could not be read or parsed.
    #[cfg(feature = "plot")]
    #[error("font {} is unusable: {reason}", path.display())]
    InvalidFont {
        /// The font file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// Drawing or writing the plot failed.
    #[cfg(feature = "plot")]
    #[error("failed to draw plot {}: {message}", path.display())]
    Plot {
        /// The output path.
        path: PathBuf,
        /// The error reported by the plotting backend.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Rejects the first non-finite value so later sorting and counting can rely on a total order.
pub(crate) fn check_finite(what: &'static str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            what,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// Checks that parallel inputs line up before anything indexes into them.
pub(crate) fn check_same_len(
    left_name: &'static str,
    left: usize,
    right_name: &'static str,
    right: usize,
) -> Result<()> {
    if left == right {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            left_name,
            left,
            right_name,
            right,
        })
    }
}
