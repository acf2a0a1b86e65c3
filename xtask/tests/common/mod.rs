//! What the xtask tests share: the assets folder and running the `xtask` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The assets folder. A test that needs it fails, naming what is missing, rather than
/// passing without having run.
pub fn assets() -> PathBuf {
    let root = std::env::var_os("MFN_ASSETS")
        .map(PathBuf::from)
        .expect("MFN_ASSETS is not set: point it at the shared assets folder");
    assert!(
        root.is_dir(),
        "the assets folder {} does not exist",
        root.display()
    );
    root
}

/// A file under the assets folder, which must exist.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets().join(rel);
    assert!(
        p.exists(),
        "missing asset {} (MFN_ASSETS={})",
        p.display(),
        assets().display()
    );
    p
}

/// The `xtask` binary with no Hub or project settings inherited from the environment, so
/// a developer's own cache or token never leaks into a test.
pub fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    for key in [
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_TOKEN",
        "MFN_HOME",
        "MFN_MIRROR",
        "MFN_REGISTRY",
    ] {
        c.env_remove(key);
    }
    c.env("MFN_ASSETS", assets());
    c
}

/// Runs a command and returns its output, with stdout and stderr as text.
pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("running xtask");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let (out, stdout, stderr) = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// Runs a command that must fail with exit status 1; returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let (out, stdout, stderr) = run(cmd);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{cmd:?} should have failed with status 1:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stderr
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
