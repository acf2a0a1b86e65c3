//! insightface `.bin` verification sets: the real files in the assets folder, against the
//! JPEG files they were packed from.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::asset;
use mfn_data::{BinSet, Error, Pairs};

/// The first LFW fold of `pairs.txt`: 300 same-person pairs, then 300 different.
fn first_fold() -> Pairs {
    let pairs = Pairs::read(&asset("lfw/pairs.txt")).unwrap();
    Pairs {
        pairs: pairs.pairs.into_iter().filter(|p| p.fold == 0).collect(),
        folds: 1,
    }
}

#[test]
fn lfw_fold1_bin_holds_the_first_fold_byte_for_byte() {
    let set = BinSet::read(&asset("lfw/lfw-fold1.bin")).unwrap();
    assert_eq!(set.pairs(), 600);
    assert_eq!(set.images.len(), 1200);
    assert_eq!(set.issame.iter().filter(|&&s| s).count(), 300);
    assert!(set.issame[..300].iter().all(|&s| s) && set.issame[300..].iter().all(|&s| !s));

    let fold = first_fold();
    assert_eq!(set.issame, fold.labels());
    let root = asset("lfw/aligned-112x112");
    let first = &fold.pairs[0];
    assert_eq!(
        first.a.path(&root, "jpg"),
        root.join("Abel_Pacheco/Abel_Pacheco_0001.jpg")
    );
    assert_eq!(
        set.images[0],
        std::fs::read(first.a.path(&root, "jpg")).unwrap()
    );
    assert_eq!(
        set.images[1],
        std::fs::read(first.b.path(&root, "jpg")).unwrap()
    );
    // Every pair: packing the JPEG files again gives the very same set.
    let packed = BinSet::from_pairs(&fold, &root, "jpg").unwrap();
    assert!(
        packed == set,
        "the .bin differs from the JPEG files of fold 1"
    );
}

#[test]
fn protocol2_bin_reads_and_decodes_to_112x112() {
    let path = asset("lfw/lfw-20pairs-protocol2.bin");
    let set = BinSet::read(&path).unwrap();
    assert_eq!(set.pairs(), 20);
    assert_eq!(set.images.len(), 40);
    assert_eq!(set.issame, [[true; 10], [false; 10]].concat());
    // The same faces as the protocol-4 file, stored the Python 3 protocol-2 way.
    let fold1 = BinSet::read(&asset("lfw/lfw-fold1.bin")).unwrap();
    for (i, image) in set.images.iter().enumerate() {
        assert!(image.starts_with(&[0xFF, 0xD8, 0xFF]), "image {i}");
        assert!(fold1.images.contains(image), "image {i} is not in fold 1");
    }
    let t = set
        .load_pairs(0..20, &path, [112, 112], &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[40, 3, 112, 112]);
    let t = set
        .load_pairs(19..20, &path, [112, 112], &Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[2, 3, 112, 112]);
    assert!(set
        .load_pairs(19..21, &path, [112, 112], &Device::Cpu)
        .is_err());
}

#[test]
fn decoded_pixels_equal_the_jpeg_files() {
    let path = asset("lfw/lfw-fold1.bin");
    let set = BinSet::read(&path).unwrap();
    let fold = first_fold();
    let root = asset("lfw/aligned-112x112");
    let files: Vec<PathBuf> = fold.pairs[..4]
        .iter()
        .flat_map(|p| [p.a.path(&root, "jpg"), p.b.path(&root, "jpg")])
        .collect();
    let from_files = mfn_data::load_batch(&files, [112, 112], &Device::Cpu).unwrap();
    let from_bin = set
        .load_pairs(0..4, &path, [112, 112], &Device::Cpu)
        .unwrap();
    let diff: f32 = (from_files - from_bin)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn wrong_size_and_corrupt_images_are_named() {
    let path = asset("lfw/lfw-20pairs-protocol2.bin");
    let mut set = BinSet::read(&path).unwrap();
    match set.load_pairs(1..2, &path, [96, 112], &Device::Cpu) {
        Err(Error::ImageSize {
            path: name, found, ..
        }) => {
            assert_eq!(found, [112, 112]);
            assert!(name
                .to_string_lossy()
                .ends_with("lfw-20pairs-protocol2.bin, image 2"));
        }
        other => panic!("expected a size error, got {other:?}"),
    }
    // Image 3 cut in half: the decoder would fill in the rest; the check refuses it.
    let half = set.images[3].len() / 2;
    set.images[3].truncate(half);
    let err = set
        .load_pairs(0..2, &path, [112, 112], &Device::Cpu)
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("image 3: cannot decode image: truncated JPEG"),
        "{err}"
    );
}

#[test]
fn truncated_real_files_are_errors_with_offsets() {
    for rel in ["lfw/lfw-fold1.bin", "lfw/lfw-20pairs-protocol2.bin"] {
        let path = asset(rel);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [
            0,
            1,
            2,
            11,
            12,
            100,
            bytes.len() / 2,
            bytes.len() - 2,
            bytes.len() - 1,
        ] {
            match BinSet::parse(&bytes[..cut], &path) {
                Err(Error::Pickle {
                    offset, message, ..
                }) => {
                    assert!(
                        offset as usize <= cut,
                        "{rel} cut at {cut}: offset {offset}"
                    );
                    assert!(
                        message.starts_with("truncated"),
                        "{rel} cut at {cut}: {message}"
                    );
                }
                other => panic!("{rel} cut at {cut}: expected a pickle error, got {other:?}"),
            }
        }
    }
}

#[test]
fn rewriting_a_real_set_round_trips() {
    let set = BinSet::read(&asset("lfw/lfw-20pairs-protocol2.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("20pairs-protocol4.bin");
    set.write(&out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..2], &[0x80, 4]);
    assert_eq!(BinSet::parse(&bytes, &out).unwrap(), set);
}

#[test]
fn a_malicious_file_on_disk_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let path = dir.path().join("evil.bin");
    // `os.system("touch <marker>")`, as Python would run it on load.
    let cmd = format!("touch {}", marker.display());
    let mut p = b"\x80\x02cos\nsystem\nX".to_vec();
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.extend_from_slice(b"\x85R.");
    std::fs::write(&path, &p).unwrap();
    let err = BinSet::read(&path).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("evil.bin: byte 2: forbidden global `os system`"),
        "{msg}"
    );
    assert!(!marker.exists());
}
