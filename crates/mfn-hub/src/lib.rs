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
    Entry, Equivalent, HubFile, Kind, ModelInfo, Registry, RepoType, Source, Threshold, UrlFile,
};
pub use resolve::{sha256_file, Origin, Resolved, Resolver};

/// The model `mfn-cli` and the pipeline use when none is named: insightface's `w600k_mbf`.
pub const DEFAULT_MODEL: &str = "w600k_mbf";

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

    /// The model called `name`, converted to the native format on first use.
    pub fn model(&self, name: &str) -> Result<Pretrained> {
        pretrained::load(&self.registry, &self.resolver, name)
    }
}
