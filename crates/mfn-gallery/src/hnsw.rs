//! [`HnswIndex`]: approximate top-k search for large galleries (HNSW, through `usearch`),
//! and its file beside a SQLite gallery.
//!
//! # The file
//!
//! A gallery at `faces.db` searched with [`IndexKind::Hnsw`] keeps its graph in
//! `faces.db.hnsw` ([`index_path`]), so that opening a large gallery does not rebuild the
//! graph. The file is ours from its first byte, little-endian:
//!
//! | bytes | what |
//! | --- | --- |
//! | 8 | magic `MFN-HNSW` |
//! | 4 | file version ([`FILE_VERSION`]) |
//! | 4, 4, 4 | dimension, `m`, `ef_construction` |
//! | 32 | the gallery's model [`Fingerprint`] |
//! | 8 | the gallery's creation time (unix seconds) |
//! | 8 | `n`, the faces it holds |
//! | 8 | the length of the `usearch` payload |
//! | 32 | sha256 of the ids and the payload |
//! | 32 | sha256 of the 112 bytes above |
//! | `8 n` | the face ids, ascending |
//! | … | the `usearch` index, as `save_to_buffer` writes it |
//!
//! It is written whole to a temporary file in the same folder, synced, and renamed over
//! the old one, so a crash leaves the old file or the new one, never a mix. It is read
//! only after everything above checks out (size, magic, version, both hashes, the ids
//! strictly ascending): `usearch`'s loader is C++ that trusts its input, so it is never
//! handed bytes this module did not write. A file that fails any check is set aside with
//! a log line and the graph is rebuilt from the database.
//!
//! # Keeping it in step with the database
//!
//! On open, the gallery's rows are scanned (embeddings only read, nothing indexed) and
//! compared with the file: every face the file holds must be in the database with the very
//! same embedding (ids are never reused, and the model fingerprint and creation time must
//! agree). Rows enrolled since the file was written are added, rows removed since are
//! marked deleted, and the file is written again; a file that disagrees on any embedding,
//! or from which more than a quarter of its faces have gone, is rebuilt from scratch.
//!
//! Afterwards, enrollments and removals update the graph in memory (after the database
//! transaction has committed). The file is written by [`Index::flush`]
//! (`Gallery::flush`) and when the index is dropped (the gallery closed), not after every
//! batch: a save writes the whole graph, which would make a stream of small batches
//! quadratic. After a crash the file is therefore at most as new as the last flush, and
//! the next open finds it behind the database and catches it up; the invariant is that
//! the index in use always holds exactly the database's faces.
//!
//! # Why usearch
//!
//! Measured on the same 10^5 + LFW vectors with the same M, `ef_construction` and distance
//! kernel (`bench/hnsw-crates`, table in `bench/README.md`): hnsw_rs takes 10-16% longer
//! per query at equal recall, 1.5-1.6x longer to build and twice the memory;
//! instant-distance builds only from a whole set, with M fixed at 32. usearch is also the
//! only one of the three that removes, and it saves to a buffer this module can check
//! before its C++ loader sees it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use usearch::{IndexOptions, MetricKind, ScalarKind};

use crate::index::{Index, IndexKind, Scored};
use crate::store::Store;
use crate::{Error, Fingerprint, Result};

/// The version of the `.hnsw` file this build writes and reads.
pub const FILE_VERSION: u32 = 1;

/// The first 8 bytes of a `.hnsw` file.
pub const FILE_MAGIC: &[u8; 8] = b"MFN-HNSW";

/// The fixed header's length in bytes (its hash included).
const HEADER_LEN: usize = 144;

/// A graph smaller than this grows one node at a time; larger, in parallel.
const SERIAL_NODES: usize = 4096;

/// The beam with which each face added in parallel is looked up, to find the odd one the
/// graph lost.
const SELF_CHECK_EF: usize = 64;

/// Rows added to the graph between two progress lines of a rebuild.
const PROGRESS_ROWS: usize = 50_000;

/// The label of each face id.
type Labels = HashMap<i64, String>;

/// The HNSW file of the SQLite gallery at `db`: `db` with `.hnsw` appended.
pub fn index_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".hnsw");
    PathBuf::from(p)
}

/// The gallery a file belongs to and the graph options it was built with: a file that
/// disagrees on any of them is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tag {
    dim: usize,
    m: usize,
    ef_construction: usize,
    fingerprint: Fingerprint,
    created: i64,
}

/// Approximate nearest-neighbour search by cosine over a hierarchical navigable
/// small-world graph (`usearch`, inner product on f32, no quantisation, distances measured
/// by [`distance_kernel`]).
///
/// Adds are parallel over rayon's threads and incremental; removals mark the graph's
/// nodes deleted, and later adds reuse them. Keys are the faces' ids. Chosen through
/// [`IndexKind::Hnsw`]; a SQLite gallery keeps it in a file beside the database (see the
/// [module documentation](self)).
pub struct HnswIndex {
    inner: usearch::Index,
    dim: usize,
    m: usize,
    ef_construction: usize,
    ef_search: usize,
    /// The ids it holds, ascending.
    ids: Vec<i64>,
    /// An upper bound on the graph's nodes, deleted ones included.
    nodes: usize,
    /// Where it is saved, and for which gallery.
    file: Option<(PathBuf, Tag)>,
    /// Changed since loaded or saved.
    dirty: bool,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("dim", &self.dim)
            .field("m", &self.m)
            .field("ef_construction", &self.ef_construction)
            .field("ef_search", &self.ef_search)
            .field("len", &self.ids.len())
            .field("file", &self.file.as_ref().map(|f| &f.0))
            .finish()
    }
}

/// A dot product of two equally long f32 slices.
type DotFn = fn(&[f32], &[f32]) -> f32;

/// The fastest dot-product kernel for this CPU and its name: AVX-512 (four 16-lane
/// accumulators), AVX2 + FMA, or plain Rust.
///
/// `usearch`'s own f32 inner product (NumKong's `nk_dot_f32_*`) widens every product to
/// f64 and sums it in a single accumulator, a chain of dependent multiply-adds: at 512
/// dimensions it is several times slower than an f32 kernel with independent
/// accumulators, and an HNSW add or search is mostly distance computations. The index
/// therefore hands `usearch` this kernel instead ([`install_metric`]); the distance is
/// the same (`1 - a.b`), so graphs and files are unchanged.
pub fn distance_kernel() -> (&'static str, DotFn) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return ("avx512", |a, b| {
                // SAFETY: the CPU has AVX-512F.
                unsafe { dot_avx512(a, b) }
            });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return ("avx2+fma", |a, b| {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { dot_avx2(a, b) }
            });
        }
    }
    ("scalar", crate::index::dot::<false>)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot::<true>(a, b)
}

/// Dot product in four 16-lane AVX-512 accumulators, the tail masked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): `i + 16 * j + 16 <= n`, or masked to the `n - i` left.
    while i + 64 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_loadu_ps(pa.add(i + 16 * j));
            let y = _mm512_loadu_ps(pb.add(i + 16 * j));
            *acc = _mm512_fmadd_ps(x, y, *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        let x = _mm512_loadu_ps(pa.add(i));
        let y = _mm512_loadu_ps(pb.add(i));
        acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = ((1u32 << (n - i)) - 1) as u16;
        let x = _mm512_maskz_loadu_ps(mask, pa.add(i));
        let y = _mm512_maskz_loadu_ps(mask, pb.add(i));
        acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}

/// Makes `inner` measure distances with [`distance_kernel`]: `1 - a.b` over `dim`
/// values, what `usearch`'s `IP` metric computes.
fn install_metric(inner: &mut usearch::Index, dim: usize) {
    let (_, dot) = distance_kernel();
    inner.change_metric::<f32>(Box::new(move |a: *const f32, b: *const f32| {
        // SAFETY: `usearch` passes two of its vectors (or the query), `dim` f32 each.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, dim),
                std::slice::from_raw_parts(b, dim),
            )
        };
        1.0 - dot(a, b)
    }));
}

/// An error of the graph library.
fn graph_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("the HNSW index: {what}: {e}"))
}

/// Thread contexts to reserve: every thread that may add or search at once.
fn threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    rayon::current_num_threads().max(cpus) + 4
}

impl HnswIndex {
    /// An empty index for vectors of `dim` values: `m` links per node (`connectivity`),
    /// `ef_construction` candidates explored per add, `ef_search` per search (raised to
    /// `k`).
    pub fn new(dim: usize, m: usize, ef_construction: usize, ef_search: usize) -> Result<Self> {
        let mut index = Self::bare(dim, m, ef_construction, ef_search)?;
        install_metric(&mut index.inner, dim);
        Ok(index)
    }

    /// [`HnswIndex::new`] still measuring with `usearch`'s own kernel (a loaded graph gets
    /// [`install_metric`] after loading, which resets the metric).
    fn bare(dim: usize, m: usize, ef_construction: usize, ef_search: usize) -> Result<Self> {
        if dim == 0 || !(2..=256).contains(&m) || ef_construction == 0 || ef_search == 0 {
            return Err(Error::Invalid(format!(
                "HNSW options dim {dim}, m {m}, ef_construction {ef_construction}, ef_search \
                 {ef_search}: expected a dimension of at least 1, m in 2..=256 and positive ef"
            )));
        }
        let inner = usearch::Index::new(&IndexOptions {
            dimensions: dim,
            metric: MetricKind::IP,
            quantization: ScalarKind::F32,
            connectivity: m,
            expansion_add: ef_construction,
            expansion_search: ef_search,
            multi: false,
        })
        .map_err(|e| graph_error("creating it", e))?;
        Ok(Self {
            inner,
            dim,
            m,
            ef_construction,
            ef_search,
            ids: Vec::new(),
            nodes: 0,
            file: None,
            dirty: false,
        })
    }

    /// The ids it holds, ascending.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// Links per node.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Candidates explored per add.
    pub fn ef_construction(&self) -> usize {
        self.ef_construction
    }

    /// Candidates explored per search (raised to `k`).
    pub fn ef_search(&self) -> usize {
        self.ef_search
    }

    /// Changes the search beam: higher is slower and recalls more.
    pub fn set_ef_search(&mut self, ef: usize) {
        self.ef_search = ef.max(1);
        self.inner.change_expansion_search(self.ef_search);
    }

    /// The kernel distances are measured with (see [`distance_kernel`]), for reports.
    pub fn hardware_acceleration(&self) -> String {
        distance_kernel().0.to_string()
    }

    /// Measures distances with `usearch`'s own f32 inner-product kernel (`library`
    /// true) or with [`distance_kernel`] (the default): the same distance, for comparing
    /// the two kernels' speed on one graph (`examples/scale_bench.rs`). Not kept across a
    /// save and load; each switch back leaves `usearch`'s wrapper a few bytes it does not
    /// free until the index is dropped.
    #[doc(hidden)]
    pub fn use_library_kernel(&mut self, library: bool) -> Result<()> {
        if library {
            self.inner
                .change_metric_kind(MetricKind::IP)
                .map_err(|e| graph_error("changing its metric", e))
        } else {
            install_metric(&mut self.inner, self.dim);
            Ok(())
        }
    }

    /// Bytes the graph and its vectors take, as `usearch` counts them.
    pub fn memory_usage(&self) -> usize {
        self.inner.memory_usage()
    }

    /// Whether it holds `id`.
    pub fn contains(&self, id: i64) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Room for `more` nodes beyond those it may already have, and thread contexts.
    fn reserve(&mut self, more: usize) -> Result<()> {
        let need = self.nodes.max(self.inner.size()) + more;
        if need > self.inner.capacity() {
            let cap = need
                .max(self.inner.capacity().saturating_mul(3) / 2)
                .max(1024);
            self.inner
                .reserve_capacity_and_threads(cap, threads())
                .map_err(|e| graph_error(&format!("reserving room for {cap} faces"), e))?;
        }
        Ok(())
    }

    /// Whether the vector stored under `id` is bit for bit `vector`.
    fn holds_exactly(&self, id: i64, vector: &[f32], buf: &mut [f32]) -> bool {
        matches!(self.inner.get(id as u64, buf), Ok(1)) && buf == vector
    }

    /// Saves to the file it belongs to when changed since loaded or saved.
    fn save_if_dirty(&mut self) -> Result<()> {
        if let (true, Some((path, tag))) = (self.dirty, &self.file) {
            self.write_file(path, tag)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Writes the file atomically (see the module documentation for its layout).
    fn write_file(&self, path: &Path, tag: &Tag) -> Result<()> {
        let started = Instant::now();
        let io = |source| Error::Io {
            path: path.into(),
            source,
        };
        let mut payload = vec![0u8; self.inner.serialized_length()];
        self.inner
            .save_to_buffer(&mut payload)
            .map_err(|e| graph_error("serialising it", e))?;
        let ids: Vec<u8> = self.ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        let body_hash = Sha256::new()
            .chain_update(&ids)
            .chain_update(&payload)
            .finalize();
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(FILE_MAGIC);
        header.extend_from_slice(&FILE_VERSION.to_le_bytes());
        for v in [tag.dim, tag.m, tag.ef_construction] {
            header.extend_from_slice(&(v as u32).to_le_bytes());
        }
        header.extend_from_slice(tag.fingerprint.as_bytes());
        header.extend_from_slice(&tag.created.to_le_bytes());
        header.extend_from_slice(&(self.ids.len() as u64).to_le_bytes());
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        header.extend_from_slice(&body_hash);
        let header_hash = Sha256::digest(&header);
        header.extend_from_slice(&header_hash);
        debug_assert_eq!(header.len(), HEADER_LEN);
        write_atomic(path, &[&header, &ids, &payload]).map_err(io)?;
        tracing::debug!(
            "{}: saved the HNSW index of {} faces ({} bytes) in {:.2?}",
            path.display(),
            self.ids.len(),
            HEADER_LEN + ids.len() + payload.len(),
            started.elapsed()
        );
        Ok(())
    }

    /// Reads a file written by [`HnswIndex::write_file`] for the gallery `tag`; `Ok(None)`
    /// when there is none, `Err` with the reason when it cannot be used.
    fn read_file(
        path: &Path,
        tag: &Tag,
        ef_search: usize,
    ) -> std::result::Result<Option<Self>, String> {
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot be opened: {e}")),
        };
        let len = file
            .metadata()
            .map_err(|e| format!("cannot be read: {e}"))?
            .len();
        if len < HEADER_LEN as u64 {
            return Err(format!(
                "{len} bytes, shorter than the {HEADER_LEN}-byte header"
            ));
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if &header[..8] != FILE_MAGIC {
            return Err("not an HNSW index file of this program (wrong magic)".into());
        }
        if Sha256::digest(&header[..112]).as_slice() != &header[112..] {
            return Err("its header is damaged (checksum mismatch)".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != FILE_VERSION {
            return Err(format!(
                "file version {version}; this build reads {FILE_VERSION}"
            ));
        }
        let found = Tag {
            dim: u32_at(12) as usize,
            m: u32_at(16) as usize,
            ef_construction: u32_at(20) as usize,
            fingerprint: Fingerprint::from_bytes(header[24..56].try_into().unwrap()),
            created: u64_at(56) as i64,
        };
        if found.fingerprint != tag.fingerprint || found.created != tag.created {
            return Err("it belongs to another gallery (model or creation time differ)".into());
        }
        if found.dim != tag.dim {
            return Err(format!(
                "dimension {}, the gallery's is {}",
                found.dim, tag.dim
            ));
        }
        if (found.m, found.ef_construction) != (tag.m, tag.ef_construction) {
            return Err(format!(
                "built with m {} and ef_construction {}, not the {} and {} asked for",
                found.m, found.ef_construction, tag.m, tag.ef_construction
            ));
        }
        let (n, payload_len) = (u64_at(64), u64_at(72));
        let expected = n
            .checked_mul(8)
            .and_then(|b| b.checked_add(payload_len))
            .and_then(|b| b.checked_add(HEADER_LEN as u64));
        if expected != Some(len) {
            return Err(format!(
                "{len} bytes, but its header describes {n} faces and a {payload_len}-byte graph \
                 (truncated or extended)"
            ));
        }
        let mut body = Vec::new();
        body.try_reserve_exact((len - HEADER_LEN as u64) as usize)
            .map_err(|e| format!("cannot be read into memory: {e}"))?;
        file.read_to_end(&mut body)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if body.len() as u64 != len - HEADER_LEN as u64 {
            return Err("it changed while being read".into());
        }
        if Sha256::digest(&body).as_slice() != &header[80..112] {
            return Err("its contents are damaged (checksum mismatch)".into());
        }
        let (id_bytes, payload) = body.split_at(n as usize * 8);
        let ids: Vec<i64> = id_bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err("its ids are not strictly ascending".into());
        }
        // Only bytes this module wrote, hash-checked, reach the C++ loader.
        let meta = usearch::Index::metadata_from_buffer(payload)
            .map_err(|e| format!("its graph header does not parse: {e}"))?;
        if meta.dimensions != tag.dim as u64
            || meta.metric != MetricKind::IP
            || meta.quantization != ScalarKind::F32
            || meta.multi
            || meta.count_present != n
        {
            return Err("its graph was built for other vectors".into());
        }
        let mut index = Self::bare(tag.dim, tag.m, tag.ef_construction, ef_search)
            .map_err(|e| e.to_string())?;
        index
            .inner
            .load_from_buffer(payload)
            .map_err(|e| format!("its graph does not load: {e}"))?;
        // Loading puts the library's own kernel back: ours again (the same distance).
        install_metric(&mut index.inner, tag.dim);
        if index.inner.size() != ids.len() || !ids.iter().all(|id| index.inner.contains(*id as u64))
        {
            return Err("its graph and its list of ids disagree".into());
        }
        index.inner.change_expansion_search(ef_search);
        index.nodes = index.inner.capacity().max(index.inner.size());
        index.ids = ids;
        let cap = index.nodes.max(1024);
        index
            .inner
            .reserve_capacity_and_threads(cap, threads())
            .map_err(|e| format!("reserving room: {e}"))?;
        index.file = Some((path.into(), tag.clone()));
        Ok(Some(index))
    }
}

impl Index for HnswIndex {
    fn name(&self) -> &'static str {
        "hnsw"
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn add(&mut self, ids: &[i64], vectors: &[f32]) -> Result<()> {
        let dim = self.dim;
        if vectors.len() != ids.len() * dim {
            return Err(Error::Invalid(format!(
                "{} ids but {} values: expected {dim} per vector",
                ids.len(),
                vectors.len(),
            )));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Invalid(format!(
                "face id {} twice in one batch",
                w[0]
            )));
        }
        if let Some(id) = sorted.iter().find(|id| self.contains(**id)) {
            return Err(Error::Invalid(format!(
                "face id {id} is already in the index"
            )));
        }
        self.reserve(ids.len())?;
        let inner = &self.inner;
        // Concurrent inserts into a small graph can leave a node unreachable (seen as a
        // face that does not find itself): the first nodes go in one at a time.
        let serial = SERIAL_NODES.saturating_sub(self.ids.len()).min(ids.len());
        let result = ids[..serial]
            .iter()
            .zip(vectors.chunks_exact(dim))
            .try_for_each(|(id, v)| inner.add(*id as u64, v))
            .and_then(|()| {
                ids[serial..]
                    .par_iter()
                    .zip(vectors[serial * dim..].par_chunks(dim))
                    .with_min_len(64)
                    .try_for_each(|(id, v)| inner.add(*id as u64, v))
            })
            .and_then(|()| {
                // Concurrent inserts also leave the odd node unreachable in a large graph
                // (about 1 in 10,000): each face added in parallel must find itself, and
                // one that does not goes in again, alone. A face is its own nearest
                // neighbour (distance 0), so a narrow beam finds it: searching with the
                // full `ef_search` would cost a whole query per face added.
                inner.change_expansion_search(SELF_CHECK_EF.min(self.ef_search));
                let lost: Vec<usize> = (serial..ids.len())
                    .into_par_iter()
                    .with_min_len(64)
                    .filter(|&i| {
                        let v = &vectors[i * dim..(i + 1) * dim];
                        !matches!(inner.search(v, 1), Ok(m) if m.keys.first() == Some(&(ids[i] as u64)))
                    })
                    .collect();
                if !lost.is_empty() {
                    tracing::debug!("HNSW: {} faces re-added alone", lost.len());
                }
                lost.into_iter().try_for_each(|i| {
                    inner.remove(ids[i] as u64)?;
                    inner.add(ids[i] as u64, &vectors[i * dim..(i + 1) * dim])
                })
            });
        self.inner.change_expansion_search(self.ef_search);
        self.nodes += ids.len();
        self.dirty = true;
        // What went in, even when something failed: the list mirrors the graph.
        let added: Vec<i64> = match &result {
            Ok(()) => sorted,
            Err(_) => sorted
                .into_iter()
                .filter(|id| self.inner.contains(*id as u64))
                .collect(),
        };
        if self
            .ids
            .last()
            .is_none_or(|last| added.first().is_some_and(|f| f > last))
        {
            self.ids.extend_from_slice(&added);
        } else {
            self.ids.extend_from_slice(&added);
            self.ids.sort_unstable();
        }
        result.map_err(|e| graph_error("adding faces", e))
    }

    fn remove(&mut self, ids: &[i64]) -> usize {
        let mut gone = std::collections::HashSet::new();
        for &id in ids {
            if self.contains(id) && matches!(self.inner.remove(id as u64), Ok(n) if n > 0) {
                gone.insert(id);
            }
        }
        if !gone.is_empty() {
            self.ids.retain(|id| !gone.contains(id));
            self.dirty = true;
        }
        gone.len()
    }

    fn search(&self, query: &[f32], k: usize) -> Vec<Scored> {
        if k == 0 || self.ids.is_empty() || query.len() != self.dim {
            return Vec::new();
        }
        let count = k.min(self.ids.len());
        let mut tries = 0u32;
        let matches = loop {
            match self.inner.search(query, count) {
                Ok(m) => break m,
                // All thread contexts busy (more threads than reserved): wait for one.
                Err(e) if tries < 10_000 => {
                    tries += 1;
                    if tries == 1 {
                        tracing::debug!("HNSW search waits: {e}");
                    }
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(e) => {
                    tracing::error!("HNSW search failed: {e}");
                    return Vec::new();
                }
            }
        };
        let mut out: Vec<Scored> = matches
            .keys
            .iter()
            .zip(&matches.distances)
            .map(|(key, d)| Scored {
                id: *key as i64,
                score: 1.0 - d,
            })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        out
    }

    fn flush(&mut self) -> Result<()> {
        self.save_if_dirty()
    }
}

impl Drop for HnswIndex {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Err(e) = self.save_if_dirty() {
            tracing::warn!("saving the HNSW index failed (the next open catches up): {e}");
        }
    }
}

/// The HNSW index of the gallery in `store` and the labels of its faces, when `kind` is
/// [`IndexKind::Hnsw`] and the store is a file: loaded from [`index_path`] and brought up
/// to date with the store, or rebuilt from it, then saved. `None` for other kinds and
/// stores, whose index is built in memory.
pub(crate) fn open_beside(
    store: &dyn Store,
    kind: IndexKind,
) -> Result<Option<(Box<dyn Index>, Labels)>> {
    let IndexKind::Hnsw {
        m,
        ef_construction,
        ef_search,
    } = kind
    else {
        return Ok(None);
    };
    let Some(db) = store.path() else {
        return Ok(None);
    };
    let meta = store.meta();
    let tag = Tag {
        dim: meta.dim,
        m,
        ef_construction,
        fingerprint: meta.fingerprint,
        created: meta.created,
    };
    let path = index_path(db);
    let found = match HnswIndex::read_file(&path, &tag, ef_search) {
        Ok(found) => found,
        Err(why) => {
            tracing::warn!("{}: {why}; rebuilding it from the gallery", path.display());
            None
        }
    };
    let (mut index, labels) = match found {
        Some(index) => match catch_up(store, index, &path)? {
            Ok(done) => done,
            Err(why) => {
                tracing::warn!("{}: {why}; rebuilding it from the gallery", path.display());
                rebuild(store, kind, &path, &tag)?
            }
        },
        None => {
            if !path.exists() {
                tracing::info!("{}: no HNSW index yet; building it", path.display());
            }
            rebuild(store, kind, &path, &tag)?
        }
    };
    index.save_if_dirty()?;
    Ok(Some((Box::new(index), labels)))
}

/// The faces of `store` in `index`: faces it holds must have the same embedding in the
/// store; faces enrolled since are added, faces removed since are removed. `Ok(Err(why))`
/// when the index is not worth keeping.
fn catch_up(
    store: &dyn Store,
    mut index: HnswIndex,
    path: &Path,
) -> Result<std::result::Result<(HnswIndex, Labels), String>> {
    let mut labels = HashMap::with_capacity(index.len());
    let (mut kept, mut differ) = (0usize, None);
    let (mut new_ids, mut new_rows) = (Vec::new(), Vec::new());
    let mut buf = vec![0f32; index.dim];
    store.scan(&mut |face, embedding| {
        if index.contains(face.id) {
            kept += 1;
            if differ.is_none() && !index.holds_exactly(face.id, embedding, &mut buf) {
                differ = Some(face.id);
            }
        } else {
            new_ids.push(face.id);
            new_rows.extend_from_slice(embedding);
        }
        labels.insert(face.id, face.label);
        Ok(())
    })?;
    if let Some(id) = differ {
        return Ok(Err(format!(
            "face {id} has another embedding in the gallery than in the index"
        )));
    }
    let gone: Vec<i64> = index
        .ids
        .iter()
        .copied()
        .filter(|id| !labels.contains_key(id))
        .collect();
    if gone.len() * 4 > index.len() {
        return Ok(Err(format!(
            "{} of its {} faces are no longer in the gallery",
            gone.len(),
            index.len()
        )));
    }
    debug_assert_eq!(kept + gone.len(), index.len());
    if !gone.is_empty() || !new_ids.is_empty() {
        tracing::info!(
            "{}: the HNSW index is behind the gallery: adding {} faces, removing {}",
            path.display(),
            new_ids.len(),
            gone.len()
        );
        index.remove(&gone);
        index.add(&new_ids, &new_rows)?;
    }
    Ok(Ok((index, labels)))
}

/// A new index of every face in `store`, to be saved at `path`.
fn rebuild(
    store: &dyn Store,
    kind: IndexKind,
    path: &Path,
    tag: &Tag,
) -> Result<(HnswIndex, Labels)> {
    let IndexKind::Hnsw {
        m,
        ef_construction,
        ef_search,
    } = kind
    else {
        unreachable!("rebuild is for HNSW only");
    };
    let started = Instant::now();
    let total = store.count()? as usize;
    let mut index = HnswIndex::new(tag.dim, m, ef_construction, ef_search)?;
    index.reserve(total)?;
    let mut labels = HashMap::with_capacity(total);
    let (mut ids, mut block) = (Vec::new(), Vec::new());
    let mut next_report = PROGRESS_ROWS;
    let mut add = |index: &mut HnswIndex, ids: &mut Vec<i64>, block: &mut Vec<f32>| {
        index.add(ids, block)?;
        ids.clear();
        block.clear();
        if index.len() >= next_report {
            tracing::info!(
                "{}: building the HNSW index: {} of {total} faces, {:.0?}",
                path.display(),
                index.len(),
                started.elapsed()
            );
            next_report += PROGRESS_ROWS;
        }
        Result::Ok(())
    };
    store.scan(&mut |face, embedding| {
        ids.push(face.id);
        block.extend_from_slice(embedding);
        labels.insert(face.id, face.label);
        if ids.len() == 4096 {
            add(&mut index, &mut ids, &mut block)?;
        }
        Ok(())
    })?;
    add(&mut index, &mut ids, &mut block)?;
    tracing::info!(
        "{}: built the HNSW index of {} faces in {:.1?}",
        path.display(),
        index.len(),
        started.elapsed()
    );
    index.file = Some((path.into(), tag.clone()));
    index.dirty = true;
    Ok((index, labels))
}

/// Writes `parts` one after the other to `path` atomically: a temporary file in the same
/// folder, synced, renamed over `path`, and the folder synced. Temporary files of
/// processes that no longer run (killed mid-write) are removed first.
fn write_atomic(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy()
        .into_owned();
    let prefix = format!(".{name}.");
    remove_stale_temps(&dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `{prefix}{pid}.tmp` files in `dir` whose process is gone (where `/proc` says).
fn remove_stale_temps(dir: &Path, prefix: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distance_kernel_matches_a_plain_sum() {
        let (name, dot) = distance_kernel();
        for n in [1, 15, 16, 17, 63, 64, 65, 100, 512, 515] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{name}, {n} values: {got} against {want}"
            );
        }
    }
}
