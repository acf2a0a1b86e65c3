use std::path::PathBuf;

/// Everything that can go wrong while reading images and protocol files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// An image file exists but cannot be decoded.
    #[error("{path}: cannot decode image: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        message: String,
    },

    /// An image does not have the size the batch needs.
    #[error("{path}: image is {found:?} (width x height), expected {expected:?}")]
    ImageSize {
        /// The file.
        path: PathBuf,
        /// The size the caller asked for, width x height.
        expected: [usize; 2],
        /// The size of the image, width x height.
        found: [usize; 2],
    },

    /// A verification set cannot be formed as asked.
    #[error("{}: {message}", path.display())]
    Verification {
        /// The set's file or folder.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// Images a protocol needs are absent.
    #[error("{} image(s) missing under {}:\n  {}", paths.len(), root.display(), list_paths(paths))]
    MissingImages {
        /// The image folder.
        root: PathBuf,
        /// Every missing file.
        paths: Vec<PathBuf>,
    },

    /// A line of a pairs file is malformed.
    #[error("{path}:{line}: {message}")]
    Pairs {
        /// The pairs file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },

    /// A pairs file has no pairs.
    #[error("{path}: the pairs file is empty")]
    EmptyPairs {
        /// The pairs file.
        path: PathBuf,
    },

    /// An asset the caller asked for is not there.
    #[error("asset missing: {message}")]
    Assets {
        /// Which asset and where it was looked for.
        message: String,
    },

    /// Landmarks that cannot describe a face: a coordinate is not finite, the points
    /// coincide, or three or more of them lie on (nearly) one line.
    #[error("degenerate landmarks: {message}")]
    DegenerateLandmarks {
        /// What is wrong with which points.
        message: String,
    },

    /// Face alignment was asked for something it cannot do: too few or mismatched points, an
    /// unsupported template size, an empty image or output.
    #[error("alignment: {message}")]
    Alignment {
        /// What was wrong.
        message: String,
    },

    /// A line of a landmarks file is malformed.
    #[error("{path}:{line}: {message}")]
    LandmarksFile {
        /// The landmarks file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },

    /// A RecordIO (`.rec`) file is malformed where a record should be.
    #[error("{path}: byte {offset}: {message}")]
    RecordIo {
        /// The `.rec` file.
        path: PathBuf,
        /// Byte offset of the record (or frame) at fault.
        offset: u64,
        /// What was wrong.
        message: String,
    },

    /// A line of a RecordIO index (`.idx`) file is malformed or points outside the `.rec`.
    #[error("{path}:{line}: {message}")]
    RecordIndex {
        /// The `.idx` file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },

    /// A record, image or class was asked for that a file or dataset does not have.
    #[error("{path}: {message}")]
    NoSuchItem {
        /// The file or folder asked.
        path: PathBuf,
        /// What was missing.
        message: String,
    },

    /// An image folder cannot be a dataset: no class folders, or a class without images.
    #[error("{path}: {message}")]
    ImageFolder {
        /// The folder at fault.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// A pickle (an insightface `.bin` set) is malformed, truncated, or asks for something
    /// the safe reader refuses, such as a global other than `_codecs encode`.
    #[error("{path}: byte {offset}: {message}")]
    Pickle {
        /// The pickle file.
        path: PathBuf,
        /// Byte offset of the opcode at fault.
        offset: u64,
        /// What was wrong.
        message: String,
    },

    /// A `.bin` verification set is a valid pickle of the wrong shape: not
    /// `(list of bytes, list of bools)` with two images per pair.
    #[error("{path}: {message}")]
    BinSet {
        /// The `.bin` file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// The tensor library failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The network failed to load or run (the loader embeds batches with it).
    #[error(transparent)]
    Model(#[from] mfn_model::Error),
}

fn list_paths(paths: &[PathBuf]) -> String {
    const SHOWN: usize = 20;
    let mut s: Vec<String> = paths
        .iter()
        .take(SHOWN)
        .map(|p| p.display().to_string())
        .collect();
    if paths.len() > SHOWN {
        s.push(format!("... and {} more", paths.len() - SHOWN));
    }
    s.join("\n  ")
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// How many characters of text from a file an error message shows.
pub(crate) const QUOTE_CHARS: usize = 80;

/// Text from a file made safe and short for an error message: escaped as `{:?}` escapes a
/// string (control and other non-printing characters as `\n`, `\u{1b}`), and cut to [`QUOTE_CHARS`]
/// characters with `…` when longer, so that a hostile file can neither drive the terminal
/// nor flood it.
pub(crate) fn quote(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == QUOTE_CHARS {
            out.push('…');
            break;
        }
        // As `{:?}` shows a string: a `'` needs no escape inside one.
        if c == '\'' {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
    }
    out
}

/// A message from another library (an image decoder's, say) made fit to print: trimmed,
/// with control characters escaped and at most 500 characters.
pub(crate) fn tidy(message: &str) -> String {
    let message = message.trim();
    let mut out = String::new();
    for (i, c) in message.chars().enumerate() {
        if i == 500 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_and_cuts() {
        assert_eq!(quote("Aaron_Peirsol"), "Aaron_Peirsol");
        assert_eq!(quote("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\n");
        let long = "x".repeat(10_000_000);
        let q = quote(&long);
        assert_eq!(q.chars().count(), QUOTE_CHARS + 1);
        assert!(q.ends_with('…'));
        assert_eq!(tidy("Not enough bytes\n"), "Not enough bytes");
        assert_eq!(tidy("a\nb \"c\""), "a\\nb \"c\"");
    }
}
