//! Test assets, found through `MFN_ASSETS` (default `../shared/assets` beside the workspace).

#![allow(dead_code)]

use std::path::PathBuf;

/// The assets folder; panics with instructions when it is not there.
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("MFN_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets")
        });
    assert!(
        dir.join("README.md").exists(),
        "test assets not found at {}: set MFN_ASSETS to the assets folder",
        dir.display()
    );
    dir
}

/// A file under the assets folder; panics naming it when it is missing.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets().join(rel);
    assert!(p.exists(), "missing test asset {}", p.display());
    p
}
