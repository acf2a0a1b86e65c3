//! The real y1 weights through the MXNet importer, against ONNX Runtime's outputs.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::asset;
use mfn_model::Checkpoint;
use serde_json::Value;

fn load_png(path: &PathBuf) -> Tensor {
    mfn_data::load_batch(std::slice::from_ref(path), [112, 112], &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &[f32]) -> f32 {
    a.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn golden() -> Vec<(PathBuf, Vec<f32>, Vec<f32>)> {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(asset("golden/mobilefacenet-y1-embeddings.json")).unwrap(),
    )
    .unwrap();
    let vec = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    json["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                asset(e["path"].as_str().unwrap()),
                vec(&e["embedding"]),
                vec(&e["embedding_hflip"]),
            )
        })
        .collect()
}

#[test]
fn y1_matches_onnx_runtime_on_golden_pngs() {
    let device = Device::Cpu;
    let ckpt = Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &device,
    )
    .unwrap();
    assert_eq!(ckpt.config.bn_eps, 1e-3);
    assert_eq!(ckpt.config.head.bn_eps, 2e-5);
    assert!(ckpt.config.head.fix_gamma);
    assert_eq!(ckpt.config.input_norm, mfn_model::InputNorm::insightface());
    let model = ckpt.build(&device).unwrap();
    let golden = golden();
    assert_eq!(golden.len(), 32);
    let mut worst = 0f32;
    for (path, plain, flipped) in &golden {
        let x = load_png(path);
        let fast = model.forward(&x).unwrap();
        let graph = model.forward_graph(&x, false).unwrap();
        let flip = model.forward(&mfn_model::hflip(&x).unwrap()).unwrap();
        worst = worst
            .max(max_abs_diff(&fast, plain))
            .max(max_abs_diff(&graph, plain))
            .max(max_abs_diff(&flip, flipped));
    }
    assert!(worst <= 1e-3, "max abs difference {worst}");
    eprintln!("max abs difference against ONNX Runtime: {worst:e}");
}

/// The reduced-precision inference path (`build_with_dtype`), run on the CPU through
/// candle's ops: f16 must stay close to the f32 engine, and the output is f32. (candle's
/// CPU matmul has no bf16; bf16 runs on CUDA, checked by `bench/gpu/run.sh`.)
#[test]
fn y1_in_f16_and_bf16_stays_close_to_f32() {
    use candle_core::DType;
    let device = Device::Cpu;
    let ckpt = Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &device,
    )
    .unwrap();
    let paths: Vec<PathBuf> = golden().into_iter().take(3).map(|g| g.0).collect();
    let x = mfn_data::load_batch(&paths, [112, 112], &device).unwrap();
    let f32_model = ckpt.build(&device).unwrap();
    assert_eq!(f32_model.dtype(), DType::F32);
    let want = mfn_model::l2_normalize(&f32_model.forward(&x).unwrap()).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 1e-2)] {
        let model = ckpt.build_with_dtype(&device, dtype).unwrap();
        assert_eq!(model.dtype(), dtype);
        let raw = model.forward_layers(&x).unwrap();
        assert_eq!(raw.dtype(), DType::F32);
        let got = mfn_model::l2_normalize(&raw).unwrap();
        let diff = max_abs_diff(&got, &want.flatten_all().unwrap().to_vec1().unwrap());
        assert!(diff <= tol, "{dtype:?}: unit embeddings differ by {diff}");
        eprintln!("{dtype:?}: unit embeddings within {diff:e} of the f32 engine");
    }
    let bf16 = ckpt.build_with_dtype(&device, DType::BF16).unwrap();
    assert_eq!(bf16.dtype(), DType::BF16);
    assert!(ckpt.build_with_dtype(&device, DType::F64).is_err());
    assert!(f32_model.to_dtype(DType::U8).is_err());
}
