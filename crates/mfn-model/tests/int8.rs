//! The int8 engine against the f32 one on real weights: y1 and `w600k_mbf`, calibrated on
//! aligned LFW faces, compared on the golden faces; and the int8 half through the native
//! format, including hostile edits of it.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::asset;
use mfn_model::quant::{QuantizeOptions, INT8_KEY};
use mfn_model::{Checkpoint, Int8, MobileFaceNet, Precision};

/// Faces to calibrate on: what `mfn-cli quantize` takes by default.
const CALIBRATION_FACES: usize = mfn_model::quant::DEFAULT_CALIBRATION_IMAGES;

/// Worst cosine to the f32 outputs allowed on the golden faces. Measured: 0.99924
/// (`w600k_mbf`), 0.99947 (y1).
const MIN_COSINE: f32 = 0.999;

/// Largest relative RMS error of one int8 product against its f32 one on the golden faces.
/// Measured: 0.0136 (`w600k_mbf`), 0.0155 (y1).
const MAX_LAYER_ERROR: f32 = 0.025;

fn golden_faces() -> Tensor {
    let dir = asset("golden/images");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 20, "golden faces in {}", dir.display());
    mfn_data::load_batch(&paths, [112, 112], &Device::Cpu).unwrap()
}

fn calibrated(ckpt: &Checkpoint) -> (MobileFaceNet, Int8) {
    let model = ckpt.build(&Device::Cpu).unwrap();
    let int8 = mfn_data::calibration::calibrate(
        &model,
        &asset("lfw/aligned-112x112"),
        CALIBRATION_FACES,
        QuantizeOptions::default(),
        |_, _| {},
    )
    .unwrap();
    (model, int8)
}

fn cosines(a: &Tensor, b: &Tensor) -> Vec<f32> {
    let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
    let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let n = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
            dot / (n(x) * n(y))
        })
        .collect()
}

fn check_model(rel: &str) {
    let ckpt = Checkpoint::load(&asset(rel), None, &Device::Cpu).unwrap();
    let (f32_model, int8) = calibrated(&ckpt);
    assert_eq!(int8.calibration.images, CALIBRATION_FACES);
    let int8_model = f32_model.quantized(&int8).unwrap();
    assert_eq!(int8_model.precision(), Precision::Int8);
    assert_eq!(f32_model.precision(), Precision::F32);
    let faces = golden_faces();
    let want = f32_model.forward(&faces).unwrap();
    let got = int8_model.forward(&faces).unwrap();
    let cos = cosines(&got, &want);
    let worst = cos.iter().cloned().fold(f32::INFINITY, f32::min);
    let mean = cos.iter().sum::<f32>() / cos.len() as f32;
    eprintln!(
        "{rel}: int8 vs f32 cosine on {} golden faces: min {worst:.5}, mean {mean:.5}",
        cos.len()
    );
    assert!(
        worst >= MIN_COSINE,
        "{rel}: worst cosine {worst} below {MIN_COSINE}"
    );
    // Each product on its own, fed the f32 path's input.
    let errors = int8_model.int8_layer_errors(&faces).unwrap();
    assert_eq!(errors.len(), int8.layers.len());
    let (worst_layer, worst_err) =
        errors
            .iter()
            .cloned()
            .fold((String::new(), 0f32), |m, e| if e.1 > m.1 { e } else { m });
    let mean_err = errors.iter().map(|e| e.1).sum::<f32>() / errors.len() as f32;
    eprintln!("{rel}: per-layer relative RMS error: mean {mean_err:.4}, worst {worst_err:.4} ({worst_layer})");
    for (name, err) in &errors {
        assert!(
            *err < MAX_LAYER_ERROR,
            "{rel}: {name} relative RMS error {err}"
        );
        assert!(*err > 0.0, "{rel}: {name} runs in f32");
    }
    // The int8 path is the engine's, not a copy of the f32 one.
    assert!(
        worst < 0.999_999,
        "{rel}: int8 gives the f32 outputs exactly"
    );

    // Through the native format: the same outputs from the written file, which a later
    // load builds in int8 by itself.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("int8.safetensors");
    let mut q = ckpt.clone();
    q.int8 = Some(int8.clone());
    q.save(&path).unwrap();
    let back = Checkpoint::load(&path, None, &Device::Cpu).unwrap();
    assert_eq!(back.int8.as_ref(), Some(&int8));
    let reloaded = back.build(&Device::Cpu).unwrap();
    assert_eq!(reloaded.precision(), Precision::Int8);
    let again = reloaded.forward(&faces).unwrap();
    let diff = (again - &got)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "{rel}: reloaded int8 model differs");
    // And back to f32 on request.
    let plain = reloaded.dequantized().unwrap().forward(&faces).unwrap();
    let cos = cosines(&plain, &want);
    assert!(
        cos.iter().all(|c| *c > 0.999_999),
        "{rel}: dequantised {cos:?}"
    );
}

#[test]
fn y1_int8_stays_close_to_f32() {
    check_model("models/mobilefacenet-y1/model-symbol.json");
}

#[test]
fn w600k_mbf_int8_stays_close_to_f32() {
    check_model("models/w600k-mbf/w600k_mbf.onnx");
}

/// A change to the int8 metadata JSON.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

/// Rewrites the int8 metadata of a saved file with `edit` and loads it.
fn load_edited(dir: &Path, ckpt: &Checkpoint, edit: impl Fn(&mut serde_json::Value)) -> String {
    let path = dir.join("edited.safetensors");
    ckpt.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = header["__metadata__"][INT8_KEY]
        .as_str()
        .unwrap()
        .to_string();
    let mut meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    edit(&mut meta);
    header["__metadata__"][INT8_KEY] = serde_json::Value::String(meta.to_string());
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    Checkpoint::load(&path, None, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn a_bad_int8_half_is_refused_naming_the_file() {
    let mut ckpt = Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let model = ckpt.build(&Device::Cpu).unwrap();
    let mut calibrator = mfn_model::Calibrator::new(&model);
    calibrator.observe(&golden_faces()).unwrap();
    ckpt.int8 = Some(
        calibrator
            .finish(QuantizeOptions::default(), "golden")
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let first = |m: &serde_json::Value| m["layers"][0].clone();
    let cases: Vec<(&str, Edit)> = vec![
        ("format", Box::new(|m| m["format"] = "mfn-int8/99".into())),
        (
            "not a 1x1 conv",
            Box::new(|m| m["layers"][0] = "conv_2_dw_conv2d_weight".into()),
        ),
        ("twice", Box::new(move |m| m["layers"][1] = first(m))),
        (
            "int8 tensor of no layer",
            Box::new(|m| {
                m["layers"].as_array_mut().unwrap().remove(0);
            }),
        ),
        ("unknown field", Box::new(|m| m["extra"] = 1.into())),
    ];
    for (want, edit) in cases {
        let err = load_edited(dir.path(), &ckpt, edit);
        assert!(err.contains("edited.safetensors"), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
    }
    // Values the metadata cannot carry: a scale that is not positive, a weight of -128.
    let int8 = ckpt.int8.clone().unwrap();
    let name = int8.layers.keys().next().unwrap().clone();
    let path = dir.path().join("values.safetensors");
    for (want, edit) in [
        (
            "input scale",
            Box::new(|l: &mut mfn_model::quant::Int8Layer| l.input_scale[3] = 0.0)
                as Box<dyn Fn(&mut mfn_model::quant::Int8Layer)>,
        ),
        ("scale", Box::new(|l| l.weight_scale[1] = f32::NAN)),
        ("-128", Box::new(|l| l.weight[5] = i8::MIN)),
    ] {
        let mut bad = ckpt.clone();
        edit(bad.int8.as_mut().unwrap().layers.get_mut(&name).unwrap());
        bad.save(&path).unwrap();
        let err = Checkpoint::load(&path, None, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("values.safetensors") && err.contains(want),
            "{want}: {err}"
        );
    }
}
