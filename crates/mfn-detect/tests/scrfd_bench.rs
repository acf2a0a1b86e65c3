//! Forward-pass timings of SCRFD (run with `--ignored --nocapture`).

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

#[test]
#[ignore = "timing, not a check: run with --ignored --nocapture"]
fn forward_timings() {
    let threads: usize = std::env::var("MFN_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    mfn_model::set_num_threads(threads);
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
    let input = mfn_detect::scrfd::InputSize::Letterbox(640);
    let time = |f: &dyn Fn()| {
        for _ in 0..3 {
            f();
        }
        let mut times: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let prep = time(&|| {
        input.prepare(&photo).unwrap();
    });
    let whole = time(&|| {
        mfn_detect::Detector::detect(&det, &photo).unwrap();
    });
    eprintln!(
        "{threads} thread(s), 250x250 photo: letterbox {prep:.2} ms, whole detection {whole:.2} ms"
    );
    for side in [640u32, 256] {
        let img: RgbImage =
            image::imageops::resize(&png, side, side, image::imageops::FilterType::Triangle);
        for _ in 0..5 {
            det.anchors(&img, 0.5).unwrap();
        }
        let mut times = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            det.anchors(&img, 0.5).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "{threads} thread(s), {side}x{side}: median {:.2} ms, min {:.2} ms",
            times[times.len() / 2],
            times[0]
        );
    }
}
