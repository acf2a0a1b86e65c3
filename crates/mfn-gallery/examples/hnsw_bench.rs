//! HNSW against exact search: build time, memory, batch-1 top-10 latency and recall@10,
//! on random unit vectors (the worst case) and on clustered face-like data (identities of
//! 10 noisy images each), on 1 and 2 threads.
//!
//! ```sh
//! cargo run --release -p mfn-gallery --example hnsw_bench -- [ROWS] [DIM]
//! ```
//!
//! Rows default to 100000, the dimension to 512; the graph is built with M 16 and
//! ef_construction 200, searched at ef 64 and 128. Latencies are medians of 500 queries
//! (after 20 warm-up queries); recall is over the same queries, against `ExactIndex`.

use std::time::Instant;

use mfn_gallery::{ExactIndex, HnswIndex, Index};

const K: usize = 10;
const QUERIES: usize = 500;

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

    fn unit(&mut self, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| self.gauss()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }
}

/// `rows` vectors and [`QUERIES`] queries: random, or clustered (10 images per identity,
/// cosine about 0.7 with the identity's centre; queries are fresh images).
fn data(rng: &mut Rng, rows: usize, dim: usize, clustered: bool) -> (Vec<f32>, Vec<f32>) {
    if !clustered {
        let data = (0..rows).flat_map(|_| rng.unit(dim)).collect();
        let queries = (0..QUERIES).flat_map(|_| rng.unit(dim)).collect();
        return (data, queries);
    }
    let people = rows.div_ceil(10);
    let centres: Vec<Vec<f32>> = (0..people).map(|_| rng.unit(dim)).collect();
    let image = |rng: &mut Rng, p: usize| {
        let noise = rng.unit(dim);
        let mut v: Vec<f32> = centres[p].iter().zip(&noise).map(|(c, n)| c + n).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    };
    let data = (0..rows).flat_map(|i| image(rng, i / 10)).collect();
    let queries = (0..QUERIES)
        .flat_map(|_| {
            let p = (rng.next_u64() % people as u64) as usize;
            image(rng, p)
        })
        .collect();
    (data, queries)
}

fn median_ms(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2] * 1e3
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(100_000);
    let dim = args.get(1).copied().unwrap_or(512);
    println!(
        "HNSW (usearch, M 16, ef_construction 200) against exact, {rows} x {dim}-d, top-{K}, \
         batch 1, medians of {QUERIES} queries"
    );
    println!(
        "{:<10} {:>7} {:>9} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "data",
        "threads",
        "build s",
        "faces/s",
        "MiB",
        "exact ms",
        "ef64 ms",
        "ef128 ms",
        "recall@10 64/128"
    );
    for clustered in [false, true] {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (data, queries) = data(&mut rng, rows, dim, clustered);
        let ids: Vec<i64> = (0..rows as i64).collect();
        let mut exact = ExactIndex::with_capacity(dim, rows);
        exact.add(&ids, &data).unwrap();
        let truth: Vec<Vec<i64>> = queries
            .chunks(dim)
            .map(|q| exact.search_serial(q, K).iter().map(|s| s.id).collect())
            .collect();
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let start = Instant::now();
                let mut hnsw = HnswIndex::new(dim, 16, 200, 128).unwrap();
                for (i, d) in ids.chunks(10_000).zip(data.chunks(10_000 * dim)) {
                    hnsw.add(i, d).unwrap();
                }
                let build = start.elapsed().as_secs_f64();
                let time = |f: &dyn Fn(&[f32]) -> Vec<i64>| -> (f64, f64) {
                    for q in queries.chunks(dim).take(20) {
                        f(q);
                    }
                    let (mut t, mut found) = (Vec::new(), 0);
                    for (q, want) in queries.chunks(dim).zip(&truth) {
                        let s = Instant::now();
                        let got = f(q);
                        t.push(s.elapsed().as_secs_f64());
                        found += want.iter().filter(|id| got.contains(id)).count();
                    }
                    (median_ms(t), found as f64 / (QUERIES * K) as f64)
                };
                let (exact_ms, _) =
                    time(&|q| exact.search(q, K).iter().map(|s| s.id).collect());
                let mut results = Vec::new();
                for ef in [64, 128] {
                    hnsw.set_ef_search(ef);
                    let h = &hnsw;
                    results.push(time(&|q| h.search(q, K).iter().map(|s| s.id).collect()));
                }
                println!(
                    "{:<10} {:>7} {:>9.1} {:>10.0} {:>8.0} {:>10.3} {:>10.3} {:>10.3} {:>9.4}/{:.4}",
                    if clustered { "clustered" } else { "random" },
                    threads,
                    build,
                    rows as f64 / build,
                    hnsw.memory_usage() as f64 / (1 << 20) as f64,
                    exact_ms,
                    results[0].0,
                    results[1].0,
                    results[0].1,
                    results[1].1,
                );
            });
        }
    }
}
