//! `cargo xtask accuracy` on quick entries of the committed expectation file: y1 passes
//! the fold-1 entries, and a y1 whose stem BatchNorm scale is zeroed fails, with the entry
//! named. Entries may name a registry model and a registry set, which the hub resolves
//! (here from the assets folder, through a test registry) and converts.

mod common;

use std::path::Path;

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

/// A registry entry for a file of the assets folder, with a made-up Hub source.
fn pinned(name: &str, kind: &str, rel: &str, extra: &str) -> String {
    let path = asset(rel);
    format!(
        r#"{{"name": "{name}", "kind": "{kind}", "sha256": "{}", "size": {},
            "assets": "{rel}",
            "source": {{"hub": {{"repo": "mfn-test/files", "revision": "main", "path": "{name}"}}}}
            {extra}}}"#,
        mfn_hub::sha256_file(&path).unwrap(),
        std::fs::metadata(&path).unwrap().len()
    )
}

/// A test registry: y1's ONNX export as a model with the threshold LFW folds 2-10 fit, and
/// the 20-pair set.
fn test_registry(dir: &Path) -> std::path::PathBuf {
    let model = pinned(
        "y1-onnx-test",
        "model",
        "models/mobilefacenet-y1/mobilefacenet-y1.onnx",
        r#", "model": {"preset": "y1", "threshold": {"cosine": 0.2686613254348914,
              "derivation": "the exact protocol on LFW folds 2-10, flip"}}"#,
    );
    let set = pinned("pairs20-test", "set", "lfw/lfw-20pairs-protocol2.bin", "");
    write(
        dir,
        "registry.json",
        &format!(r#"{{"format": "mfn-registry/1", "entries": [{model}, {set}]}}"#),
    )
}

#[test]
fn registry_models_and_sets_resolve_through_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = test_registry(tmp.path());
    let home = tmp.path().join("home");
    let file = write(
        tmp.path(),
        "accuracy.json",
        r#"{"entries": [
            {"name": "y1-onnx/pairs20/flip/exact", "model": {"registry": "y1-onnx-test"},
             "data": {"set": "pairs20-test"}, "flip": true, "protocol": "exact",
             "expected": 1.0, "tolerance": 0.0005},
            {"name": "y1-onnx/pairs20/flip/threshold", "model": {"registry": "y1-onnx-test"},
             "data": {"set": "pairs20-test"}, "flip": true, "protocol": "threshold",
             "expected": 1.0, "tolerance": 0.0005}]}"#,
    );
    let run = |cmd: &mut std::process::Command| {
        cmd.args(["accuracy", "--file"])
            .arg(&file)
            .env("MFN_REGISTRY", &registry)
            .env("MFN_HOME", &home)
            .env("HF_HUB_OFFLINE", "1");
    };
    let out = tmp.path().join("out");
    let mut cmd = xtask();
    run(&mut cmd);
    let stdout = ok(cmd.arg("--out").arg(&out));
    for line in [
        "y1-onnx/pairs20/flip/exact ",
        "y1-onnx/pairs20/flip/threshold ",
    ] {
        let l = stdout
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no `{line}` line in:\n{stdout}"));
        assert!(l.ends_with("ok"), "{l}");
    }
    // The threshold protocol used the registry's threshold, as the entry gives none.
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("accuracy.json")).unwrap()).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["protocol"] == "threshold")
        .unwrap();
    assert_eq!(row["threshold_cosine"], 0.2686613254348914, "{row}");
    // Converted once into MFN_HOME, with that threshold in its metadata.
    let converted: Vec<_> = std::fs::read_dir(home.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(converted.len(), 1, "{converted:?}");
    let ckpt = Checkpoint::load(&converted[0], None, &Device::Cpu).unwrap();
    assert_eq!(ckpt.metadata["mfn.threshold"], "0.2686613254348914");

    // Without the assets folder's copy and offline, the registry model cannot be found: the
    // entry, the name, the URL and the cache path are named.
    let empty = tmp.path().join("empty-assets");
    std::fs::create_dir_all(&empty).unwrap();
    let mut cmd = xtask();
    run(&mut cmd);
    let stderr = fails(
        cmd.env("MFN_ASSETS", &empty)
            .env("MFN_HOME", tmp.path().join("h2")),
    );
    for want in [
        "entry `y1-onnx/pairs20/flip/exact`",
        "the registry model `y1-onnx-test`",
        "/mfn-test/files/resolve/main/y1-onnx-test",
        "downloads are off",
    ] {
        assert!(stderr.contains(want), "missing `{want}` in:\n{stderr}");
    }
}
