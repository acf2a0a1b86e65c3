//! Every model file the registry knows finds its verification threshold by the sha256 of
//! its weights, whatever the format it comes in; other files find none.

use std::path::PathBuf;

use candle_core::Device;
use mfn_hub::{find_threshold, Registry, ThresholdOrigin};
use mfn_model::Checkpoint;

fn asset(rel: &str) -> PathBuf {
    let root = std::env::var_os("MFN_ASSETS")
        .map(PathBuf::from)
        .expect("MFN_ASSETS must name the assets folder");
    let p = root.join(rel);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

#[test]
fn registry_thresholds_follow_the_weights_not_the_format() {
    let reg = Registry::builtin().unwrap();
    for (rel, entry) in [
        ("models/w600k-mbf/w600k_mbf.onnx", "w600k_mbf"),
        // The symbol's weights are the `.params` beside it.
        ("models/mobilefacenet-y1/model-symbol.json", "y1"),
        // The same weights converted to ONNX.
        ("models/mobilefacenet-y1/mobilefacenet-y1.onnx", "y1"),
        ("models/foamliu-mobilefacenet/mobilefacenet.pt", "foamliu"),
    ] {
        let ckpt = Checkpoint::load(&asset(rel), None, &Device::Cpu).unwrap();
        let t = find_threshold(&reg, &ckpt)
            .unwrap()
            .unwrap_or_else(|| panic!("{rel} has no threshold"));
        assert_eq!(
            t.origin,
            ThresholdOrigin::Registry {
                entry: entry.into()
            },
            "{rel}"
        );
        let want = reg.get(entry).unwrap().threshold().unwrap();
        assert_eq!(t.cosine, want.cosine);
        assert!(t.derivation.contains("LFW"), "{}", t.derivation);
    }
    // Random weights: no threshold anywhere.
    let random = asset("models/mbf-onnx-export/mbf-random-weights.onnx");
    let ckpt = Checkpoint::load(&random, None, &Device::Cpu).unwrap();
    assert_eq!(find_threshold(&reg, &ckpt).unwrap(), None);
}

#[test]
fn the_metadata_comes_first_and_must_be_a_cosine() {
    let reg = Registry::builtin().unwrap();
    let mut ckpt = Checkpoint::load(
        &asset("models/w600k-mbf/w600k_mbf.onnx"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    ckpt.metadata.insert("mfn.threshold".into(), "0.31".into());
    ckpt.metadata
        .insert("mfn.threshold.source".into(), "measured by hand".into());
    let t = find_threshold(&reg, &ckpt).unwrap().unwrap();
    assert_eq!(t.origin, ThresholdOrigin::Metadata);
    assert_eq!(t.cosine, 0.31);
    assert_eq!(t.derivation, "measured by hand");
    for bad in ["NaN", "1.5", "x", "inf"] {
        ckpt.metadata.insert("mfn.threshold".into(), bad.into());
        let err = find_threshold(&reg, &ckpt).unwrap_err().to_string();
        assert!(err.contains("w600k_mbf.onnx"), "{err}");
    }
}
