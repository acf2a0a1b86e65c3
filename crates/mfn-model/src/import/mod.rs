//! Importers from other frameworks' checkpoints into a [`crate::Config`] and named tensors.
//!
//! Every file they read is untrusted: it must be a regular file (a FIFO would block a read
//! forever, a device such as `/dev/zero` never ends) of bounded size, and every count or
//! length in it is checked against the bytes that are left before anything is allocated.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

pub mod mxnet;
pub mod onnx;
pub mod torch;

/// Largest model file read (ONNX, MXNet `.params`, PyTorch, native): 2 GiB, twenty times
/// the largest network [`crate::Config::validate`] accepts in `f32`.
pub const MAX_FILE_BYTES: u64 = 2 << 30;

fn io_error(path: &Path, message: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message,
    }
}

/// Checks, without opening it, that `path` is a regular file (after following links) of at
/// most `max` bytes; returns its size. Check before opening anything untrusted: opening a
/// FIFO for reading blocks until a writer comes.
pub fn check_regular_file(path: &Path, max: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(io_error(
            path,
            "not a regular file (a folder, FIFO, socket or device)".into(),
        ));
    }
    if meta.len() > max {
        return Err(io_error(
            path,
            format!(
                "{} bytes, more than the {max} a model file may have",
                meta.len()
            ),
        ));
    }
    Ok(meta.len())
}

/// Reads a regular file of at most `max` bytes, never more than that whatever happens to
/// the file meanwhile.
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    // Checked before opening: opening a FIFO for reading blocks until a writer comes.
    check_regular_file(path, max)?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io_error(path, "not a regular file".into()));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(max) as usize);
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(io_error(
            path,
            format!("more than the {max} bytes a model file may have"),
        ));
    }
    Ok(bytes)
}
