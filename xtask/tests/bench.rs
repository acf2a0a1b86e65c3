//! `cargo xtask bench` as a gate: it passes against a baseline it has just recorded and
//! fails against one twice as fast, in time and in the ratio to its reference workload;
//! it times y1 and `w600k_mbf` unless given `--model`, fails naming a model its baseline
//! lacks, and an update of one model keeps the other's rows.
//!
//! One test, so no other test of this binary competes for the cores while it times.

mod common;

use std::path::Path;

use common::{asset, fails, ok, xtask};
use serde_json::Value;

/// A short bench: one thread, batch 1, three rounds of ten runs.
fn bench(baseline: &Path) -> std::process::Command {
    let mut c = xtask();
    c.args([
        "bench",
        "--threads",
        "1",
        "--batches",
        "1",
        "--runs",
        "10",
        "--rounds",
        "3",
        "--no-layers",
        "--baseline",
    ])
    .arg(baseline);
    c
}

#[test]
fn the_gate_passes_its_own_baseline_and_fails_a_twice_faster_one() {
    let tmp = tempfile::tempdir().unwrap();

    let missing = tmp.path().join("none.json");
    let stderr = fails(&mut bench(&missing));
    assert!(stderr.contains("--update-baseline"), "{stderr}");

    // y1 alone first: the default run (y1 and w600k_mbf) then fails, naming the command
    // that records w600k_mbf's rows.
    let y1 = asset("models/mobilefacenet-y1/model-symbol.json");
    let fresh = tmp.path().join("baselines/this.json");
    ok(bench(&fresh)
        .args(["--update-baseline", "--tolerance", "0.5", "--model"])
        .arg(&y1));
    let stderr = fails(&mut bench(&fresh));
    assert!(
        stderr.contains("no rows for 1 of the models")
            && stderr.contains("w600k_mbf (models/w600k-mbf/w600k_mbf.onnx)")
            && stderr.contains("--update-baseline --model"),
        "{stderr}"
    );
    // A wide tolerance: the point is the gate's logic, not this machine's noise.
    ok(bench(&fresh).args(["--update-baseline", "--tolerance", "0.5"]));
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert!(!recorded["machine"]["cpu"].as_str().unwrap().is_empty());
    assert!(recorded["machine"]["cores"].as_u64().unwrap() >= 1);
    let models = recorded["models"].as_array().unwrap();
    let labels: Vec<&str> = models
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "models/mobilefacenet-y1/model-symbol.json",
            "models/w600k-mbf/w600k_mbf.onnx"
        ]
    );
    for m in models {
        assert_eq!(m["results"].as_array().unwrap().len(), 1);
        let row = &m["results"][0];
        assert!(row["median_ms"].as_f64().unwrap() > 0.0);
        assert!(row["ratio"].as_f64().unwrap() > 0.0);
    }
    // Recording y1 again keeps w600k_mbf's rows as they were.
    ok(bench(&fresh)
        .arg("--update-baseline")
        .arg("--model")
        .arg(&y1));
    let again: Value = serde_json::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert_eq!(again["models"][1], recorded["models"][1]);
    assert_ne!(again["models"][0], recorded["models"][0]);
    let recorded = again;

    // Timing on a shared machine is noisy: the gate gets a few tries to pass, and each
    // try's own figures (`--json`) join the recorded ones, so the "twice faster" baseline
    // below is twice as fast as the fastest run seen, not merely as a slow one.
    let mut fastest = [f64::INFINITY; 2];
    let mut passed = [false; 2];
    for (i, metric) in ["time", "ratio"].into_iter().enumerate() {
        for _ in 0..3 {
            let now = tmp.path().join("now.json");
            let (out, stdout, _) =
                common::run(bench(&fresh).args(["--metric", metric, "--json"]).arg(&now));
            let rows: Value =
                serde_json::from_str(&std::fs::read_to_string(&now).unwrap()).unwrap();
            assert_eq!(rows.as_array().unwrap().len(), 2);
            assert_eq!(rows[1]["model"], "models/w600k-mbf/w600k_mbf.onnx");
            for (j, key) in ["median_ms", "ratio"].into_iter().enumerate() {
                fastest[j] = fastest[j].min(rows[0][key].as_f64().unwrap());
            }
            if out.status.success() {
                assert!(stdout.contains("all 2 rows within 50%"), "{stdout}");
                passed[i] = true;
                break;
            }
        }
    }
    assert_eq!(
        passed, [true; 2],
        "the gate failed its own baseline three times"
    );

    // y1's rows twice as fast; w600k_mbf's as recorded.
    let mut faster = recorded.clone();
    for (key, seen) in [("median_ms", fastest[0]), ("ratio", fastest[1])] {
        let v = faster["models"][0]["results"][0][key]
            .as_f64()
            .unwrap()
            .min(seen);
        faster["models"][0]["results"][0][key] = (v / 2.0).into();
    }
    let faster_path = tmp.path().join("faster.json");
    std::fs::write(&faster_path, serde_json::to_string(&faster).unwrap()).unwrap();
    for metric in ["time", "ratio"] {
        let stderr = fails(bench(&faster_path).args(["--metric", metric]));
        assert!(
            stderr.contains("1 of 2 rows are slower than the baseline"),
            "{stderr}"
        );
        assert!(stderr.contains("y1 threads 1 batch 1"), "{stderr}");
    }
}
