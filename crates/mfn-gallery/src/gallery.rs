//! [`Gallery`]: a store of labelled faces and an index to search them.

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use mfn_detect::Pipeline;

use crate::index::{Index, IndexKind};
use crate::sqlite::{now, SqliteStore};
use crate::store::{check_model, Enrollment, Face, Location, ServerSearch, Store};
use crate::{Error, Fingerprint, Result, Storage};

/// The default memory limit of a gallery's search index: 16 GiB, about 8 million
/// 512-d faces.
pub const DEFAULT_MEMORY_LIMIT: u64 = 16 << 30;

/// A face found by a search: its id, who it is, and its cosine with the query.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Hit {
    /// The face's id in the gallery.
    pub id: i64,
    /// Who it is.
    pub label: String,
    /// Cosine similarity with the query, in `-1..=1`.
    pub score: f32,
}

/// The answer of open-set identification: someone enrolled, or nobody.
#[derive(Clone, Debug, PartialEq)]
pub enum Identity {
    /// The best match clears the threshold.
    Known(Hit),
    /// No face clears the threshold; `best` is the closest one (none in an empty gallery).
    Unknown {
        /// The closest face, below the threshold.
        best: Option<Hit>,
    },
}

impl Identity {
    /// The label when known.
    pub fn label(&self) -> Option<&str> {
        match self {
            Self::Known(hit) => Some(&hit.label),
            Self::Unknown { .. } => None,
        }
    }

    /// The best match, known or not.
    pub fn best(&self) -> Option<&Hit> {
        match self {
            Self::Known(hit) => Some(hit),
            Self::Unknown { best } => best.as_ref(),
        }
    }
}

/// What a gallery holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Stats {
    /// The backend (`sqlite`).
    pub backend: &'static str,
    /// Where it is.
    pub location: String,
    /// The store format version.
    pub format_version: u32,
    /// The model's fingerprint, 64 hex digits.
    pub fingerprint: String,
    /// The embedding dimension.
    pub dim: usize,
    /// How the embeddings are stored.
    pub storage: Storage,
    /// Faces enrolled.
    pub faces: u64,
    /// Distinct labels.
    pub labels: u64,
    /// The most faces under one label.
    pub max_faces_per_label: u64,
    /// When the gallery was created, unix seconds.
    pub created: i64,
    /// The file's size in bytes, for a file backend (without its WAL).
    pub file_bytes: Option<u64>,
}

/// The index and the labels of its ids, read from the store on first search.
struct Loaded {
    index: Box<dyn Index>,
    labels: HashMap<i64, String>,
}

/// Labelled faces, stored, and searched by cosine.
///
/// Persistence goes through a [`Store`] ([`SqliteStore`] for a file path, `PgStore` for a
/// `postgres://` URL). Search goes to the store when it searches on its own (PostgreSQL:
/// an exact scan or pgvector's HNSW index, as the [`IndexKind`] or
/// [`Gallery::set_server_search`] says), else
/// through an in-memory [`Index`] ([`crate::ExactIndex`] by default), built from the
/// store on the first search and kept in step with enrollments and removals afterwards.
/// Embeddings are stored unit length. A gallery belongs to the model that embedded its
/// faces: opening it for another model's [`Fingerprint`] is refused.
pub struct Gallery {
    store: Box<dyn Store>,
    index_kind: IndexKind,
    server_search: ServerSearch,
    memory_limit: u64,
    loaded: OnceCell<Loaded>,
}

impl Gallery {
    /// Opens an existing gallery, for any model: what listing, counting and removing
    /// need. Use [`Gallery::open_for`] to search or enroll with a model.
    pub fn open(location: impl Into<Location>) -> Result<Self> {
        let store: Box<dyn Store> = match location.into() {
            Location::Sqlite(path) => Box::new(SqliteStore::open(&path)?),
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => Box::new(crate::PgStore::open(&url)?),
            #[cfg(not(feature = "postgres"))]
            other => return Err(other.not_built()),
        };
        Ok(Self::with_store(store))
    }

    /// Opens an existing gallery whose faces come from the model `fingerprint` with
    /// embeddings of `dim` values; another model's gallery is refused
    /// ([`Error::ModelMismatch`]).
    pub fn open_for(
        location: impl Into<Location>,
        fingerprint: &Fingerprint,
        dim: usize,
    ) -> Result<Self> {
        let gallery = Self::open(location)?;
        gallery.check_model(fingerprint, dim)?;
        Ok(gallery)
    }

    /// Creates a new, empty gallery for the model `fingerprint`, storing f32 embeddings;
    /// an existing one is refused.
    pub fn create(
        location: impl Into<Location>,
        fingerprint: &Fingerprint,
        dim: usize,
    ) -> Result<Self> {
        Self::create_with(location, fingerprint, dim, Storage::F32)
    }

    /// [`Gallery::create`] storing embeddings as `storage`: f16 or int8 take a half or a
    /// quarter of the room, at a small cost in recall (see [`Storage`]). Searches score the
    /// stored (decoded) embeddings. A PostgreSQL gallery stores f32 only (pgvector's
    /// `vector`): another storage is refused there.
    pub fn create_with(
        location: impl Into<Location>,
        fingerprint: &Fingerprint,
        dim: usize,
        storage: Storage,
    ) -> Result<Self> {
        let store: Box<dyn Store> = match location.into() {
            Location::Sqlite(path) => {
                Box::new(SqliteStore::create_with(&path, fingerprint, dim, storage)?)
            }
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => {
                if storage != Storage::F32 {
                    return Err(Error::Invalid(format!(
                        "{}: a PostgreSQL gallery stores f32 embeddings (pgvector's `vector`), \
                         not {storage}",
                        crate::store::redact(&url)
                    )));
                }
                Box::new(crate::PgStore::create(&url, fingerprint, dim)?)
            }
            #[cfg(not(feature = "postgres"))]
            other => return Err(other.not_built()),
        };
        Ok(Self::with_store(store))
    }

    /// [`Gallery::open_for`] when the gallery exists, else [`Gallery::create`].
    pub fn open_or_create(
        location: impl Into<Location>,
        fingerprint: &Fingerprint,
        dim: usize,
    ) -> Result<Self> {
        let location = location.into();
        if Self::exists(&location)? {
            Self::open_for(location, fingerprint, dim)
        } else {
            Self::create(location, fingerprint, dim)
        }
    }

    /// Whether there is a gallery at `location`: the file exists, or the database holds a
    /// gallery's tables (an error when it cannot be reached).
    pub fn exists(location: &Location) -> Result<bool> {
        match location {
            Location::Sqlite(path) => Ok(path.exists()),
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => crate::PgStore::exists(url),
            #[cfg(not(feature = "postgres"))]
            other => Err(other.not_built()),
        }
    }

    /// A gallery over any [`Store`]: the extension point for other backends.
    pub fn with_store(store: Box<dyn Store>) -> Self {
        Self {
            store,
            index_kind: IndexKind::default(),
            server_search: ServerSearch::from(IndexKind::default()),
            memory_limit: DEFAULT_MEMORY_LIMIT,
            loaded: OnceCell::new(),
        }
    }

    /// Chooses the index the next search builds [default: [`IndexKind::Exact`]]; an index
    /// already built is dropped (an HNSW index saved first). A SQLite gallery keeps its
    /// [`IndexKind::Hnsw`] index in a file beside it (`faces.db.hnsw`), loaded and brought
    /// up to date on the first search, or rebuilt when it cannot be used: see
    /// [`crate::hnsw`]. A store that searches on its server (PostgreSQL) is searched the
    /// matching way there instead (see [`ServerSearch`]'s `From<IndexKind>`).
    pub fn set_index_kind(&mut self, kind: IndexKind) {
        self.index_kind = kind;
        self.server_search = ServerSearch::from(kind);
        self.loaded = OnceCell::new();
    }

    /// Saves the search index where it persists (an HNSW index beside a SQLite gallery)
    /// when it changed; it is also saved when the gallery is dropped. Enrollments and
    /// removals are in the store as soon as they return, whether flushed or not: an index
    /// file left behind is caught up on the next open.
    pub fn flush(&mut self) -> Result<()> {
        match self.loaded.get_mut() {
            Some(loaded) => loaded.index.flush(),
            None => Ok(()),
        }
    }

    /// How a store that searches on its server does it [default: as the index kind says,
    /// so exact]: [`ServerSearch::Hnsw`] with any `ef_search`, or [`ServerSearch::Exact`].
    /// Stores searched in memory (SQLite) ignore it: see [`Gallery::set_index_kind`].
    pub fn set_server_search(&mut self, how: ServerSearch) {
        self.server_search = how;
    }

    /// The most bytes the search index may take [default: [`DEFAULT_MEMORY_LIMIT`]]: a
    /// larger gallery is refused ([`Error::TooLarge`]) before anything is allocated.
    pub fn set_memory_limit(&mut self, bytes: u64) {
        self.memory_limit = bytes;
    }

    /// Refuses a model other than the gallery's.
    pub fn check_model(&self, fingerprint: &Fingerprint, dim: usize) -> Result<()> {
        check_model(self.store.as_ref(), fingerprint, dim)
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Where the gallery is.
    pub fn location(&self) -> String {
        self.store.location()
    }

    /// The fingerprint of the model that embedded its faces.
    pub fn fingerprint(&self) -> Fingerprint {
        self.store.meta().fingerprint
    }

    /// The embedding dimension.
    pub fn dim(&self) -> usize {
        self.store.meta().dim
    }

    /// How its embeddings are stored.
    pub fn storage(&self) -> Storage {
        self.store.meta().storage
    }

    /// How many faces it holds.
    pub fn len(&self) -> Result<u64> {
        self.store.count()
    }

    /// Whether it holds no face.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Enrolls faces, all or none (one transaction); returns their ids in order. Each
    /// embedding must have the gallery's dimension and be finite and not zero; it is
    /// stored unit length, in the gallery's [`Storage`].
    pub fn enroll(&mut self, faces: &[Enrollment]) -> Result<Vec<i64>> {
        let dim = self.dim();
        let mut unit = Vec::with_capacity(faces.len());
        for (i, f) in faces.iter().enumerate() {
            let norm = f
                .embedding
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm == 0.0 {
                return Err(Error::Invalid(format!(
                    "enrollment {i} (label `{}`): the embedding is zero",
                    f.label.escape_debug()
                )));
            }
            // A non-finite embedding stays non-finite, for the store to refuse.
            let embedding = f
                .embedding
                .iter()
                .map(|v| (*v as f64 / norm) as f32)
                .collect();
            unit.push(Enrollment {
                label: f.label.clone(),
                embedding,
                source: f.source.clone(),
            });
        }
        let ids = self.store.insert(&unit, now())?;
        let storage = self.storage();
        if let Some(loaded) = self.loaded.get_mut() {
            let mut rows = Vec::with_capacity(unit.len() * dim);
            for (f, id) in unit.iter().zip(&ids) {
                // What the store will hand back: the index holds the same values.
                rows.extend_from_slice(&storage.round_trip(&f.embedding));
                loaded.labels.insert(*id, f.label.clone());
            }
            loaded.index.add(&ids, &rows)?;
        }
        Ok(ids)
    }

    /// Enrolls, under `label`, the face each photo is about (the pipeline's
    /// [`mfn_detect::Pick`], central by default), all or none: a photo without a face
    /// fails the batch before anything is written.
    pub fn enroll_photos<P: AsRef<Path>>(
        &mut self,
        pipeline: &Pipeline,
        label: &str,
        photos: &[P],
    ) -> Result<Vec<i64>> {
        let mut faces = Vec::with_capacity(photos.len());
        for photo in photos {
            let photo = photo.as_ref();
            faces.push(Enrollment {
                label: label.to_string(),
                embedding: pipeline.face(photo)?.embedding,
                source: Some(photo.display().to_string()),
            });
        }
        self.enroll(&faces)
    }

    /// Enrolls, under `label`, crops already aligned at the model's input size (another
    /// size is an error naming the file), all or none.
    pub fn enroll_crops<P: AsRef<Path>>(
        &mut self,
        pipeline: &Pipeline,
        label: &str,
        crops: &[P],
    ) -> Result<Vec<i64>> {
        let mut faces = Vec::with_capacity(crops.len());
        for crop in crops {
            let crop = crop.as_ref();
            faces.push(Enrollment {
                label: label.to_string(),
                embedding: embed_crop(pipeline, crop)?,
                source: Some(crop.display().to_string()),
            });
        }
        self.enroll(&faces)
    }

    /// Removes every face under `label`; returns how many there were.
    pub fn remove_label(&mut self, label: &str) -> Result<usize> {
        let ids = self.store.remove_label(label)?;
        self.forget(&ids);
        Ok(ids.len())
    }

    /// Removes the face `id`; returns whether it was there.
    pub fn remove_id(&mut self, id: i64) -> Result<bool> {
        let ids = self.store.remove_ids(&[id])?;
        self.forget(&ids);
        Ok(!ids.is_empty())
    }

    fn forget(&mut self, ids: &[i64]) {
        if let Some(loaded) = self.loaded.get_mut() {
            loaded.index.remove(ids);
            for id in ids {
                loaded.labels.remove(id);
            }
        }
    }

    /// Every face, by id, without embeddings.
    pub fn list(&self) -> Result<Vec<Face>> {
        self.store.faces()
    }

    /// Labels with their face counts, by label.
    pub fn labels(&self) -> Result<Vec<(String, u64)>> {
        self.store.labels()
    }

    /// What the gallery holds.
    pub fn stats(&self) -> Result<Stats> {
        let meta = self.store.meta();
        let labels = self.store.labels()?;
        Ok(Stats {
            backend: self.store.backend(),
            location: self.store.location(),
            format_version: meta.format_version,
            fingerprint: meta.fingerprint.hex(),
            dim: meta.dim,
            storage: meta.storage,
            faces: labels.iter().map(|(_, n)| n).sum(),
            labels: labels.len() as u64,
            max_faces_per_label: labels.iter().map(|(_, n)| *n).max().unwrap_or(0),
            created: meta.created,
            file_bytes: self
                .store
                .path()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| m.len()),
        })
    }

    /// The index, built from the store on first use.
    pub fn index(&self) -> Result<&dyn Index> {
        Ok(self.loaded()?.index.as_ref())
    }

    fn loaded(&self) -> Result<&Loaded> {
        if let Some(l) = self.loaded.get() {
            return Ok(l);
        }
        let dim = self.dim();
        let rows = self.store.count()?;
        let needed = rows.saturating_mul(dim as u64 * 4 + 64);
        if needed > self.memory_limit {
            return Err(Error::TooLarge {
                path: self.store.location().into(),
                rows,
                dim,
                needed,
                limit: self.memory_limit,
            });
        }
        if let Some((index, labels)) =
            crate::hnsw::open_beside(self.store.as_ref(), self.index_kind)?
        {
            let _ = self.loaded.set(Loaded { index, labels });
            return Ok(self.loaded.get().expect("set above"));
        }
        let mut index = self.index_kind.build(dim)?;
        let mut labels = HashMap::with_capacity(rows as usize);
        let (mut ids, mut block) = (Vec::new(), Vec::new());
        self.store.scan(&mut |face, embedding| {
            ids.push(face.id);
            block.extend_from_slice(embedding);
            labels.insert(face.id, face.label);
            if ids.len() == 4096 {
                index.add(&ids, &block)?;
                ids.clear();
                block.clear();
            }
            Ok(())
        })?;
        index.add(&ids, &block)?;
        let _ = self.loaded.set(Loaded { index, labels });
        Ok(self.loaded.get().expect("set above"))
    }

    /// The query as a unit vector; errors for the wrong dimension, non-finite values, zero.
    fn unit_query(&self, query: &[f32]) -> Result<Vec<f32>> {
        let dim = self.dim();
        if query.len() != dim {
            return Err(Error::Invalid(format!(
                "the query has {} values; the gallery's embeddings have {dim}",
                query.len()
            )));
        }
        if let Some(j) = query.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "value {j} of the query is {}: embeddings must be finite",
                query[j]
            )));
        }
        let norm = query
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm == 0.0 {
            return Err(Error::Invalid("the query embedding is zero".into()));
        }
        Ok(query.iter().map(|v| (*v as f64 / norm) as f32).collect())
    }

    /// The `k` faces most similar to `query` (any scale: it is normalised), best first;
    /// several may share a label.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = self.unit_query(query)?;
        self.search_unit(&q, k)
    }

    /// [`Gallery::search`] for a unit-length query: the store's own search when it has
    /// one, else the in-memory index.
    fn search_unit(&self, q: &[f32], k: usize) -> Result<Vec<Hit>> {
        if let Some(hits) = self.store.search(q, k, self.server_search)? {
            return Ok(hits);
        }
        let loaded = self.loaded()?;
        Ok(loaded
            .index
            .search(q, k)
            .into_iter()
            .map(|s| Hit {
                id: s.id,
                label: loaded.labels.get(&s.id).cloned().unwrap_or_default(),
                score: s.score,
            })
            .collect())
    }

    /// How many faces a search can see: the store's count when it searches (answering
    /// `k = 0` costs it nothing), else the in-memory index's.
    fn searchable(&self) -> Result<usize> {
        if self.store.search(&[], 0, self.server_search)?.is_some() {
            return Ok(self.store.count()? as usize);
        }
        Ok(self.loaded()?.index.len())
    }

    /// The `k` labels most similar to `query`, each by its best face, best first.
    pub fn search_labels(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = self.unit_query(query)?;
        let n = self.searchable()?;
        // Look deeper until `k` distinct labels turn up or every face has been seen.
        let mut depth = k.saturating_mul(4).max(16).min(n);
        loop {
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for hit in self.search_unit(&q, depth)? {
                if seen.insert(hit.label.clone()) {
                    out.push(hit);
                    if out.len() == k {
                        return Ok(out);
                    }
                }
            }
            if depth >= n {
                return Ok(out);
            }
            depth = depth.saturating_mul(4).min(n);
        }
    }

    /// Open-set identification: the best match when its cosine is at least `threshold`
    /// (in `-1..=1`), else [`Identity::Unknown`].
    pub fn identify(&self, query: &[f32], threshold: f32) -> Result<Identity> {
        if !(threshold.is_finite() && (-1.0..=1.0).contains(&threshold)) {
            return Err(Error::Invalid(format!(
                "threshold {threshold} is not a cosine in -1..=1"
            )));
        }
        let best = self.search(query, 1)?.into_iter().next();
        Ok(match best {
            Some(hit) if hit.score >= threshold => Identity::Known(hit),
            best => Identity::Unknown { best },
        })
    }
}

/// The embedding of one crop aligned at the pipeline model's input size.
pub fn embed_crop(pipeline: &Pipeline, crop: &Path) -> Result<Vec<f32>> {
    let [h, w] = pipeline.model().config().input_size;
    let image = mfn_data::decode_rgb_sized(crop, [w, h])?;
    let mut rows = pipeline.embed_crops(&[&image], crop)?;
    Ok(rows.pop().unwrap_or_default())
}
