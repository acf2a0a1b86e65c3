//! f16 and int8 storage of embeddings: what it costs in recall@10 against f32 on
//! LFW-like and on random data (printed with `--nocapture`, gated here), the gallery's
//! file smaller by that much, the precision recorded and used on reopen (the HNSW file
//! beside it reused, not rebuilt), and damaged or foreign storage refused by name.

#[path = "common/faces.rs"]
mod faces;

use std::path::Path;

use faces::{lfw_like, unit, Rng};
use mfn_gallery::{
    Enrollment, ExactIndex, Fingerprint, Gallery, Index, IndexKind, Location, Storage,
};

/// recall@k of exact search over the `storage` round trip of `data` against exact search
/// over `data` itself, and recall@1.
fn recall(dim: usize, data: &[f32], queries: &[f32], storage: Storage, k: usize) -> (f64, f64) {
    let n = data.len() / dim;
    let ids: Vec<i64> = (0..n as i64).collect();
    let mut exact = ExactIndex::new(dim);
    exact.add(&ids, data).unwrap();
    let stored: Vec<f32> = data
        .chunks(dim)
        .flat_map(|row| storage.round_trip(row))
        .collect();
    let mut lossy = ExactIndex::new(dim);
    lossy.add(&ids, &stored).unwrap();
    let (mut found, mut total, mut first) = (0usize, 0usize, 0usize);
    for q in queries.chunks(dim) {
        let truth: Vec<i64> = exact.search(q, k).iter().map(|s| s.id).collect();
        let got: Vec<i64> = lossy.search(q, k).iter().map(|s| s.id).collect();
        found += truth.iter().filter(|id| got.contains(id)).count();
        total += truth.len();
        first += usize::from(truth.first() == got.first());
    }
    (
        found as f64 / total as f64,
        first as f64 / (queries.len() / dim) as f64,
    )
}

#[test]
fn recall_cost_of_f16_and_int8() {
    let dim = 512;
    let mut rng = Rng(0x5eed_0010);
    let (lfw, lfw_queries) = lfw_like(&mut rng, dim, 2500, 500);
    let random: Vec<f32> = (0..10_000)
        .flat_map(|_| unit(rng.gauss_vec(dim, 1.0)))
        .collect();
    let random_queries: Vec<f32> = (0..500)
        .flat_map(|_| unit(rng.gauss_vec(dim, 1.0)))
        .collect();
    for (name, data, queries) in [
        ("LFW-like", &lfw, &lfw_queries),
        ("random", &random, &random_queries),
    ] {
        for (storage, want10) in [
            (Storage::F32, 1.0),
            (Storage::F16, 0.995),
            (Storage::Int8, 0.95),
        ] {
            let (r10, r1) = recall(dim, data, queries, storage, 10);
            println!(
                "{name}, {} x {dim}-d, {storage} ({} bytes a face): recall@10 {r10:.4}, \
                 top-1 agreement {r1:.4}",
                data.len() / dim,
                storage.bytes(dim)
            );
            assert!(r10 >= want10, "{name} {storage}: recall@10 {r10}");
            if name == "LFW-like" {
                assert!(r1 >= 0.99, "{name} {storage}: top-1 {r1}");
            }
        }
    }
}

const DIM: usize = 64;

fn model() -> Fingerprint {
    Fingerprint::from_bytes([5; 32])
}

fn faces(rng: &mut Rng, n: usize) -> Vec<Enrollment> {
    (0..n)
        .map(|i| Enrollment {
            label: format!("person-{}", i / 4),
            embedding: rng.gauss_vec(DIM, 1.0),
            source: None,
        })
        .collect()
}

fn size(path: &Path) -> u64 {
    // The WAL is checkpointed into the file when the last connection closes.
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn the_storage_is_recorded_and_used_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let batch = faces(&mut Rng(0x5eed_0011), 2000);
    let mut sizes = Vec::new();
    for storage in Storage::ALL {
        let path = dir.path().join(format!("{storage}.db"));
        let mut g = Gallery::create_with(&path, &model(), DIM, storage).unwrap();
        g.set_index_kind(IndexKind::hnsw());
        // The index built before the enrollment is kept in step with it.
        g.search(&[1.0; DIM], 1).unwrap();
        let ids = g.enroll(&batch).unwrap();
        let before: Vec<Vec<i64>> = batch
            .iter()
            .take(50)
            .map(|f| {
                g.search(&f.embedding, 5)
                    .unwrap()
                    .iter()
                    .map(|h| h.id)
                    .collect()
            })
            .collect();
        assert_eq!(g.storage(), storage);
        drop(g);
        let hnsw = mfn_gallery::hnsw::index_path(&path);
        let saved = std::fs::metadata(&hnsw).unwrap().modified().unwrap();

        let mut g = Gallery::open_for(&path, &model(), DIM).unwrap();
        let stats = g.stats().unwrap();
        assert_eq!(stats.storage, storage);
        assert_eq!(
            stats.format_version,
            if storage == Storage::F32 { 1 } else { 2 }
        );
        g.set_index_kind(IndexKind::hnsw());
        for (f, want) in batch.iter().zip(&before) {
            let got: Vec<i64> = g
                .search(&f.embedding, 5)
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect();
            assert_eq!(&got, want, "{storage}");
        }
        // The file's embeddings are bit for bit those the index was given: it is reused.
        assert_eq!(
            std::fs::metadata(&hnsw).unwrap().modified().unwrap(),
            saved,
            "{storage}: the HNSW index was rebuilt"
        );
        // Each face is its own best match, at a cosine close to 1.
        let hit = &g.search(&batch[7].embedding, 1).unwrap()[0];
        assert_eq!(hit.id, ids[7]);
        assert!(hit.score > 0.999, "{storage}: {}", hit.score);
        // Exact search over the stored values agrees with the HNSW index on the top face.
        g.set_index_kind(IndexKind::Exact);
        assert_eq!(g.search(&batch[7].embedding, 1).unwrap()[0].id, ids[7]);
        drop(g);
        sizes.push(size(&path));
    }
    println!("file sizes f32 / f16 / int8: {sizes:?}");
    // Embeddings dominate: f16 about halves the file, int8 about quarters it.
    assert!(sizes[1] * 10 < sizes[0] * 6, "{sizes:?}");
    assert!(sizes[2] * 100 < sizes[0] * 45, "{sizes:?}");
}

#[test]
fn damaged_or_foreign_storage_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    let mut g = Gallery::create_with(&path, &model(), DIM, Storage::Int8).unwrap();
    g.enroll(&faces(&mut Rng(0x5eed_0012), 3)).unwrap();
    drop(g);

    // A row with an f32-sized BLOB in an int8 gallery: named, with the size it should be.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute(
        "UPDATE faces SET embedding = zeroblob(?1) WHERE id = 2",
        [(DIM * 4) as i64],
    )
    .unwrap();
    drop(c);
    let g = Gallery::open_for(&path, &model(), DIM).unwrap();
    let err = g.search(&[1.0; DIM], 1).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("row id 2"), "{err}");
    assert!(err.contains(&format!("{} bytes", DIM + 4)), "{err}");
    drop(g);

    // An int8 scale that is not finite: refused, not searched.
    let c = rusqlite::Connection::open(&path).unwrap();
    let mut blob = vec![0u8; DIM + 4];
    blob[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    blob[4] = 1;
    c.execute("UPDATE faces SET embedding = ?1 WHERE id = 2", [blob])
        .unwrap();
    drop(c);
    let g = Gallery::open_for(&path, &model(), DIM).unwrap();
    let err = g.search(&[1.0; DIM], 1).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("inf"), "{err}");
    drop(g);

    // A storage this build does not know.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute("UPDATE meta SET value = 'f64' WHERE key = 'storage'", [])
        .unwrap();
    drop(c);
    let err = Gallery::open(&path).err().expect("opened").to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("`f64`"), "{err}");

    // PostgreSQL stores f32: another storage is refused before connecting, password
    // masked.
    let url = "postgres://me:hunter2@127.0.0.1:1/faces";
    let err = Gallery::create_with(Location::parse(url), &model(), DIM, Storage::F16)
        .err()
        .expect("created")
        .to_string();
    assert!(err.contains("f32") && err.contains("f16"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
