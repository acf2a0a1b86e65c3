//! The gallery at scale: `N` random unit 512-d vectors plus LFW's face embeddings, searched
//! batch-1 for the top 10 by exact search and (with `--hnsw`) by the HNSW index, with
//! recall@10 against exact, build time and memory. It also writes the very same vectors
//! and queries for `bench/gallery_faiss.py`, so FAISS is measured on identical data.
//!
//! ```sh
//! # LFW's embeddings, one row per image (see `mfn-cli gallery eval --save-embeddings`)
//! mfn-cli gallery eval --model w600k_mbf --save-embeddings lfw-w600k.f32
//! cargo run --release -p mfn-gallery --example scale_bench -- \
//!     --random 1000000 --lfw lfw-w600k.f32 --out scale-1e6 [--hnsw] [--threads 1,2]
//! ```
//!
//! Queries: `--queries` (default 1000) LFW images held out of the gallery (every
//! `rows / queries`-th LFW row: other photos of enrolled people, or people never
//! enrolled), and as many random unit vectors. The gallery holds the other LFW rows and
//! the `--random` vectors (xorshift, seed fixed). Latency is the median over the queries
//! after 20 warm-up queries, one query at a time, on a rayon pool of each `--threads`
//! count. `--out DIR` gets `base.f32`, `q_lfw.f32` and `q_rand.f32` (raw little-endian
//! f32, 512 per row) and `mfn.json` with the results.
//!
//! HNSW options: `--m`, `--ef-construction` (default those of `IndexKind::hnsw()`), `--ef
//! LIST` (the `ef_search` values searched), `--build-ef N` (the `ef_search` the index is
//! created with, 64), `--kernels mfn,library` (search the one graph with MFN's distance
//! kernel and with usearch's own, alternately), `--build-kernel mfn|library`, `--rounds R`
//! (repeat the searches). The graph is built on the largest `--threads` count. Every
//! phase prints the load average.

use std::path::PathBuf;
use std::time::Instant;

use mfn_gallery::{ExactIndex, HnswIndex, Index, IndexKind};

const DIM: usize = 512;
const K: usize = 10;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn gauss(&mut self) -> f32 {
        let u = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let v = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    fn unit_into(&mut self, out: &mut Vec<f32>) {
        let start = out.len();
        out.extend((0..DIM).map(|_| self.gauss()));
        let row = &mut out[start..];
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
}

struct Args {
    random: usize,
    lfw: Option<PathBuf>,
    queries: usize,
    hnsw: bool,
    threads: Vec<usize>,
    out: Option<PathBuf>,
    ef: Vec<usize>,
    kernels: Vec<String>,
    build_kernel: String,
    rounds: usize,
    m: Option<usize>,
    ef_construction: Option<usize>,
    build_ef: usize,
}

fn args() -> Args {
    let mut a = Args {
        random: 1_000_000,
        lfw: None,
        queries: 1000,
        hnsw: false,
        threads: vec![1, 2],
        out: None,
        ef: vec![64, 128, 256],
        kernels: vec!["mfn".into()],
        build_kernel: "mfn".into(),
        rounds: 1,
        m: None,
        ef_construction: None,
        build_ef: 64,
    };
    let mut it = std::env::args().skip(1);
    let list = |s: String| -> Vec<usize> {
        s.split(',')
            .map(|t| t.parse().expect("a list of numbers"))
            .collect()
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--random" => a.random = value().parse().expect("--random N"),
            "--lfw" => a.lfw = Some(value().into()),
            "--queries" => a.queries = value().parse().expect("--queries N"),
            "--hnsw" => a.hnsw = true,
            "--threads" => a.threads = list(value()),
            "--ef" => a.ef = list(value()),
            "--out" => a.out = Some(value().into()),
            "--kernels" => a.kernels = value().split(',').map(String::from).collect(),
            "--build-kernel" => a.build_kernel = value(),
            "--build-ef" => a.build_ef = value().parse().expect("--build-ef N"),
            "--rounds" => a.rounds = value().parse().expect("--rounds N"),
            "--m" => a.m = Some(value().parse().expect("--m M")),
            "--ef-construction" => {
                a.ef_construction = Some(value().parse().expect("--ef-construction E"))
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn median_ms(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2] * 1e3
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_f32(path: &std::path::Path, rows: &[f32]) {
    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Median batch-1 latency (ms) of `search` over `queries`, and recall@10 against `truth`.
fn measure(search: &dyn Fn(&[f32]) -> Vec<i64>, queries: &[f32], truth: &[Vec<i64>]) -> (f64, f64) {
    for q in queries.chunks(DIM).take(20) {
        search(q);
    }
    let (mut t, mut found, mut total) = (Vec::new(), 0, 0);
    for (q, want) in queries.chunks(DIM).zip(truth) {
        let s = Instant::now();
        let got = search(q);
        t.push(s.elapsed().as_secs_f64());
        found += want.iter().filter(|id| got.contains(id)).count();
        total += want.len();
    }
    (median_ms(t), found as f64 / total as f64)
}

fn main() {
    let a = args();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    // LFW: held-out queries and the rest for the gallery.
    let (mut base, mut q_lfw) = (Vec::new(), Vec::new());
    let mut lfw_rows = 0;
    if let Some(path) = &a.lfw {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            bytes.len() % (DIM * 4) == 0,
            "{}: not rows of {DIM} f32",
            path.display()
        );
        let rows: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(
            rows.iter().all(|v| v.is_finite()),
            "{}: non-finite",
            path.display()
        );
        lfw_rows = rows.len() / DIM;
        let every = (lfw_rows / a.queries.max(1)).max(2);
        for (i, row) in rows.chunks(DIM).enumerate() {
            if i % every == every - 1 && q_lfw.len() < a.queries * DIM {
                q_lfw.extend_from_slice(row);
            } else {
                base.extend_from_slice(row);
            }
        }
    }
    let lfw_in_base = base.len() / DIM;
    base.reserve(a.random * DIM);
    for _ in 0..a.random {
        rng.unit_into(&mut base);
    }
    let mut q_rand = Vec::with_capacity(a.queries * DIM);
    for _ in 0..a.queries {
        rng.unit_into(&mut q_rand);
    }
    let rows = base.len() / DIM;
    println!("load average at start: {}", loadavg());
    println!(
        "gallery: {} random + {lfw_in_base} LFW = {rows} x {DIM}; queries: {} LFW (held out of \
         {lfw_rows}), {} random; top-{K}, batch 1",
        a.random,
        q_lfw.len() / DIM,
        q_rand.len() / DIM
    );
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).unwrap();
        write_f32(&dir.join("base.f32"), &base);
        write_f32(&dir.join("q_lfw.f32"), &q_lfw);
        write_f32(&dir.join("q_rand.f32"), &q_rand);
    }
    let ids: Vec<i64> = (0..rows as i64).collect();

    let rss0 = rss_mb();
    let start = Instant::now();
    let mut exact = ExactIndex::with_capacity(DIM, rows);
    exact.add(&ids, &base).unwrap();
    let exact_build = start.elapsed().as_secs_f64();
    let exact_mb = rss_mb() - rss0;
    let sets: Vec<(&str, &[f32])> = [("lfw", &q_lfw[..]), ("random", &q_rand[..])]
        .into_iter()
        .filter(|(_, q)| !q.is_empty())
        .collect();
    let truth: Vec<Vec<Vec<i64>>> = sets
        .iter()
        .map(|(_, q)| {
            exact
                .search_many(q, K)
                .into_iter()
                .map(|hits| hits.iter().map(|s| s.id).collect())
                .collect()
        })
        .collect();
    let mut results = Vec::new();
    println!(
        "{:<12} {:>7} {:>8} {:>9} {:>9} {:>5} {:>10} {:>10} {:>10} {:>10}",
        "index",
        "threads",
        "build s",
        "RSS MB",
        "index MB",
        "ef",
        "lfw ms",
        "lfw r@10",
        "rand ms",
        "rand r@10"
    );
    for &threads in &a.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let row = pool.install(|| {
            let r: Vec<(f64, f64)> = sets
                .iter()
                .zip(&truth)
                .map(|((_, q), t)| {
                    measure(&|q| exact.search(q, K).iter().map(|s| s.id).collect(), q, t)
                })
                .collect();
            r
        });
        print_row(
            "exact",
            threads,
            exact_build,
            exact_mb,
            (rows * DIM * 4) as f64 / 1048576.0,
            0,
            &sets,
            &row,
        );
        results.push(serde_json::json!({
            "index": "exact", "threads": threads, "build_s": exact_build, "rss_mb": exact_mb,
            "rows": rows, "results": json_rows(&sets, &row),
        }));
    }
    if a.hnsw {
        let IndexKind::Hnsw {
            m, ef_construction, ..
        } = IndexKind::hnsw()
        else {
            unreachable!()
        };
        let (m, ef_construction) = (
            a.m.unwrap_or(m),
            a.ef_construction.unwrap_or(ef_construction),
        );
        let kernel_is_library = |k: &str| match k {
            "mfn" => false,
            "library" => true,
            other => panic!("kernel {other}: expected mfn or library"),
        };
        let build_threads = *a.threads.iter().max().unwrap_or(&1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(build_threads)
            .build()
            .unwrap();
        let rss0 = rss_mb();
        let start = Instant::now();
        let mut hnsw = pool.install(|| {
            let mut h = HnswIndex::new(DIM, m, ef_construction, a.build_ef).unwrap();
            h.use_library_kernel(kernel_is_library(&a.build_kernel))
                .unwrap();
            for (i, d) in ids.chunks(50_000).zip(base.chunks(50_000 * DIM)) {
                h.add(i, d).unwrap();
                eprintln!(
                    "  HNSW: {} rows, {:.0} s, load {}",
                    h.len(),
                    start.elapsed().as_secs_f64(),
                    loadavg()
                );
            }
            h
        });
        let build = start.elapsed().as_secs_f64();
        let mb = rss_mb() - rss0;
        println!(
            "HNSW M {m}, ef_construction {ef_construction}: built in {build:.1} s with the {} \
             kernel on {build_threads} threads; MFN kernel: {}; load {}",
            a.build_kernel,
            hnsw.hardware_acceleration(),
            loadavg()
        );
        let index_mb = hnsw.memory_usage() as f64 / 1048576.0;
        for round in 1..=a.rounds {
            for kernel in &a.kernels {
                hnsw.use_library_kernel(kernel_is_library(kernel)).unwrap();
                println!("round {round}, {kernel} kernel, load {}", loadavg());
                for &ef in &a.ef {
                    hnsw.set_ef_search(ef);
                    for &threads in &a.threads {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        let h = &hnsw;
                        let row = pool.install(|| {
                            let r: Vec<(f64, f64)> = sets
                                .iter()
                                .zip(&truth)
                                .map(|((_, q), t)| {
                                    measure(
                                        &|q| h.search(q, K).iter().map(|s| s.id).collect(),
                                        q,
                                        t,
                                    )
                                })
                                .collect();
                            r
                        });
                        print_row(
                            &format!("hnsw-{kernel}"),
                            threads,
                            build,
                            mb,
                            index_mb,
                            ef,
                            &sets,
                            &row,
                        );
                        results.push(serde_json::json!({
                    "index": "hnsw", "m": m, "ef_construction": ef_construction, "ef_search": ef,
                    "threads": threads, "build_threads": build_threads, "build_s": build,
                    "build_kernel": a.build_kernel, "kernel": kernel, "round": round,
                    "load": loadavg(),
                    "rss_mb": mb, "index_mb": index_mb, "rows": rows,
                    "results": json_rows(&sets, &row),
                }));
                    }
                }
            }
        }
    }
    if let Some(dir) = &a.out {
        let out = serde_json::json!({"random": a.random, "lfw_in_base": lfw_in_base, "rows": rows, "results": results});
        std::fs::write(
            dir.join("mfn.json"),
            serde_json::to_string_pretty(&out).unwrap(),
        )
        .unwrap();
    }
}

#[allow(clippy::too_many_arguments)]
fn print_row(
    name: &str,
    threads: usize,
    build: f64,
    rss: f64,
    index_mb: f64,
    ef: usize,
    sets: &[(&str, &[f32])],
    row: &[(f64, f64)],
) {
    let get = |set: &str| {
        sets.iter()
            .position(|(n, _)| *n == set)
            .map_or((f64::NAN, f64::NAN), |i| row[i])
    };
    let (l, r) = (get("lfw"), get("random"));
    println!(
        "{name:<12} {threads:>7} {build:>8.1} {rss:>9.0} {index_mb:>9.0} {:>5} {:>10.3} {:>10.4} {:>10.3} {:>10.4}",
        if ef == 0 { "-".to_string() } else { ef.to_string() },
        l.0, l.1, r.0, r.1
    );
}

fn json_rows(sets: &[(&str, &[f32])], row: &[(f64, f64)]) -> serde_json::Value {
    sets.iter()
        .zip(row)
        .map(|((name, _), (ms, recall))| {
            serde_json::json!({"queries": name, "median_ms": ms, "recall_at_10": recall})
        })
        .collect()
}
