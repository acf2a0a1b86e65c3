//! The variants beyond the paper's: insightface's `mbf`, `mbf_large` and `w600k_mbf`,
//! foamliu's ReLU6 network with its separable stem, and PyTorch checkpoints in their own
//! layouts.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::asset;
use mfn_model::{Activation, Checkpoint, Config, Error, MobileFaceNet, StemKind};

fn png(rel: &str) -> Tensor {
    mfn_data::load_batch(&[asset(rel)], [112, 112], &Device::Cpu).unwrap()
}

/// Deterministic pixel values in 0..=255.
fn input(n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 3 * 112 * 112)
        .map(|i| ((i as f32 * 0.618).sin() * 0.5 + 0.5) * 255.0)
        .collect();
    Tensor::from_vec(v, (n, 3, 112, 112), &Device::Cpu).unwrap()
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

fn random(config: &Config) -> MobileFaceNet {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    MobileFaceNet::new(config, vb).unwrap()
}

#[test]
fn every_preset_runs_the_same_on_all_three_paths() {
    let x = input(2);
    let narrow = [
        Config::paper().with_width(0.25),
        Config::mbf().with_width(0.5),
        Config::w600k_mbf().with_width(0.5),
    ];
    for config in Config::PRESETS
        .iter()
        .map(|n| Config::preset(n).unwrap())
        .chain(narrow)
    {
        let name = config.name.clone();
        let model = random(&config);
        let graph = model.forward_graph(&x, false).unwrap();
        assert_eq!(graph.dims(), [2, config.embedding_size], "{name}");
        let engine = model.forward(&x).unwrap();
        let layers = model.forward_layers(&x).unwrap();
        assert!(rel_diff(&engine, &graph) < 1e-4, "{name}: engine vs graph");
        assert!(rel_diff(&layers, &graph) < 1e-4, "{name}: layers vs graph");
    }
}

#[test]
fn mbf_large_follows_arcface_torch() {
    let c = Config::mbf_large();
    let plan = c.plan();
    assert_eq!(c.stem, StemKind::ConvOnly);
    assert!(plan.stem_dw.is_none() && plan.stem_pw.is_none());
    assert_eq!(plan.stem.out_channels, 256);
    // Residual(2) + DepthWise + Residual(8) + DepthWise + Residual(12) + DepthWise + Residual(4).
    assert_eq!(plan.blocks.len(), 2 + 9 + 13 + 5);
    let hidden: Vec<usize> = plan.blocks.iter().map(|b| b.expand.out_channels).collect();
    assert_eq!(&hidden[..3], [128, 128, 128]);
    assert_eq!(hidden[11], 256, "the 256 -> 512 downsampling block");
    assert_eq!(hidden[24], 512, "the last downsampling block");
    assert_eq!(hidden[25], 256);
    let strided: Vec<usize> = (0..plan.blocks.len())
        .filter(|&i| plan.blocks[i].depthwise.stride == 2)
        .collect();
    assert_eq!(strided, [2, 11, 24]);
    assert!(plan.blocks[0].residual && plan.blocks[1].residual && !plan.blocks[2].residual);
    assert_eq!(plan.pool.gdconv().unwrap().kernel, [7, 7]);
    assert_eq!(plan.embedding.out_features, 512);
    // Larger than mbf, as the name says.
    assert!(c.complexity().params > 2 * Config::mbf().complexity().params);
}

#[test]
fn foamliu_preset_has_relu6_and_a_separable_stem() {
    let c = Config::foamliu();
    let plan = c.plan();
    assert_eq!(c.activation, Activation::Relu6);
    assert_eq!(plan.stem.act, Some(Activation::Relu6));
    let dw = plan.stem_dw.as_ref().unwrap();
    let pw = plan.stem_pw.as_ref().unwrap();
    assert!(dw.is_depthwise() && dw.act == Some(Activation::Relu));
    assert_eq!((pw.kernel, pw.act), ([1, 1], Some(Activation::Relu)));
    assert_eq!(plan.blocks[0].project.act, None);
    // No PReLU anywhere, so no slopes to load.
    assert!(!plan
        .weights()
        .iter()
        .any(|(n, _)| n.ends_with("_relu_gamma")));
    // The config survives the native format's JSON.
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
}

#[test]
fn foamliu_checkpoint_imports_and_separates_people() {
    let device = Device::Cpu;
    let path = asset("models/foamliu-mobilefacenet/mobilefacenet.pt");
    let ckpt = Checkpoint::load(&path, None, &device).unwrap();
    assert_eq!(ckpt.config.name, "foamliu");
    assert_eq!(ckpt.config.embedding_size, 128);
    let model = ckpt.build(&device).unwrap();
    let faces = [
        "golden/images/Abel_Pacheco_0001.png",
        "golden/images/Abel_Pacheco_0002.png",
        "golden/images/Angela_Bassett_0001.png",
        "golden/images/Angela_Bassett_0002.png",
    ];
    let x = Tensor::cat(&faces.map(png), 0).unwrap();
    let fast = model.forward(&x).unwrap();
    let graph = model.forward_graph(&x, false).unwrap();
    assert!(rel_diff(&fast, &graph) < 1e-4);
    let e = model.embed(&x, true).unwrap();
    let cos = |i: usize, j: usize| -> f32 {
        (e.get(i).unwrap() * e.get(j).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let same = cos(0, 1).min(cos(2, 3));
    let different = [cos(0, 2), cos(0, 3), cos(1, 2), cos(1, 3)]
        .into_iter()
        .fold(f32::MIN, f32::max);
    assert!(
        same > different + 0.2,
        "same-person cosines {same} vs different {different}"
    );

    // Round trip through the native format keeps every output bit.
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("foamliu.safetensors");
    ckpt.save(&native).unwrap();
    let back = Checkpoint::load(&native, None, &device).unwrap();
    assert_eq!(back.config, ckpt.config);
    let again = back.build(&device).unwrap().forward(&x).unwrap();
    assert_eq!(rel_diff(&again, &fast), 0.0);
}

#[test]
fn torch_checkpoint_in_the_wrong_layout_or_config_is_an_error() {
    let device = Device::Cpu;
    let path = asset("models/foamliu-mobilefacenet/mobilefacenet.pt");
    // foamliu's weights cannot fill insightface's mbf.
    let err = Checkpoint::load(&path, Some(&Config::mbf()), &device).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingWeight { .. } | Error::WeightShape { .. } | Error::Torch { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("mobilefacenet.pt"), "{err}");
    // A state dict of another network (MTCNN's ONet) is named as an unknown layout.
    let err = Checkpoint::load(&asset("models/mtcnn/onet.pt"), None, &device).unwrap_err();
    assert!(err.to_string().contains("unknown layout"), "{err}");
    assert!(err.to_string().contains("onet.pt"), "{err}");
}

#[test]
fn arcface_torch_layout_maps_onto_mbf_and_mbf_large() {
    // Export the native names of a random model under arcface_torch's names and read the
    // result back as a `.pt`-style layout through the renaming.
    for config in [Config::mbf(), Config::mbf_large()] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let model = MobileFaceNet::new(&config, vb).unwrap();
        let ours: std::collections::HashMap<String, Tensor> = map
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let torch = mfn_model::import::torch::to_layout(
            mfn_model::import::torch::TorchLayout::ArcfaceTorch,
            &config,
            &ours,
        )
        .unwrap();
        assert!(torch.contains_key("layers.0.layers.2.weight"));
        assert!(torch.contains_key("features.layers.3.running_var"));
        let (found, back) =
            mfn_model::import::torch::from_state_dict(torch, None, std::path::Path::new("x.pth"))
                .unwrap();
        assert_eq!(found.name, config.name);
        let vb = VarBuilder::from_tensors(back, DType::F32, &Device::Cpu);
        let again = MobileFaceNet::new(&found, vb).unwrap();
        let x = input(1);
        assert_eq!(
            rel_diff(&again.forward(&x).unwrap(), &model.forward(&x).unwrap()),
            0.0,
            "{}",
            config.name
        );
    }
}

#[test]
fn torch_layouts_refuse_the_conv_reduce_head() {
    let config = Config::w600k_mbf();
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    MobileFaceNet::new(&config, vb).unwrap();
    let ours: std::collections::HashMap<String, Tensor> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let err = mfn_model::import::torch::to_layout(
        mfn_model::import::torch::TorchLayout::ArcfaceTorch,
        &config,
        &ours,
    )
    .unwrap_err();
    assert!(err.to_string().contains("reduce conv"), "{err}");
}
