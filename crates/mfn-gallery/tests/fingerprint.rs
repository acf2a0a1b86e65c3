//! The model fingerprint: the same weights from ONNX and from the converted native file
//! agree; other weights, or another config, do not.

use candle_core::Device;
use mfn_gallery::Fingerprint;
use mfn_model::Checkpoint;

fn asset(rel: &str) -> std::path::PathBuf {
    mfn_hub::Hub::from_env()
        .and_then(|hub| hub.locate(rel, None))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn onnx_and_converted_safetensors_agree() {
    let onnx = Checkpoint::load(
        &asset("models/w600k-mbf/w600k_mbf.onnx"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("w600k.safetensors");
    let mut converted = onnx.clone();
    // Metadata (a stored threshold, say) is not part of the fingerprint.
    converted
        .metadata
        .insert("mfn.threshold".into(), "0.2".into());
    converted.save(&native).unwrap();
    let native = Checkpoint::load(&native, None, &Device::Cpu).unwrap();
    let a = Fingerprint::of(&onnx).unwrap();
    assert_eq!(a, Fingerprint::of(&native).unwrap());

    let mut other = native.clone();
    let (name, t) = other
        .tensors
        .iter()
        .next()
        .map(|(n, t)| (n.clone(), t.clone()))
        .unwrap();
    other.tensors.insert(name, (t + 1e-3).unwrap());
    assert_ne!(a, Fingerprint::of(&other).unwrap());

    let mut renamed = native.clone();
    renamed.config.name = "another".into();
    assert_ne!(a, Fingerprint::of(&renamed).unwrap());
}
