//! RetinaFace on the raw LFW photos, against the landmarks given with them.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use mfn_data::detect::{central, Detector, DetectorOptions};
use mfn_data::{assets, decode_rgb};

fn asset(rel: &str) -> PathBuf {
    assets::path(rel).unwrap_or_else(|e| panic!("{e}"))
}

fn detector() -> Detector {
    if std::env::var("DET").as_deref() == Ok("retinaface") {
        Detector::retinaface(&asset("models/retinaface-mnet025/mobilenet0.25_Final.pth"), &Device::Cpu).unwrap()
    } else {
        Detector::mtcnn(&asset("models/mtcnn"), &Device::Cpu).unwrap()
    }
}

#[test]
fn finds_the_central_face_with_accurate_landmarks() {
    let det = detector();
    let list = std::fs::read_to_string(asset("lfw-raw-subset/landmarks.txt")).unwrap();
    let root = asset("lfw-raw-subset/images");
    let mut errors = Vec::new();
    let start = Instant::now();
    let mut n = 0;
    let mut bias = [[0f32; 2]; 5];
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let given: Vec<f32> = f[1..].iter().map(|v| v.parse().unwrap()).collect();
        let img = decode_rgb(&root.join(f[0])).unwrap();
        let faces = det.detect(&img, &DetectorOptions::default()).unwrap();
        assert!(!faces.is_empty(), "no face in {}", f[0]);
        let best = central(&faces, img.width(), img.height()).unwrap();
        if std::env::var("DBG").is_ok() && f[0].contains("Ariel_Sharon_0010") { eprintln!("{:?} given {:?}", best, given); }
        let iod = ((given[0] - given[2]).powi(2) + (given[1] - given[3]).powi(2)).sqrt();
        let mean: f32 = (0..5)
            .map(|k| {
                let dx = best.landmarks[k][0] - given[2 * k];
                let dy = best.landmarks[k][1] - given[2 * k + 1];
                (dx * dx + dy * dy).sqrt()
            })
            .sum::<f32>()
            / 5.0;
        errors.push(mean / iod);
        for k in 0..5 {
            bias[k][0] += (best.landmarks[k][0] - given[2 * k]) / iod;
            bias[k][1] += (best.landmarks[k][1] - given[2 * k + 1]) / iod;
        }
        n += 1;
    }
    let per_photo = start.elapsed().as_secs_f64() / n as f64;
    let nme = errors.iter().sum::<f32>() / errors.len() as f32;
    let worst = errors.iter().cloned().fold(0f32, f32::max);
    eprintln!(
        "{n} photos: NME {nme:.4}, worst {worst:.4}, {:.1} ms per photo",
        per_photo * 1e3
    );
    eprintln!(
        "bias {:?}",
        bias.map(|b| [b[0] / n as f32, b[1] / n as f32])
    );
    assert_eq!(n, 100);
    assert!(nme <= 0.05, "mean normalised landmark error {nme}");
}
