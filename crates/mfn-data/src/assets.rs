//! The assets folder (weights, face sets, reference outputs) named by `MFN_ASSETS`.
//!
//! Inside this workspace, cargo sets `MFN_ASSETS` to `../shared/assets` beside the
//! workspace unless the environment already names a folder.

use std::path::PathBuf;

use crate::{Error, Result};

/// The environment variable that names the assets folder.
pub const ENV: &str = "MFN_ASSETS";

/// The assets folder, if `MFN_ASSETS` is set.
pub fn root() -> Option<PathBuf> {
    std::env::var_os(ENV).map(PathBuf::from)
}

/// A file or folder under the assets folder. It is an error when `MFN_ASSETS` is unset or
/// the path does not exist, so that nothing that needs an asset runs without it.
pub fn path(rel: &str) -> Result<PathBuf> {
    let root = root().ok_or_else(|| Error::Assets {
        message: format!("{ENV} is not set; point it at the assets folder that holds {rel}"),
    })?;
    let p = root.join(rel);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::Assets {
            message: format!("{} does not exist ({ENV}={})", p.display(), root.display()),
        })
    }
}
