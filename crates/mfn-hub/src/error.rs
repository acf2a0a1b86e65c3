use std::path::PathBuf;

/// Everything that can go wrong while reading the registry, finding, downloading or
/// checking a pinned file, or converting a pinned model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A registry file is malformed or one of its entries is unsafe.
    #[error("registry {origin}: {message}")]
    Registry {
        /// The registry file, or `built-in`.
        origin: String,
        /// What was wrong, naming the entry.
        message: String,
    },

    /// No entry of that name.
    #[error("no pinned source named `{name}`; known: {known}")]
    UnknownName {
        /// The name asked for.
        name: String,
        /// The names the registry holds, comma-separated.
        known: String,
    },

    /// A file's content is not the pinned content.
    #[error("{0}")]
    Mismatch(Box<Mismatch>),

    /// Downloads are off and the file is not in the cache.
    #[error(
        "`{name}` is not in the cache and downloads are off ({reason}): it would come from \
         {url} into {}. Run once with network access (unset HF_HUB_OFFLINE), or download that \
         URL yourself and place the file there{assets}",
        cache_path.display()
    )]
    Offline {
        /// The entry's name.
        name: String,
        /// Where the file is downloaded from.
        url: String,
        /// Where the file would be cached.
        cache_path: PathBuf,
        /// Why downloads are off.
        reason: String,
        /// How the assets folder could serve it instead, starting with a separator.
        assets: String,
    },

    /// A download failed.
    #[error("downloading `{name}` from {url} into {}: {message}", cache_path.display())]
    Download {
        /// The entry's name.
        name: String,
        /// The URL.
        url: String,
        /// Where the file was going.
        cache_path: PathBuf,
        /// The client's complaint.
        message: String,
    },

    /// A pinned archive lacks the member the entry names, or it cannot be read.
    #[error("{}: {message}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// A pinned model cannot be read or converted.
    #[error("model `{name}` ({}): {source}", path.display())]
    Model {
        /// The entry's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// The model crate's error.
        source: Box<mfn_model::Error>,
    },

    /// An entry was used as something it is not (a data set as a model, say).
    #[error("`{name}` is a {kind}, not a {wanted}")]
    Kind {
        /// The entry's name.
        name: String,
        /// What the entry is.
        kind: &'static str,
        /// What the caller needed.
        wanted: &'static str,
    },

    /// A setting (environment variable or argument) is unusable.
    #[error("{0}")]
    Setting(String),
}

/// A file whose size or sha256 is not the pinned one.
#[derive(Debug)]
pub struct Mismatch {
    /// The entry's name.
    pub name: String,
    /// The file that was checked.
    pub path: PathBuf,
    /// What the file is: `the download`, `the cached copy`, `the assets copy`.
    pub what: &'static str,
    /// The pinned sha256.
    pub expected: String,
    /// The sha256 of the file.
    pub actual: String,
    /// The pinned size.
    pub expected_size: u64,
    /// The size of the file.
    pub actual_size: u64,
    /// What to do about it, starting with a separator.
    pub hint: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} has sha256 {} ({} bytes), but `{}` is pinned to sha256 {} ({} bytes){}",
            self.path.display(),
            self.what,
            self.actual,
            self.actual_size,
            self.name,
            self.expected,
            self.expected_size,
            self.hint
        )
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
