//! `mfn-cli embed` on insightface's `w600k_mbf` ONNX file, against ONNX Runtime's raw
//! outputs.

mod common;
use common::asset;

/// `embed --no-normalize --model w600k_mbf.onnx` on the golden PNGs and on their mirror
/// images.
#[test]
fn embed_w600k_mbf_matches_the_reference_outputs() {
    let model = asset("models/w600k-mbf/w600k_mbf.onnx");
    let (plain, mirrored) = common::golden_embed_diffs(
        &model,
        "golden/w600k-mbf-reference.json",
        "golden",
        "embedding_flipped",
        512,
    );
    assert!(plain <= 1e-3, "plain: max abs difference {plain}");
    assert!(mirrored <= 1e-3, "mirrored: max abs difference {mirrored}");
}
