//! `--device` and `--dtype` of the benchmarks on a machine without a GPU: clear errors,
//! before any model is loaded.

mod common;

use common::{fails, xtask};

#[test]
fn cuda_benches_say_how_to_get_a_cuda_build() {
    for cmd in [
        vec!["bench", "--device", "cuda", "--no-gate"],
        vec!["bench-depthwise", "--device", "cuda"],
    ] {
        let stderr = fails(xtask().args(&cmd));
        if cfg!(feature = "cuda") {
            assert!(stderr.contains("CUDA device"), "{cmd:?}: {stderr}");
        } else {
            assert!(
                stderr.contains("--features cuda") && stderr.contains("without CUDA support"),
                "{cmd:?}: {stderr}"
            );
        }
    }
}

#[test]
fn reduced_precision_needs_the_gpu() {
    let stderr = fails(xtask().args(["bench", "--dtype", "f16", "--no-gate"]));
    assert!(
        stderr.contains("--dtype f16") && stderr.contains("--device cuda"),
        "{stderr}"
    );
}

/// The depthwise comparison on the CPU at a tiny batch: the native op agrees with candle's
/// grouped conv on every MobileFaceNet layer, forward and backward.
#[test]
fn depthwise_bench_runs_and_agrees_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("dw.json");
    common::ok(
        xtask()
            .args(["bench-depthwise", "--batch", "1", "--runs", "1", "--json"])
            .arg(&json),
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 8);
    for l in layers {
        assert!(l["native_ms"].as_f64().unwrap() > 0.0);
        assert!(l["candle_ms"].as_f64().unwrap() > 0.0);
        for d in l["max_rel_diff"]["candle"].as_array().unwrap() {
            assert!(d.as_f64().unwrap() <= 1e-4, "{l}");
        }
    }
}
