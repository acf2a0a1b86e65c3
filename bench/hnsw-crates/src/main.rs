//! One HNSW crate built and searched on `scale_bench`'s vectors, for choosing the crate
//! behind `mfn_gallery::HnswIndex` by measured recall and speed.
//!
//! ```sh
//! hnsw-crates --dir DIR --crate usearch|hnsw_rs|hnsw_rs-anndists|instant-distance \
//!     [--m 16] [--ef-construction 200] [--ef 128,256,384,512] [--threads 2] [--json FILE]
//! ```
//!
//! `DIR` holds `base.f32` (the gallery) and `q_lfw.f32` (the queries), raw little-endian
//! f32, 512 per row, as `scale_bench --out DIR` writes them. The truth is the exact top 10
//! (`mfn_gallery::ExactIndex`). The index is built on a rayon pool of `--threads`; each
//! query is searched alone for its 10 nearest, and the latency is the median after 20
//! warm-up queries. `--json` appends one line per `ef` to FILE.
//!
//! Every crate measures `1 - a.b` with `mfn_gallery::hnsw::distance_kernel` (the one the
//! gallery uses), so the graphs and their search code are compared, not the kernels;
//! `hnsw_rs-anndists` is hnsw_rs with its own `DistDot` (SIMD through `simdeez`).
//! instant-distance fixes `M` at 32 (64 links on the bottom layer) and takes `ef_search`
//! when it is built, so it is built once per `--ef`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mfn_gallery::hnsw::distance_kernel;
use mfn_gallery::{ExactIndex, HnswIndex, Index};

const DIM: usize = 512;
const K: usize = 10;

struct Args {
    dir: PathBuf,
    krate: String,
    m: usize,
    ef_construction: usize,
    ef: Vec<usize>,
    threads: usize,
    json: Option<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::new(),
        krate: String::new(),
        m: 16,
        ef_construction: 200,
        ef: vec![128, 256, 384, 512],
        threads: 2,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    let number = |flag: &str, s: &str| -> Result<usize, String> {
        s.parse()
            .map_err(|_| format!("{flag}: expected a number, got {s:?}"))
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => a.dir = value.into(),
            "--crate" => a.krate = value,
            "--m" => a.m = number(&flag, &value)?,
            "--ef-construction" => a.ef_construction = number(&flag, &value)?,
            "--threads" => a.threads = number(&flag, &value)?,
            "--json" => a.json = Some(value.into()),
            "--ef" => {
                a.ef = value
                    .split(',')
                    .map(|s| number(&flag, s))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.dir.as_os_str().is_empty() || a.krate.is_empty() {
        return Err("--dir DIR and --crate NAME are required".into());
    }
    Ok(a)
}

/// A file of 512-wide f32 rows.
fn read_rows(path: &Path) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.is_empty() || bytes.len() % (DIM * 4) != 0 {
        return Err(format!(
            "{}: {} bytes is not a whole number of {DIM}-value f32 rows",
            path.display(),
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
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

/// Median batch-1 latency (ms) of `search` over `queries`, and recall@10 against `truth`.
fn measure(
    search: &dyn Fn(&[f32]) -> Vec<usize>,
    queries: &[f32],
    truth: &[Vec<usize>],
) -> (f64, f64) {
    for q in queries.chunks(DIM).take(20) {
        search(q);
    }
    let (mut times, mut found) = (Vec::new(), 0);
    for (q, want) in queries.chunks(DIM).zip(truth) {
        let start = Instant::now();
        let got = search(q);
        times.push(start.elapsed().as_secs_f64() * 1e3);
        found += want.iter().filter(|id| got.contains(id)).count();
    }
    times.sort_by(f64::total_cmp);
    let total: usize = truth.iter().map(Vec::len).sum();
    (times[times.len() / 2], found as f64 / total as f64)
}

/// `1 - a.b` with the gallery's kernel, for hnsw_rs.
#[derive(Clone, Copy)]
struct KernelDot(DotFn);

impl hnsw_rs::anndists::dist::Distance<f32> for KernelDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        // Rounding can put `a.b` of a vector with itself a hair above 1.
        (1.0 - (self.0)(a, b)).max(0.0)
    }
}

/// A unit vector for instant-distance, measured with the gallery's kernel.
#[derive(Clone, Copy)]
struct Row<'a>(&'a [f32]);

/// The gallery's kernel, picked once: `distance_kernel` checks the CPU's features on
/// every call, which the other crates' distances (a stored function) do not pay.
static DOT: std::sync::LazyLock<DotFn> = std::sync::LazyLock::new(|| distance_kernel().1);

/// A dot product of two equally long f32 slices.
type DotFn = fn(&[f32], &[f32]) -> f32;

impl instant_distance::Point for Row<'_> {
    fn distance(&self, other: &Self) -> f32 {
        (1.0 - (*DOT)(self.0, other.0)).max(0.0)
    }
}

/// A built index: searches one query for its `K` nearest rows at `ef`.
type Searcher<'a> = Box<dyn Fn(&[f32], usize) -> Vec<usize> + Send + Sync + 'a>;

/// Builds on `pool`: the searcher, seconds, and the resident memory it added (MB).
fn build<'a>(
    pool: &rayon::ThreadPool,
    make: impl FnOnce() -> Searcher<'a> + Send,
) -> (Searcher<'a>, f64, f64) {
    let rss0 = rss_mb();
    let start = Instant::now();
    let searcher = pool.install(make);
    (searcher, start.elapsed().as_secs_f64(), rss_mb() - rss0)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let load = |name: &str| {
        read_rows(&a.dir.join(name)).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2);
        })
    };
    let base = load("base.f32");
    let queries = load("q_lfw.f32");
    let rows = base.len() / DIM;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()
        .expect("a thread pool");

    let truth: Vec<Vec<usize>> = {
        let mut exact = ExactIndex::with_capacity(DIM, rows);
        let ids: Vec<i64> = (0..rows as i64).collect();
        exact.add(&ids, &base).expect("exact index");
        pool.install(|| exact.search_many(&queries, K))
            .into_iter()
            .map(|hits| hits.iter().map(|s| s.id as usize).collect())
            .collect()
    };
    let (kernel_name, dot) = distance_kernel();
    // instant-distance has M as a constant of its own.
    let m = if a.krate == "instant-distance" {
        "32 (fixed)".to_string()
    } else {
        a.m.to_string()
    };
    println!(
        "{}: {rows} rows, {} queries, M {m}, ef_construction {}, {} threads, kernel {kernel_name}, load {}",
        a.krate,
        truth.len(),
        a.ef_construction,
        a.threads,
        loadavg()
    );

    let report = |ef: usize, build_s: f64, rss: f64, ms: f64, recall: f64| {
        println!(
            "{:<18} ef {ef:>4}  build {build_s:>7.1} s  memory {rss:>6.0} MB  {ms:>7.3} ms  recall@10 {recall:.4}  load {}",
            a.krate,
            loadavg()
        );
        if let Some(path) = &a.json {
            use std::io::Write;
            let line = format!(
                "{{\"crate\":\"{}\",\"rows\":{rows},\"m\":\"{m}\",\"ef_construction\":{},\"ef_search\":{ef},\"threads\":{},\"build_s\":{build_s:.2},\"rss_mb\":{rss:.1},\"ms\":{ms:.4},\"recall\":{recall:.5},\"load\":\"{}\"}}\n",
                a.krate,
                a.ef_construction,
                a.threads,
                loadavg()
            );
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    };

    match a.krate.as_str() {
        "usearch" => {
            let make = || -> Searcher<'_> {
                let mut index = HnswIndex::new(DIM, a.m, a.ef_construction, 64).expect("usearch");
                let ids: Vec<i64> = (0..rows as i64).collect();
                for (i, d) in ids.chunks(50_000).zip(base.chunks(50_000 * DIM)) {
                    index.add(i, d).expect("usearch add");
                }
                let index = std::sync::RwLock::new(index);
                Box::new(move |q, ef| {
                    let mut index = index.write().expect("not poisoned");
                    index.set_ef_search(ef);
                    index.search(q, K).iter().map(|s| s.id as usize).collect()
                })
            };
            let (search, secs, mb) = build(&pool, make);
            for &ef in &a.ef {
                let (ms, recall) = measure(&|q| search(q, ef), &queries, &truth);
                report(ef, secs, mb, ms, recall);
            }
        }
        "hnsw_rs" | "hnsw_rs-anndists" => {
            use hnsw_rs::prelude::{DistDot, Hnsw};
            let own = a.krate == "hnsw_rs-anndists";
            let data: Vec<(&[f32], usize)> = base.chunks(DIM).zip(0..).collect();
            let make = || -> Searcher<'_> {
                if own {
                    let h = Hnsw::<f32, DistDot>::new(a.m, rows, 16, a.ef_construction, DistDot);
                    h.parallel_insert_slice(&data);
                    Box::new(move |q, ef| h.search(q, K, ef).iter().map(|n| n.d_id).collect())
                } else {
                    let h = Hnsw::<f32, KernelDot>::new(
                        a.m,
                        rows,
                        16,
                        a.ef_construction,
                        KernelDot(dot),
                    );
                    h.parallel_insert_slice(&data);
                    Box::new(move |q, ef| h.search(q, K, ef).iter().map(|n| n.d_id).collect())
                }
            };
            let (search, secs, mb) = build(&pool, make);
            for &ef in &a.ef {
                let (ms, recall) = measure(&|q| search(q, ef), &queries, &truth);
                report(ef, secs, mb, ms, recall);
            }
        }
        "instant-distance" => {
            for &ef in &a.ef {
                let make = || -> Searcher<'_> {
                    let points: Vec<Row<'_>> = base.chunks(DIM).map(Row).collect();
                    let (h, pids) = instant_distance::Builder::default()
                        .ef_construction(a.ef_construction)
                        .ef_search(ef)
                        .build_hnsw(points);
                    // The build reorders the points; `pids[i]` is where row `i` went.
                    let mut row_of = vec![0usize; rows];
                    for (row, pid) in pids.iter().enumerate() {
                        row_of[pid.into_inner() as usize] = row;
                    }
                    // One search state, kept between queries as usearch keeps its contexts.
                    let search = std::sync::Mutex::new(instant_distance::Search::default());
                    Box::new(move |q, _| {
                        let mut search = search.lock().expect("not poisoned");
                        h.search(&Row(q), &mut search)
                            .take(K)
                            .map(|item| row_of[item.pid.into_inner() as usize])
                            .collect()
                    })
                };
                let (search, secs, mb) = build(&pool, make);
                let (ms, recall) = measure(&|q| search(q, ef), &queries, &truth);
                report(ef, secs, mb, ms, recall);
            }
        }
        other => {
            eprintln!(
                "error: --crate {other}: expected usearch, hnsw_rs, hnsw_rs-anndists or instant-distance"
            );
            std::process::exit(2);
        }
    }
}
