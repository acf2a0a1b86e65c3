//! ONNX import by graph walking: the real y1 export (BatchNorm not folded) and a torch
//! export of insightface's `mbf` (BatchNorm folded, opaque initializer names).

mod common;

use candle_core::{Device, Tensor};
use common::asset;
use mfn_model::{Checkpoint, Config, Error};
use serde_json::Value;

fn png(rel: &str) -> Tensor {
    mfn_data::load_batch(&[asset(rel)], [112, 112], &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn y1_onnx_equals_the_mxnet_import() {
    let device = Device::Cpu;
    let onnx = Checkpoint::load(
        &asset("models/mobilefacenet-y1/mobilefacenet-y1.onnx"),
        None,
        &device,
    )
    .unwrap();
    assert_eq!(onnx.config.name, "y1");
    assert_eq!(onnx.config.input_norm, mfn_model::InputNorm::insightface());
    let mxnet = Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &device,
    )
    .unwrap();
    let (a, b) = (onnx.build(&device).unwrap(), mxnet.build(&device).unwrap());
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(asset("golden/mobilefacenet-y1-embeddings.json")).unwrap(),
    )
    .unwrap();
    for e in golden["images"].as_array().unwrap().iter().take(8) {
        let x = png(e["path"].as_str().unwrap());
        let (ya, yb) = (rows(&a.forward(&x).unwrap()), rows(&b.forward(&x).unwrap()));
        let diff = ya
            .iter()
            .zip(&yb)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "ONNX vs MXNet import differ by {diff}");
    }
}

#[test]
fn mbf_torch_export_matches_onnx_runtime() {
    let device = Device::Cpu;
    let ckpt = Checkpoint::load(
        &asset("models/mbf-onnx-export/mbf-random-weights.onnx"),
        None,
        &device,
    )
    .unwrap();
    assert_eq!(ckpt.config.name, "mbf");
    assert_eq!(ckpt.config.embedding_size, 512);
    assert_eq!(ckpt.config.stem_groups, Some(64));
    let model = ckpt.build(&device).unwrap();
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(asset("golden/mbf-random-weights-embeddings.json")).unwrap(),
    )
    .unwrap();
    let entries = golden["images"].as_array().unwrap();
    assert_eq!(entries.len(), 8);
    for e in entries {
        let x = png(e["path"].as_str().unwrap());
        let want: Vec<f32> = e["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        for (path, got) in [
            ("engine", rows(&model.forward(&x).unwrap())),
            ("graph", rows(&model.forward_graph(&x, false).unwrap())),
        ] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-4 * scale,
                "{path}: max diff {diff}, scale {scale}"
            );
        }
    }
}

#[test]
fn onnx_that_is_not_a_mobilefacenet_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, [0xffu8; 64]).unwrap();
    let err = Checkpoint::load(&junk, None, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Onnx { .. }), "{err}");
    assert!(err.to_string().contains("junk.onnx"), "{err}");

    // The y1 graph against the mbf config: the first differing node is named.
    let err = Checkpoint::load(
        &asset("models/mobilefacenet-y1/mobilefacenet-y1.onnx"),
        Some(&Config::mbf()),
        &Device::Cpu,
    )
    .unwrap_err();
    match err {
        Error::GraphMismatch { node, .. } => assert!(!node.is_empty()),
        other => panic!("expected GraphMismatch, got {other}"),
    }

    // A truncated file fails cleanly.
    let bytes = std::fs::read(asset("models/mbf-onnx-export/mbf-random-weights.onnx")).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::load(&cut, None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("cut.onnx"), "{err}");
}
