//! Replacing a file so that no failed or interrupted write loses the old one or leaves a
//! partial one: the new content goes to a temporary file in the same folder, is synced to
//! disk and renamed over the old file, and the folder is synced; a write that fails removes
//! its temporary file.
//!
//! A process killed mid-write cannot remove its temporary file. Temporary files are named
//! `.{name}.{pid}-{n}.tmp[.{ext}]`, and the first write of a process into a folder removes
//! those of processes that no longer run (on systems with `/proc`; elsewhere they stay).

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Writes `bytes` to `path` atomically: afterwards `path` holds either its old content (or
/// nothing, if there was none) or all of `bytes`, and no temporary file is left.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |tmp| -> io::Result<()> {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)
    })
}

/// Like [`write`] for writers that want a path rather than bytes (image encoders, plot
/// backends, model savers): `write` gets a temporary path in the folder of `path`, with the
/// same extension, and must create the file there. It may create other files whose names
/// start with the temporary file's stem; they are removed with it on failure.
pub fn write_with<E>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> io::Result<()>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (dir, prefix, tmp) = temp_path(path)?;
    clean_stale_once(&dir);
    let result = write(&tmp)
        .map_err(|e| match e.into().downcast::<io::Error>() {
            Ok(e) => *e,
            Err(e) => io::Error::other(e),
        })
        .and_then(|()| {
            // The writer may not have synced; the rename must not reach the disk first.
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, path)?;
            sync_dir(&dir);
            Ok(())
        });
    if result.is_err() {
        remove_with_prefix(&dir, &prefix);
    }
    result
}

/// Checks that files can be created in `dir`, by creating and removing one, so that a long
/// computation does not end in an unwritable folder.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    let (_, _, probe) = temp_path(&dir.join("write-check"))?;
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// The folder of `path` ("." for a bare name).
pub fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `name` is a temporary file of this module, and the process that made it.
pub fn temp_owner(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    // `.{name}.{pid}-{n}.tmp` then nothing or `.{ext}...`.
    name.match_indices(".tmp").find_map(|(at, _)| {
        let rest = &name[at + 4..];
        if !(rest.is_empty() || rest.starts_with('.')) {
            return None;
        }
        let (stem, id) = name[..at].rsplit_once('.')?;
        let (pid, n) = id.split_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if stem.len() < 2 || !digits(pid) || !digits(n) {
            return None;
        }
        pid.parse().ok()
    })
}

/// `(folder, stem of the temporary names, temporary path)` for `path`.
fn temp_path(path: &Path) -> io::Result<(PathBuf, String, PathBuf)> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    // Room for the suffix within the usual 255-byte limit of a file name.
    let short: String = name.to_string_lossy().chars().take(120).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = format!(".{short}.{}-{n}.tmp", std::process::id());
    let tmp_name = match path.extension() {
        Some(ext) => format!("{prefix}.{}", ext.to_string_lossy()),
        None => prefix.clone(),
    };
    let dir = folder(path);
    let tmp = dir.join(tmp_name);
    Ok((dir, prefix, tmp))
}

fn sync_dir(dir: &Path) {
    // Persists the rename; not every platform can open a folder.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn remove_with_prefix(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes, once per folder and process, the temporary files of processes that are gone.
fn clean_stale_once(dir: &Path) {
    static DONE: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !done.lock().map(|mut d| d.insert(key)).unwrap_or(false) {
        return;
    }
    clean_stale(dir);
}

/// Removes the temporary files in `dir` whose process no longer runs.
pub fn clean_stale(dir: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = temp_owner(&name.to_string_lossy()) else {
            continue;
        };
        if pid != me
            && !proc.join(pid.to_string()).exists()
            && e.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised() {
        assert_eq!(temp_owner(".lfw.bin.123-0.tmp"), Some(123));
        assert_eq!(temp_owner(".lfw.bin.123-4.tmp.bin"), Some(123));
        assert_eq!(
            temp_owner(".last.safetensors.9-2.tmp.safetensors.partial"),
            Some(9)
        );
        assert_eq!(temp_owner("lfw.bin.123-0.tmp"), None);
        assert_eq!(temp_owner(".lfw.bin.12a-0.tmp"), None);
        assert_eq!(temp_owner(".lfw.bin.123-0.tmpx"), None);
        assert_eq!(temp_owner(".123-0.tmp"), None);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write(&path, b"old").unwrap();
        let err = write_with(&path, |tmp| -> io::Result<()> {
            std::fs::write(tmp, b"half")?;
            std::fs::write(tmp.with_extension("json.partial"), b"x")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // No process has pid 2^31 - 2 (Linux caps pids at 2^22).
        let stale = dir.path().join(".x.bin.2147483646-0.tmp.bin");
        let mine = dir
            .path()
            .join(format!(".x.bin.{}-999.tmp", std::process::id()));
        let other = dir.path().join(".keep.tmp");
        for p in [&stale, &mine, &other] {
            std::fs::write(p, b"").unwrap();
        }
        clean_stale(dir.path());
        assert_eq!(stale.exists(), !Path::new("/proc/self").exists());
        assert!(mine.exists() && other.exists());
    }
}
