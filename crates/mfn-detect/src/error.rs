use std::path::PathBuf;

/// Everything that can go wrong while finding, aligning, embedding and comparing faces.
///
/// The errors of the crates underneath convert into it, so `?` works on all of them in
/// code that mixes this crate with `mfn-data`, `mfn-model` and `mfn-hub`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A photo has no face the detector can find.
    #[error("{}: no face found", path.display())]
    NoFace {
        /// The photo.
        path: PathBuf,
    },

    /// A detector could not be loaded or run: its weights are missing, malformed or of
    /// another network, or an image cannot be searched.
    #[error("{}: {message}", path.display())]
    Detector {
        /// The detector's weights, or the image being searched.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// A model has no verification threshold, and none was given.
    #[error("{}: no verification threshold: {message}", path.display())]
    NoThreshold {
        /// The recognition model.
        path: PathBuf,
        /// Where one was looked for, and how to get one.
        message: String,
    },

    /// A setting the pipeline was given cannot work (an unknown registry name, say).
    #[error("{0}")]
    Setting(String),

    /// Images, alignment or pair files failed.
    #[error(transparent)]
    Data(Box<mfn_data::Error>),

    /// The recognition network failed to load or run.
    #[error(transparent)]
    Model(Box<mfn_model::Error>),

    /// A pinned file could not be found, downloaded or checked.
    #[error(transparent)]
    Hub(Box<mfn_hub::Error>),

    /// The tensor library failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

// The errors underneath are boxed so that this one stays small: a `Result` of it is
// returned on every call, and user functions that return it pass clippy's size lint.
impl From<mfn_data::Error> for Error {
    fn from(e: mfn_data::Error) -> Self {
        Self::Data(Box::new(e))
    }
}

impl From<mfn_model::Error> for Error {
    fn from(e: mfn_model::Error) -> Self {
        Self::Model(Box::new(e))
    }
}

impl From<mfn_hub::Error> for Error {
    fn from(e: mfn_hub::Error) -> Self {
        Self::Hub(Box::new(e))
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
