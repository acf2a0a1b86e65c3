//! Importing, saving and loading checkpoints, and what happens when they are broken.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::asset;
use mfn_model::import::mxnet;
use mfn_model::{Checkpoint, Config, Error};

fn y1_symbol() -> PathBuf {
    asset("models/mobilefacenet-y1/model-symbol.json")
}

fn y1_model(device: &Device) -> mfn_model::MobileFaceNet {
    Checkpoint::load(&y1_symbol(), None, device)
        .unwrap()
        .build(device)
        .unwrap()
}

fn y1_params() -> PathBuf {
    asset("models/mobilefacenet-y1/model-0000.params")
}

/// A deterministic, face-sized input in 0..=255.
fn input(n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 3 * 112 * 112)
        .map(|i| ((i as f32 * 0.013).sin() * 0.5 + 0.5) * 255.0)
        .collect();
    Tensor::from_vec(v, (n, 3, 112, 112), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn params_file_lists_every_y1_weight() {
    let arrays = mxnet::read_params(&y1_params()).unwrap();
    assert_eq!(arrays.len(), 284);
    assert_eq!(arrays["conv_1_conv2d_weight"].shape, [64, 3, 3, 3]);
    assert_eq!(arrays["fc1_moving_var"].shape, [128]);
    assert!(arrays["fc1_moving_var"].data.iter().all(|v| *v > 0.0));
}

#[test]
fn truncated_params_name_the_file_and_offset() {
    let bytes = std::fs::read(y1_params()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [0usize, 5, 30, 1000, bytes.len() / 2, bytes.len() - 3] {
        let path = dir.path().join("model-0000.params");
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = mxnet::read_params(&path).unwrap_err();
        match &err {
            Error::Params {
                path: p, offset, ..
            } => {
                assert_eq!(p, &path);
                assert!(
                    *offset as usize <= cut,
                    "offset {offset} past the end {cut}"
                );
            }
            other => panic!("cut at {cut}: expected a Params error, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("model-0000.params") && msg.contains("offset"),
            "{msg}"
        );
    }
}

#[test]
fn garbage_params_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x-0000.params");
    std::fs::write(&path, b"this is not an MXNet file at all, just text").unwrap();
    let msg = mxnet::read_params(&path).unwrap_err().to_string();
    assert!(msg.contains("not an MXNet NDArray list"), "{msg}");
}

/// Copies y1's symbol with one edit and links its params beside it.
fn edited_y1(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(y1_symbol()).unwrap()).unwrap();
    edit(&mut json);
    let symbol = dir.join("model-symbol.json");
    std::fs::write(&symbol, serde_json::to_string(&json).unwrap()).unwrap();
    std::fs::copy(y1_params(), dir.join("model-0000.params")).unwrap();
    symbol
}

fn set_attr(json: &mut serde_json::Value, node: &str, key: &str, value: &str) {
    for n in json["nodes"].as_array_mut().unwrap() {
        if n["name"] == node {
            n["attrs"][key] = serde_json::Value::String(value.into());
        }
    }
}

#[test]
fn symbol_that_differs_from_the_config_names_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let symbol = edited_y1(dir.path(), |j| {
        set_attr(j, "res_4_block2_conv_dw_conv2d", "stride", "(2, 2)")
    });
    let err = Checkpoint::load(&symbol, None, &Device::Cpu).unwrap_err();
    match &err {
        Error::GraphMismatch { node, .. } => assert_eq!(node, "res_4_block2_conv_dw_conv2d"),
        other => panic!("expected GraphMismatch, got {other}"),
    }
}

#[test]
fn symbol_whose_shapes_disagree_with_the_params_is_an_error() {
    // A symbol and config that agree on a 64-d embedding, against params holding 128.
    let dir = tempfile::tempdir().unwrap();
    let symbol = edited_y1(dir.path(), |j| set_attr(j, "pre_fc1", "num_hidden", "64"));
    let config = Config {
        embedding_size: 64,
        ..Config::y1()
    };
    let err = Checkpoint::load(&symbol, Some(&config), &Device::Cpu).unwrap_err();
    match &err {
        Error::WeightShape {
            path,
            name,
            expected,
            found,
        } => {
            assert!(path.ends_with("model-0000.params"));
            assert_eq!(name, "fc1_weight");
            assert_eq!(expected, &[64, 512]);
            assert_eq!(found, &[128, 512]);
        }
        other => panic!("expected WeightShape, got {other}"),
    }
}

#[test]
fn bn_eps_defaults_to_mxnet_and_is_read_per_node() {
    let sym = mxnet::read_symbol(&y1_symbol()).unwrap();
    let config = mxnet::match_config(&sym, &Config::y1(), &y1_symbol()).unwrap();
    assert_eq!(config.bn_eps, mxnet::MXNET_BN_EPS);
    assert_eq!(config.head.bn_eps, 2e-5);
    // A body node with an explicit eps that the others do not share is a mismatch.
    let dir = tempfile::tempdir().unwrap();
    let symbol = edited_y1(dir.path(), |j| {
        set_attr(j, "conv_6sep_batchnorm", "eps", "1e-5")
    });
    match Checkpoint::load(&symbol, None, &Device::Cpu).unwrap_err() {
        Error::GraphMismatch { node, .. } => assert_eq!(node, "conv_6sep_batchnorm"),
        other => panic!("expected GraphMismatch, got {other}"),
    }
}

#[test]
fn missing_and_unknown_files_are_errors() {
    let err = Checkpoint::load(
        Path::new("/nonexistent/model-symbol.json"),
        None,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/model-symbol.json"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("model.bin");
    std::fs::write(&odd, b"x").unwrap();
    let err = Checkpoint::load(&odd, None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("unknown model format"), "{err}");
}

#[test]
fn native_format_round_trips_and_rejects_damage() {
    let device = Device::Cpu;
    let mut ckpt = Checkpoint::load(&y1_symbol(), None, &device).unwrap();
    ckpt.metadata.insert("mfn.threshold".into(), "0.25".into());
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("y1.safetensors");
    ckpt.save(&native).unwrap();

    let back = Checkpoint::load(&native, None, &device).unwrap();
    assert_eq!(back.config, ckpt.config);
    assert_eq!(
        back.metadata.get("mfn.threshold").map(String::as_str),
        Some("0.25")
    );
    let x = input(2);
    let a = ckpt.build(&device).unwrap().forward(&x).unwrap();
    let b = back.build(&device).unwrap().forward(&x).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);

    let bytes = std::fs::read(&native).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = Checkpoint::load(&cut, None, &device).unwrap_err();
    assert!(matches!(err, Error::Native { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");

    // A plain safetensors file without our metadata is not silently accepted.
    let plain = dir.path().join("plain.safetensors");
    candle_core::safetensors::save(&ckpt.tensors, &plain).unwrap();
    let err = Checkpoint::load(&plain, None, &device).unwrap_err();
    assert!(err.to_string().contains("mfn.format"), "{err}");
}

#[test]
fn inference_path_matches_the_unfolded_graph_in_batches() {
    let device = Device::Cpu;
    let model = y1_model(&device);
    let x = input(3);
    let fast = model.forward(&x).unwrap();
    let graph = model.forward_graph(&x, false).unwrap();
    assert!(
        max_diff(&fast, &graph) < 1e-4,
        "{}",
        max_diff(&fast, &graph)
    );
    // Each image's embedding does not depend on its batch.
    let one = model.forward(&x.narrow(0, 1, 1).unwrap()).unwrap();
    assert!(max_diff(&one, &fast.narrow(0, 1, 1).unwrap()) < 1e-5);
}

#[test]
fn wrong_input_shape_is_a_typed_error() {
    let device = Device::Cpu;
    let model = y1_model(&device);
    let x = Tensor::zeros((1, 3, 96, 112), candle_core::DType::F32, &device).unwrap();
    match model.forward(&x).unwrap_err() {
        Error::InputShape { found, .. } => assert_eq!(found, [1, 3, 96, 112]),
        other => panic!("expected InputShape, got {other}"),
    }
}

#[test]
fn engine_is_independent_of_threads_layout_and_batch_split() {
    let device = Device::Cpu;
    let model = y1_model(&device);
    let x = input(3);
    let reference = model.forward_graph(&x, false).unwrap();
    // A strided view with the same values: H and W swapped twice.
    let strided = x
        .transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(2, 3)
        .unwrap();
    assert!(!strided.is_contiguous());
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            // Batch 3 runs one image per thread with 1-3 threads; batch 1 splits layers.
            let all = model.forward(&strided).unwrap();
            assert!(max_diff(&all, &reference) < 1e-4, "{threads} threads");
            let one = model.forward(&x.narrow(0, 2, 1).unwrap()).unwrap();
            assert!(max_diff(&one, &reference.narrow(0, 2, 1).unwrap()) < 1e-4);
            let (timed, layers) = model.forward_timed(&x).unwrap();
            assert_eq!(max_diff(&timed, &all), 0.0);
            assert_eq!(layers.len(), mfn_model::LayerKind::ALL.len());
        });
    }
}

#[test]
fn legacy_pytorch_state_dicts_are_read() {
    use mfn_model::import::torch::read_state_dict;
    let path = asset("models/retinaface-mnet025/mobilenet0.25_Final.pth");
    let sd = read_state_dict(&path, &Device::Cpu).unwrap();
    // 300 entries, of which 47 are integer `num_batches_tracked` buffers (one per BatchNorm).
    assert_eq!(sd.len(), 253);
    assert_eq!(sd["body.stage1.0.0.weight"].dims(), &[8, 3, 3, 3]);
    assert_eq!(sd["LandmarkHead.2.conv1x1.bias"].dims(), &[20]);
    let var: Vec<f32> = sd["fpn.merge1.1.running_var"].to_vec1().unwrap();
    assert!(var.iter().all(|v| *v > 0.0 && v.is_finite()));

    let onet = read_state_dict(&asset("models/mtcnn/onet.pt"), &Device::Cpu).unwrap();
    assert!(onet.keys().any(|k| k.contains("conv")), "{:?}", onet.keys());

    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = read_state_dict(&cut, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("cut.pth") && err.contains("truncated"),
        "{err}"
    );
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"hello").unwrap();
    let err = read_state_dict(&junk, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a PyTorch checkpoint"), "{err}");
}
