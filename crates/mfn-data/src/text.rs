//! Reading files whose size the reader does not control: a cap on what is read, memory
//! asked for without aborting when it is not there, and text checked for UTF-8 with the
//! line of the first bad byte.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// How much more is read at a time when a file does not say how long it is (a pipe, a
/// device such as `/dev/zero`).
const CHUNK: usize = 1 << 20;

/// Reads at most `max` bytes of `path`; a file longer than that is an error that names it
/// and `what` it was read as. Memory is reserved with `try_reserve`, so a file too big for
/// memory is an error too, never an abort; a file that never ends (`/dev/zero`) stops at
/// `max`.
///
/// `check(bytes, start)` sees what has been read after each read, the new part starting
/// at `start`, and can refuse it early: a text file holding a NUL byte, a header that no
/// image format has, so that junk is refused before megabytes of it are read.
pub(crate) fn read_capped(
    path: &Path,
    max: u64,
    what: &str,
    mut check: impl FnMut(&[u8], usize) -> Result<()>,
) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_big = |len: String| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} is more than the {} a {what} may take", bytes(max)),
        ),
    };
    let no_memory = |n: usize| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("cannot hold {} in memory", bytes(n as u64)),
        ),
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let declared = file.metadata().map_err(io)?.len();
    if declared > max {
        return Err(too_big(format!("the file's {}", bytes(declared))));
    }
    // Regular files say their length; devices and pipes say 0 and are read in chunks.
    let first = usize::try_from(declared).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    out.try_reserve_exact(first.saturating_add(1))
        .map_err(|_| no_memory(first))?;
    let mut limited = file.take(max.saturating_add(1));
    loop {
        if out.len() == out.capacity() {
            let more = CHUNK.min(out.len().max(4096));
            out.try_reserve(more)
                .map_err(|_| no_memory(out.len() + more))?;
        }
        let start = out.len();
        out.resize(out.capacity(), 0);
        let n = loop {
            match limited.read(&mut out[start..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            }
        };
        out.truncate(start + n);
        if n == 0 {
            break;
        }
        if out.len() as u64 > max {
            return Err(too_big(format!("more than {}", bytes(max))));
        }
        check(&out, start)?;
    }
    Ok(out)
}

/// Reads a text file of at most `max` bytes (see [`read_capped`]) as UTF-8. A NUL byte
/// (which no text file holds: `/dev/zero`, a binary file given by mistake) or bytes that
/// are not UTF-8 are refused through `bad(line, message)`, with the 1-based line.
pub(crate) fn read_text(
    path: &Path,
    max: u64,
    what: &str,
    bad: impl Fn(usize, String) -> Error,
) -> Result<String> {
    let bytes = read_capped(path, max, what, |bytes, start| {
        match bytes[start..].iter().position(|&b| b == 0) {
            Some(i) => {
                let at = start + i;
                let (line, column) = line_of(bytes, at);
                Err(bad(
                    line,
                    format!(
                        "byte {column} of the line (offset {at} in the file) is NUL: not a \
                         text file"
                    ),
                ))
            }
            None => Ok(()),
        }
    })?;
    utf8(bytes).map_err(|(line, message)| bad(line, message))
}

/// The 1-based line and column of byte `at`.
fn line_of(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = &bytes[..at];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let column = at
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
    (line, column + 1)
}

/// The bytes of a text file as UTF-8, or the 1-based line of the first byte that is not,
/// with a message.
pub(crate) fn utf8(bytes: Vec<u8>) -> std::result::Result<String, (usize, String)> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let (line, column) = line_of(e.as_bytes(), at);
        (
            line,
            format!("byte {column} of the line (offset {at} in the file) is not UTF-8 text"),
        )
    })
}

/// A size for messages: `512 MiB`, `1.5 GiB`, `300 bytes`.
pub(crate) fn bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match n {
        n if n >= GIB && n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n >= GIB => format!("{:.1} GiB", n as f64 / GIB as f64),
        n if n >= MIB && n % MIB == 0 => format!("{} MiB", n / MIB),
        n if n >= MIB => format!("{:.1} MiB", n as f64 / MIB as f64),
        n if n >= KIB && n % KIB == 0 => format!("{} KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        let ok = |_: &[u8], _: usize| Ok(());
        assert_eq!(read_capped(&p, 5000, "test file", ok).unwrap().len(), 5000);
        let e = read_capped(&p, 4999, "test file", ok)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.txt") && e.contains("more than the 4999 bytes"),
            "{e}"
        );
        #[cfg(unix)]
        {
            let zero = Path::new("/dev/zero");
            let e = read_capped(zero, 3 << 20, "test file", ok)
                .unwrap_err()
                .to_string();
            assert!(e.contains("/dev/zero: more than 3 MiB"), "{e}");
            let bad = |line, message| Error::Pairs {
                path: zero.into(),
                line,
                message,
            };
            let e = read_text(zero, 1 << 30, "test file", bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("/dev/zero:1: byte 1 of the line (offset 0"),
                "{e}"
            );
        }
    }

    #[test]
    fn utf8_names_the_line() {
        assert_eq!(utf8(b"ab\ncd".to_vec()).unwrap(), "ab\ncd");
        let (line, message) = utf8(b"ab\ncd\nx\xffy".to_vec()).unwrap_err();
        assert_eq!(line, 3);
        assert!(
            message.starts_with("byte 2 of the line (offset 7"),
            "{message}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(300), "300 bytes");
    }
}
