//! Search over a gallery's embeddings: the [`Index`] trait, [`ExactIndex`], which scores
//! every face, and the choice between it and [`crate::HnswIndex`] ([`IndexKind`]).
//!
//! An index holds unit-length vectors under the ids the store gave them and answers
//! "which `k` are nearest to this query" by cosine (a dot product, the vectors being unit
//! length). [`ExactIndex`] is exact and needs no training; [`crate::HnswIndex`] is
//! approximate (a graph), much faster on large galleries, and kept in a file beside a
//! SQLite gallery.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

use rayon::prelude::*;

use crate::{Error, Result};

/// A face id and its cosine with a query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// The face's id in the store.
    pub id: i64,
    /// Cosine similarity with the query, in `-1..=1`.
    pub score: f32,
}

/// Nearest-neighbour search over unit-length vectors, by cosine.
///
/// Implementations: [`ExactIndex`] and [`crate::HnswIndex`], chosen through [`IndexKind`];
/// the gallery keeps its index in step with its store through [`Index::add`] and
/// [`Index::remove`], and saves one that persists with [`Index::flush`].
pub trait Index: Send + Sync {
    /// A short name for reports (`exact`).
    fn name(&self) -> &'static str;

    /// The vectors' dimension.
    fn dim(&self) -> usize;

    /// How many vectors it holds.
    fn len(&self) -> usize;

    /// Whether it holds none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `ids.len()` unit-length vectors, row-major in `vectors`.
    fn add(&mut self, ids: &[i64], vectors: &[f32]) -> Result<()>;

    /// Removes the vectors with these ids (ids it does not hold are skipped); returns how
    /// many it removed.
    fn remove(&mut self, ids: &[i64]) -> usize;

    /// The `k` vectors with the highest cosine with the unit-length `query`, best first
    /// (ties: lower id first); fewer when it holds fewer.
    fn search(&self, query: &[f32], k: usize) -> Vec<Scored>;

    /// [`Index::search`] for many queries (row-major in `queries`), in parallel over the
    /// queries.
    fn search_many(&self, queries: &[f32], k: usize) -> Vec<Vec<Scored>> {
        let dim = self.dim().max(1);
        queries.par_chunks(dim).map(|q| self.search(q, k)).collect()
    }

    /// Writes what changed to where the index persists, if it does ([`crate::HnswIndex`]
    /// beside a SQLite gallery); nothing for an index that lives in memory only.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The kinds of index a gallery can search with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexKind {
    /// [`ExactIndex`]: every face scored, the true top-k.
    #[default]
    Exact,
    /// [`crate::HnswIndex`]: approximate, a graph searched in time about logarithmic in
    /// the gallery's size; saved beside a SQLite gallery. [`IndexKind::hnsw`] gives the
    /// defaults.
    Hnsw {
        /// Links per node (`M`): more recalls more, at more memory and a slower build.
        m: usize,
        /// Candidates explored when adding a face: more builds a better graph, slower.
        ef_construction: usize,
        /// Candidates explored per search (raised to `k`): more recalls more, slower. It
        /// can change without rebuilding the graph.
        ef_search: usize,
    },
}

impl IndexKind {
    /// [`IndexKind::Hnsw`] with `m` 16, `ef_construction` 200, `ef_search` 384: recall@10
    /// of at least 0.99 on clustered and on LFW-like face data (checked by `tests/hnsw.rs`;
    /// at `ef_search` 128 LFW-like data gives about 0.98, because most people there have
    /// one image and most of a probe's top 10 are strangers at nearly the same distance),
    /// and for LFW's held-out faces searched among LFW plus 10^5 or 10^6 random unit
    /// vectors (`examples/scale_bench.rs`: 0.991 at 10^6, where `ef_search` 256 gives
    /// 0.984; see `bench/README.md`).
    pub const fn hnsw() -> Self {
        Self::Hnsw {
            m: 16,
            ef_construction: 200,
            ef_search: 384,
        }
    }

    /// Parses `exact` or `hnsw` (the latter with the defaults of [`IndexKind::hnsw`]).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "exact" => Ok(Self::Exact),
            "hnsw" => Ok(Self::hnsw()),
            other => Err(Error::Invalid(format!(
                "index `{}`: expected `exact` or `hnsw`",
                other.escape_debug()
            ))),
        }
    }

    /// Its short name (`exact`, `hnsw`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Hnsw { .. } => "hnsw",
        }
    }

    /// An empty index of this kind for vectors of `dim` values, in memory only (a gallery
    /// loads or saves a SQLite gallery's HNSW index itself); an error for options out of
    /// range.
    pub fn build(self, dim: usize) -> Result<Box<dyn Index>> {
        Ok(match self {
            Self::Exact => Box::new(ExactIndex::new(dim)),
            Self::Hnsw {
                m,
                ef_construction,
                ef_search,
            } => Box::new(crate::HnswIndex::new(dim, m, ef_construction, ef_search)?),
        })
    }
}

/// Exact search: all vectors in one contiguous row-major matrix, each query scored
/// against every row. Rows are split over rayon's threads, each keeping its own top-k,
/// and the per-thread lists are merged. The dot products run in 16-lane chunks the
/// compiler vectorises, with AVX2 + FMA chosen at run time where the CPU has them.
#[derive(Clone, Debug)]
pub struct ExactIndex {
    dim: usize,
    ids: Vec<i64>,
    data: Vec<f32>,
}

/// Below this many rows a query is scored on the calling thread.
const PARALLEL_ROWS: usize = 8192;

impl ExactIndex {
    /// An empty index for vectors of `dim` values.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            ids: Vec::new(),
            data: Vec::new(),
        }
    }

    /// An empty index with room for `rows` vectors.
    pub fn with_capacity(dim: usize, rows: usize) -> Self {
        Self {
            dim,
            ids: Vec::with_capacity(rows),
            data: Vec::with_capacity(rows.saturating_mul(dim)),
        }
    }

    /// The ids in row order.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// The matrix, row-major, one unit-length row per id.
    pub fn matrix(&self) -> &[f32] {
        &self.data
    }

    /// Adds one row.
    pub fn push(&mut self, id: i64, vector: &[f32]) -> Result<()> {
        self.add(&[id], vector)
    }

    /// [`Index::search`] on the calling thread only.
    pub fn search_serial(&self, query: &[f32], k: usize) -> Vec<Scored> {
        if k == 0 || self.ids.is_empty() || query.len() != self.dim {
            return Vec::new();
        }
        scan(&self.data, self.dim, query, &self.ids, k).into_sorted()
    }
}

impl Index for ExactIndex {
    fn name(&self) -> &'static str {
        "exact"
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn add(&mut self, ids: &[i64], vectors: &[f32]) -> Result<()> {
        if vectors.len() != ids.len() * self.dim {
            return Err(Error::Invalid(format!(
                "{} ids but {} values: expected {} per vector",
                ids.len(),
                vectors.len(),
                self.dim
            )));
        }
        self.ids.extend_from_slice(ids);
        self.data.extend_from_slice(vectors);
        Ok(())
    }

    fn remove(&mut self, ids: &[i64]) -> usize {
        let gone: HashSet<i64> = ids.iter().copied().collect();
        let (dim, before) = (self.dim, self.ids.len());
        let mut keep = 0;
        for row in 0..before {
            if gone.contains(&self.ids[row]) {
                continue;
            }
            if keep != row {
                self.ids[keep] = self.ids[row];
                self.data
                    .copy_within(row * dim..(row + 1) * dim, keep * dim);
            }
            keep += 1;
        }
        self.ids.truncate(keep);
        self.data.truncate(keep * dim);
        before - keep
    }

    fn search(&self, query: &[f32], k: usize) -> Vec<Scored> {
        let (n, dim) = (self.ids.len(), self.dim);
        if k == 0 || n == 0 || query.len() != dim {
            return Vec::new();
        }
        if n < PARALLEL_ROWS || rayon::current_num_threads() == 1 {
            return self.search_serial(query, k);
        }
        // A few blocks per thread balance the load without many merges.
        let rows = n.div_ceil(rayon::current_num_threads() * 4).max(1024);
        self.data
            .par_chunks(rows * dim)
            .zip(self.ids.par_chunks(rows))
            .map(|(block, ids)| scan(block, dim, query, ids, k))
            .reduce(|| TopK::new(k), TopK::merge)
            .into_sorted()
    }

    fn search_many(&self, queries: &[f32], k: usize) -> Vec<Vec<Scored>> {
        let dim = self.dim.max(1);
        queries
            .par_chunks(dim)
            .map(|q| self.search_serial(q, k))
            .collect()
    }
}

/// A scored row ordered so that the worse of two compares greater: a lower score, or an
/// equal score with a higher id. A max-heap of them keeps the worst kept row on top.
#[derive(Clone, Copy, Debug)]
struct Worse(Scored);

impl PartialEq for Worse {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Worse {}

impl PartialOrd for Worse {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worse {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .score
            .total_cmp(&self.0.score)
            .then(self.0.id.cmp(&other.0.id))
    }
}

/// The best `k` rows seen so far.
struct TopK {
    k: usize,
    heap: BinaryHeap<Worse>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
        }
    }

    /// The score a row must beat (or tie with a lower id) to enter; -inf until full.
    #[inline(always)]
    fn floor(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.score)
        }
    }

    #[inline(always)]
    fn offer(&mut self, s: Scored) {
        if self.heap.len() < self.k {
            self.heap.push(Worse(s));
        } else if let Some(mut top) = self.heap.peek_mut() {
            if Worse(s) < *top {
                *top = Worse(s);
            }
        }
    }

    fn merge(mut self, other: Self) -> Self {
        for w in other.heap {
            self.offer(w.0);
        }
        self
    }

    fn into_sorted(self) -> Vec<Scored> {
        // Ascending "worse" order is best first.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| w.0)
            .collect()
    }
}

/// The top `k` of the rows of `block` (row-major, `dim` wide, ids in `ids`) against
/// `query`.
fn scan(block: &[f32], dim: usize, query: &[f32], ids: &[i64], k: usize) -> TopK {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(block: &[f32], dim: usize, query: &[f32], ids: &[i64], k: usize) -> TopK {
            scan_impl::<true>(block, dim, query, ids, k)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features `fast` is compiled for.
            return unsafe { fast(block, dim, query, ids, k) };
        }
    }
    scan_impl::<false>(block, dim, query, ids, k)
}

#[inline(always)]
fn scan_impl<const FMA: bool>(
    block: &[f32],
    dim: usize,
    query: &[f32],
    ids: &[i64],
    k: usize,
) -> TopK {
    let mut top = TopK::new(k);
    let mut floor = f32::NEG_INFINITY;
    for (row, &id) in block.chunks_exact(dim).zip(ids) {
        let score = dot::<FMA>(row, query);
        if score >= floor {
            top.offer(Scored { id, score });
            floor = top.floor();
        }
    }
    top
}

/// Lanes of the dot product's accumulators: two AVX registers.
const LANES: usize = 16;

/// Dot product in [`LANES`] independent accumulators, which the compiler turns into
/// vector multiply-adds; with `FMA` as fused multiply-adds (only where the CPU has FMA:
/// elsewhere `mul_add` is a slow library call).
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the lanes.
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_plain_sum_with_tails() {
        for n in [1usize, 15, 16, 17, 100, 512] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot::<false>(&a, &b) as f64 - want).abs() < 1e-4);
            assert!((dot::<true>(&a, &b) as f64 - want).abs() < 1e-4);
        }
    }

    #[test]
    fn ties_go_to_the_lower_id_and_remove_compacts() {
        let mut index = ExactIndex::new(2);
        index
            .add(&[5, 3, 9], &[1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
            .unwrap();
        let hits = index.search(&[1.0, 0.0], 2);
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(index.remove(&[3, 42]), 1);
        assert_eq!(index.ids(), [5, 9]);
        assert_eq!(index.matrix(), [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(index.search(&[0.0, 1.0], 5)[0].id, 9);
        assert!(index.search(&[0.0, 1.0], 0).is_empty());
    }
}
