//! The pipeline as a library user meets it: by paths or by pack, decisions that say where
//! their threshold came from, and errors that name the photo.

mod common;

use std::path::{Path, PathBuf};

use common::asset;
use mfn_detect::{Error, Pick, Pipeline};

fn photo(rel: &str) -> PathBuf {
    asset(&format!("lfw-raw-subset/images/{rel}"))
}

fn scrfd() -> PathBuf {
    asset("models/scrfd-500m/scrfd_500m_bnkps.onnx")
}

fn w600k() -> PathBuf {
    asset("models/w600k-mbf/w600k_mbf.onnx")
}

#[test]
fn by_paths_the_threshold_comes_from_the_registry_by_sha256() {
    let pipeline = Pipeline::from_paths(scrfd(), w600k()).unwrap();
    let t = pipeline.threshold().unwrap();
    assert_eq!(t.source, "registry entry `w600k_mbf`");
    assert!((t.cosine - 0.20303).abs() < 1e-9);
    let same = pipeline
        .verify(
            photo("Colin_Powell/Colin_Powell_0001.jpg"),
            photo("Colin_Powell/Colin_Powell_0002.jpg"),
        )
        .unwrap();
    assert!(same.same && same.cosine > same.threshold, "{same:?}");
    let other = pipeline
        .verify(
            photo("Colin_Powell/Colin_Powell_0001.jpg"),
            photo("George_W_Bush/George_W_Bush_0001.jpg"),
        )
        .unwrap();
    assert!(!other.same && other.cosine < other.threshold, "{other:?}");
    assert_eq!(other.threshold_source, "registry entry `w600k_mbf`");

    // The faces behind a decision: box, landmarks, crop and a unit-length embedding.
    let faces = pipeline
        .faces(photo("Colin_Powell/Colin_Powell_0001.jpg"))
        .unwrap();
    assert_eq!(faces.len(), 1);
    let f = &faces[0];
    assert_eq!(f.picked_by, Pick::Central);
    assert!(f.score > 0.5 && f.bbox[2] > f.bbox[0] && f.bbox[3] > f.bbox[1]);
    assert_eq!(f.aligned.image.dimensions(), (112, 112));
    let norm: f32 = f.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
}

#[test]
fn a_given_threshold_decides_and_says_so() {
    let pipeline = Pipeline::builder()
        .detector_weights(&scrfd())
        .model(w600k())
        .threshold(0.99)
        .build()
        .unwrap();
    let d = pipeline
        .verify(
            photo("Colin_Powell/Colin_Powell_0001.jpg"),
            photo("Colin_Powell/Colin_Powell_0002.jpg"),
        )
        .unwrap();
    assert!(!d.same, "{d:?}");
    assert_eq!(
        (d.threshold, d.threshold_source.as_str()),
        (0.99, "given by the caller")
    );
    let err = Pipeline::builder()
        .detector_weights(&scrfd())
        .model(w600k())
        .threshold(1.5)
        .build()
        .err()
        .unwrap();
    assert!(err.to_string().contains("1.5"), "{err}");
}

#[test]
fn a_model_without_a_threshold_cannot_decide_but_still_embeds() {
    let dir = tempfile::tempdir().unwrap();
    // The same weights saved anew: no metadata threshold, and a sha256 no registry entry has.
    let ckpt = mfn_model::Checkpoint::load(&w600k(), None, &mfn_detect::Device::Cpu).unwrap();
    let copy = dir.path().join("copy.safetensors");
    ckpt.save(&copy).unwrap();
    let pipeline = Pipeline::from_paths(scrfd(), &copy).unwrap();
    assert!(pipeline.threshold().is_none());
    let a = pipeline
        .face(photo("Colin_Powell/Colin_Powell_0001.jpg"))
        .unwrap();
    let err = pipeline.decide(&a.embedding, &a.embedding).unwrap_err();
    assert!(
        matches!(err, Error::NoThreshold { .. }) && err.to_string().contains("copy.safetensors"),
        "{err}"
    );
}

#[test]
fn photos_without_a_face_or_unreadable_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.png");
    image::RgbImage::from_pixel(300, 200, image::Rgb([120, 120, 120]))
        .save(&blank)
        .unwrap();
    let missing = dir.path().join("missing.jpg");
    let pipeline = Pipeline::from_paths(scrfd(), w600k()).unwrap();
    assert!(pipeline.faces(&blank).unwrap().is_empty());
    let good = photo("Colin_Powell/Colin_Powell_0001.jpg");
    let err = pipeline.verify(&good, &blank).unwrap_err();
    assert!(
        matches!(&err, Error::NoFace { path } if path == &blank),
        "{err}"
    );
    let err = pipeline.verify(&missing, &good).unwrap_err();
    assert!(err.to_string().contains("missing.jpg"), "{err}");
    // Without a detector only aligned crops can be embedded.
    let crops_only = Pipeline::builder()
        .model(w600k())
        .without_detector()
        .build()
        .unwrap();
    assert!(crops_only.faces(&good).is_err());
}

#[test]
fn detector_files_of_the_wrong_kind_are_refused_naming_them() {
    let err = Pipeline::from_paths(Path::new("detector.bin"), w600k())
        .err()
        .unwrap();
    assert!(err.to_string().contains("detector.bin"), "{err}");
    // A recognition model where the detector belongs.
    let err = Pipeline::from_paths(w600k(), w600k()).err().unwrap();
    assert!(err.to_string().contains("w600k_mbf.onnx"), "{err}");
}

/// Errors of the crates underneath convert, so `?` mixes them in one function.
#[test]
fn question_mark_works_across_crates() {
    fn mixed(photo: &Path) -> mfn_detect::Result<usize> {
        let image = mfn_data::decode_rgb(photo)?;
        let ckpt = mfn_model::Checkpoint::load(&w600k(), None, &mfn_detect::Device::Cpu)?;
        let hub = mfn_hub::Hub::from_env()?;
        hub.registry.pack("buffalo_s")?;
        Ok(image.width() as usize + ckpt.config.embedding_size)
    }
    assert_eq!(
        mixed(&photo("Colin_Powell/Colin_Powell_0001.jpg")).unwrap(),
        250 + 512
    );
    assert!(matches!(
        mixed(Path::new("no-such-photo.jpg")),
        Err(Error::Data(_))
    ));
}
