//! `cargo xtask accuracy` on quick entries of the committed expectation file: y1 passes
//! the fold-1 entries, and a y1 whose stem BatchNorm scale is zeroed fails, with the entry
//! named.

mod common;

use candle_core::{Device, Tensor};
use common::{asset, fails, ok, write, xtask};
use mfn_model::Checkpoint;

/// The three flip entries on `lfw-fold1.bin`: one embedding pass of 1,200 faces.
const QUICK: &str = "y1/lfw-fold1-bin/flip";

#[test]
fn y1_passes_the_quick_entries() {
    let stdout = ok(xtask().args(["accuracy", "--only", QUICK]));
    for protocol in ["insightface", "exact", "threshold"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{QUICK}/{protocol} ")))
            .unwrap_or_else(|| panic!("no {protocol} line in:\n{stdout}"));
        assert!(line.ends_with("ok"), "{line}");
    }
    // Fold 1 of pairs.txt scores 99.000% at the threshold folds 2-10 give it.
    assert!(stdout.contains("99.000%"), "{stdout}");
}

#[test]
fn a_corrupted_model_fails_and_names_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let symbol = asset("models/mobilefacenet-y1/model-symbol.json");
    let mut ckpt = Checkpoint::load(&symbol, None, &Device::Cpu).unwrap();
    let name = "conv_1_batchnorm_gamma";
    let gamma = ckpt
        .tensors
        .get(name)
        .unwrap_or_else(|| panic!("y1 has no {name}"));
    let zeroed = Tensor::zeros(gamma.shape(), gamma.dtype(), &Device::Cpu).unwrap();
    ckpt.tensors.insert(name.into(), zeroed);
    let broken = tmp.path().join("y1-zeroed-stem-bn.safetensors");
    ckpt.save(&broken).unwrap();

    // The 20-pair set: 80 forward passes, where y1 scores 100%.
    let entry = "y1/lfw-20pairs-bin/flip/exact";
    let stderr = fails(
        xtask()
            .args(["accuracy", "--only", entry, "--model"])
            .arg(&broken),
    );
    eprintln!("{stderr}");
    assert!(stderr.contains(&format!("`{entry}` fell to")), "{stderr}");
    assert!(stderr.contains("1 of 1 entries"), "{stderr}");
}

#[test]
fn bad_expectation_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = write(tmp.path(), "bad.json", r#"{"entries": [{"name": 3}]}"#);
    let stderr = fails(xtask().args(["accuracy", "--file"]).arg(&bad));
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");

    // An expectation that disagrees with its reference is stale: refused before any run.
    let stale = write(
        tmp.path(),
        "stale.json",
        r#"{"entries": [{"name": "y1/lfw/flip/exact",
            "model": "models/mobilefacenet-y1/model-symbol.json",
            "data": {"pairs": "lfw/pairs.txt", "images": "lfw/aligned-112x112"},
            "flip": true, "protocol": "exact", "expected": 0.95, "tolerance": 0.0005,
            "reference": {"file": "golden/lfw-y1-reference.json",
                          "pointer": "/results_image_crate/flip/exact/accuracy_mean"}}]}"#,
    );
    let stderr = fails(xtask().args(["accuracy", "--file"]).arg(&stale));
    assert!(
        stderr.contains("expects 0.95 but its reference"),
        "{stderr}"
    );

    let stderr = fails(xtask().args(["accuracy", "--only", "no-such-entry"]));
    assert!(stderr.contains("--only no-such-entry"), "{stderr}");
}
