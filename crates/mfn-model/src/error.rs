use std::path::PathBuf;

/// Everything that can go wrong while building, importing, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A path names something no model is read from: not a regular file (a folder, a FIFO,
    /// a device), or larger than a model file may be.
    #[error("{path}: {message}")]
    File {
        /// The path.
        path: PathBuf,
        /// What it is.
        message: String,
    },

    /// An MXNet `.params` file is malformed or truncated.
    #[error("{path}: at byte offset {offset}: {message}")]
    Params {
        /// The file.
        path: PathBuf,
        /// Where in the file the problem was found.
        offset: u64,
        /// What was wrong.
        message: String,
    },

    /// An MXNet symbol file is not valid JSON or lacks what a graph needs.
    #[error("{path}: {message}")]
    Symbol {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// A graph does not have the layers the config describes.
    #[error("{path}: node `{node}` does not match the config: expected {expected}, found {found}")]
    GraphMismatch {
        /// The symbol file.
        path: PathBuf,
        /// Name of the first differing node.
        node: String,
        /// What the config expects there.
        expected: String,
        /// What the graph has.
        found: String,
    },

    /// An ONNX model is malformed or holds a graph that is not a supported network.
    #[error("{path}: {message}")]
    Onnx {
        /// The file.
        path: PathBuf,
        /// What was wrong, naming the node where there is one.
        message: String,
    },

    /// A PyTorch checkpoint is malformed, truncated or of an unknown layout.
    #[error("{path}: {message}")]
    Torch {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// A weight is absent from a checkpoint.
    #[error("{path}: missing weight `{name}`")]
    MissingWeight {
        /// The checkpoint.
        path: PathBuf,
        /// The weight's name.
        name: String,
    },

    /// A weight has the wrong shape.
    #[error("{path}: weight `{name}` has shape {found:?}, the config expects {expected:?}")]
    WeightShape {
        /// The checkpoint.
        path: PathBuf,
        /// The weight's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
    },

    /// A config describes no network this crate builds: a zero width or group count, a
    /// stride other than 1 or 2, a group count that does not divide its channels, a
    /// non-finite eps or input scaling, or a size past the caps of [`crate::config::limits`].
    #[error("{}config: {message}", path_prefix(.path))]
    Config {
        /// The file the config came from, when it came from one.
        path: Option<PathBuf>,
        /// What is wrong, naming the field.
        message: String,
    },

    /// A weight holds a value that is not finite (NaN or infinite).
    #[error("{path}: weight `{name}` is not finite: {value} at index {index}")]
    NonFinite {
        /// The checkpoint.
        path: PathBuf,
        /// The weight's name.
        name: String,
        /// Row-major index of the first such value.
        index: usize,
        /// The value.
        value: f32,
    },

    /// A weight is present but unusable: an unexpected tensor, a dtype that is not
    /// floating point, a variance below `-eps`.
    #[error("{path}: weight `{name}`: {message}")]
    BadWeight {
        /// The checkpoint.
        path: PathBuf,
        /// The weight's name.
        name: String,
        /// What is wrong.
        message: String,
    },

    /// A native safetensors file is malformed or lacks its metadata.
    #[error("{path}: {message}")]
    Native {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// An input tensor has the wrong shape for the network.
    #[error("input has shape {found:?}, expected {expected}")]
    InputShape {
        /// The shape that was passed.
        found: Vec<usize>,
        /// A description of the accepted shapes.
        expected: String,
    },

    /// The tensor library failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn path_prefix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

impl Error {
    /// The error with `path` as the file it concerns, where it names none yet (a config
    /// checked before the file it came from was known).
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::Config {
                path: None,
                message,
            } => Error::Config {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
