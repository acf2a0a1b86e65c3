//! The error type of this crate.

use std::path::PathBuf;

/// What can go wrong with a gallery. Every variant about a file names it, and the row id
/// where one row is at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not a gallery: not SQLite, empty, or a SQLite database without the
    /// gallery's tables.
    #[error("{}: not a face gallery: {message}", path.display())]
    NotAGallery {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        message: String,
    },

    /// The gallery was written by a newer version of this crate, in a format this build
    /// cannot read.
    #[error(
        "{}: gallery format version {found}, newer than this build reads (up to {supported}): \
         upgrade mfn-gallery",
        path.display()
    )]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// The format version in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// The gallery holds embeddings of another model: its faces cannot be compared with
    /// this model's.
    #[error(
        "{}: the gallery was enrolled with another model (fingerprint {gallery}), not with \
         this one ({model}); embeddings of different models cannot be compared: use the \
         gallery's model, or enroll into a new gallery",
        path.display()
    )]
    ModelMismatch {
        /// The file.
        path: PathBuf,
        /// The short fingerprint stored in the gallery.
        gallery: String,
        /// The short fingerprint of the model in use.
        model: String,
    },

    /// The gallery's contents are damaged: a row's embedding has the wrong length or a
    /// value that is not finite, a meta value does not parse, a field is too long.
    #[error("{}{}: {message}", path.display(), row.map(|id| format!(", row id {id}")).unwrap_or_default())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The row at fault, when one is.
        row: Option<i64>,
        /// What is wrong.
        message: String,
    },

    /// A file or folder that should exist does not, or one that should not already does.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// An argument cannot be used: an embedding of the wrong dimension or not finite, an
    /// empty label, a threshold outside `-1..=1`.
    #[error("{0}")]
    Invalid(String),

    /// The gallery is larger than the memory this process allows its index.
    #[error(
        "{}: {rows} faces of {dim} values need {needed} bytes for the search index, above \
         the limit of {limit} bytes (see `Gallery::set_memory_limit`)",
        path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Rows in the gallery.
        rows: u64,
        /// Embedding dimension.
        dim: usize,
        /// Bytes the index would take.
        needed: u64,
        /// The limit.
        limit: u64,
    },

    /// A backend left out of this build (`postgres://` without the `postgres` feature).
    #[error(
        "{location}: the {backend} backend is not built in (build mfn-gallery with its \
         `postgres` feature); use a SQLite file path"
    )]
    BackendNotBuilt {
        /// The location as given.
        location: String,
        /// The backend's name.
        backend: &'static str,
    },

    /// SQLite failed on the file.
    #[error("{}: {source}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: Box<rusqlite::Error>,
    },

    /// PostgreSQL failed on the database (its URL without the password).
    #[cfg(feature = "postgres")]
    #[error("{location}: {message}")]
    Postgres {
        /// The database's URL, password masked.
        location: String,
        /// What failed: the server's message with its detail and hint, or the client's.
        message: String,
        /// The client's error.
        #[source]
        source: Box<postgres::Error>,
    },

    /// The database server cannot hold a gallery as it is (the pgvector extension
    /// missing).
    #[error("{location}: {message}")]
    Server {
        /// The database's URL, password masked.
        location: String,
        /// What is wrong, and what to do.
        message: String,
    },

    /// SQLite failed outside of any one file.
    #[error(transparent)]
    SqliteOther(Box<rusqlite::Error>),

    /// Detection, alignment or the recognition model failed.
    #[error(transparent)]
    Detect(Box<mfn_detect::Error>),

    /// An image or a data file failed.
    #[error(transparent)]
    Data(Box<mfn_data::Error>),

    /// The recognition model failed to load or run.
    #[error(transparent)]
    Model(Box<mfn_model::Error>),

    /// An evaluation failed.
    #[error(transparent)]
    Eval(Box<mfn_eval::Error>),

    /// The tensor library failed (reading a model's weights for its fingerprint).
    #[error(transparent)]
    Candle(Box<candle_core::Error>),

    /// Input or output failed on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Self::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    SqliteOther(rusqlite::Error),
    Detect(mfn_detect::Error),
    Data(mfn_data::Error),
    Model(mfn_model::Error),
    Eval(mfn_eval::Error),
    Candle(candle_core::Error),
);
