//! Pinned models, converted once to the native format with their threshold and source in
//! the metadata, and the verification threshold of any model file the registry knows.

use std::path::{Path, PathBuf};

use candle_core::Device;
use mfn_model::{Checkpoint, Config};

use crate::registry::{Entry, Kind, Registry, Threshold};
use crate::resolve::{sha256_file, Resolved, Resolver};
use crate::{Error, Result};

/// Metadata key of a model's verification threshold (a cosine).
pub const THRESHOLD_KEY: &str = "mfn.threshold";
/// Metadata key of how that threshold was found.
pub const THRESHOLD_SOURCE_KEY: &str = "mfn.threshold.source";
/// Metadata key of the number of pairs the threshold was measured on.
pub const THRESHOLD_PAIRS_KEY: &str = "mfn.threshold.pairs";
/// Writes `entry`'s threshold, its derivation and pair count into the metadata.
fn registry_threshold(ckpt: &mut Checkpoint, entry: &Entry) {
    let Some(t) = entry.threshold() else {
        return;
    };
    let meta = &mut ckpt.metadata;
    meta.insert(THRESHOLD_KEY.into(), format!("{}", t.cosine));
    meta.insert(
        THRESHOLD_SOURCE_KEY.into(),
        format!("registry entry `{}`: {}", entry.name, t.derivation),
    );
    match t.pairs {
        Some(p) => meta.insert(THRESHOLD_PAIRS_KEY.into(), p.to_string()),
        None => meta.remove(THRESHOLD_PAIRS_KEY),
    };
}

/// Metadata key of the sha256 of the file a native model was converted from.
pub const SOURCE_SHA256_KEY: &str = "mfn.source.sha256";

/// A pinned model, ready to build.
#[derive(Debug)]
pub struct Pretrained {
    /// The weights, config and metadata (threshold included).
    pub checkpoint: Checkpoint,
    /// The native file it was loaded from (the converted copy in the cache).
    pub native: PathBuf,
    /// The pinned file it was converted from.
    pub original: Resolved,
}

/// The converted copy of `entry` under the resolver's cache.
pub fn converted_path(resolver: &Resolver, entry: &Entry) -> PathBuf {
    resolver.cache.join("models").join(format!(
        "{}-{}.safetensors",
        entry.name,
        &entry.sha256[..12]
    ))
}

/// Resolves the model called `name` (and the files it needs beside it), converts it to
/// the native format on first use, and loads it. The converted file carries the
/// registry's threshold, its derivation and the source's sha256.
pub fn load(registry: &Registry, resolver: &Resolver, name: &str) -> Result<Pretrained> {
    let entry = registry.get_kind(name, Kind::Model)?;
    let original = resolver.resolve(entry)?;
    for c in entry.model.iter().flat_map(|m| &m.companions) {
        let comp = registry.get(c)?;
        let got = resolver.resolve(comp)?;
        if got.path.parent() != original.path.parent() {
            return Err(Error::Setting(format!(
                "`{c}` ({}) must lie beside `{name}` ({}): keep both in one folder",
                got.path.display(),
                original.path.display()
            )));
        }
    }
    let native = converted_path(resolver, entry);
    let model_err = |path: &Path| {
        let path = path.to_path_buf();
        let name = name.to_string();
        move |source| Error::Model {
            name,
            path,
            source: Box::new(source),
        }
    };
    if native.is_file() {
        let mut ckpt = Checkpoint::load(&native, None, &Device::Cpu).map_err(model_err(&native))?;
        if ckpt.metadata.get(SOURCE_SHA256_KEY) == Some(&entry.sha256) {
            // A threshold the registry gave follows the registry, which may have been
            // measured again since; one the user stored stays.
            let from_registry = ckpt
                .metadata
                .get(THRESHOLD_SOURCE_KEY)
                .is_some_and(|s| s.starts_with(&format!("registry entry `{}`", entry.name)));
            if from_registry {
                registry_threshold(&mut ckpt, entry);
            }
            return Ok(Pretrained {
                checkpoint: ckpt,
                native,
                original,
            });
        }
        tracing::warn!(
            "{} was not converted from the pinned file; converting again",
            native.display()
        );
    }
    let preset = entry
        .model
        .as_ref()
        .and_then(|m| m.preset.as_deref())
        .and_then(Config::preset);
    let mut ckpt = Checkpoint::load(&original.path, preset.as_ref(), &Device::Cpu)
        .map_err(model_err(&original.path))?;
    let meta = &mut ckpt.metadata;
    meta.insert("mfn.name".into(), entry.name.clone());
    meta.insert("mfn.source.url".into(), resolver.url(entry));
    meta.insert(SOURCE_SHA256_KEY.into(), entry.sha256.clone());
    registry_threshold(&mut ckpt, entry);
    let dir = native.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(crate::error::io(dir))?;
    // Several processes may convert the same model at once: each writes its own file and
    // renames it into place, so that a reader sees one whole file or none.
    let own = native.with_extension(format!("{}.safetensors", std::process::id()));
    ckpt.save(&own).map_err(model_err(&own))?;
    std::fs::rename(&own, &native).map_err(|e| {
        let _ = std::fs::remove_file(&own);
        Error::Io {
            path: native.clone(),
            source: e,
        }
    })?;
    ckpt.source = native.clone();
    tracing::info!("converted `{name}` to {}", native.display());
    Ok(Pretrained {
        checkpoint: ckpt,
        native,
        original,
    })
}

/// The registry's threshold for a model file on disk, found by the sha256 of its weights:
/// the file itself, or for an MXNet `*-symbol.json` the `.params` file loaded beside it.
/// Returns the threshold and the entry that pins the weights' model.
pub fn threshold_for_file<'r>(
    registry: &'r Registry,
    path: &Path,
) -> Result<Option<(&'r Threshold, &'r Entry)>> {
    let weights = if path.extension().and_then(|e| e.to_str()) == Some("json") {
        match mfn_model::import::mxnet::params_beside(path) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        }
    } else {
        path.to_path_buf()
    };
    let sha = sha256_file(&weights)?;
    let Some(hit) = registry.by_sha256(&sha) else {
        return Ok(None);
    };
    if let Some(t) = hit.threshold() {
        return Ok(Some((t, hit)));
    }
    // A companion file (an MXNet `.params`) takes the threshold of the model it serves.
    for e in registry.of_kind(Kind::Model) {
        let serves = e
            .model
            .as_ref()
            .is_some_and(|m| m.companions.iter().any(|c| c == &hit.name));
        if let (true, Some(t)) = (serves, e.threshold()) {
            return Ok(Some((t, e)));
        }
    }
    Ok(None)
}

/// Where a verification threshold was found.
#[derive(Clone, Debug, PartialEq)]
pub enum ThresholdOrigin {
    /// The model file's own metadata (`mfn.threshold`).
    Metadata,
    /// The registry entry that pins the model's weights, found by their sha256.
    Registry {
        /// The entry's name.
        entry: String,
    },
}

/// A verification threshold and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct VerificationThreshold {
    /// Two faces are the same person when their cosine is at least this.
    pub cosine: f64,
    /// How it was measured, in words.
    pub derivation: String,
    /// Where it was found.
    pub origin: ThresholdOrigin,
}

/// The threshold of a loaded model: its metadata first, then the registry entry whose
/// pinned file (or an equivalent of it) has the sha256 of the model's weights file.
/// `None` when neither knows one; an unreadable stored threshold is an error naming the
/// file.
pub fn find_threshold(
    registry: &Registry,
    checkpoint: &Checkpoint,
) -> Result<Option<VerificationThreshold>> {
    if let Some(text) = checkpoint.metadata.get(THRESHOLD_KEY) {
        let cosine: f64 = text.trim().parse().map_err(|_| {
            Error::Setting(format!(
                "{}: metadata {THRESHOLD_KEY} `{}` is not a number",
                checkpoint.source.display(),
                text.escape_debug()
            ))
        })?;
        if !cosine.is_finite() || !(-1.0..=1.0).contains(&cosine) {
            return Err(Error::Setting(format!(
                "{}: metadata {THRESHOLD_KEY} {cosine} is not a cosine in -1..=1",
                checkpoint.source.display()
            )));
        }
        let derivation = checkpoint
            .metadata
            .get(THRESHOLD_SOURCE_KEY)
            .cloned()
            .unwrap_or_else(|| "stored without a derivation".into());
        return Ok(Some(VerificationThreshold {
            cosine,
            derivation,
            origin: ThresholdOrigin::Metadata,
        }));
    }
    Ok(
        threshold_for_file(registry, &checkpoint.source)?.map(|(t, e)| VerificationThreshold {
            cosine: t.cosine,
            derivation: t.derivation.clone(),
            origin: ThresholdOrigin::Registry {
                entry: e.name.clone(),
            },
        }),
    )
}
