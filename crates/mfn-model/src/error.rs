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

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
