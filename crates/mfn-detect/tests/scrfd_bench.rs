//! Forward-pass timings of SCRFD (run with `--ignored --nocapture`).
//!
//! Each round times every input side at every thread count in turn, so that a shared,
//! noisy machine slows all of them alike; the medians are over all rounds. Set
//! `MFN_BENCH_THREADS` (a list, `1,2` by default), `MFN_BENCH_SIDES` (`256,640`) and
//! `MFN_BENCH_ROUNDS` (5).

mod common;

// As the command line runs it: activation-sized buffers are freed and allocated again on
// every forward, which glibc's malloc hands back to the kernel and faults back in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use candle_core::Device;
use common::asset;
use image::RgbImage;
use mfn_detect::scrfd::Scrfd;

/// A comma-separated list of numbers from the environment, or `default`.
fn list(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[test]
#[ignore = "timing, not a check: run with --ignored --nocapture"]
fn forward_timings() {
    let threads = list("MFN_BENCH_THREADS", &[1, 2]);
    let sides = list("MFN_BENCH_SIDES", &[256, 640]);
    let rounds = list("MFN_BENCH_ROUNDS", &[5])[0].max(1);
    // The most threads any pool gets, for anything that sizes itself from the variable.
    mfn_model::set_num_threads(threads.iter().copied().max().unwrap_or(1));
    let pools: Vec<rayon::ThreadPool> = threads
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    let det = Scrfd::load(
        &asset("models/scrfd-500m/scrfd_500m_bnkps.onnx"),
        &Device::Cpu,
    )
    .unwrap();
    let png = image::open(asset("golden/scrfd-inputs/Ariel_Sharon_0001_640.png"))
        .unwrap()
        .to_rgb8();
    // A whole detection of a 250x250 LFW photo: letterbox, network, decoding, NMS.
    let photo = image::open(asset(
        "lfw-raw-subset/images/Colin_Powell/Colin_Powell_0001.jpg",
    ))
    .unwrap()
    .to_rgb8();
    let inputs: Vec<RgbImage> = sides
        .iter()
        .map(|&side| {
            let side = side as u32;
            image::imageops::resize(&png, side, side, image::imageops::FilterType::Triangle)
        })
        .collect();
    let letterbox = mfn_detect::scrfd::InputSize::Letterbox(640);
    // times[pool][what]: the inputs' forwards, then the whole detection.
    let mut times = vec![vec![Vec::new(); inputs.len() + 1]; pools.len()];
    for _ in 0..rounds {
        for (pool, times) in pools.iter().zip(&mut times) {
            pool.install(|| {
                for (img, t) in inputs.iter().zip(times.iter_mut()) {
                    for _ in 0..3 {
                        det.anchors(img, 0.5).unwrap();
                    }
                    for _ in 0..10 {
                        let start = Instant::now();
                        det.anchors(img, 0.5).unwrap();
                        t.push(start.elapsed().as_secs_f64() * 1e3);
                    }
                }
                for _ in 0..5 {
                    let start = Instant::now();
                    mfn_detect::Detector::detect(&det, &photo).unwrap();
                    times[inputs.len()].push(start.elapsed().as_secs_f64() * 1e3);
                }
            });
        }
    }
    let letterbox_ms = median(
        (0..20)
            .map(|_| {
                let start = Instant::now();
                letterbox.prepare(&photo).unwrap();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    eprintln!("250x250 photo: letterbox to 640 {letterbox_ms:.2} ms");
    for (t, times) in threads.iter().zip(times) {
        for (side, times) in sides.iter().zip(&times) {
            let min = times.iter().copied().fold(f64::INFINITY, f64::min);
            eprintln!(
                "{t} thread(s), {side}x{side}: median {:.2} ms, min {min:.2} ms",
                median(times.clone())
            );
        }
        eprintln!(
            "{t} thread(s), 250x250 photo: whole detection {:.2} ms",
            median(times[sides.len()].clone())
        );
    }
}
