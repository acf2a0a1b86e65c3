//! Exact search latency: one query, top-10, over random unit-length 512-d vectors.
//!
//! ```sh
//! cargo run --release -p mfn-gallery --example exact_bench -- [ROWS...]
//! ```
//!
//! Rows default to 100000 and 1000000; each size is timed on 1 and 2 threads (and on all
//! cores when there are more), as the median of 21 queries after 3 warm-up queries.

use std::time::Instant;

use mfn_gallery::{ExactIndex, Index};

const DIM: usize = 512;
const K: usize = 10;

fn main() {
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if args.is_empty() {
            vec![100_000, 1_000_000]
        } else {
            args
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1, 2];
    if cores > 2 {
        threads.push(cores);
    }
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut unit = |n: usize| -> Vec<f32> {
        let mut v: Vec<f32> = (0..n * DIM).map(|_| next()).collect();
        for row in v.chunks_mut(DIM) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    };
    println!("exact search, {DIM}-d, top-{K}, batch 1: median of 21 queries");
    println!(
        "{:>10} {:>8} {:>12} {:>12}",
        "rows", "threads", "ms/query", "GB/s"
    );
    for &n in &sizes {
        let data = unit(n);
        let ids: Vec<i64> = (0..n as i64).collect();
        let mut index = ExactIndex::with_capacity(DIM, n);
        index.add(&ids, &data).unwrap();
        drop(data);
        let queries = unit(24);
        for &t in &threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            let mut times: Vec<f64> = pool.install(|| {
                queries
                    .chunks(DIM)
                    .map(|q| {
                        let start = Instant::now();
                        let hits = index.search(q, K);
                        assert_eq!(hits.len(), K.min(n));
                        start.elapsed().as_secs_f64()
                    })
                    .skip(3)
                    .collect()
            });
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let gbs = (n * DIM * 4) as f64 / median / 1e9;
            println!("{n:>10} {t:>8} {:>12.2} {gbs:>12.1}", median * 1e3);
        }
    }
}
