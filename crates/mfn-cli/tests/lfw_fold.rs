//! One full LFW fold (600 pairs) through the real y1 and w600k_mbf, against ONNX Runtime's
//! accuracy on the same fold.
//!
//! A fold's accuracy depends on the threshold learned on the other nine folds. Those
//! thresholds come from a full 10-fold run of this project (`cargo xtask accuracy`, whose
//! per-fold accuracies equal the reference on all ten folds) and are kept in
//! `tests/expect/lfw-*-fold1.json`, so that CI embeds one fold instead of all of LFW.

use std::path::PathBuf;

use candle_core::Device;
use mfn_data::Pairs;
use serde_json::Value;

mod common;
use common::{asset, y1};

fn json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn first_lfw_fold_matches_the_reference_accuracy_y1() {
    first_fold(
        y1(),
        "lfw-y1-fold1.json",
        "golden/lfw-y1-reference.json",
        "/results_image_crate",
        "fold_accuracy",
    );
}

#[test]
fn first_lfw_fold_matches_the_reference_accuracy_w600k_mbf() {
    let device = Device::Cpu;
    let model =
        mfn_model::Checkpoint::load(&asset("models/w600k-mbf/w600k_mbf.onnx"), None, &device)
            .unwrap()
            .build(&device)
            .unwrap();
    first_fold(
        model,
        "lfw-w600k-mbf-fold1.json",
        "golden/w600k-mbf-reference.json",
        "/lfw/results_image_crate",
        "folds",
    );
}

/// Fold 1 of LFW through `model`, at the thresholds in `tests/expect/{expect}`, against
/// the reference's fold-1 accuracies under `pointer` (`{pointer}/{flip}/{protocol}/{key}`).
fn first_fold(
    model: mfn_model::MobileFaceNet,
    expect: &str,
    reference: &str,
    pointer: &str,
    key: &str,
) {
    let pairs = Pairs::read(&asset("lfw/pairs.txt")).unwrap();
    let fold: Vec<_> = pairs
        .pairs
        .iter()
        .filter(|p| p.fold == 0)
        .cloned()
        .collect();
    assert_eq!(fold.len(), 600);
    let fold = Pairs {
        pairs: fold,
        folds: 1,
    };
    let (unique, index) = fold.index();
    let root = asset("lfw/aligned-112x112");
    let paths: Vec<PathBuf> = unique.iter().map(|r| r.path(&root, "jpg")).collect();

    let device = Device::Cpu;
    let expect = json(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/expect")
            .join(expect),
    );
    let reference = json(&asset(reference));
    let labels = fold.labels();
    for (setting, flip) in [("flip", true), ("noflip", false)] {
        let emb = mfn_data::embed_images(
            &paths,
            8,
            [112, 112],
            &device,
            |x| -> Result<_, Box<dyn std::error::Error>> { Ok(model.embed(x, flip)?) },
            |_| {},
        )
        .unwrap();
        let cos: Vec<f64> = index
            .iter()
            .map(|[a, b]| mfn_eval::cosine(&emb[*a], &emb[*b]).unwrap())
            .collect();
        let accuracy = |same: &dyn Fn(f64) -> bool| {
            cos.iter()
                .zip(&labels)
                .filter(|(c, l)| same(**c) == **l)
                .count() as f64
                / 600.0
        };
        let grid = expect[setting]["insightface_threshold"].as_f64().unwrap();
        let exact = expect[setting]["exact_threshold"].as_f64().unwrap();
        let got_grid = accuracy(&|c| 2.0 - 2.0 * c < grid);
        let got_exact = accuracy(&|c| c > exact);
        let refs = &reference.pointer(pointer).unwrap()[setting];
        let want_grid = refs["insightface"][key][0].as_f64().unwrap();
        let want_exact = refs["exact"][key][0].as_f64().unwrap();
        // The reference rounds to 5 decimals; one pair is 0.00167.
        assert!(
            (got_grid - want_grid).abs() < 1e-4,
            "{setting} insightface fold 1: {got_grid} vs reference {want_grid}"
        );
        assert!(
            (got_exact - want_exact).abs() < 1e-4,
            "{setting} exact fold 1: {got_exact} vs reference {want_exact}"
        );
        let curve = mfn_eval::roc(&cos, &labels).unwrap();
        assert!(curve.auc > 0.998, "{setting} fold 1 AUC {}", curve.auc);
        eprintln!(
            "{setting}: fold 1 accuracy {got_grid:.5} (grid) {got_exact:.5} (exact), AUC {:.5}",
            curve.auc
        );
    }
}
