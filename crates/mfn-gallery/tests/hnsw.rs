//! The HNSW index: top-k against exact search on face-like (clustered) data, on LFW-like
//! data and on random unit vectors; its file beside a SQLite gallery: saved, reused,
//! caught up when the gallery moved on, rebuilt when stale, foreign, damaged or
//! truncated, never trusted blindly.

use std::path::{Path, PathBuf};

use mfn_gallery::hnsw::{index_path, FILE_MAGIC};
use mfn_gallery::{
    Enrollment, ExactIndex, Fingerprint, Gallery, HnswIndex, Index, IndexKind, Scored,
};

#[path = "common/faces.rs"]
mod faces;

use faces::{clustered, lfw_like, unit, Rng};

/// recall@k of `hnsw` against `exact` over `queries`: the fraction of the true top-k
/// found.
fn recall(hnsw: &dyn Index, exact: &dyn Index, queries: &[f32], k: usize) -> f64 {
    let dim = exact.dim();
    let (mut found, mut total) = (0usize, 0usize);
    for q in queries.chunks(dim) {
        let truth: Vec<i64> = exact.search(q, k).iter().map(|s| s.id).collect();
        let got: Vec<Scored> = hnsw.search(q, k);
        assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
        found += truth
            .iter()
            .filter(|id| got.iter().any(|g| g.id == **id))
            .count();
        total += truth.len();
    }
    found as f64 / total as f64
}

/// An HNSW index with the defaults of [`IndexKind::hnsw`] and an exact one, both of
/// `data`.
fn both(dim: usize, data: &[f32]) -> (HnswIndex, ExactIndex) {
    let ids: Vec<i64> = (1..=(data.len() / dim) as i64).collect();
    let IndexKind::Hnsw {
        m,
        ef_construction,
        ef_search,
    } = IndexKind::hnsw()
    else {
        unreachable!()
    };
    let mut hnsw = HnswIndex::new(dim, m, ef_construction, ef_search).unwrap();
    hnsw.add(&ids, data).unwrap();
    let mut exact = ExactIndex::new(dim);
    exact.add(&ids, data).unwrap();
    (hnsw, exact)
}

#[test]
fn recall_at_10_on_clustered_faces() {
    let dim = 512;
    let mut rng = Rng(0x5eed_0001);
    let (data, queries) = clustered(&mut rng, dim, 500, 10, 300);
    let (hnsw, exact) = both(dim, &data);
    assert_eq!(hnsw.len(), 5000);
    let r = recall(&hnsw, &exact, &queries, 10);
    println!("clustered 500 x 10, 512-d: recall@10 {r:.4}");
    assert!(r >= 0.99, "recall@10 {r}");
    // The enrolled images themselves come back first.
    for i in [0usize, 1234, 4999] {
        let hit = hnsw.search(&data[i * dim..(i + 1) * dim], 1)[0];
        assert_eq!(hit.id, i as i64 + 1);
        assert!((hit.score - 1.0).abs() < 1e-4);
    }
}

#[test]
fn recall_at_10_on_lfw_like_data() {
    let dim = 512;
    let mut rng = Rng(0x5eed_0002);
    let (data, queries) = lfw_like(&mut rng, dim, 2500, 300);
    let (mut hnsw, exact) = both(dim, &data);
    // Most people have one image, so most of a probe's top 10 are strangers at nearly
    // the same distance: harder than whole clusters, and the beam must be wider for the
    // same recall@10.
    // The default beam passes the 0.99 gate, and so does two thirds of it; a third of it
    // does not quite.
    assert_eq!(hnsw.ef_search(), 384, "the default ef_search");
    for (ef, want10) in [(128, 0.97), (256, 0.99), (384, 0.99)] {
        hnsw.set_ef_search(ef);
        let r = recall(&hnsw, &exact, &queries, 10);
        let r1 = recall(&hnsw, &exact, &queries, 1);
        println!(
            "LFW-like, {} images of 2500 people, 512-d, ef {ef}: recall@10 {r:.4}, recall@1 {r1:.4}",
            hnsw.len()
        );
        assert!(r >= want10, "ef {ef}: recall@10 {r}");
        assert!(r1 >= 0.99, "ef {ef}: recall@1 {r1}");
    }
}

#[test]
fn recall_on_random_unit_vectors_is_reported() {
    // The worst case: no structure, every neighbour nearly as far as any other.
    let dim = 512;
    let mut rng = Rng(0x5eed_0003);
    let data: Vec<f32> = (0..5000)
        .flat_map(|_| unit(rng.gauss_vec(dim, 1.0)))
        .collect();
    let queries: Vec<f32> = (0..200)
        .flat_map(|_| unit(rng.gauss_vec(dim, 1.0)))
        .collect();
    let (mut hnsw, exact) = both(dim, &data);
    for ef in [64, 128, 512] {
        hnsw.set_ef_search(ef);
        let r = recall(&hnsw, &exact, &queries, 10);
        println!("random 5000 x 512-d, ef {ef}: recall@10 {r:.4}");
        assert!(r > 0.5, "ef {ef}: recall@10 {r}");
    }
}

#[test]
fn add_remove_and_edge_cases() {
    let dim = 16;
    let mut rng = Rng(7);
    let mut index = HnswIndex::new(dim, 8, 64, 32).unwrap();
    assert!(index.search(&unit(rng.gauss_vec(dim, 1.0)), 5).is_empty());
    // Many small batches: capacity grows as needed.
    let mut all = Vec::new();
    for batch in 0..30 {
        let ids: Vec<i64> = (batch * 100..batch * 100 + 100).collect();
        let rows: Vec<f32> = ids
            .iter()
            .flat_map(|_| unit(rng.gauss_vec(dim, 1.0)))
            .collect();
        index.add(&ids, &rows).unwrap();
        all.extend(
            ids.iter()
                .copied()
                .zip(rows.chunks(dim).map(<[f32]>::to_vec)),
        );
    }
    assert_eq!(index.len(), 3000);
    // A duplicate id, a wrong length: refused, nothing changes.
    assert!(index.add(&[5], &all[5].1).is_err());
    assert!(index.add(&[99_999], &[1.0; 3]).is_err());
    assert_eq!(index.len(), 3000);
    // Removed faces are never found again; later adds reuse their nodes.
    let gone: Vec<i64> = (0..1500).collect();
    assert_eq!(index.remove(&gone), 1500);
    assert_eq!(index.remove(&gone), 0);
    assert_eq!(index.len(), 1500);
    for (id, v) in all.iter().step_by(97) {
        let hits = index.search(v, 10);
        assert!(hits.iter().all(|h| h.id >= 1500));
        if *id >= 1500 {
            assert_eq!(hits[0].id, *id);
        }
    }
    let ids: Vec<i64> = (10_000..12_000).collect();
    let rows: Vec<f32> = ids
        .iter()
        .flat_map(|_| unit(rng.gauss_vec(dim, 1.0)))
        .collect();
    index.add(&ids, &rows).unwrap();
    assert_eq!(index.len(), 3500);
    assert_eq!(index.search(&rows[..dim], 1)[0].id, 10_000);
    // k beyond the size, a query of the wrong length, k = 0.
    // (approximate even then: the odd node may not be reached).
    let all = index.search(&rows[..dim], 10_000).len();
    assert!((3490..=3500).contains(&all), "{all}");
    assert!(index.search(&rows[..dim - 1], 3).is_empty());
    assert!(index.search(&rows[..dim], 0).is_empty());
    assert!(HnswIndex::new(dim, 1, 64, 32).is_err());
    assert!(IndexKind::Hnsw {
        m: 0,
        ef_construction: 1,
        ef_search: 1
    }
    .build(dim)
    .is_err());
    assert_eq!(IndexKind::parse("hnsw").unwrap(), IndexKind::hnsw());
    assert!(IndexKind::parse("flat").is_err());
}

// --- The file beside a SQLite gallery ---

const DIM: usize = 32;

fn model() -> Fingerprint {
    Fingerprint::from_bytes([3; 32])
}

fn faces(rng: &mut Rng, from: usize, n: usize) -> Vec<Enrollment> {
    (from..from + n)
        .map(|i| Enrollment {
            label: format!("person-{}", i / 5),
            embedding: rng.gauss_vec(DIM, 1.0),
            source: None,
        })
        .collect()
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    (dir, path)
}

/// Opens the gallery with the HNSW index and loads it (one search).
fn open_hnsw(path: &Path) -> Gallery {
    let mut g = Gallery::open_for(path, &model(), DIM).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    g.search(&[1.0; DIM], 1).unwrap();
    g
}

/// The number of faces a `.hnsw` file's header says it holds.
fn file_count(db: &Path) -> u64 {
    let bytes = std::fs::read(index_path(db)).unwrap();
    assert_eq!(&bytes[..8], FILE_MAGIC);
    u64::from_le_bytes(bytes[64..72].try_into().unwrap())
}

/// Every face of the gallery is found as its own nearest neighbour through the HNSW
/// index, and its size is the gallery's.
fn check_matches(g: &Gallery, rng_seed: u64, total: usize, gone: &[i64]) {
    let n = g.len().unwrap() as usize;
    assert_eq!(g.index().unwrap().name(), "hnsw");
    assert_eq!(g.index().unwrap().len(), n);
    // Regenerate the embeddings in enrollment order (ids 1..=total).
    let mut rng = Rng(rng_seed);
    let all = faces(&mut rng, 0, total);
    for (i, f) in all.iter().enumerate().step_by(37) {
        let id = i as i64 + 1;
        let hits = g.search(&f.embedding, 3).unwrap();
        if gone.contains(&id) {
            assert!(hits.iter().all(|h| h.id != id), "removed face {id} found");
        } else {
            assert_eq!(hits[0].id, id, "{hits:?}");
            assert_eq!(hits[0].label, f.label);
            assert!(hits[0].score > 0.9999);
        }
    }
}

fn ids(hits: &[mfn_gallery::Hit]) -> Vec<i64> {
    hits.iter().map(|h| h.id).collect()
}

fn modified(path: &Path) -> (std::time::SystemTime, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.modified().unwrap(), m.len())
}

#[test]
fn the_index_is_saved_beside_the_gallery_and_reused() {
    let (_dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&faces(&mut Rng(11), 0, 2000)).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    let exact_hits = {
        let e = Gallery::open_for(&path, &model(), DIM).unwrap();
        ids(&e.search(&[0.5; DIM], 10).unwrap())
    };
    assert_eq!(ids(&g.search(&[0.5; DIM], 10).unwrap()), exact_hits);
    // Built on the first search and saved at once.
    assert_eq!(file_count(&path), 2000);
    check_matches(&g, 11, 2000, &[]);
    drop(g);
    let before = modified(&index_path(&path));

    // Reopened: used as it is, not written again.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let g = open_hnsw(&path);
    check_matches(&g, 11, 2000, &[]);
    assert_eq!(ids(&g.search(&[0.5; DIM], 10).unwrap()), exact_hits);
    drop(g);
    assert_eq!(modified(&index_path(&path)), before);

    // Enrollments and removals go to the loaded index, and to the file on flush.
    let mut g = open_hnsw(&path);
    let mut rng = Rng(11);
    let all = faces(&mut rng, 0, 2500);
    g.enroll(&all[2000..]).unwrap();
    assert_eq!(g.remove_label("person-3").unwrap(), 5);
    assert!(g.remove_id(100).unwrap());
    let gone = [16, 17, 18, 19, 20, 100];
    check_matches(&g, 11, 2500, &gone);
    assert_eq!(file_count(&path), 2000);
    g.flush().unwrap();
    assert_eq!(file_count(&path), 2494);
    drop(g);
    let g = open_hnsw(&path);
    check_matches(&g, 11, 2500, &gone);

    // Another ef_search uses the same file; another m or ef_construction rebuilds it.
    drop(g);
    let before = modified(&index_path(&path));
    let mut g = Gallery::open_for(&path, &model(), DIM).unwrap();
    g.set_index_kind(IndexKind::Hnsw {
        m: 16,
        ef_construction: 200,
        ef_search: 300,
    });
    check_matches(&g, 11, 2500, &gone);
    drop(g);
    assert_eq!(modified(&index_path(&path)), before);
    let mut g = Gallery::open_for(&path, &model(), DIM).unwrap();
    g.set_index_kind(IndexKind::Hnsw {
        m: 8,
        ef_construction: 100,
        ef_search: 64,
    });
    check_matches(&g, 11, 2500, &gone);
    drop(g);
    assert_ne!(modified(&index_path(&path)), before);
}

#[test]
fn an_index_behind_the_gallery_is_caught_up() {
    let (_dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    let mut rng = Rng(12);
    let all = faces(&mut rng, 0, 1600);
    g.enroll(&all[..1000]).unwrap();
    drop(g);
    drop(open_hnsw(&path));
    assert_eq!(file_count(&path), 1000);
    // Another handle, with the exact index, changes the gallery behind the file's back.
    let mut other = Gallery::open_for(&path, &model(), DIM).unwrap();
    other.enroll(&all[1000..]).unwrap();
    let gone: Vec<i64> = (1..=100).collect();
    for id in &gone {
        other.remove_id(*id).unwrap();
    }
    drop(other);
    assert_eq!(file_count(&path), 1000);
    let g = open_hnsw(&path);
    assert_eq!(g.len().unwrap(), 1500);
    check_matches(&g, 12, 1600, &gone);
    // Caught up and saved again.
    assert_eq!(file_count(&path), 1500);
}

#[test]
fn a_stale_index_is_rebuilt() {
    let (_dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&faces(&mut Rng(13), 0, 1000)).unwrap();
    drop(g);
    drop(open_hnsw(&path));
    // Most faces removed behind its back: not worth patching.
    let mut other = Gallery::open_for(&path, &model(), DIM).unwrap();
    let gone: Vec<i64> = (1..=600).collect();
    for id in &gone {
        other.remove_id(*id).unwrap();
    }
    drop(other);
    let g = open_hnsw(&path);
    check_matches(&g, 13, 1000, &gone);
    assert_eq!(file_count(&path), 400);
}

#[test]
fn a_foreign_index_is_never_used() {
    // Two galleries of the same model with the same ids but other faces: the index of
    // one, copied beside the other, is refused (another creation time) or caught by
    // its embeddings (created in the same second).
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    for (path, seed) in [(&a, 21), (&b, 22)] {
        let mut g = Gallery::create(path, &model(), DIM).unwrap();
        g.enroll(&faces(&mut Rng(seed), 0, 500)).unwrap();
    }
    drop(open_hnsw(&a));
    std::fs::copy(index_path(&a), index_path(&b)).unwrap();
    let g = open_hnsw(&b);
    check_matches(&g, 22, 500, &[]);
    drop(g);
    // Another model's gallery.
    let c = dir.path().join("c.db");
    let other = Fingerprint::from_bytes([4; 32]);
    let mut g = Gallery::create(&c, &other, DIM).unwrap();
    g.enroll(&faces(&mut Rng(21), 0, 500)).unwrap();
    std::fs::copy(index_path(&a), index_path(&c)).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    assert_eq!(g.index().unwrap().len(), 500);
    assert_eq!(
        g.search(&faces(&mut Rng(21), 0, 1)[0].embedding, 1)
            .unwrap()[0]
            .id,
        1
    );
}

#[test]
fn a_damaged_index_file_is_rebuilt_without_panic() {
    let (_dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&faces(&mut Rng(14), 0, 800)).unwrap();
    drop(g);
    drop(open_hnsw(&path));
    let good = std::fs::read(index_path(&path)).unwrap();
    let mut rng = Rng(99);
    let random: Vec<u8> = (0..good.len()).map(|_| rng.next_u64() as u8).collect();
    let mut wrong_magic = good.clone();
    wrong_magic[..8].copy_from_slice(b"USEARCH!");
    let mut flipped_payload = good.clone();
    let at = good.len() - 1000;
    flipped_payload[at] ^= 0x40;
    let mut flipped_header = good.clone();
    flipped_header[40] ^= 1;
    let mut more_faces = good.clone();
    more_faces[64] ^= 1;
    let mut newer = good.clone();
    newer[8] = 9;
    let mut extended = good.clone();
    extended.extend_from_slice(&[0; 64]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("a few bytes", b"MFN-HN".to_vec()),
        ("random bytes", random),
        ("random bytes after the magic", {
            let mut v = FILE_MAGIC.to_vec();
            v.extend((0..5000).map(|_| rng.next_u64() as u8));
            v
        }),
        ("wrong magic", wrong_magic),
        ("header only", good[..144].to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("one byte short", good[..good.len() - 1].to_vec()),
        ("extended", extended),
        ("a payload byte flipped", flipped_payload),
        ("a header byte flipped", flipped_header),
        ("the count changed", more_faces),
        ("a newer version", newer),
    ];
    for (what, bytes) in cases {
        std::fs::write(index_path(&path), &bytes).unwrap();
        let g = open_hnsw(&path);
        assert_eq!(g.index().unwrap().len(), 800, "{what}");
        check_matches(&g, 14, 800, &[]);
        drop(g);
        let again = std::fs::read(index_path(&path)).unwrap();
        assert_eq!(&again[..8], FILE_MAGIC, "{what}: not rewritten");
        assert_eq!(file_count(&path), 800, "{what}");
    }
    // A folder where the file should be: the index is built in memory, saving fails
    // with an error, nothing panics.
    std::fs::remove_file(index_path(&path)).unwrap();
    std::fs::create_dir(index_path(&path)).unwrap();
    let mut g = Gallery::open_for(&path, &model(), DIM).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    assert!(g.search(&[1.0; DIM], 1).is_err());
}

#[test]
fn no_temporary_files_are_left() {
    let (dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&faces(&mut Rng(15), 0, 300)).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    g.search(&[1.0; DIM], 1).unwrap();
    // A temporary file of a process that no longer runs (killed while saving).
    let stale = dir.path().join(".g.db.hnsw.999999999.tmp");
    std::fs::write(&stale, b"partial").unwrap();
    g.enroll(&faces(&mut Rng(16), 300, 10)).unwrap();
    g.flush().unwrap();
    drop(g);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}
