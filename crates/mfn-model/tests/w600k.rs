//! insightface's `w600k_mbf` (the `buffalo_s` recognition model) from its ONNX file: the
//! `mbf` body with a conv-reduce head (1x1 conv to 64 + PReLU, flatten 64x7x7, FC 3136 ->
//! 512, BatchNorm), against ONNX Runtime's raw outputs, on every forward path.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::asset;
use mfn_model::{Checkpoint, Config, Error, MobileFaceNet, Pooling};
use serde_json::Value;

fn model_path() -> PathBuf {
    asset("models/w600k-mbf/w600k_mbf.onnx")
}

fn load() -> Checkpoint {
    Checkpoint::load(&model_path(), None, &Device::Cpu).unwrap()
}

/// The reference file's `golden` entries: image path, plain and mirrored raw outputs.
fn golden() -> Vec<(PathBuf, Vec<f32>, Vec<f32>)> {
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(asset("golden/w600k-mbf-reference.json")).unwrap(),
    )
    .unwrap();
    let vec = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    json["golden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                asset(e["path"].as_str().unwrap()),
                vec(&e["embedding"]),
                vec(&e["embedding_flipped"]),
            )
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

/// Largest difference relative to the largest magnitude of `b`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max)
        / scale
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn onnx_import_finds_the_w600k_mbf_preset() {
    let ckpt = load();
    let mut want = Config::w600k_mbf();
    // The graph defines eps; f32's 1e-5 is not f64's.
    want.head.bn_eps = ckpt.config.head.bn_eps;
    assert!((ckpt.config.head.bn_eps - 1e-5).abs() < 1e-10);
    assert_eq!(ckpt.config, want);
    assert_eq!(ckpt.config.head.pool, Pooling::ConvReduce { channels: 64 });
    assert_eq!(ckpt.tensors["fc1_weight"].dims(), [512, 3136]);
    assert_eq!(
        ckpt.tensors["conv_6_reduce_conv2d_weight"].dims(),
        [64, 512, 1, 1]
    );
    assert_eq!(ckpt.tensors["conv_6_reduce_relu_gamma"].dims(), [64]);
    // The preset counts what the file holds: every tensor but the running statistics, plus
    // the gamma that folding BatchNorm into each conv took away.
    let stored: usize = ckpt
        .tensors
        .iter()
        .filter(|(k, _)| !k.ends_with("_moving_mean") && !k.ends_with("_moving_var"))
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(ckpt.config.complexity().params, stored as u64);
    assert_eq!(ckpt.config.complexity().params, 3_410_368);
}

#[test]
fn the_heads_are_told_apart_and_mismatches_name_the_node() {
    let device = Device::Cpu;
    // w600k_mbf's graph read as `mbf`: its reduce conv is where a GDConv should be.
    let err = Checkpoint::load(&model_path(), Some(&Config::mbf()), &device).unwrap_err();
    match &err {
        Error::GraphMismatch { node, .. } => assert_eq!(node, "Conv_93", "{err}"),
        other => panic!("expected GraphMismatch, got {other}"),
    }
    // The GDConv export read as `w600k_mbf`: its GDConv is where the reduce conv should be.
    let gdc = asset("models/mbf-onnx-export/mbf-random-weights.onnx");
    let err = Checkpoint::load(&gdc, Some(&Config::w600k_mbf()), &device).unwrap_err();
    match &err {
        Error::GraphMismatch { node, expected, .. } => {
            assert!(!node.is_empty() && node != "(end of graph)", "{err}");
            assert!(expected.contains("conv_6_reduce"), "{err}");
        }
        other => panic!("expected GraphMismatch, got {other}"),
    }
    // With no config given, each file still finds its own preset.
    assert_eq!(
        Checkpoint::load(&gdc, None, &device).unwrap().config.name,
        "mbf"
    );
}

#[test]
fn w600k_mbf_matches_onnx_runtime_on_every_path() {
    let device = Device::Cpu;
    let model = load().build(&device).unwrap();
    let golden = golden();
    assert_eq!(golden.len(), 26);
    let paths: Vec<PathBuf> = golden.iter().map(|g| g.0.clone()).collect();
    let x = mfn_data::load_batch(&paths, [112, 112], &device).unwrap();
    let flipped = mfn_model::hflip(&x).unwrap();

    let engine = model.forward(&x).unwrap();
    let engine_flipped = model.forward(&flipped).unwrap();
    assert_eq!(engine.dims(), [26, 512]);
    let (mut worst, mut worst_flipped) = (0f32, 0f32);
    for (i, (got, got_flipped)) in rows(&engine).iter().zip(rows(&engine_flipped)).enumerate() {
        let (path, plain, mirrored) = &golden[i];
        let norm = got.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((5.0..100.0).contains(&norm), "{path:?}: raw norm {norm}");
        worst = worst.max(max_abs_diff(got, plain));
        worst_flipped = worst_flipped.max(max_abs_diff(&got_flipped, mirrored));
    }
    eprintln!("engine vs ONNX Runtime: plain {worst:e}, mirrored {worst_flipped:e}");
    assert!(worst <= 1e-3, "plain: max abs difference {worst}");
    assert!(
        worst_flipped <= 1e-3,
        "mirrored: max abs difference {worst_flipped}"
    );

    // One image at a time runs the engine's other schedule (layers split across threads).
    let one = model.forward(&x.narrow(0, 3, 1).unwrap()).unwrap();
    assert!(rel_diff(&one, &engine.narrow(0, 3, 1).unwrap()) < 1e-5);

    let both = Tensor::cat(&[&x, &flipped], 0).unwrap();
    let want = Tensor::cat(&[&engine, &engine_flipped], 0).unwrap();
    let layers = model.forward_layers(&both).unwrap();
    let graph = model.forward_graph(&both, false).unwrap();
    let (dl, dg) = (rel_diff(&layers, &want), rel_diff(&graph, &want));
    eprintln!("relative to the engine: layers {dl:e}, graph {dg:e}");
    assert!(dl < 1e-4, "layers vs engine: {dl}");
    assert!(dg < 1e-4, "graph vs engine: {dg}");
}

#[test]
fn w600k_mbf_round_trips_through_the_native_format() {
    let device = Device::Cpu;
    let ckpt = load();
    let model = ckpt.build(&device).unwrap();
    let x = mfn_data::load_batch(
        &[
            asset("golden/images/Abel_Pacheco_0001.png"),
            asset("golden/images/Angela_Bassett_0001.png"),
        ],
        [112, 112],
        &device,
    )
    .unwrap();
    let want = model.forward(&x).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("w600k_mbf.safetensors");
    ckpt.save(&native).unwrap();
    let back = Checkpoint::load(&native, None, &device).unwrap();
    assert_eq!(back.config, ckpt.config);
    assert_eq!(
        back.metadata.get("mfn.source").map(String::as_str),
        Some("onnx")
    );
    let again = back.build(&device).unwrap();
    assert_eq!(rel_diff(&again.forward(&x).unwrap(), &want), 0.0);
    assert_eq!(
        rel_diff(
            &again.forward_graph(&x, false).unwrap(),
            &model.forward_graph(&x, false).unwrap()
        ),
        0.0
    );

    // The config alone, as the native metadata stores it.
    let json = serde_json::to_string(&ckpt.config).unwrap();
    assert!(json.contains("conv_reduce"), "{json}");
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), ckpt.config);
}

#[test]
fn w600k_mbf_fine_tunes_through_the_unfolded_graph() {
    let device = Device::Cpu;
    let ckpt = load();
    // Trainable variables holding the imported weights.
    let vars = VarMap::new();
    {
        let mut data = vars.data().lock().unwrap();
        for (name, t) in &ckpt.tensors {
            data.insert(name.clone(), candle_core::Var::from_tensor(t).unwrap());
        }
    }
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    let model = MobileFaceNet::new(&ckpt.config, vb).unwrap();
    let faces = [
        "golden/images/Abel_Pacheco_0001.png",
        "golden/images/Abel_Pacheco_0002.png",
        "golden/images/Angela_Bassett_0001.png",
        "golden/images/Angela_Bassett_0002.png",
    ];
    let paths: Vec<PathBuf> = faces.iter().map(|f| asset(f)).collect();
    let x = mfn_data::load_batch(&paths, [112, 112], &device).unwrap();
    let before = ckpt.tensors["fc1_moving_mean"].to_vec1::<f32>().unwrap();

    let y = model.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), [4, 512]);
    let r: Vec<f32> = (0..4 * 512).map(|i| ((i as f32) * 0.37).sin()).collect();
    let r = Tensor::from_vec(r, (4, 512), &device).unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let data = vars.data().lock().unwrap();
    for name in [
        "fc1_weight",
        "pre_fc1_bias",
        "conv_6_reduce_conv2d_weight",
        "conv_6_reduce_relu_gamma",
        "conv_6sep_conv2d_weight",
        "conv_1_conv2d_weight",
    ] {
        let g = grads
            .get(data[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(g.iter().any(|v| *v != 0.0), "{name}: zero gradient");
    }
    // Train-mode BatchNorm moved the embedding layer's running statistics.
    let after = data["fc1_moving_mean"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, after);
}
