//! Store, search and identification round trips; atomic batches; refusals of other
//! models' galleries and of corrupt or foreign files; exact search against brute force.

use std::path::{Path, PathBuf};

use mfn_gallery::{
    Enrollment, Error, ExactIndex, Fingerprint, Gallery, Identity, Index, Location, FORMAT_VERSION,
};

const DIM: usize = 8;

fn model() -> Fingerprint {
    Fingerprint::from_bytes([1; 32])
}

/// A small deterministic generator (xorshift), so the tests need no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn unit(&mut self, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| self.next()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}

fn face(label: &str, embedding: Vec<f32>) -> Enrollment {
    Enrollment {
        label: label.into(),
        embedding,
        source: Some(format!("{label}.jpg")),
    }
}

fn axis(i: usize, scale: f32) -> Vec<f32> {
    let mut v = vec![0.0; DIM];
    v[i] = scale;
    v
}

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    (dir, path)
}

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn round_trip_search_identify_remove_reopen() {
    let (_dir, path) = temp();
    let mut g = Gallery::open_or_create(&path, &model(), DIM).unwrap();
    assert!(g.is_empty().unwrap());
    let ids = g
        .enroll(&[
            face("ada", axis(0, 2.0)),
            face("ada", {
                let mut v = axis(0, 1.0);
                v[1] = 0.2;
                v
            }),
            face("grace", axis(1, 0.5)),
        ])
        .unwrap();
    assert_eq!(ids, [1, 2, 3]);
    // Search before and after more enrollments: the loaded index keeps in step.
    let hits = g.search(&axis(0, 1.0), 3).unwrap();
    assert_eq!(hits[0].id, 1);
    assert!((hits[0].score - 1.0).abs() < 1e-6, "stored unit length");
    assert_eq!(hits[1].label, "ada");
    assert_eq!(hits[2].label, "grace");
    let more = g.enroll(&[face("linus", axis(2, 1.0))]).unwrap();
    assert_eq!(more, [4]);
    assert_eq!(g.search(&axis(2, 3.0), 1).unwrap()[0].label, "linus");
    let people = g.search_labels(&axis(0, 1.0), 2).unwrap();
    assert_eq!(
        people.iter().map(|h| h.label.as_str()).collect::<Vec<_>>(),
        ["ada", "grace"]
    );

    match g.identify(&axis(1, 1.0), 0.5).unwrap() {
        Identity::Known(hit) => assert_eq!((hit.id, hit.label.as_str()), (3, "grace")),
        other => panic!("{other:?}"),
    }
    match g.identify(&axis(5, 1.0), 0.3).unwrap() {
        Identity::Unknown { best: Some(best) } => assert!(best.score.abs() < 1e-6),
        other => panic!("{other:?}"),
    }
    assert!(g.identify(&axis(5, 1.0), 1.5).is_err());

    assert_eq!(g.remove_label("ada").unwrap(), 2);
    assert!(!g.remove_id(99).unwrap());
    assert!(g.remove_id(4).unwrap());
    assert_eq!(g.search(&axis(0, 1.0), 5).unwrap().len(), 1);
    drop(g);

    let g = Gallery::open_for(&path, &model(), DIM).unwrap();
    let list = g.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].id,
            list[0].label.as_str(),
            list[0].source.as_deref()
        ),
        (3, "grace", Some("grace.jpg"))
    );
    assert!(list[0].time > 1_600_000_000);
    let stats = g.stats().unwrap();
    assert_eq!((stats.faces, stats.labels, stats.dim), (1, 1, DIM));
    // An f32 gallery keeps the first format, which every build reads.
    assert_eq!(stats.format_version, 1);
    assert!(FORMAT_VERSION >= stats.format_version);
    assert_eq!(stats.storage, mfn_gallery::Storage::F32);
    assert_eq!(stats.fingerprint, model().hex());
    // Removed ids are not reused.
    let mut g = g;
    assert_eq!(g.enroll(&[face("new", axis(3, 1.0))]).unwrap(), [5]);
}

#[test]
fn empty_gallery_answers_unknown() {
    let (_dir, path) = temp();
    let g = Gallery::create(&path, &model(), DIM).unwrap();
    assert!(g.search(&axis(0, 1.0), 3).unwrap().is_empty());
    assert_eq!(
        g.identify(&axis(0, 1.0), 0.0).unwrap(),
        Identity::Unknown { best: None }
    );
    assert!(Gallery::create(&path, &model(), DIM).is_err(), "exists");
}

#[test]
fn a_failing_batch_leaves_nothing() {
    let (_dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&[face("before", axis(0, 1.0))]).unwrap();
    g.search(&axis(0, 1.0), 1).unwrap(); // the index is loaded
    let mut nan = axis(1, 1.0);
    nan[3] = f32::NAN;
    let batch = [
        face("a", axis(1, 1.0)),
        face("b", axis(2, 1.0)),
        face("c", nan),
        face("d", axis(3, 1.0)),
    ];
    let err = message(g.enroll(&batch).unwrap_err());
    assert!(err.contains("enrollment 2") && err.contains("NaN"), "{err}");
    for bad in [
        vec![face("x", axis(1, 1.0)), face("y", vec![1.0; DIM + 1])],
        vec![face("x", axis(1, 1.0)), face("", axis(2, 1.0))],
        vec![face("x", axis(1, 1.0)), face("zero", vec![0.0; DIM])],
    ] {
        assert!(g.enroll(&bad).is_err());
    }
    assert_eq!(g.len().unwrap(), 1);
    assert_eq!(g.search(&axis(1, 1.0), 10).unwrap().len(), 1);
    drop(g);
    let g = Gallery::open(&path).unwrap();
    let labels: Vec<String> = g.list().unwrap().into_iter().map(|f| f.label).collect();
    assert_eq!(labels, ["before"]);
}

#[test]
fn another_models_gallery_is_refused() {
    let (_dir, path) = temp();
    Gallery::create(&path, &model(), DIM).unwrap();
    let other = Fingerprint::from_bytes([2; 32]);
    let err = message(Gallery::open_for(&path, &other, DIM).err().unwrap());
    assert!(err.contains("g.db"), "{err}");
    assert!(
        err.contains(&model().short()) && err.contains(&other.short()),
        "{err}"
    );
    assert!(Gallery::open_or_create(&path, &other, DIM).is_err());
    assert!(Gallery::open_for(&path, &model(), DIM + 1).is_err());
    // Listing needs no model.
    assert!(Gallery::open(&path).is_ok());
}

/// Without a server: the error names the database, its password masked (the PostgreSQL
/// backend itself is tested against a real server in `postgres.rs`).
#[test]
fn postgres_unreachable_is_named_without_its_password() {
    let err = message(
        Gallery::open("postgres://u:pw@127.0.0.1:1/faces")
            .err()
            .unwrap(),
    );
    assert!(
        err.starts_with("postgres://u:***@127.0.0.1:1/faces: ") && !err.contains("pw"),
        "{err}"
    );
    assert_eq!(
        Location::parse("sqlite:x.db"),
        Location::Sqlite(PathBuf::from("x.db"))
    );
}

fn refused(path: &Path, want: &str) -> String {
    let err = match Gallery::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => message(e),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains(want), "expected `{want}` in: {err}");
    err
}

#[test]
fn foreign_and_corrupt_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    std::fs::write(p("empty.db"), b"").unwrap();
    refused(&p("empty.db"), "empty");

    let mut rng = Rng(99);
    let noise: Vec<u8> = (0..10_000)
        .map(|_| (rng.next() * 127.0) as i8 as u8)
        .collect();
    std::fs::write(p("noise.db"), &noise).unwrap();
    refused(&p("noise.db"), "not a SQLite database");

    // SQLite's header followed by garbage.
    let mut fake = b"SQLite format 3\0".to_vec();
    fake.extend_from_slice(&noise);
    std::fs::write(p("fake.db"), &fake).unwrap();
    refused(&p("fake.db"), "not a face gallery");

    refused(&p("missing.db"), "no such gallery file");
    refused(dir.path(), "not a regular file");

    let other = rusqlite::Connection::open(p("other.db")).unwrap();
    other
        .execute_batch("CREATE TABLE people (name TEXT); CREATE TABLE meta (k, v);")
        .unwrap();
    drop(other);
    refused(
        &p("other.db"),
        "without a gallery's `meta` and `faces` tables",
    );
    // Not even switched to WAL: a foreign file is left as it was.
    assert!(!p("other.db-wal").exists());

    // Our tables, another format name.
    let other = rusqlite::Connection::open(p("named.db")).unwrap();
    other
        .execute_batch(
            "CREATE TABLE meta (key TEXT, value TEXT); CREATE TABLE faces (id INTEGER);
             INSERT INTO meta VALUES ('format', 'something-else');",
        )
        .unwrap();
    drop(other);
    refused(&p("named.db"), "something-else");

    // A newer format.
    Gallery::create(p("future.db"), &model(), DIM).unwrap();
    let c = rusqlite::Connection::open(p("future.db")).unwrap();
    c.execute("UPDATE meta SET value = '99' WHERE key = 'version'", [])
        .unwrap();
    drop(c);
    refused(&p("future.db"), "format version 99");

    // A malformed dimension.
    Gallery::create(p("dim.db"), &model(), DIM).unwrap();
    let c = rusqlite::Connection::open(p("dim.db")).unwrap();
    c.execute(
        "UPDATE meta SET value = '99999999999' WHERE key = 'dim'",
        [],
    )
    .unwrap();
    drop(c);
    refused(&p("dim.db"), "dimension");
}

/// A gallery with three good faces and `sql` run on its file afterwards.
fn damaged(dir: &Path, name: &str, sql: &str) -> PathBuf {
    let path = dir.join(name);
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&[
        face("a", axis(0, 1.0)),
        face("b", axis(1, 1.0)),
        face("c", axis(2, 1.0)),
    ])
    .unwrap();
    drop(g);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(sql).unwrap();
    drop(c);
    path
}

#[test]
fn damaged_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "short.db",
            "UPDATE faces SET embedding = x'00000000' WHERE id = 2",
            "row id 2: the embedding is 4 bytes",
        ),
        (
            "nan.db",
            // 8 f32: a quiet NaN (0x7fc00000) first.
            "UPDATE faces SET embedding = x'0000c07f00000000000000000000000000000000000000000000000000000000' WHERE id = 3",
            "row id 3: value 0 of the embedding is NaN",
        ),
        (
            "text.db",
            "UPDATE faces SET embedding = 'hello' WHERE id = 1",
            "row id 1: the embedding is text",
        ),
        (
            "label.db",
            "UPDATE faces SET label = x'00ff' WHERE id = 2",
            "row id 2: the label is a BLOB of 2 bytes",
        ),
        (
            "huge.db",
            "UPDATE faces SET embedding = zeroblob(5000000) WHERE id = 1",
            "row id 1: the embedding is 5000000 bytes",
        ),
        (
            "longlabel.db",
            "UPDATE faces SET label = printf('%.5000c', 'x') WHERE id = 3",
            "row id 3: the label is text of 5000 bytes",
        ),
    ];
    for (name, sql, want) in cases {
        let path = damaged(dir.path(), name, sql);
        // Opening works (rows are read lazily); the first search reads them and refuses.
        let g = Gallery::open_for(&path, &model(), DIM).unwrap();
        let err = match g.search(&axis(0, 1.0), 1) {
            Ok(hits) => panic!("{name}: searched {hits:?}"),
            Err(e) => message(e),
        };
        assert!(err.contains(name), "{err}");
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
}

#[test]
fn the_index_refuses_a_gallery_over_its_memory_limit() {
    let (_dir, path) = temp();
    let mut g = Gallery::create(&path, &model(), DIM).unwrap();
    g.enroll(&[face("a", axis(0, 1.0)), face("b", axis(1, 1.0))])
        .unwrap();
    g.set_memory_limit(64);
    let err = message(g.search(&axis(0, 1.0), 1).unwrap_err());
    assert!(err.contains("above the limit"), "{err}");
}

/// The reference: every score in f64, sorted best first, ties by id.
fn brute_force(data: &[f32], ids: &[i64], dim: usize, q: &[f32], k: usize) -> Vec<(i64, f64)> {
    let mut all: Vec<(i64, f64)> = data
        .chunks(dim)
        .zip(ids)
        .map(|(row, &id)| {
            let s = row.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum();
            (id, s)
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

#[test]
fn exact_top_k_equals_brute_force() {
    let mut rng = Rng(7);
    for (n, dim, k) in [
        (1, 3, 5),
        (100, 17, 10),
        (20_000, 64, 10),
        (30_000, 512, 50),
    ] {
        let mut index = ExactIndex::new(dim);
        let mut data = Vec::new();
        let ids: Vec<i64> = (0..n as i64).map(|i| i * 3 + 1).collect();
        for _ in 0..n {
            data.extend(rng.unit(dim));
        }
        index.add(&ids, &data).unwrap();
        for _ in 0..5 {
            let q = rng.unit(dim);
            let want = brute_force(&data, &ids, dim, &q, k);
            for got in [index.search(&q, k), index.search_serial(&q, k)] {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!((g.score as f64 - w.1).abs() < 1e-5, "{g:?} vs {w:?}");
                    if g.id != w.0 {
                        // Only a near-tie may swap places.
                        let gs = brute_force(&data, &ids, dim, &q, n)
                            .into_iter()
                            .find(|x| x.0 == g.id)
                            .unwrap()
                            .1;
                        assert!((gs - w.1).abs() < 1e-5, "{g:?} vs {w:?}");
                    }
                }
            }
        }
        let many: Vec<f32> = (0..3).flat_map(|_| rng.unit(dim)).collect();
        let batched = index.search_many(&many, k);
        for (q, got) in many.chunks(dim).zip(&batched) {
            assert_eq!(got, &index.search_serial(q, k));
        }
    }
}
