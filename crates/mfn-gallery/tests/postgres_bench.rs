//! pgvector's HNSW index against exact search, on random unit-length 512-d vectors: load
//! and index build times, batch-1 top-10 latency (client to server and back, on
//! 127.0.0.1) and recall@10 against the true top-10, for random queries (the hardest case:
//! every vector is nearly as far as any other) and for probes near an enrolled vector (as
//! identification sends them), with how often the true best face comes first.
//!
//! ```sh
//! MFN_PG_BENCH_ROWS=100000 cargo test --release -p mfn-gallery --test postgres_bench \
//!     -- --ignored --nocapture
//! ```
//!
//! Rows default to 100000. The server gets 2 GB of shared buffers, 4 GB of
//! `maintenance_work_mem` (the HNSW graph is built in memory when it fits) and every core
//! for the parallel build.
//!
//! `hnsw_on_scale_bench_vectors` loads the very vectors `examples/scale_bench.rs` wrote
//! (`--out DIR`: `base.f32`, `q_lfw.f32`, `q_rand.f32`), so pgvector is measured on the
//! data MFN's index and FAISS were:
//!
//! ```sh
//! MFN_PG_BENCH_VECTORS=DIR MFN_PG_BENCH_EF=128,256,384,512 MFN_PG_BENCH_WORKERS=2 \
//!     cargo test --release -p mfn-gallery --test postgres_bench -- --ignored --nocapture \
//!     hnsw_on_scale_bench_vectors
//! ```

mod common;

use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::Rng;
use mfn_gallery::{
    Enrollment, ExactIndex, Fingerprint, Gallery, Index, PgStore, ServerSearch, Store,
};

const DIM: usize = 512;
const K: usize = 10;

fn median_and_p95(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p95 = times[((times.len() * 95).div_ceil(100)).min(times.len()) - 1];
    (ms(times[times.len() / 2]), ms(p95))
}

#[test]
#[ignore = "a benchmark: minutes of index build"]
fn hnsw_against_exact() {
    let rows: usize = std::env::var("MFN_PG_BENCH_ROWS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100_000);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = cores.saturating_sub(1).max(1).to_string();
    let processes = (cores + 8).to_string();
    let server = PgServer::start_with(&[
        ("shared_buffers", "2GB"),
        ("maintenance_work_mem", "4GB"),
        ("max_worker_processes", &processes),
        ("max_parallel_workers", &workers),
        ("max_parallel_maintenance_workers", &workers),
        ("max_parallel_workers_per_gather", &workers),
    ]);
    let url = server.url("postgres");
    let model = Fingerprint::from_bytes([1; 32]);
    let mut store = PgStore::create(&url, &model, DIM).unwrap();
    store.drop_search_index().unwrap();

    // Load without the index, keeping the true top-k's index in memory.
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut truth = ExactIndex::with_capacity(DIM, rows);
    let start = Instant::now();
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(10_000);
        let batch: Vec<Enrollment> = (0..n)
            .map(|i| Enrollment {
                label: format!("p{}", done + i),
                embedding: rng.unit(DIM),
                source: None,
            })
            .collect();
        let ids = store.insert(&batch, 0).unwrap();
        for (id, e) in ids.iter().zip(&batch) {
            truth.push(*id, &e.embedding).unwrap();
        }
        done += n;
    }
    let load = start.elapsed();
    println!(
        "loaded {rows} rows in {:.1} s; building the index on {cores} cores",
        load.as_secs_f64()
    );
    common::client(&server, "postgres")
        .batch_execute("VACUUM ANALYZE mfn_faces")
        .unwrap();
    let start = Instant::now();
    store.build_search_index().unwrap();
    let build = start.elapsed();
    let sizes = common::client(&server, "postgres")
        .query_one(
            "SELECT pg_total_relation_size('mfn_faces') - pg_relation_size('mfn_faces_embedding'), \
             pg_relation_size('mfn_faces_embedding')",
            &[],
        )
        .unwrap();
    let (table, index): (i64, i64) = (sizes.get(0), sizes.get(1));
    let mut g = Gallery::with_store(Box::new(store));

    println!(
        "pgvector HNSW (m = 16, ef_construction = 200) on {rows} random unit {DIM}-d vectors, \
         {cores} cores"
    );
    println!(
        "load {:.1} s ({:.0} rows/s, batches of 10000, no index); index build {:.1} s; \
         table {:.0} MB, index {:.0} MB",
        load.as_secs_f64(),
        rows as f64 / load.as_secs_f64(),
        build.as_secs_f64(),
        table as f64 / 1e6,
        index as f64 / 1e6
    );

    let queries: Vec<Vec<f32>> = (0..200).map(|_| rng.unit(DIM)).collect();
    let want: Vec<Vec<i64>> = queries
        .iter()
        .map(|q| truth.search(q, K).iter().map(|s| s.id).collect())
        .collect();
    // Probes as identification sends them: another photo of someone enrolled, here an
    // enrolled vector plus as much noise again (cosine about 0.7 with it).
    let probes: Vec<Vec<f32>> = (0..200)
        .map(|_| {
            let row = (rng.next().abs() * (rows - 1) as f32) as usize;
            let v = &truth.matrix()[row * DIM..(row + 1) * DIM];
            let q: Vec<f32> = v.iter().zip(rng.unit(DIM)).map(|(a, b)| a + b).collect();
            let n = q.iter().map(|x| x * x).sum::<f32>().sqrt();
            q.into_iter().map(|x| x / n).collect()
        })
        .collect();
    let probe_want: Vec<Vec<i64>> = probes
        .iter()
        .map(|q| truth.search(q, K).iter().map(|s| s.id).collect())
        .collect();

    // Exact on the server: a sequential scan (parallel workers allowed).
    g.set_server_search(ServerSearch::Exact);
    for q in &queries[..2] {
        g.search(q, K).unwrap();
    }
    let mut times = Vec::new();
    for (q, want) in queries.iter().zip(&want).take(20) {
        let t = Instant::now();
        let hits = g.search(q, K).unwrap();
        times.push(t.elapsed());
        let got: Vec<i64> = hits.iter().map(|h| h.id).collect();
        assert_eq!(&got, want, "the server's exact search is the true top-{K}");
    }
    let (exact_ms, exact_p95) = median_and_p95(times);
    let mut times = Vec::new();
    for q in queries.iter().take(20) {
        let t = Instant::now();
        truth.search(q, K);
        times.push(t.elapsed());
    }
    let (memory_ms, _) = median_and_p95(times);
    println!();
    println!(
        "{:<30} {:>9} {:>9} {:>10} {:>13} {:>11}",
        "search, batch 1, top-10",
        "median ms",
        "p95 ms",
        "recall@10",
        "probe rec@10",
        "probe top-1"
    );
    let row = |name: &str, ms: f64, p95: String, recall: f64, probe: f64, top1: f64| {
        println!("{name:<30} {ms:>9.2} {p95:>9} {recall:>10.4} {probe:>13.4} {top1:>11.4}");
    };
    row(
        "exact (server scan)",
        exact_ms,
        format!("{exact_p95:.2}"),
        1.0,
        1.0,
        1.0,
    );
    row(
        "exact (in memory, ExactIndex)",
        memory_ms,
        String::new(),
        1.0,
        1.0,
        1.0,
    );

    for ef in [40, 100, 200, 400] {
        g.set_server_search(ServerSearch::Hnsw { ef_search: ef });
        for q in &queries[..5] {
            g.search(q, K).unwrap();
        }
        let (mut times, mut found) = (Vec::new(), 0);
        for (q, want) in queries.iter().zip(&want) {
            let t = Instant::now();
            let hits = g.search(q, K).unwrap();
            times.push(t.elapsed());
            found += hits.iter().filter(|h| want.contains(&h.id)).count();
        }
        let (ms, p95) = median_and_p95(times);
        let recall = found as f64 / (queries.len() * K) as f64;
        let (mut probe_found, mut top1) = (0, 0);
        for (q, want) in probes.iter().zip(&probe_want) {
            let hits = g.search(q, K).unwrap();
            probe_found += hits.iter().filter(|h| want.contains(&h.id)).count();
            top1 += usize::from(hits.first().map(|h| h.id) == want.first().copied());
        }
        row(
            &format!("HNSW ef_search {ef}"),
            ms,
            format!("{p95:.2}"),
            recall,
            probe_found as f64 / (probes.len() * K) as f64,
            top1 as f64 / probes.len() as f64,
        );
    }
}

/// Raw little-endian f32 rows of `DIM` from `path`.
fn read_rows(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len().is_multiple_of(DIM * 4),
        "{}: not rows of {DIM} f32",
        path.display()
    );
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
#[ignore = "a benchmark: minutes of index build; needs MFN_PG_BENCH_VECTORS"]
fn hnsw_on_scale_bench_vectors() {
    // Run on purpose (it is ignored): without its vectors it must say so, not pass.
    let dir = std::env::var_os("MFN_PG_BENCH_VECTORS")
        .map(std::path::PathBuf::from)
        .expect(
            "MFN_PG_BENCH_VECTORS: set it to a folder written by `scale_bench --out DIR` \
             (base.f32, q_lfw.f32, q_rand.f32)",
        );
    let efs: Vec<u32> = std::env::var("MFN_PG_BENCH_EF")
        .unwrap_or_else(|_| "64,128,256".into())
        .split(',')
        .map(|e| e.parse().expect("MFN_PG_BENCH_EF: a list of numbers"))
        .collect();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = std::env::var("MFN_PG_BENCH_WORKERS")
        .unwrap_or_else(|_| cores.saturating_sub(1).max(1).to_string());
    let processes = (cores + 8).to_string();
    let base = read_rows(&dir.join("base.f32"));
    let sets: Vec<(&str, Vec<f32>)> = [("lfw", "q_lfw.f32"), ("random", "q_rand.f32")]
        .into_iter()
        .map(|(name, file)| (name, read_rows(&dir.join(file))))
        .filter(|(_, q)| !q.is_empty())
        .collect();
    let rows = base.len() / DIM;
    let server = PgServer::start_with(&[
        ("shared_buffers", "2GB"),
        ("maintenance_work_mem", "4GB"),
        ("max_worker_processes", &processes),
        ("max_parallel_workers", &workers),
        ("max_parallel_maintenance_workers", &workers),
        ("max_parallel_workers_per_gather", &workers),
    ]);
    let url = server.url("postgres");
    let model = Fingerprint::from_bytes([1; 32]);
    let mut store = PgStore::create(&url, &model, DIM).unwrap();
    store.drop_search_index().unwrap();

    let mut truth = ExactIndex::with_capacity(DIM, rows);
    let start = Instant::now();
    for (b, chunk) in base.chunks(10_000 * DIM).enumerate() {
        let batch: Vec<Enrollment> = chunk
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| Enrollment {
                label: format!("r{}", b * 10_000 + i),
                embedding: v.to_vec(),
                source: None,
            })
            .collect();
        let ids = store.insert(&batch, 0).unwrap();
        for (id, e) in ids.iter().zip(&batch) {
            truth.push(*id, &e.embedding).unwrap();
        }
    }
    let load = start.elapsed();
    common::client(&server, "postgres")
        .batch_execute("VACUUM ANALYZE mfn_faces")
        .unwrap();
    println!(
        "loaded {rows} rows from {} in {:.1} s; building the index (m 16, ef_construction 200) \
         with max_parallel_maintenance_workers {workers}, load {}",
        dir.display(),
        load.as_secs_f64(),
        loadavg()
    );
    let start = Instant::now();
    store.build_search_index().unwrap();
    let build = start.elapsed();
    let sizes = common::client(&server, "postgres")
        .query_one(
            "SELECT pg_total_relation_size('mfn_faces') - pg_relation_size('mfn_faces_embedding'), \
             pg_relation_size('mfn_faces_embedding')",
            &[],
        )
        .unwrap();
    let (table, index): (i64, i64) = (sizes.get(0), sizes.get(1));
    println!(
        "index build {:.1} s; table {:.0} MB, index {:.0} MB; load {}",
        build.as_secs_f64(),
        table as f64 / 1048576.0,
        index as f64 / 1048576.0,
        loadavg()
    );
    let mut g = Gallery::with_store(Box::new(store));
    let want: Vec<Vec<Vec<i64>>> = sets
        .iter()
        .map(|(_, q)| {
            truth
                .search_many(q, K)
                .into_iter()
                .map(|hits| hits.iter().map(|s| s.id).collect())
                .collect()
        })
        .collect();
    println!(
        "{:<24} {:>8} {:>10} {:>8} {:>10}",
        "search, batch 1, top-10", "queries", "median ms", "p95 ms", "recall@10"
    );
    let mut measure = |name: &str, search: ServerSearch, limit: usize| {
        g.set_server_search(search);
        for (_, q) in &sets {
            for q in q.chunks_exact(DIM).take(5) {
                g.search(q, K).unwrap();
            }
        }
        for ((set, q), want) in sets.iter().zip(&want) {
            let (mut times, mut found, mut total) = (Vec::new(), 0, 0);
            for (q, want) in q.chunks_exact(DIM).zip(want).take(limit) {
                let t = Instant::now();
                let hits = g.search(q, K).unwrap();
                times.push(t.elapsed());
                found += hits.iter().filter(|h| want.contains(&h.id)).count();
                total += want.len();
            }
            let (ms, p95) = median_and_p95(times);
            println!(
                "{name:<24} {set:>8} {ms:>10.2} {p95:>8.2} {:>10.4}   load {}",
                found as f64 / total as f64,
                loadavg()
            );
        }
    };
    measure("exact (server scan)", ServerSearch::Exact, 20);
    for &ef in &efs {
        measure(
            &format!("HNSW ef_search {ef}"),
            ServerSearch::Hnsw { ef_search: ef },
            usize::MAX,
        );
    }
}
