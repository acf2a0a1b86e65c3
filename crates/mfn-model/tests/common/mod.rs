//! Where the integration tests find their files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use mfn_hub::Hub;

/// Files committed with the project, laid out as in the assets folder (`golden/...`).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub::from_env().unwrap_or_else(|e| panic!("{e}")))
}

/// A file or folder by its path in the assets layout (`models/mtcnn/onet.pt`,
/// `golden/images/Abel_Pacheco_0001.png`, `lfw/aligned-112x112`).
///
/// A committed fixture is used as it is. Anything else comes through the registry of
/// pinned public sources (the assets folder, the cache, or a download checked against its
/// sha256), or from the assets folder when the registry pins nothing there. A pinned file
/// comes with the pinned files beside it (an MXNet symbol needs its params), and a folder
/// with the pinned files under it. A file that none of these can give fails the test with
/// the hub's message, which names it and says whether it has a public source.
pub fn asset(rel: &str) -> PathBuf {
    static FOUND: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let found = FOUND.get_or_init(Default::default);
    if let Some(p) = found.lock().unwrap().get(rel) {
        return p.clone();
    }
    let p = locate(rel).unwrap_or_else(|e| panic!("{e}"));
    found.lock().unwrap().insert(rel.to_string(), p.clone());
    p
}

fn locate(rel: &str) -> mfn_hub::Result<PathBuf> {
    let fixture = fixtures().join(rel);
    if fixture.exists() {
        return Ok(fixture);
    }
    let hub = hub();
    if hub.registry.under_assets(rel).next().is_some() {
        return hub.asset_dir(rel);
    }
    match (hub.registry.by_assets(rel), rel.rsplit_once('/')) {
        (Some(_), Some((dir, name))) if hub.registry.under_assets(dir).count() > 1 => {
            Ok(hub.asset_dir(dir)?.join(name))
        }
        _ => hub.asset(rel),
    }
}
