//! The PostgreSQL + pgvector store against a real server (see `common/pg.rs` for where the
//! server comes from): round trips equal to the SQLite store's on the same data, HNSW
//! recall against exact search, refusals of other models' galleries (the password masked)
//! and of foreign schemas, atomic batches, and two handles sharing one gallery.

mod common;

use common::pg::PgServer;
use common::Rng;
use mfn_gallery::{
    Enrollment, Error, ExactIndex, Fingerprint, Gallery, Identity, Index, IndexKind, Location,
    PgStore, ServerSearch, Store,
};

fn model() -> Fingerprint {
    Fingerprint::from_bytes([1; 32])
}

fn face(label: &str, embedding: Vec<f32>) -> Enrollment {
    Enrollment {
        label: label.into(),
        embedding,
        source: Some(format!("{label}.jpg")),
    }
}

/// `n` faces of `dim` values under `people` labels, each person's faces near one centre.
fn people(rng: &mut Rng, n: usize, people: usize, dim: usize) -> Vec<Enrollment> {
    let centres: Vec<Vec<f32>> = (0..people).map(|_| rng.unit(dim)).collect();
    (0..n)
        .map(|i| {
            let p = i % people;
            let e = centres[p]
                .iter()
                .map(|c| c + 0.4 * rng.next() / (dim as f32).sqrt())
                .collect();
            Enrollment {
                label: format!("person-{p:03}"),
                embedding: e,
                source: (i % 3 != 0).then(|| format!("photos/{i}.jpg")),
            }
        })
        .collect()
}

fn exact(g: &mut Gallery) {
    g.set_server_search(ServerSearch::Exact);
}

/// Hits as (id, label) with scores compared to a tolerance.
fn same_hits(a: &[mfn_gallery::Hit], b: &[mfn_gallery::Hit], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.id, &x.label), (y.id, &y.label), "{what}: {a:?} vs {b:?}");
        assert!((x.score - y.score).abs() < 1e-5, "{what}: {x:?} vs {y:?}");
    }
}

#[test]
fn same_answers_as_sqlite() {
    let server = PgServer::start();
    let url = server.url("postgres");
    let dir = tempfile::tempdir().unwrap();
    let dim = 64;
    let mut sq = Gallery::create(dir.path().join("g.db"), &model(), dim).unwrap();
    let mut pg = Gallery::open_or_create(url.as_str(), &model(), dim).unwrap();
    assert_eq!(pg.store().backend(), "postgres");
    assert!(pg.is_empty().unwrap());
    exact(&mut pg);

    let mut rng = Rng(0x5eed);
    let faces = people(&mut rng, 600, 40, dim);
    // Two batches, one larger than an INSERT chunk.
    for batch in [&faces[..500], &faces[500..]] {
        assert_eq!(sq.enroll(batch).unwrap(), pg.enroll(batch).unwrap());
    }
    let strip = |g: &Gallery| -> Vec<(i64, String, Option<String>)> {
        g.list()
            .unwrap()
            .into_iter()
            .map(|f| (f.id, f.label, f.source))
            .collect()
    };
    let compare = |sq: &Gallery, pg: &Gallery, rng: &mut Rng, when: &str| {
        assert_eq!(strip(sq), strip(pg), "{when}: list");
        assert_eq!(sq.labels().unwrap(), pg.labels().unwrap(), "{when}: labels");
        let (a, b) = (sq.stats().unwrap(), pg.stats().unwrap());
        assert_eq!(
            (
                a.faces,
                a.labels,
                a.max_faces_per_label,
                a.dim,
                &a.fingerprint
            ),
            (
                b.faces,
                b.labels,
                b.max_faces_per_label,
                b.dim,
                &b.fingerprint
            ),
            "{when}: stats"
        );
        assert_eq!(b.backend, "postgres");
        assert_eq!(b.file_bytes, None);
        for i in 0..20 {
            // Probes near enrolled people and random ones, at any scale.
            let q: Vec<f32> = if i % 2 == 0 {
                faces[i * 7].embedding.iter().map(|v| v * 3.0).collect()
            } else {
                rng.unit(dim)
            };
            let what = format!("{when}: query {i}");
            same_hits(
                &sq.search(&q, 10).unwrap(),
                &pg.search(&q, 10).unwrap(),
                &what,
            );
            same_hits(
                &sq.search_labels(&q, 5).unwrap(),
                &pg.search_labels(&q, 5).unwrap(),
                &what,
            );
            let (x, y) = (sq.identify(&q, 0.8).unwrap(), pg.identify(&q, 0.8).unwrap());
            assert_eq!(x.label(), y.label(), "{what}");
            let best = |i: &Identity| i.best().cloned().into_iter().collect::<Vec<_>>();
            same_hits(&best(&x), &best(&y), &format!("{what}: identify"));
        }
    };
    compare(&sq, &pg, &mut rng, "enrolled");

    // Removals answer the same and leave the same.
    assert_eq!(
        sq.remove_label("person-007").unwrap(),
        pg.remove_label("person-007").unwrap()
    );
    assert_eq!(pg.remove_label("person-007").unwrap(), 0);
    for id in [1, 2, 8, 9999] {
        assert_eq!(
            sq.remove_id(id).unwrap(),
            pg.remove_id(id).unwrap(),
            "id {id}"
        );
    }
    compare(&sq, &pg, &mut rng, "after removals");

    // HNSW finds the same best face for probes near enrolled people.
    pg.set_server_search(ServerSearch::from(IndexKind::hnsw()));
    for i in (0..600).step_by(37) {
        let q = &faces[i].embedding;
        let top = |g: &Gallery| g.search(q, 1).unwrap()[0].id;
        assert_eq!(top(&sq), top(&pg), "face {i}");
    }
    // A fresh handle agrees; its in-memory index, read by a scan, too.
    drop(pg);
    let mut again = Gallery::open_for(url.as_str(), &model(), dim).unwrap();
    exact(&mut again);
    compare(&sq, &again, &mut rng, "reopened");
    let index = again.index().unwrap();
    assert_eq!(index.len() as u64, sq.len().unwrap());
    let q = rng.unit(dim);
    let from_scan: Vec<i64> = index.search(&q, 10).iter().map(|s| s.id).collect();
    let from_server: Vec<i64> = again.search(&q, 10).unwrap().iter().map(|h| h.id).collect();
    assert_eq!(from_scan, from_server);
}

#[test]
fn hnsw_recall_against_exact() {
    let server = PgServer::start();
    let url = server.url("postgres");
    let (dim, n, queries, k) = (64, 4000, 100, 10);
    let mut g = Gallery::create(url.as_str(), &model(), dim).unwrap();
    let mut rng = Rng(42);
    let mut truth = ExactIndex::new(dim);
    let faces: Vec<Enrollment> = (0..n)
        .map(|i| face(&format!("p{i}"), rng.unit(dim)))
        .collect();
    let ids = g.enroll(&faces).unwrap();
    for (id, f) in ids.iter().zip(&faces) {
        truth.push(*id, &f.embedding).unwrap();
    }
    // The planner takes the HNSW index for the search the store sends.
    let plan: Vec<String> = common::client(&server, "postgres")
        .query(
            &format!(
                "EXPLAIN SELECT id FROM mfn_faces ORDER BY embedding <#> '{:?}' LIMIT 10",
                faces[0].embedding
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("mfn_faces_embedding")),
        "{plan:#?}"
    );

    let (mut found, mut exact_found) = (0, 0);
    for _ in 0..queries {
        let q = rng.unit(dim);
        let want: Vec<i64> = truth.search(&q, k).iter().map(|s| s.id).collect();
        g.set_server_search(ServerSearch::from(IndexKind::hnsw()));
        let approx = g.search(&q, k).unwrap();
        assert_eq!(approx.len(), k);
        assert!(approx.windows(2).all(|w| w[0].score >= w[1].score));
        found += approx.iter().filter(|h| want.contains(&h.id)).count();
        g.set_server_search(ServerSearch::Exact);
        let got: Vec<i64> = g.search(&q, k).unwrap().iter().map(|h| h.id).collect();
        exact_found += got.iter().filter(|id| want.contains(id)).count();
        assert_eq!(got, want, "exact search on the server is the true top-{k}");
    }
    let recall = found as f64 / (queries * k) as f64;
    eprintln!("HNSW recall@{k} on {n} random {dim}-d vectors: {recall:.4}");
    assert!(recall >= 0.95, "recall@{k} {recall}");
    assert_eq!(exact_found, queries * k);

    // Deeper than pgvector's HNSW goes (1000): exact, every face.
    g.set_server_search(ServerSearch::from(IndexKind::hnsw()));
    let all = g.search(&rng.unit(dim), n + 5).unwrap();
    assert_eq!(all.len(), n);
}

#[test]
fn other_models_refused_password_masked() {
    let server = PgServer::start();
    // Trust authentication takes any password: it is there to be masked.
    let url = format!(
        "postgres://{}:hunter2-secret@127.0.0.1:{}/postgres",
        common::pg::USER,
        server.port()
    );
    let mut g = Gallery::create(url.as_str(), &model(), 8).unwrap();
    g.enroll(&[face("ada", vec![1.0; 8])]).unwrap();
    assert!(!g.location().contains("hunter2"), "{}", g.location());
    drop(g);
    let other = Fingerprint::from_bytes([2; 32]);
    for result in [
        Gallery::open_for(url.as_str(), &other, 8),
        Gallery::open_or_create(url.as_str(), &other, 8),
    ] {
        let err = result.err().expect("refused");
        assert!(matches!(err, Error::ModelMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(
            msg.contains(&format!("{}:***@127.0.0.1", common::pg::USER)),
            "{msg}"
        );
        assert!(
            msg.contains(&model().short()) && msg.contains(&other.short()),
            "{msg}"
        );
    }
    // Another dimension, too.
    let err = Gallery::open_for(url.as_str(), &model(), 16).err().unwrap();
    assert!(err.to_string().contains("8 values"), "{err}");
    // Creating over it is refused.
    let err = Gallery::create(url.as_str(), &model(), 8).err().unwrap();
    assert!(err.to_string().contains("already holds a gallery"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"));
    // A server that is not there: the URL without its password, the client's reason.
    let down = "postgres://me:hunter2-secret@127.0.0.1:1/x?password=hunter2-secret";
    let err = Gallery::open(down).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Postgres { .. }), "{err:?}");
    assert!(
        msg.starts_with("postgres://me:***@127.0.0.1:1/x?password=***: "),
        "{msg}"
    );
    assert!(msg.contains("connect"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    // A URL that does not parse.
    let err = Gallery::open("postgres://me:hunter2-secret@127.0.0.1:nope/x")
        .err()
        .unwrap();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn a_batch_is_atomic_and_ids_never_reused() {
    let server = PgServer::start();
    let url = server.url("postgres");
    let dim = 16;
    let mut g = Gallery::create(url.as_str(), &model(), dim).unwrap();
    let mut rng = Rng(7);
    let mut batch: Vec<Enrollment> = (0..600)
        .map(|i| face(&format!("p{i}"), rng.unit(dim)))
        .collect();
    // Past the first INSERT chunk, so rows were written before the bad one.
    batch[520].embedding[3] = f32::NAN;
    let err = g.enroll(&batch).unwrap_err();
    assert!(err.to_string().contains("enrollment 520"), "{err}");
    assert_eq!(g.len().unwrap(), 0, "nothing of the batch stays");
    assert_eq!(
        common::client(&server, "postgres")
            .query_one("SELECT count(*) FROM mfn_faces", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    // An invalid face later in a batch fails it the same.
    let err = g
        .enroll(&[face("ok", rng.unit(dim)), face("", rng.unit(dim))])
        .unwrap_err();
    assert!(err.to_string().contains("label is empty"), "{err}");
    assert_eq!(g.len().unwrap(), 0);

    let ids = g
        .enroll(&[face("a", rng.unit(dim)), face("b", rng.unit(dim))])
        .unwrap();
    assert!(ids[0] < ids[1]);
    assert!(g.remove_id(ids[1]).unwrap());
    let next = g.enroll(&[face("c", rng.unit(dim))]).unwrap();
    assert!(
        next[0] > ids[1],
        "ids are never reused: {next:?} after {ids:?}"
    );
    // Ids come back in batch order.
    let many: Vec<Enrollment> = (0..700)
        .map(|i| face(&format!("q{i}"), rng.unit(dim)))
        .collect();
    let ids = g.enroll(&many).unwrap();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let listed = g.list().unwrap();
    for (id, f) in ids.iter().zip(&many) {
        let row = listed.iter().find(|r| r.id == *id).unwrap();
        assert_eq!(row.label, f.label);
    }
}

#[test]
fn two_machines_share_one_gallery() {
    let server = PgServer::start();
    let url = server.url("postgres");
    let dim = 32;
    let mut rng = Rng(99);
    let mut a = Gallery::open_or_create(url.as_str(), &model(), dim).unwrap();
    let mut b = Gallery::open_or_create(url.as_str(), &model(), dim).unwrap();
    let ada = rng.unit(dim);
    let grace = rng.unit(dim);
    a.enroll(&[face("ada", ada.clone())]).unwrap();
    assert_eq!(b.len().unwrap(), 1);
    assert_eq!(b.search(&ada, 1).unwrap()[0].label, "ada");
    b.enroll(&[face("grace", grace.clone())]).unwrap();
    for g in [&a, &b] {
        match g.identify(&grace, 0.9).unwrap() {
            Identity::Known(hit) => assert_eq!(hit.label, "grace"),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.labels().unwrap().len(), 2);
    }
    // Uncommitted faces are not seen: a batch in flight on `b` is invisible to `a`.
    let mut raw = common::client(&server, "postgres");
    let mut tx = raw.transaction().unwrap();
    tx.batch_execute(&format!(
        "INSERT INTO mfn_faces (label, embedding, time) VALUES ('ghost', '{:?}', 0)",
        rng.unit(dim)
    ))
    .unwrap();
    assert_eq!(a.len().unwrap(), 2);
    tx.rollback().unwrap();
    assert_eq!(b.remove_label("ada").unwrap(), 1);
    assert!(matches!(
        a.identify(&ada, 0.9).unwrap(),
        Identity::Unknown { .. }
    ));
    assert_eq!(a.list().unwrap().len(), 1);
}

#[test]
fn foreign_or_damaged_schemas_refused() {
    let server = PgServer::start();
    let empty = server.database("empty");
    let err = Gallery::open(empty.as_str()).err().unwrap();
    assert!(matches!(err, Error::NotAGallery { .. }), "{err:?}");
    assert!(
        err.to_string().contains("mfn_meta and mfn_faces tables"),
        "{err}"
    );
    assert!(!Gallery::exists(&Location::parse(&empty)).unwrap());

    let check = |db: &str, setup: &str, expect: &str| {
        let url = server.database(db);
        Gallery::create(url.as_str(), &model(), 8).unwrap();
        common::client(&server, db).batch_execute(setup).unwrap();
        let err = Gallery::open(url.as_str())
            .err()
            .unwrap_or_else(|| panic!("{db} opened"));
        let msg = err.to_string();
        assert!(msg.contains(expect), "{db}: {msg}");
        assert!(msg.starts_with(&url), "{db}: names the database: {msg}");
    };
    check(
        "foreign_meta",
        "DROP TABLE mfn_meta; CREATE TABLE mfn_meta (a int)",
        "not a gallery",
    );
    check(
        "other_format",
        "UPDATE mfn_meta SET value = 'x' WHERE key = 'format'",
        "format `x`",
    );
    check(
        "newer",
        "UPDATE mfn_meta SET value = '99' WHERE key = 'version'",
        "version 99",
    );
    check(
        "bad_print",
        "UPDATE mfn_meta SET value = 'zz' WHERE key = 'fingerprint'",
        "fingerprint",
    );
    check(
        "bad_dim",
        "UPDATE mfn_meta SET value = '16' WHERE key = 'dim'",
        "`vector(8)`, not `vector(16)`",
    );
    check(
        "huge_meta",
        "UPDATE mfn_meta SET value = repeat('7', 100000) WHERE key = 'dim'",
        "longer than",
    );
    check(
        "no_faces",
        "DROP TABLE mfn_faces",
        "without a gallery's mfn_faces table",
    );
    check(
        "other_column",
        "ALTER TABLE mfn_faces ALTER COLUMN source TYPE varchar(10)",
        "`mfn_faces.source` is `character varying(10)`",
    );

    // A damaged row names itself when read.
    let url = server.database("bad_row");
    let mut g = Gallery::create(url.as_str(), &model(), 8).unwrap();
    g.enroll(&[face("ada", vec![1.0; 8])]).unwrap();
    common::client(&server, "bad_row")
        .batch_execute(
            "ALTER TABLE mfn_faces DROP CONSTRAINT mfn_faces_label_check;
             UPDATE mfn_faces SET label = repeat('x', 5000)",
        )
        .unwrap();
    let err = g.list().unwrap_err().to_string();
    assert!(
        err.contains("row id 1") && err.contains("5000 bytes"),
        "{err}"
    );
    let err = g.search(&[1.0; 8], 1).unwrap_err().to_string();
    assert!(err.contains("row id 1"), "{err}");
}

#[test]
fn bulk_load_without_the_index() {
    let server = PgServer::start();
    let url = server.url("postgres");
    let dim = 16;
    let mut store = PgStore::create(&url, &model(), dim).unwrap();
    assert!(store.has_search_index().unwrap());
    store.drop_search_index().unwrap();
    assert!(!store.has_search_index().unwrap());
    let mut g = Gallery::with_store(Box::new(store));
    let mut rng = Rng(3);
    let faces: Vec<Enrollment> = (0..300)
        .map(|i| face(&format!("p{i}"), rng.unit(dim)))
        .collect();
    g.enroll(&faces).unwrap();
    let q = rng.unit(dim);
    // Without the index an HNSW search is a scan: exact.
    let scanned = g.search(&q, 5).unwrap();
    g.set_server_search(ServerSearch::Exact);
    same_hits(&scanned, &g.search(&q, 5).unwrap(), "no index");
    drop(g);
    let mut store = PgStore::open(&url).unwrap();
    store.build_search_index().unwrap();
    assert!(store.has_search_index().unwrap());
    assert_eq!(store.count().unwrap(), 300);
}
