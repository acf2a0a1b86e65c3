//! From raw photos to decisions: the 100 unaligned LFW photos (10 people x 10), aligned
//! with the given landmarks and with the detector's, embedded with y1, all 4,950 pairs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use mfn_data::align::{align_arcface, read_landmarks_file, Landmarks, ARCFACE_112};
use mfn_data::detect::{central, Detector, DetectorOptions};
use mfn_data::face::{images_to_tensor, FaceAligner, Pick};
use mfn_model::MobileFaceNet;
use serde_json::Value;

mod common;
use common::{asset, y1};

fn person(p: &Path) -> String {
    p.parent().unwrap().to_string_lossy().into_owned()
}

/// Flip-test embeddings of aligned crops.
fn embed(model: &MobileFaceNet, crops: &[image::RgbImage]) -> Vec<Vec<f32>> {
    let refs: Vec<&image::RgbImage> = crops.iter().collect();
    let x = images_to_tensor(&refs, &Device::Cpu).unwrap();
    model.embed(&x, true).unwrap().to_vec2().unwrap()
}

struct Scores {
    cos: Vec<f64>,
    same: Vec<bool>,
}

fn all_pairs(paths: &[PathBuf], emb: &[Vec<f32>]) -> Scores {
    let mut s = Scores {
        cos: vec![],
        same: vec![],
    };
    for i in 0..paths.len() {
        for j in i + 1..paths.len() {
            s.cos.push(mfn_eval::cosine(&emb[i], &emb[j]).unwrap());
            s.same.push(person(&paths[i]) == person(&paths[j]));
        }
    }
    assert_eq!(s.cos.len(), 4950);
    s
}

/// AUC and the accuracy at the best single threshold.
fn auc_and_best_accuracy(s: &Scores) -> (f64, f64) {
    let roc = mfn_eval::roc(&s.cos, &s.same).unwrap();
    let (p, n) = (roc.positives as f64, roc.negatives as f64);
    let best = roc
        .points
        .iter()
        .map(|pt| (pt.tpr * p + (1.0 - pt.fpr) * n) / (p + n))
        .fold(0.0, f64::max);
    (roc.auc, best)
}

#[test]
fn given_and_detected_landmarks_verify_the_100_photos() {
    let model = y1();
    let given = read_landmarks_file(&asset("lfw-raw-subset/landmarks.txt")).unwrap();
    assert_eq!(given.len(), 100);
    let root = asset("lfw-raw-subset/images");
    let paths: Vec<PathBuf> = given.iter().map(|(p, _)| p.clone()).collect();
    let photos: Vec<image::RgbImage> = paths
        .iter()
        .map(|p| mfn_data::decode_rgb(&root.join(p)).unwrap())
        .collect();

    // Given landmarks.
    let start = Instant::now();
    let crops: Vec<_> = photos
        .iter()
        .zip(&given)
        .map(|(img, (_, l))| align_arcface(img, l).unwrap().image)
        .collect();
    let align_ms = start.elapsed().as_secs_f64() * 1e3 / 100.0;
    let s = all_pairs(&paths, &embed(&model, &crops));
    let (auc, acc) = auc_and_best_accuracy(&s);
    eprintln!("given landmarks: AUC {auc:.6}, best-threshold accuracy {:.3}%, alignment {align_ms:.2} ms/photo", acc * 100.0);
    assert!(auc >= 0.9999, "AUC {auc}");
    assert!(acc >= 0.995, "best-threshold accuracy {acc}");

    // Detector landmarks.
    let detector = Detector::mtcnn(&asset("models/mtcnn"), &Device::Cpu).unwrap();
    let options = DetectorOptions::default();
    let start = Instant::now();
    let mut found: Vec<Landmarks> = Vec::new();
    for (img, p) in photos.iter().zip(&paths) {
        let faces = detector.detect(img, &options).unwrap();
        let face = central(&faces, img.width(), img.height())
            .unwrap_or_else(|| panic!("no face found in {}", p.display()));
        found.push(face.landmarks);
    }
    let detect_ms = start.elapsed().as_secs_f64() * 1e3 / 100.0;
    let nme: f64 = found
        .iter()
        .zip(&given)
        .map(|(d, (_, g))| {
            let iod = ((g[0][0] - g[1][0]).powi(2) + (g[0][1] - g[1][1]).powi(2)).sqrt() as f64;
            (0..5)
                .map(|k| {
                    (((d[k][0] - g[k][0]).powi(2) + (d[k][1] - g[k][1]).powi(2)).sqrt()) as f64
                })
                .sum::<f64>()
                / 5.0
                / iod
        })
        .sum::<f64>()
        / 100.0;
    let crops: Vec<_> = photos
        .iter()
        .zip(&found)
        .map(|(img, l)| align_arcface(img, l).unwrap().image)
        .collect();
    let s = all_pairs(&paths, &embed(&model, &crops));
    let (auc, acc) = auc_and_best_accuracy(&s);
    eprintln!(
        "MTCNN landmarks: 100/100 faces, NME {nme:.4}, AUC {auc:.6}, best-threshold accuracy {:.3}%, detection {detect_ms:.1} ms/photo",
        acc * 100.0
    );
    assert!(auc >= 0.999, "AUC {auc}");
    // facenet-pytorch's own MTCNN lands 0.0615 inter-ocular distances from these given
    // landmarks (they follow another annotation convention: both MTCNN and RetinaFace place
    // the eyes about 0.03 lower); this bounds a regression of the port, not the convention.
    assert!(nme < 0.065, "mean normalised landmark error {nme}");

    // Decisions at the model's default threshold, through the pipeline `mfn-cli verify`
    // runs: the largest face of each photo, aligned, embedded with the flip test.
    let aligner = FaceAligner {
        detector,
        options,
        template: ARCFACE_112,
        size: [112, 112],
    };
    let crops: Vec<_> = photos
        .iter()
        .zip(&paths)
        .map(|(img, p)| {
            aligner
                .faces(img, Pick::Largest, p)
                .unwrap()
                .remove(0)
                .aligned
                .image
        })
        .collect();
    let s = all_pairs(&paths, &embed(&model, &crops));
    let expect: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/expect/lfw-y1-fold1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let t = expect["flip"]["exact_mean_threshold"].as_f64().unwrap();
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (c, same) in s.cos.iter().zip(&s.same) {
        match (*c >= t, *same) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let agreement = (tp + tn) as f64 / 4950.0;
    eprintln!(
        "verify at threshold {t:.4}: agreement {:.2}% (same: {tp} accepted, {fn_} rejected; different: {tn} rejected, {fp} accepted)",
        agreement * 100.0
    );
    assert!(agreement >= 0.98, "agreement {agreement}");
}
