//! Where the integration tests find their files.

use std::path::{Path, PathBuf};

/// Files committed with the project, laid out as in the assets folder (`golden/...`).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A file or folder by its path in the assets layout (`models/mtcnn/onet.pt`,
/// `golden/images/Abel_Pacheco_0001.png`, `lfw/aligned-112x112`): a committed fixture,
/// else through the registry of pinned public sources (assets folder, cache, or a checked
/// download), else the assets folder (see `mfn_hub::Hub::locate`). A file none of them
/// has fails the test with a message that names it and says whether it has a public
/// source.
pub fn asset(rel: &str) -> PathBuf {
    mfn_hub::Hub::from_env()
        .and_then(|hub| hub.locate(rel, Some(&fixtures())))
        .unwrap_or_else(|e| panic!("{e}"))
}
