//! Where a gallery keeps its faces: the [`Store`] trait, and [`Location`], which picks the
//! backend from what the user wrote (`faces.db`, `sqlite:faces.db`, `postgres://...`), and
//! [`ServerSearch`], how a store that searches on its server does it.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Error, Fingerprint, Hit, IndexKind, Result};

/// The newest store format this build writes and reads: 2 for a gallery whose embeddings
/// are stored in f16 or int8 ([`crate::Storage`]), 1 for f32 (which every build reads).
pub const FORMAT_VERSION: u32 = 2;

/// The format version a gallery storing its embeddings as `storage` is written with: the
/// oldest that can read it, so that builds without [`crate::Storage`] still open f32
/// galleries and refuse the others as newer.
pub fn format_version_for(storage: crate::Storage) -> u32 {
    match storage {
        crate::Storage::F32 => 1,
        _ => 2,
    }
}

/// The largest embedding dimension a gallery accepts (the presets give 128 and 512).
pub const MAX_DIM: usize = 8192;

/// The longest label, in bytes of UTF-8.
pub const MAX_LABEL_BYTES: usize = 1024;

/// The longest source description (a photo's path), in bytes of UTF-8.
pub const MAX_SOURCE_BYTES: usize = 4096;

/// What a gallery's faces come from and how they are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The store format version.
    pub format_version: u32,
    /// The model that embedded every face.
    pub fingerprint: Fingerprint,
    /// The embedding dimension.
    pub dim: usize,
    /// When the gallery was created, unix seconds.
    pub created: i64,
    /// How its embeddings are stored.
    pub storage: crate::Storage,
}

/// One face to enroll: who it is, its embedding, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Enrollment {
    /// Who the face is (non-empty, at most [`MAX_LABEL_BYTES`]).
    pub label: String,
    /// Its embedding, of the gallery's dimension, finite and not zero; stored unit length.
    pub embedding: Vec<f32>,
    /// Where it came from (a photo's path), if anything (at most [`MAX_SOURCE_BYTES`]).
    pub source: Option<String>,
}

/// A stored face, without its embedding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Face {
    /// Its id, unique in the gallery and never reused.
    pub id: i64,
    /// Who it is.
    pub label: String,
    /// Where it came from.
    pub source: Option<String>,
    /// When it was enrolled, unix seconds.
    pub time: i64,
}

/// How a store that searches on its server ([`Store::search`]) does it; stores searched
/// in memory ignore it. A gallery derives it from its [`IndexKind`]
/// ([`crate::Gallery::set_index_kind`]), or takes it as it is
/// ([`crate::Gallery::set_server_search`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerSearch {
    /// The server's approximate index (pgvector's HNSW), exploring at least `ef_search`
    /// candidates (raised to `k`; pgvector caps it at 1000, and deeper searches are exact).
    Hnsw {
        /// The search beam: higher is slower and recalls more.
        ef_search: u32,
    },
    /// Every face scored (a sequential scan): the true top-k.
    Exact,
}

/// [`IndexKind::Exact`] is an exact scan on the server; [`IndexKind::Hnsw`] the server's
/// HNSW index with the same `ef_search` (the server's graph has its own `m` and
/// `ef_construction`, set when the gallery was created).
impl From<IndexKind> for ServerSearch {
    fn from(kind: IndexKind) -> Self {
        match kind {
            IndexKind::Exact => Self::Exact,
            IndexKind::Hnsw { ef_search, .. } => Self::Hnsw {
                ef_search: u32::try_from(ef_search).unwrap_or(u32::MAX),
            },
        }
    }
}

/// Persistence for a gallery: faces with their unit-length embeddings and the gallery's
/// [`Meta`].
///
/// Implemented by [`crate::SqliteStore`] (one file, the embedded default) and, with the
/// `postgres` feature, `PgStore` (PostgreSQL with pgvector, for a gallery many machines
/// share). A store that can search on its own (a database server with a vector index)
/// answers [`Store::search`]; the gallery then asks it rather than loading every
/// embedding into an in-memory [`crate::Index`].
pub trait Store: Send {
    /// The backend's name (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Where it is, for messages: a file's path, a URL without its password.
    fn location(&self) -> String;

    /// The file it lives in, when it is one.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// What its faces come from.
    fn meta(&self) -> &Meta;

    /// Stores `faces` (embeddings unit length, as [`crate::Gallery::enroll`] makes them)
    /// enrolled at `time`, all or none: one transaction. Returns their ids, in order.
    fn insert(&mut self, faces: &[Enrollment], time: i64) -> Result<Vec<i64>>;

    /// Removes every face with this label; returns their ids.
    fn remove_label(&mut self, label: &str) -> Result<Vec<i64>>;

    /// Removes the faces with these ids, all or none; returns the ids that were there.
    fn remove_ids(&mut self, ids: &[i64]) -> Result<Vec<i64>>;

    /// How many faces it holds.
    fn count(&self) -> Result<u64>;

    /// Every face, by id, without embeddings.
    fn faces(&self) -> Result<Vec<Face>>;

    /// Labels with their face counts, by label.
    fn labels(&self) -> Result<Vec<(String, u64)>>;

    /// Calls `visit` with every face and its embedding, by id, from one consistent
    /// snapshot. Each embedding is checked: [`Meta::dim`] values, all finite.
    fn scan(&self, visit: &mut dyn FnMut(Face, &[f32]) -> Result<()>) -> Result<()>;

    /// The `k` faces with the highest cosine with the unit-length `query`, best first
    /// (ties: lower id first), searched by the store itself as `how` says; `None` when the
    /// store does not search (the default), and the gallery searches its in-memory index.
    /// A store that searches answers `k = 0` with `Some` of nothing, without asking its
    /// server: that is how the gallery tells the two kinds apart.
    fn search(&self, query: &[f32], k: usize, how: ServerSearch) -> Result<Option<Vec<Hit>>> {
        let _ = (query, k, how);
        Ok(None)
    }
}

/// Where a gallery lives, parsed from what a user wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file: a plain path, or `sqlite:PATH` / `sqlite://PATH`.
    Sqlite(PathBuf),
    /// A PostgreSQL database with pgvector: `postgres://...` or `postgresql://...`, opened
    /// by `PgStore`; in a build without the `postgres` feature, opening one is
    /// [`Error::BackendNotBuilt`].
    Postgres(String),
}

impl Location {
    /// Parses a location: a URL with a known scheme, else a path to a SQLite file.
    pub fn parse(text: &str) -> Self {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Self::Postgres(text.to_string());
        }
        if let Some(rest) = text.strip_prefix("sqlite://") {
            return Self::Sqlite(PathBuf::from(rest));
        }
        if let Some(rest) = text.strip_prefix("sqlite:") {
            return Self::Sqlite(PathBuf::from(rest));
        }
        Self::Sqlite(PathBuf::from(text))
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// The error for a backend this build does not have.
    #[cfg_attr(feature = "postgres", allow(dead_code))]
    pub(crate) fn not_built(&self) -> Error {
        Error::BackendNotBuilt {
            location: redact(&self.to_string()),
            backend: "PostgreSQL (pgvector)",
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "{}", p.display()),
            Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl From<&str> for Location {
    fn from(s: &str) -> Self {
        Self::parse(s)
    }
}

impl From<String> for Location {
    fn from(s: String) -> Self {
        Self::parse(&s)
    }
}

impl From<&String> for Location {
    fn from(s: &String) -> Self {
        Self::parse(s)
    }
}

/// A path is always a SQLite file, whatever it looks like.
impl From<&Path> for Location {
    fn from(p: &Path) -> Self {
        Self::Sqlite(p.to_path_buf())
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Self {
        Self::Sqlite(p)
    }
}

impl From<&PathBuf> for Location {
    fn from(p: &PathBuf) -> Self {
        Self::Sqlite(p.clone())
    }
}

/// A URL with its password replaced by `***`: the one after the user name, and a
/// `password=` query parameter.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let mut out = match rest.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}")
        }
        _ => format!("{scheme}://{rest}"),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Checks one enrollment against the gallery's dimension and limits; `i` is its position
/// in the batch.
pub(crate) fn check_enrollment(i: usize, e: &Enrollment, dim: usize) -> Result<()> {
    let what = || format!("enrollment {i} (label `{}`)", e.label.escape_debug());
    if e.label.trim().is_empty() {
        return Err(Error::Invalid(format!(
            "enrollment {i}: the label is empty"
        )));
    }
    if e.label.len() > MAX_LABEL_BYTES || e.label.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{}: a label is at most {MAX_LABEL_BYTES} bytes, without control characters",
            what()
        )));
    }
    if e.source
        .as_ref()
        .is_some_and(|s| s.len() > MAX_SOURCE_BYTES)
    {
        return Err(Error::Invalid(format!(
            "{}: the source is longer than {MAX_SOURCE_BYTES} bytes",
            what()
        )));
    }
    if e.embedding.len() != dim {
        return Err(Error::Invalid(format!(
            "{}: the embedding has {} values; the gallery's have {dim}",
            what(),
            e.embedding.len()
        )));
    }
    if let Some(j) = e.embedding.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "{}: value {j} of the embedding is {}: embeddings must be finite",
            what(),
            e.embedding[j]
        )));
    }
    Ok(())
}

/// Whether a fingerprint and dimension match the gallery's; the error names the file and
/// both fingerprints.
pub(crate) fn check_model(store: &dyn Store, fingerprint: &Fingerprint, dim: usize) -> Result<()> {
    let meta = store.meta();
    if meta.fingerprint != *fingerprint {
        return Err(Error::ModelMismatch {
            path: PathBuf::from(store.location()),
            gallery: meta.fingerprint.short(),
            model: fingerprint.short(),
        });
    }
    if meta.dim != dim {
        return Err(Error::Corrupt {
            path: PathBuf::from(store.location()),
            row: None,
            message: format!(
                "the gallery says its embeddings have {} values, but its model's have {dim}",
                meta.dim
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(Location::parse("a/b.db"), Location::Sqlite("a/b.db".into()));
        assert_eq!(
            Location::parse("sqlite:x.db"),
            Location::Sqlite("x.db".into())
        );
        assert_eq!(
            Location::parse("sqlite:///tmp/x.db"),
            Location::Sqlite("/tmp/x.db".into())
        );
        let pg = Location::parse("postgres://me:secret@host/db");
        assert_eq!(pg.backend(), "postgres");
        assert_eq!(pg.to_string(), "postgres://me:***@host/db");
        assert!(!pg.not_built().to_string().contains("secret"));
        assert_eq!(
            redact("postgresql://me:p@ss@host:5433/db?password=x&sslmode=disable"),
            "postgresql://me:***@host:5433/db?password=***&sslmode=disable"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
    }
}
