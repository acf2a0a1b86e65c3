//! Errors of this crate.

use candle_core::DType;

/// Everything that can go wrong when building or applying a margin head.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A label is not a valid class index.
    #[error("label {label} at batch index {index} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// Position in the batch.
        index: usize,
        /// The offending label.
        label: u32,
        /// Number of classes.
        classes: usize,
    },
    /// The embedding dimension does not match the head.
    #[error("embedding dimension {got} does not match the head's dimension {expected}")]
    DimMismatch {
        /// Dimension of the class centres.
        expected: usize,
        /// Dimension of the embeddings given.
        got: usize,
    },
    /// A tensor has the wrong rank or the batch sizes disagree.
    #[error("shape error: {0}")]
    Shape(String),
    /// Labels must be `u32`.
    #[error("labels must have dtype u32, got {0:?}")]
    LabelDType(DType),
    /// The scale `s` is not a positive finite number.
    #[error("scale s must be positive and finite, got {0}")]
    NonPositiveScale(f64),
    /// A margin parameter is out of its domain.
    #[error("invalid margin: {0}")]
    InvalidMargin(String),
    /// `k = 0` sub-centres.
    #[error("the number of sub-centres k must be at least 1")]
    ZeroSubCenters,
    /// Zero classes or a zero embedding dimension.
    #[error("the head needs at least one class and a non-zero embedding dimension")]
    EmptyHead,
    /// The weight's row count is not a multiple of `k`.
    #[error("weight has {rows} rows, not a multiple of k = {k}")]
    WeightRows {
        /// Rows of the weight.
        rows: usize,
        /// Sub-centres per class.
        k: usize,
    },
    /// The inter-class filter threshold is not a finite number in `[-1, 1]`.
    #[error("filter threshold must be finite and in [-1, 1], got {0}")]
    InvalidFilterThreshold(f64),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
