//! Decoding real LFW files, and what broken or missing files do.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::asset;
use mfn_data::{load_batch, missing_files, BatchLoader, Error, Pairs};

#[test]
fn lfw_pairs_file_has_ten_folds_of_600() {
    let pairs = Pairs::read(&asset("lfw/pairs.txt")).unwrap();
    assert_eq!(pairs.folds, 10);
    assert_eq!(pairs.pairs.len(), 6000);
    for fold in 0..10 {
        let f: Vec<_> = pairs.pairs.iter().filter(|p| p.fold == fold).collect();
        assert_eq!(f.len(), 600);
        assert!(f[..300].iter().all(|p| p.same) && f[300..].iter().all(|p| !p.same));
    }
    let unique = pairs.unique_images();
    assert_eq!(unique.len(), 7701);
    let root = asset("lfw/aligned-112x112");
    let paths: Vec<_> = unique.iter().map(|r| r.path(&root, "jpg")).collect();
    assert!(missing_files(&paths).is_empty());
}

#[test]
fn decodes_rgb_planes_in_nchw_order() {
    let png = asset("golden/images/Abel_Pacheco_0001.png");
    let t = load_batch(&[png.clone(), png.clone()], [112, 112], &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3, 112, 112]);
    let img = image::open(&png).unwrap().to_rgb8();
    let px = img.get_pixel(17, 5);
    for c in 0..3 {
        let v: f32 = t
            .get(1)
            .unwrap()
            .get(c)
            .unwrap()
            .get(5)
            .unwrap()
            .get(17)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(v, px[c] as f32);
    }
}

#[test]
fn corrupt_jpeg_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = asset("lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg");
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("corrupt.jpg");
    // A JPEG header followed by garbage: the decoder gets far enough to fail inside.
    let mut broken = bytes[..bytes.len() / 3].to_vec();
    broken.extend(std::iter::repeat_n(0xA5u8, 64));
    std::fs::write(&bad, &broken).unwrap();
    let text = dir.path().join("text.jpg");
    std::fs::write(&text, b"not an image").unwrap();
    for path in [&bad, &text] {
        let err = load_batch(&[good.clone(), path.clone()], [112, 112], &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Decode { .. }), "{err}");
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    }
}

#[test]
fn wrong_size_and_missing_files_are_named() {
    let good = asset("lfw/aligned-112x112/Aaron_Peirsol/Aaron_Peirsol_0001.jpg");
    let err = load_batch(std::slice::from_ref(&good), [96, 112], &Device::Cpu).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImageSize {
                found: [112, 112],
                ..
            }
        ),
        "{err}"
    );
    let gone = Path::new("/nonexistent/face.jpg").to_path_buf();
    let err = load_batch(std::slice::from_ref(&gone), [112, 112], &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/face.jpg"), "{err}");
    assert_eq!(missing_files(&[good, gone.clone()]), [gone]);
}

#[test]
fn loader_keeps_order_and_stops_at_the_first_error() {
    let root = asset("lfw/aligned-112x112/Aaron_Peirsol");
    let mut paths: Vec<PathBuf> = (1..=4)
        .map(|i| root.join(format!("Aaron_Peirsol_{i:04}.jpg")))
        .collect();
    let starts: Vec<usize> = BatchLoader::new(paths.clone(), 3, 1, [112, 112], Device::Cpu)
        .map(|b| b.unwrap().start)
        .collect();
    assert_eq!(starts, [0, 3]);
    paths.insert(1, PathBuf::from("/nonexistent/x.jpg"));
    let results: Vec<_> = BatchLoader::new(paths, 2, 1, [112, 112], Device::Cpu).collect();
    assert_eq!(results.len(), 1);
    assert!(results[0].is_err());
}
