//! The registry: every model, detector and data set MFN uses, each with one pinned public
//! source, its size and its sha256.
//!
//! The built-in registry is `registry.json` beside this crate's manifest, compiled in.
//! `MFN_REGISTRY` may name a file of the same format whose entries are added to it, or
//! replace built-in entries of the same name (a company's own models, or test pins).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The built-in registry's text: models, detectors, sets and protocol files.
pub const BUILTIN: &str = include_str!("../registry.json");

/// The built-in sample photos: 100 unaligned LFW photos of 10 people.
pub const SAMPLES: &str = include_str!("../samples.json");

/// The environment variable naming an extra registry file.
pub const REGISTRY_ENV: &str = "MFN_REGISTRY";

/// The format tag a registry file must carry.
pub const FORMAT: &str = "mfn-registry/1";

/// Largest file a registry entry may pin (16 GiB): a bound on what a download may write.
pub const MAX_SIZE: u64 = 16 << 30;

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A face recognition model (ONNX, MXNet, PyTorch or native weights).
    Model,
    /// A face detector's weights.
    Detector,
    /// A verification set in insightface's `.bin` format.
    Set,
    /// Any other file: a pair protocol, a companion weights file, test data.
    File,
}

impl Kind {
    /// The kind's name as the registry spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Detector => "detector",
            Kind::Set => "set",
            Kind::File => "file",
        }
    }
}

/// The kind of a Hugging Face repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepoType {
    /// A model repository: `{endpoint}/{repo}/resolve/...`.
    #[default]
    Model,
    /// A data set repository: `{endpoint}/datasets/{repo}/resolve/...`.
    Dataset,
}

/// A file in a Hugging Face repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    /// `org/name`.
    pub repo: String,
    /// Model or data set repository.
    #[serde(default, rename = "type")]
    pub repo_type: RepoType,
    /// A commit hash, or a branch or tag (the entry's sha256 pins the content either way).
    pub revision: String,
    /// The file's path inside the repository.
    pub path: String,
}

/// A file at a plain HTTPS URL, or a member of a zip archive (a Python wheel) at one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlFile {
    /// The `https://` URL of the file or of the archive.
    pub url: String,
    /// The member's path inside the archive, when the URL serves a zip archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// With `member`: the archive's sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_sha256: Option<String>,
    /// With `member`: the archive's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_size: Option<u64>,
}

/// Where a pinned file comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// The Hugging Face Hub.
    Hub(HubFile),
    /// A public URL.
    Url(UrlFile),
}

/// A verification threshold that comes with a model, and how it was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// The cosine at or above which two faces are the same person.
    pub cosine: f64,
    /// How it was measured, with the command that reproduces it.
    pub derivation: String,
    /// How many pairs it was measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<u64>,
}

/// What a model entry needs beyond its file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// The config preset the graph must match (`None`: every preset is tried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Other entries that must sit beside this file (an MXNet symbol's `.params`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub companions: Vec<String>,
    /// The verification threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Threshold>,
    /// Other files that hold the same weights (a conversion to another format that gives
    /// the same outputs), so that their threshold is found too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub equivalents: Vec<Equivalent>,
}

/// A file that holds the same weights as a model entry, in another format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Equivalent {
    /// Its sha256, lower-case hex.
    pub sha256: String,
    /// What it is and how it was checked to be the same.
    pub about: String,
}

/// One pinned file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The name users and code ask for (`w600k_mbf`, `lfw`, `agedb_30`, ...).
    pub name: String,
    /// What it holds.
    pub kind: Kind,
    /// Where it comes from.
    pub source: Source,
    /// sha256 of the file (of the member, for an archive member), lower-case hex.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
    /// Its path under an assets folder (`MFN_ASSETS`), when one may hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assets: Option<String>,
    /// The file's licence, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// What it is, for people reading the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// For models: the preset, companions and threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
}

impl Entry {
    /// The URL the file is downloaded from, at the given Hub endpoint.
    pub fn url(&self, endpoint: &str) -> String {
        match &self.source {
            Source::Hub(h) => hub_url(endpoint, h),
            Source::Url(u) => u.url.clone(),
        }
    }

    /// The file name the entry's file has (the last part of its path or URL).
    pub fn file_name(&self) -> &str {
        let path = match &self.source {
            Source::Hub(h) => h.path.as_str(),
            Source::Url(u) => u.member.as_deref().unwrap_or(u.url.as_str()),
        };
        path.rsplit('/').next().unwrap_or(path)
    }

    /// The threshold the registry gives this model, if any.
    pub fn threshold(&self) -> Option<&Threshold> {
        self.model.as_ref()?.threshold.as_ref()
    }
}

/// `{endpoint}/[datasets/]{repo}/resolve/{revision}/{path}`, as the Hub serves files.
pub(crate) fn hub_url(endpoint: &str, h: &HubFile) -> String {
    let prefix = match h.repo_type {
        RepoType::Model => "",
        RepoType::Dataset => "datasets/",
    };
    format!(
        "{}/{prefix}{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        h.repo,
        h.revision.replace('/', "%2F"),
        h.path
    )
}

/// A detector and a recognition model that are used together, as insightface's model
/// packs (`buffalo_s`) ship them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    /// The name users and code ask for (`buffalo_s`).
    pub name: String,
    /// What it is, for people reading the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// The detector's network (`scrfd`, `mtcnn`, `retinaface`).
    pub detector_network: String,
    /// Detector entries that hold the same network, in order of preference: the first
    /// one found without a download (assets folder or cache) is used, else the first is
    /// downloaded.
    pub detector: Vec<String>,
    /// The recognition model's entry.
    pub model: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    #[serde(default, rename = "about")]
    _about: Option<serde_json::Value>,
    entries: Vec<Entry>,
    #[serde(default)]
    packs: Vec<Pack>,
}

/// A set of pinned files, by name, and the packs made of them.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    packs: BTreeMap<String, Pack>,
}

impl Registry {
    /// The registry compiled into this crate (the sample photos included).
    pub fn builtin() -> Result<Self> {
        let mut reg = Self::parse(BUILTIN, "built-in")?;
        let samples = Self::parse(SAMPLES, "built-in samples")?;
        if let Some(dup) = samples.names().find(|n| reg.entries.contains_key(*n)) {
            return Err(Error::Registry {
                origin: "built-in samples".into(),
                message: format!("the name `{dup}` is also in the registry"),
            });
        }
        reg.extend(samples);
        Ok(reg)
    }

    /// The built-in registry, with the entries of the file `MFN_REGISTRY` names added (an
    /// entry of an existing name replaces it).
    pub fn from_env() -> Result<Self> {
        let mut reg = Self::builtin()?;
        if let Some(path) = std::env::var_os(REGISTRY_ENV).filter(|v| !v.is_empty()) {
            reg.extend(Self::load(Path::new(&path))?);
        }
        Ok(reg)
    }

    /// A registry file.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(crate::error::io(path))?;
        // A registry is a few kilobytes; anything far larger is not one.
        if meta.len() > 4 << 20 {
            return Err(Error::Registry {
                origin: path.display().to_string(),
                message: format!("{} bytes is too large for a registry", meta.len()),
            });
        }
        let text = std::fs::read_to_string(path).map_err(crate::error::io(path))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// A registry from its JSON text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let bad = |message: String| Error::Registry {
            origin: origin.to_string(),
            message,
        };
        let file: File =
            serde_json::from_str(text).map_err(|e| bad(format!("line {}: {e}", e.line())))?;
        if file.format != FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{FORMAT}`",
                file.format
            )));
        }
        let mut entries = BTreeMap::new();
        for e in file.entries {
            validate(&e).map_err(|m| bad(format!("entry `{}`: {m}", e.name)))?;
            let name = e.name.clone();
            if entries.insert(name.clone(), e).is_some() {
                return Err(bad(format!("the name `{name}` appears twice")));
            }
        }
        let mut packs = BTreeMap::new();
        for p in file.packs {
            if !safe_name(&p.name) {
                return Err(bad(format!(
                    "pack `{}`: the name may only hold letters, digits, `-`, `_` and `.`",
                    p.name
                )));
            }
            if p.detector.is_empty() {
                return Err(bad(format!("pack `{}` names no detector", p.name)));
            }
            let name = p.name.clone();
            if packs.insert(name.clone(), p).is_some() {
                return Err(bad(format!("the pack `{name}` appears twice")));
            }
        }
        let reg = Self { entries, packs };
        reg.check_packs().map_err(bad)?;
        for e in reg.entries.values() {
            for c in e.model.iter().flat_map(|m| &m.companions) {
                if !reg.entries.contains_key(c) {
                    return Err(bad(format!(
                        "entry `{}`: companion `{c}` is not in the registry",
                        e.name
                    )));
                }
            }
        }
        Ok(reg)
    }

    /// Adds `other`'s entries and packs, replacing those of the same name.
    pub fn extend(&mut self, other: Registry) {
        self.entries.extend(other.entries);
        self.packs.extend(other.packs);
    }

    /// Every pack's entries exist and are of the right kind.
    fn check_packs(&self) -> std::result::Result<(), String> {
        for p in self.packs.values() {
            let kinds = p
                .detector
                .iter()
                .map(|d| (d, Kind::Detector))
                .chain([(&p.model, Kind::Model)]);
            for (name, kind) in kinds {
                match self.entries.get(name) {
                    Some(e) if e.kind == kind => {}
                    Some(e) => {
                        return Err(format!(
                            "pack `{}`: `{name}` is a {} entry, not a {}",
                            p.name,
                            e.kind.as_str(),
                            kind.as_str()
                        ))
                    }
                    // Packs may name entries an overlay file adds later; `pack` checks again.
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// The pack called `name` (`buffalo_s`), whose entries are all in the registry.
    pub fn pack(&self, name: &str) -> Result<&Pack> {
        let p = self.packs.get(name).ok_or_else(|| Error::UnknownName {
            name: name.to_string(),
            known: self.pack_names().collect::<Vec<_>>().join(", "),
        })?;
        for d in &p.detector {
            self.get_kind(d, Kind::Detector)?;
        }
        self.get_kind(&p.model, Kind::Model)?;
        Ok(p)
    }

    /// Every pack's name, sorted.
    pub fn pack_names(&self) -> impl Iterator<Item = &str> {
        self.packs.keys().map(String::as_str)
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::UnknownName {
            name: name.to_string(),
            known: self.names().collect::<Vec<_>>().join(", "),
        })
    }

    /// The entry called `name`, which must be of `kind`.
    pub fn get_kind(&self, name: &str, kind: Kind) -> Result<&Entry> {
        let e = self.get(name)?;
        if e.kind != kind {
            return Err(Error::Kind {
                name: name.to_string(),
                kind: e.kind.as_str(),
                wanted: kind.as_str(),
            });
        }
        Ok(e)
    }

    /// Every name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Every entry, by name.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entries of one kind.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Entry> {
        self.entries.values().filter(move |e| e.kind == kind)
    }

    /// The entry that an assets folder holds at `rel` (`models/mtcnn/pnet.pt`).
    pub fn by_assets(&self, rel: &str) -> Option<&Entry> {
        self.entries
            .values()
            .find(|e| e.assets.as_deref() == Some(rel))
    }

    /// The entries an assets folder holds under the folder `rel` (`models/mtcnn`).
    pub fn under_assets<'a>(&'a self, rel: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        let prefix = format!("{}/", rel.trim_end_matches('/'));
        self.entries
            .values()
            .filter(move |e| e.assets.as_deref().is_some_and(|a| a.starts_with(&prefix)))
    }

    /// The entry whose pinned file has this sha256 (a model file found on disk, say), or
    /// the model entry that lists it among its equivalents.
    pub fn by_sha256(&self, sha256: &str) -> Option<&Entry> {
        let same = |h: &str| h.eq_ignore_ascii_case(sha256);
        self.entries.values().find(|e| same(&e.sha256)).or_else(|| {
            self.entries.values().find(|e| {
                e.model
                    .as_ref()
                    .is_some_and(|m| m.equivalents.iter().any(|q| same(&q.sha256)))
            })
        })
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A relative path of plain components: nothing that climbs out of the folder it joins.
pub(crate) fn safe_relative(s: &str) -> bool {
    !s.is_empty()
        && !s.contains('\\')
        && s.len() <= 1024
        && Path::new(s)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn validate(e: &Entry) -> std::result::Result<(), String> {
    if !safe_name(&e.name) {
        return Err("the name may only hold letters, digits, `-`, `_` and `.`".into());
    }
    if !is_hex64(&e.sha256) {
        return Err(format!(
            "sha256 `{}` is not 64 lower-case hex digits",
            e.sha256
        ));
    }
    if e.size == 0 || e.size > MAX_SIZE {
        return Err(format!("size {} is not in 1..={MAX_SIZE}", e.size));
    }
    if let Some(a) = &e.assets {
        if !safe_relative(a) {
            return Err(format!("assets path `{a}` is not a relative path"));
        }
    }
    match &e.source {
        Source::Hub(h) => {
            let parts: Vec<&str> = h.repo.split('/').collect();
            if parts.len() != 2 || !parts.iter().all(|p| safe_name(p)) {
                return Err(format!("repo `{}` is not `org/name`", h.repo));
            }
            if !safe_relative(&h.path) {
                return Err(format!(
                    "path `{}` is not a relative path inside the repository",
                    h.path
                ));
            }
            let rev_ok = !h.revision.is_empty()
                && h.revision.len() <= 256
                && h.revision.split('/').all(safe_name);
            if !rev_ok {
                return Err(format!(
                    "revision `{}` is not a commit, branch or tag",
                    h.revision
                ));
            }
        }
        Source::Url(u) => {
            let rest = u
                .url
                .strip_prefix("https://")
                .ok_or_else(|| format!("url `{}` is not https://", u.url))?;
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if !safe_name(host) || !safe_relative(path) {
                return Err(format!("url `{}` has an unusable host or path", u.url));
            }
            match (&u.member, &u.archive_sha256, u.archive_size) {
                (None, None, None) => {}
                (Some(m), Some(h), Some(s)) => {
                    if !safe_relative(m) {
                        return Err(format!("member `{m}` is not a relative path"));
                    }
                    if !is_hex64(h) {
                        return Err(format!("archive_sha256 `{h}` is not 64 hex digits"));
                    }
                    if s == 0 || s > MAX_SIZE {
                        return Err(format!("archive_size {s} is not in 1..={MAX_SIZE}"));
                    }
                }
                _ => return Err("`member`, `archive_sha256` and `archive_size` go together".into()),
            }
        }
    }
    if let Some(m) = &e.model {
        if !matches!(e.kind, Kind::Model | Kind::File) {
            return Err("only models carry `model`".into());
        }
        if let Some(p) = &m.preset {
            if mfn_model::Config::preset(p).is_none() {
                return Err(format!(
                    "unknown preset `{p}`; known: {}",
                    mfn_model::Config::PRESETS.join(", ")
                ));
            }
        }
        if let Some(q) = m.equivalents.iter().find(|q| !is_hex64(&q.sha256)) {
            return Err(format!(
                "equivalent sha256 `{}` is not 64 hex digits",
                q.sha256
            ));
        }
        if let Some(t) = &m.threshold {
            if !t.cosine.is_finite() || !(-1.0..=1.0).contains(&t.cosine) {
                return Err(format!("threshold {} is not a cosine in -1..=1", t.cosine));
            }
        }
    }
    Ok(())
}

/// Where a cached URL file lives under `root`: `urls/{host}/{path}`, so that files from
/// one folder of a server sit in one folder here too (an MXNet symbol beside its
/// `.params`).
pub(crate) fn url_cache_path(root: &Path, url: &str) -> PathBuf {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let mut p = root.join("urls");
    for part in rest.split('/').filter(|s| !s.is_empty()) {
        p.push(part);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_parses_and_pins_every_entry() {
        let r = Registry::builtin().unwrap();
        for name in [
            "w600k_mbf",
            "scrfd_500m",
            "lfw",
            "agedb_30",
            "cfp_fp",
            "calfw",
            "cplfw",
            "cfp_ff",
        ] {
            let e = r.get(name).unwrap();
            assert!(is_hex64(&e.sha256), "{name}");
        }
        let m = r.get_kind("w600k_mbf", Kind::Model).unwrap();
        assert!(m.threshold().is_some());
        assert_eq!(
            m.url("https://huggingface.co/"),
            "https://huggingface.co/immich-app/buffalo_s/resolve/main/recognition/model.onnx"
        );
        let lfw = r.get_kind("lfw", Kind::Set).unwrap();
        assert!(lfw
            .url("https://huggingface.co")
            .starts_with("https://huggingface.co/datasets/Icar/val_sets/resolve/1f7800d9"));
        assert!(r.get_kind("lfw", Kind::Model).is_err());
        assert_eq!(
            r.by_sha256(&m.sha256.to_uppercase())
                .map(|e| e.name.as_str()),
            Some("w600k_mbf")
        );
    }

    fn one(entry: &str) -> Result<Registry> {
        Registry::parse(
            &format!(r#"{{"format": "mfn-registry/1", "entries": [{entry}]}}"#),
            "test",
        )
    }

    #[test]
    fn rejects_unsafe_or_unpinned_entries() {
        let sha = "a".repeat(64);
        let ok = format!(
            r#"{{"name": "m", "kind": "file", "sha256": "{sha}", "size": 3,
                "source": {{"hub": {{"repo": "o/r", "revision": "main", "path": "a/b.bin"}}}}}}"#
        );
        assert!(one(&ok).is_ok());
        for (from, to) in [
            ("\"a/b.bin\"", "\"../b.bin\""),
            ("\"a/b.bin\"", "\"/etc/passwd\""),
            ("\"o/r\"", "\"../r\""),
            ("\"main\"", "\"../../x\""),
            ("\"name\": \"m\"", "\"name\": \"a/b\""),
            ("\"size\": 3", "\"size\": 0"),
            ("\"size\": 3", "\"size\": 99999999999999"),
            (sha.as_str(), "abc"),
            ("\"kind\": \"file\"", "\"kind\": \"weights\""),
            ("\"size\": 3", "\"size\": 3, \"extra\": 1"),
        ] {
            let bad = ok.replace(from, to);
            assert!(one(&bad).is_err(), "{bad}");
        }
        let url = |u: &str| {
            format!(
                r#"{{"name": "m", "kind": "file", "sha256": "{sha}", "size": 3,
                    "source": {{"url": {{"url": "{u}"}}}}}}"#
            )
        };
        assert!(one(&url("https://example.org/a/b.pt")).is_ok());
        assert!(one(&url("http://example.org/a/b.pt")).is_err());
        assert!(one(&url("https://example.org/../b.pt")).is_err());
        let twice = format!(r#"{ok}, {ok}"#);
        assert!(one(&twice).is_err());
    }

    #[test]
    fn packs_name_entries_of_the_right_kinds() {
        let r = Registry::builtin().unwrap();
        let p = r.pack("buffalo_s").unwrap();
        assert_eq!(p.detector_network, "scrfd");
        assert_eq!(p.detector, ["scrfd_500m", "scrfd_500m_bnkps"]);
        assert_eq!(p.model, "w600k_mbf");
        let err = r.pack("buffalo_l").unwrap_err().to_string();
        assert!(err.contains("buffalo_s"), "{err}");

        let sha = "a".repeat(64);
        let entry = |name: &str, kind: &str| {
            format!(
                r#"{{"name": "{name}", "kind": "{kind}", "sha256": "{sha}", "size": 3,
                    "source": {{"hub": {{"repo": "o/r", "revision": "main", "path": "{name}"}}}}}}"#
            )
        };
        let file = |pack: &str| {
            format!(
                r#"{{"format": "{FORMAT}", "entries": [{}, {}], "packs": [{pack}]}}"#,
                entry("d", "detector"),
                entry("m", "model")
            )
        };
        let pack = |detector: &str, model: &str| {
            format!(
                r#"{{"name": "p", "detector_network": "scrfd", "detector": {detector}, "model": "{model}"}}"#
            )
        };
        let ok = Registry::parse(&file(&pack(r#"["d"]"#, "m")), "t").unwrap();
        assert_eq!(ok.pack("p").unwrap().model, "m");
        // A model where a detector belongs, and the other way round.
        assert!(Registry::parse(&file(&pack(r#"["m"]"#, "m")), "t").is_err());
        assert!(Registry::parse(&file(&pack(r#"["d"]"#, "d")), "t").is_err());
        assert!(Registry::parse(&file(&pack("[]", "m")), "t").is_err());
        // A name no entry has is refused when the pack is asked for.
        let dangling = Registry::parse(&file(&pack(r#"["x"]"#, "m")), "t").unwrap();
        assert!(dangling.pack("p").is_err());
        let twice = file(&format!("{0}, {0}", pack(r#"["d"]"#, "m")));
        assert!(Registry::parse(&twice, "t").is_err());
    }

    #[test]
    fn url_cache_paths_keep_folders_together() {
        let root = Path::new("/c");
        assert_eq!(
            url_cache_path(root, "https://h.org/a/b/model-symbol.json"),
            Path::new("/c/urls/h.org/a/b/model-symbol.json")
        );
    }
}
