//! `cargo xtask bench` as a gate: it passes against a baseline it has just recorded and
//! fails against one twice as fast, in time and in the ratio to its reference workload.
//!
//! One test, so no other test of this binary competes for the cores while it times.

mod common;

use std::path::Path;

use common::{fails, ok, xtask};
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

    // A wide tolerance: the point is the gate's logic, not this machine's noise.
    let fresh = tmp.path().join("baselines/this.json");
    ok(bench(&fresh).args(["--update-baseline", "--tolerance", "0.5"]));
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&fresh).unwrap()).unwrap();
    assert!(!recorded["machine"]["cpu"].as_str().unwrap().is_empty());
    assert!(recorded["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(recorded["results"].as_array().unwrap().len(), 1);
    let row = &recorded["results"][0];
    assert!(row["median_ms"].as_f64().unwrap() > 0.0);
    assert!(row["ratio"].as_f64().unwrap() > 0.0);

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
            for (j, key) in ["median_ms", "ratio"].into_iter().enumerate() {
                fastest[j] = fastest[j].min(rows[0][key].as_f64().unwrap());
            }
            if out.status.success() {
                assert!(stdout.contains("all 1 rows within 50%"), "{stdout}");
                passed[i] = true;
                break;
            }
        }
    }
    assert_eq!(
        passed, [true; 2],
        "the gate failed its own baseline three times"
    );

    let mut faster = recorded.clone();
    for (key, seen) in [("median_ms", fastest[0]), ("ratio", fastest[1])] {
        let v = faster["results"][0][key].as_f64().unwrap().min(seen);
        faster["results"][0][key] = (v / 2.0).into();
    }
    let faster_path = tmp.path().join("faster.json");
    std::fs::write(&faster_path, serde_json::to_string(&faster).unwrap()).unwrap();
    for metric in ["time", "ratio"] {
        let stderr = fails(bench(&faster_path).args(["--metric", metric]));
        assert!(
            stderr.contains("1 of 1 rows are slower than the baseline"),
            "{stderr}"
        );
        assert!(stderr.contains("threads 1 batch 1"), "{stderr}");
    }
}
