//! `mfn-cli quantize` and `--precision`: the int8 model a file carries and the one
//! calibrated on the fly are the same, `--precision f32` gives the f32 model back, and an
//! int8 request the model cannot meet is refused.

mod common;

use std::path::Path;

use common::{asset, floats, mfn, ok, stderr};
use serde_json::Value;

fn embed(model: &Path, extra: &[&str]) -> Vec<Vec<f32>> {
    let faces = [
        asset("golden/images/Dean_Barker_0001.png"),
        asset("golden/images/Abel_Pacheco_0001.png"),
    ];
    let mut args = vec!["embed", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(faces.iter().map(|p| p.to_str().unwrap()));
    let out = ok(mfn(&args));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| floats(&i["embedding"]))
        .collect()
}

#[test]
fn quantize_writes_a_model_that_runs_in_int8() {
    let dir = tempfile::tempdir().unwrap();
    let y1 = asset("models/mobilefacenet-y1/model-symbol.json");
    let calib = asset("golden/images");
    let int8 = dir.path().join("y1-int8.safetensors");
    let out = ok(mfn(&[
        "quantize",
        "--model",
        y1.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--images",
        "64",
        "--out",
        int8.to_str().unwrap(),
    ]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("32 int8 layers") && said.contains("26 faces"),
        "{said}"
    );

    let f32_out = embed(&y1, &[]);
    let from_file = embed(&int8, &[]);
    let on_the_fly = embed(
        &y1,
        &[
            "--precision",
            "int8",
            "--calib",
            calib.to_str().unwrap(),
            "--calib-images",
            "64",
        ],
    );
    assert_eq!(
        from_file, on_the_fly,
        "the same calibration, the same int8 model"
    );
    assert_ne!(from_file, f32_out, "the int8 file ran in f32");
    for (a, b) in from_file.iter().zip(&f32_out) {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.99, "int8 against f32: cosine {cos}");
    }
    assert_eq!(embed(&int8, &["--precision", "f32"]), f32_out);

    // An int8 request that the model cannot meet names it and how to meet it.
    let face = asset("golden/images/Dean_Barker_0001.png");
    let face = face.to_str().unwrap();
    let refused = mfn(&[
        "embed",
        "--model",
        y1.to_str().unwrap(),
        "--precision",
        "int8",
        face,
    ]);
    assert_eq!(refused.status.code(), Some(2));
    let err = stderr(&refused);
    assert!(
        err.contains("no int8 half") && err.contains("mfn-cli quantize"),
        "{err}"
    );
    let refused = mfn(&["embed", "--calib", calib.to_str().unwrap(), face]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    // A calibration folder with no faces.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let refused = mfn(&[
        "quantize",
        "--model",
        y1.to_str().unwrap(),
        "--calib",
        empty.to_str().unwrap(),
        "--out",
        dir.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    let err = stderr(&refused);
    assert!(err.contains("empty") && err.contains("no .jpg"), "{err}");
    assert!(!dir.path().join("x.safetensors").exists());
}
