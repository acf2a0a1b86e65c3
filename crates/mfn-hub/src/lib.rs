#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
#[cfg(feature = "loopback")]
pub mod loopback;
pub mod pretrained;
pub mod registry;
pub mod resolve;

pub use error::{Error, Mismatch, Result};
pub use pretrained::{
    find_threshold, threshold_for_file, Pretrained, ThresholdOrigin, VerificationThreshold,
};
pub use registry::{
    Entry, Equivalent, HubFile, Kind, ModelInfo, Pack, Registry, RepoType, Source, Threshold,
    UrlFile,
};
pub use resolve::{sha256_file, Origin, Resolved, Resolver};

/// The model `mfn-cli` and the pipeline use when none is named: insightface's `w600k_mbf`.
pub const DEFAULT_MODEL: &str = "w600k_mbf";

/// The detector and model pack the pipeline uses when none is named: SCRFD-500M and
/// `w600k_mbf`, as insightface's `buffalo_s`.
pub const DEFAULT_PACK: &str = "buffalo_s";

/// The verification sets of insightface's benchmark table, in its order.
pub const SETS: &[&str] = &["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff"];

/// A registry and a resolver together: what most callers want.
#[derive(Clone, Debug)]
pub struct Hub {
    /// The pinned sources.
    pub registry: Registry,
    /// Where files are found.
    pub resolver: Resolver,
}

impl Hub {
    /// The built-in registry (plus `MFN_REGISTRY`) and the resolver the environment sets.
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            registry: Registry::from_env()?,
            resolver: Resolver::from_env()?,
        })
    }

    /// The pinned file called `name`, found or downloaded, and checked.
    pub fn file(&self, name: &str) -> Result<Resolved> {
        self.resolver.resolve(self.registry.get(name)?)
    }

    /// The verification set called `name` (`lfw`, `agedb_30`, ...).
    pub fn set(&self, name: &str) -> Result<Resolved> {
        self.resolver
            .resolve(self.registry.get_kind(name, Kind::Set)?)
    }

    /// A file by its path in the assets layout (`models/w600k-mbf/w600k_mbf.onnx`): through
    /// the registry entry that pins that path, when there is one (assets folder, cache or
    /// download, checked), else from the assets folder. A file that neither can give is an
    /// error that names it.
    pub fn asset(&self, rel: &str) -> Result<std::path::PathBuf> {
        if let Some(e) = self.registry.by_assets(rel) {
            return Ok(self.resolver.resolve(e)?.path);
        }
        self.unpinned(rel)
    }

    /// A folder by its path in the assets layout (`models/mtcnn`): the one folder that the
    /// registry entries under it resolve to, when there are any, else the assets folder's.
    pub fn asset_dir(&self, rel: &str) -> Result<std::path::PathBuf> {
        let rel = rel.trim_end_matches('/');
        let mut roots = Vec::new();
        for e in self.registry.under_assets(rel) {
            let p = self.resolver.resolve(e)?.path;
            // The folder that plays `rel`: the file's path without its part below `rel`.
            let below = e.assets.as_deref().unwrap_or_default()[rel.len() + 1..]
                .split('/')
                .count();
            let mut root = p.clone();
            for _ in 0..below {
                root.pop();
            }
            if !p.ends_with(&e.assets.as_deref().unwrap_or_default()[rel.len() + 1..]) {
                return Err(Error::Setting(format!(
                    "`{}` resolved to {}, which does not keep its place under `{rel}`",
                    e.name,
                    p.display()
                )));
            }
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        match roots.len() {
            0 => self.unpinned(rel),
            1 => Ok(roots.remove(0)),
            _ => Err(Error::Setting(format!(
                "the files under `{rel}` came from {} different folders: {roots:?}",
                roots.len()
            ))),
        }
    }

    /// A file or folder by its path in the assets layout, as a program or test that knows
    /// that layout asks for it: `fixtures/<rel>` first when `fixtures` is given (files
    /// committed with a project), then [`Hub::asset_dir`] for a folder the registry pins
    /// files under, then the pinned file together with the pinned files beside it (an
    /// MXNet symbol needs its `.params`), then [`Hub::asset`].
    pub fn locate(
        &self,
        rel: &str,
        fixtures: Option<&std::path::Path>,
    ) -> Result<std::path::PathBuf> {
        if let Some(f) = fixtures.map(|f| f.join(rel)).filter(|f| f.exists()) {
            return Ok(f);
        }
        if self.registry.under_assets(rel).next().is_some() {
            return self.asset_dir(rel);
        }
        match (self.registry.by_assets(rel), rel.rsplit_once('/')) {
            (Some(_), Some((dir, name))) if self.registry.under_assets(dir).count() > 1 => {
                Ok(self.asset_dir(dir)?.join(name))
            }
            _ => self.asset(rel),
        }
    }

    fn unpinned(&self, rel: &str) -> Result<std::path::PathBuf> {
        match &self.resolver.assets {
            Some(root) if root.join(rel).exists() => Ok(root.join(rel)),
            Some(root) => Err(Error::Setting(format!(
                "{} does not exist, and `{rel}` has no public source in the registry",
                root.join(rel).display()
            ))),
            None => Err(Error::Setting(format!(
                "`{rel}` has no public source in the registry and there is no assets folder ({}): \
                 set {} to a folder that holds it",
                self.resolver.assets_note.as_deref().unwrap_or("none given"),
                resolve::ASSETS_ENV
            ))),
        }
    }

    /// The first of `names` that is at hand without a download (assets folder or cache),
    /// else the first, downloaded: for entries that hold the same network in different
    /// files (a pack's detector exports).
    pub fn first_at_hand(&self, names: &[String]) -> Result<Resolved> {
        let Some(first) = names.first() else {
            return Err(Error::Setting("no entry names given".into()));
        };
        for name in names {
            let entry = self.registry.get(name)?;
            if self.resolver.at_hand(entry) {
                return self.resolver.resolve(entry);
            }
        }
        self.file(first)
    }

    /// The model called `name`, converted to the native format on first use.
    pub fn model(&self, name: &str) -> Result<Pretrained> {
        pretrained::load(&self.registry, &self.resolver, name)
    }
}
