//! `mfn-cli embed` on insightface's `w600k_mbf` ONNX file, against ONNX Runtime's raw
//! outputs.

mod common;
use common::{asset, floats, mfn, ok, read_json};

/// `embed --no-normalize --model w600k_mbf.onnx` on the golden PNGs and on their mirror
/// images.
#[test]
fn embed_w600k_mbf_matches_the_reference_outputs() {
    let reference = read_json(&asset("golden/w600k-mbf-reference.json"));
    let entries = reference["golden"].as_array().unwrap();
    assert_eq!(entries.len(), 26);
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    let mut expected = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let png = asset(e["path"].as_str().unwrap());
        let mirrored = dir.path().join(format!("{i}-flipped.png"));
        image::imageops::flip_horizontal(&image::open(&png).unwrap().to_rgb8())
            .save(&mirrored)
            .unwrap();
        inputs.push(png);
        expected.push(floats(&e["embedding"]));
        inputs.push(mirrored);
        expected.push(floats(&e["embedding_flipped"]));
    }
    let out = dir.path().join("emb.json");
    let model = asset("models/w600k-mbf/w600k_mbf.onnx");
    let mut args = vec![
        "embed".to_string(),
        "--no-normalize".into(),
        "--model".into(),
        model.display().to_string(),
        "--json".into(),
        out.display().to_string(),
    ];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    ok(mfn(&args.iter().map(String::as_str).collect::<Vec<_>>()));

    let got = read_json(&out);
    let rows = got["images"].as_array().unwrap();
    assert_eq!(rows.len(), 52);
    let (mut plain, mut mirrored) = (0f32, 0f32);
    for (i, (row, (want, path))) in rows.iter().zip(expected.iter().zip(&inputs)).enumerate() {
        assert_eq!(row["path"].as_str().unwrap(), path.display().to_string());
        let e = floats(&row["embedding"]);
        assert_eq!(e.len(), 512);
        let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm > 1.0, "raw outputs are not unit length (norm {norm})");
        let diff = e
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let worst = if i % 2 == 0 {
            &mut plain
        } else {
            &mut mirrored
        };
        *worst = worst.max(diff);
    }
    assert!(plain <= 1e-3, "plain: max abs difference {plain}");
    assert!(mirrored <= 1e-3, "mirrored: max abs difference {mirrored}");
}
