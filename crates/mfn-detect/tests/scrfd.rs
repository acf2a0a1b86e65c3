//! SCRFD-500M against ONNX Runtime's outputs (`golden/scrfd-500m-reference.json`), another
//! export of the same network, and inputs that should not break it.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use candle_core::Device;
use common::asset;
use image::RgbImage;
use mfn_detect::scrfd::{Anchor, InputSize, Scrfd, ScrfdOptions};
use mfn_detect::{Detector, Error, Face};
use serde_json::Value;

const MODEL: &str = "models/scrfd-500m/scrfd_500m_bnkps.onnx";

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        let path = asset("golden/scrfd-500m-reference.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

fn scrfd() -> &'static Scrfd {
    static DET: OnceLock<Scrfd> = OnceLock::new();
    DET.get_or_init(|| Scrfd::load(&asset(MODEL), &Device::Cpu).unwrap())
}

fn rgb(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn flat_landmarks(f: &Face) -> Vec<f32> {
    f.landmarks.iter().flatten().copied().collect()
}

/// The reference's preprocessing and decoding are what this port implements.
#[test]
fn reference_describes_what_the_port_does() {
    let r = reference();
    assert_eq!(r["model"].as_str(), Some(MODEL));
    let pre = r["preprocessing"].as_str().unwrap();
    for part in [
        "RGB",
        "640",
        "bilinear",
        "top-left",
        "(x - 127.5) / 128",
        "NCHW",
    ] {
        assert!(pre.contains(part), "preprocessing: {pre}");
    }
    let dec = r["decoding"].as_str().unwrap();
    for part in ["two anchors", "row-major", "0.5", "0.4", "+1"] {
        assert!(dec.contains(part), "decoding: {dec}");
    }
    assert_eq!(scrfd().anchors_per_cell(), 2);
    assert_eq!(scrfd().options, ScrfdOptions::default());
}

/// The tolerance on scores at the 0.02 cut: an anchor that ONNX Runtime scores just above
/// it may come out just below it here, and the other way round.
const SCORE_TOL: f32 = 1e-3;

/// Every anchor of score >= 0.02 on the three letterboxed inputs: same anchors (up to the
/// boundary), scores within 1e-3, boxes and landmarks within 0.05 px.
pub fn compare_raw_inputs(det: &Scrfd) -> (f32, f32, f32, usize) {
    let cut = 0.02;
    let (mut ds, mut db, mut dk, mut total) = (0f32, 0f32, 0f32, 0usize);
    for case in reference()["raw_inputs"].as_array().unwrap() {
        let input = case["input"].as_str().unwrap();
        let img = rgb(&asset(input));
        assert_eq!(img.dimensions(), (640, 640), "{input}");
        let ours = det.anchors(&img, cut).unwrap();
        // Just below the cut too, to compare the reference's boundary anchors.
        let loose = det.anchors(&img, cut - SCORE_TOL).unwrap();
        let find = |set: &[Anchor], stride: u32, index: usize| {
            set.iter()
                .find(|a| a.stride == stride && a.index == index)
                .copied()
        };
        let want = case["anchors_score_ge_0.02"].as_array().unwrap();
        assert!(!want.is_empty(), "{input}");
        for w in want {
            let stride = w["stride"].as_u64().unwrap() as u32;
            let index = w["anchor"].as_u64().unwrap() as usize;
            let score = w["score"].as_f64().unwrap() as f32;
            let a = find(&loose, stride, index).unwrap_or_else(|| {
                panic!("{input}: reference anchor {index} of stride {stride} (score {score}) not found")
            });
            if find(&ours, stride, index).is_none() {
                assert!(
                    score - cut < SCORE_TOL,
                    "{input}: anchor {index} of stride {stride}: ours {} < {cut}, reference {score}",
                    a.face.score
                );
            }
            ds = ds.max((a.face.score - score).abs());
            db = db.max(max_abs(&a.face.bbox, &floats(&w["box"])));
            dk = dk.max(max_abs(&flat_landmarks(&a.face), &floats(&w["landmarks"])));
            total += 1;
        }
        for a in &ours {
            let known = want.iter().any(|w| {
                w["stride"].as_u64() == Some(a.stride as u64)
                    && w["anchor"].as_u64() == Some(a.index as u64)
            });
            assert!(
                known || a.face.score - cut < SCORE_TOL,
                "{input}: anchor {} of stride {} scores {}, the reference has no such anchor",
                a.index,
                a.stride,
                a.face.score
            );
        }
    }
    (ds, db, dk, total)
}

#[test]
fn raw_inputs_match_onnx_runtime_anchor_by_anchor() {
    let (ds, db, dk, total) = compare_raw_inputs(scrfd());
    eprintln!(
        "{total} reference anchors: max score diff {ds:.2e}, box {db:.2e} px, landmarks {dk:.2e} px"
    );
    assert!(ds <= 1e-3, "score diff {ds}");
    assert!(db <= 0.05, "box diff {db}");
    assert!(dk <= 0.05, "landmark diff {dk}");
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    iw * ih / (area(a) + area(b) - iw * ih)
}

/// The photos' final faces (letterbox 640, score 0.5, NMS 0.4) against the reference,
/// every `step`-th photo: same face count, each face matched by IoU; returns the largest
/// box and landmark differences and the faces compared.
fn compare_photos(det: &Scrfd, step: usize) -> (f32, f32, usize) {
    let photos = reference()["photos"].as_array().unwrap();
    assert_eq!(photos.len(), 100);
    let (mut db, mut dk, mut faces) = (0f32, 0f32, 0usize);
    for p in photos.iter().step_by(step) {
        let rel = p["path"].as_str().unwrap();
        let img = rgb(&asset(rel));
        // The reference letterboxed every photo to 640x640, as insightface does.
        let letterbox = ScrfdOptions {
            input: InputSize::Letterbox(640),
            ..ScrfdOptions::default()
        };
        let ours = det.detect_with(&img, &letterbox).unwrap();
        let want = p["faces"].as_array().unwrap();
        assert_eq!(ours.len(), want.len(), "{rel}: {ours:?}");
        for w in want {
            let bbox: [f32; 4] = floats(&w["box"]).try_into().unwrap();
            let best = ours
                .iter()
                .max_by(|a, b| iou(&a.bbox, &bbox).total_cmp(&iou(&b.bbox, &bbox)))
                .unwrap();
            assert!(
                iou(&best.bbox, &bbox) > 0.5,
                "{rel}: no face matches {bbox:?}"
            );
            assert!(
                (best.score - w["score"].as_f64().unwrap() as f32).abs() < 0.05,
                "{rel}: score {} vs {}",
                best.score,
                w["score"]
            );
            db = db.max(max_abs(&best.bbox, &bbox));
            dk = dk.max(max_abs(&flat_landmarks(best), &floats(&w["landmarks"])));
            faces += 1;
        }
    }
    (db, dk, faces)
}

#[test]
fn photos_match_onnx_runtime_face_by_face() {
    let (db, dk, faces) = compare_photos(scrfd(), 1);
    eprintln!("{faces} faces in 100 photos: max box diff {db:.3} px, landmarks {dk:.3} px");
    assert!(db <= 1.5, "box diff {db}");
    assert!(dk <= 1.5, "landmark diff {dk}");
}

/// The error is the detector's, and its message says `parts`.
fn refused<T: std::fmt::Debug>(r: mfn_detect::Result<T>, parts: &[&str]) -> String {
    let e = r.expect_err("an error");
    assert!(matches!(e, Error::Detector { .. }), "{e:?}");
    let text = e.to_string();
    for p in parts {
        assert!(text.contains(p), "`{text}` does not say `{p}`");
    }
    text
}

#[test]
fn malformed_and_foreign_models_are_refused_by_name() {
    let path = asset(MODEL);
    let bytes = std::fs::read(&path).unwrap();
    let here = Path::new("cut.onnx");
    for cut in [
        0,
        1,
        10,
        1000,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        refused(
            Scrfd::load_bytes(&bytes[..cut], here, &Device::Cpu),
            &["cut.onnx"],
        );
    }
    // Random bytes, from a fixed seed.
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    refused(
        Scrfd::load_bytes(&noise, Path::new("noise.onnx"), &Device::Cpu),
        &["noise.onnx"],
    );
    // Valid ONNX files of other networks: the first node SCRFD cannot run is named.
    for other in [
        "models/mobilefacenet-y1/mobilefacenet-y1.onnx",
        "models/w600k-mbf/w600k_mbf.onnx",
    ] {
        let text = refused(Scrfd::load(&asset(other), &Device::Cpu), &[other, "node `"]);
        eprintln!("{text}");
    }
    // Not a file, no file.
    let dir = tempfile::tempdir().unwrap();
    refused(Scrfd::load(dir.path(), &Device::Cpu), &["regular file"]);
    refused(
        Scrfd::load(&dir.path().join("none.onnx"), &Device::Cpu),
        &["none.onnx"],
    );
}

#[test]
fn mutated_models_load_or_fail_cleanly() {
    let bytes = std::fs::read(asset(MODEL)).unwrap();
    let img = RgbImage::from_pixel(64, 64, image::Rgb([90, 120, 200]));
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let (mut loaded, mut failed) = (0, 0);
    for _ in 0..60 {
        let mut m = bytes.clone();
        for _ in 0..4 {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // Most of the structure is in the graph's nodes, before the weights.
            let at = (s >> 33) as usize % if s & 1 == 0 { 40_000 } else { m.len() };
            m[at] ^= 1 << ((s >> 20) % 8);
        }
        match Scrfd::load_bytes(&m, Path::new("mutant.onnx"), &Device::Cpu) {
            Ok(det) => {
                loaded += 1;
                let _ = det.anchors(&img, 0.5);
            }
            Err(e) => {
                assert!(matches!(e, Error::Detector { .. }), "{e:?}");
                failed += 1;
            }
        }
    }
    eprintln!("{loaded} mutants loaded, {failed} refused");
}

#[test]
fn odd_images_give_results_or_clear_errors() {
    let det = scrfd();
    // Sides that are not multiples of 32, or nothing at all, are not network inputs.
    for (w, h) in [(100, 96), (96, 100), (0, 0), (0, 64), (31, 32)] {
        refused(det.anchors(&RgbImage::new(w, h), 0.5), &["multiples of 32"]);
    }
    refused(det.anchors(&RgbImage::new(4128, 32), 0.5), &["4096"]);
    refused(det.detect(&RgbImage::new(0, 0)), &["empty image"]);
    refused(det.detect(&RgbImage::new(0, 10)), &["empty image"]);
    // Sizes the network cannot take, or that would need gigabytes.
    let img = RgbImage::from_pixel(50, 40, image::Rgb([128, 128, 128]));
    for input in [
        InputSize::Letterbox(0),
        InputSize::Letterbox(100),
        InputSize::Letterbox(8192),
        InputSize::Fit { max_side: 0 },
        InputSize::Fit { max_side: 100_000 },
    ] {
        let options = ScrfdOptions {
            input,
            ..ScrfdOptions::default()
        };
        refused(det.detect_with(&img, &options), &["size"]);
    }
    // Tiny, blank, extreme and huge images are searched at the letterbox's size.
    for (w, h) in [(1, 1), (20_000, 2), (2, 20_000), (6000, 4000)] {
        let img = RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]));
        let faces = det.detect(&img).unwrap();
        assert!(faces.is_empty(), "{w}x{h}: {faces:?}");
        for input in [InputSize::Letterbox(640), InputSize::Fit { max_side: 1024 }] {
            let p = input.prepare(&img).unwrap();
            let (pw, ph) = p.image.dimensions();
            assert!(
                pw % 32 == 0 && ph % 32 == 0 && pw.max(ph) <= 1024,
                "{w}x{h}: {pw}x{ph}"
            );
        }
    }
}

#[test]
fn fit_finds_the_faces_the_letterbox_finds() {
    let det = scrfd();
    let img = rgb(&asset(
        "lfw-raw-subset/images/Colin_Powell/Colin_Powell_0001.jpg",
    ));
    let p = InputSize::Fit { max_side: 640 }.prepare(&img).unwrap();
    // 250x250 is neither enlarged nor cut: padded to 256x256.
    assert_eq!((p.image.dimensions(), p.scale), ((256, 256), 1.0));
    let fit = ScrfdOptions {
        input: InputSize::Fit { max_side: 640 },
        ..ScrfdOptions::default()
    };
    let a = det.detect_with(&img, &fit).unwrap();
    let b = det.detect(&img).unwrap();
    assert!(!a.is_empty() && !b.is_empty());
    assert!(iou(&a[0].bbox, &b[0].bbox) > 0.8, "{a:?} vs {b:?}");
    // Scores come out best first.
    assert!(b.windows(2).all(|p| p[0].score >= p[1].score));
    let p = InputSize::Fit { max_side: 100 }.prepare(&img).unwrap();
    assert_eq!((p.image.dimensions(), p.scale), ((128, 128), 0.4));
}
