//! Errors of the training crate.

use std::path::PathBuf;

/// What can go wrong while setting up or running training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A training checkpoint is damaged or does not fit this run.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A training image does not fit the model.
    #[error("training image {index}: {message}")]
    Sample {
        /// Its position in the data set.
        index: usize,
        /// What was wrong.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A batch could not be built.
    #[error(transparent)]
    Data(#[from] mfn_data::Error),
    /// The network failed.
    #[error(transparent)]
    Model(#[from] mfn_model::Error),
    /// The loss failed.
    #[error(transparent)]
    Loss(#[from] mfn_loss::Error),
    /// The evaluation failed.
    #[error(transparent)]
    Eval(#[from] mfn_eval::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
