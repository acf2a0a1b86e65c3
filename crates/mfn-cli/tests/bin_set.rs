//! insightface `.bin` verification sets through the real y1 and the `mfn-cli` binary:
//! `pack-bin`, `eval --bin`, and the same numbers as the JPEG files they hold.

use std::path::{Path, PathBuf};

use candle_core::Device;
use mfn_data::{BinSet, Pairs};

mod common;
use common::{asset, mfn, ok, read_json, stderr, y1};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The key check: the 600 pairs of `lfw-fold1.bin` and fold 1 of `pairs.txt` (the JPEG
/// files) give the same cosine for every pair, so every accuracy computed from them is the
/// same. The .bin embeds all 1,200 images in order; the JPEG path each image once.
#[test]
fn bin_scores_equal_the_jpeg_scores_of_fold1() {
    let bin = asset("lfw/lfw-fold1.bin");
    let set = BinSet::read(&bin).unwrap();
    let pairs = Pairs::read(&asset("lfw/pairs.txt")).unwrap();
    let fold = Pairs {
        pairs: pairs.pairs.into_iter().filter(|p| p.fold == 0).collect(),
        folds: 1,
    };
    assert_eq!(set.issame, fold.labels());
    let (unique, index) = fold.index();
    let root = asset("lfw/aligned-112x112");
    let paths: Vec<PathBuf> = unique.iter().map(|r| r.path(&root, "jpg")).collect();

    let device = Device::Cpu;
    let model = y1();
    let embed = |x: &candle_core::Tensor| -> Result<_, Box<dyn std::error::Error>> {
        Ok(model.embed(x, true)?)
    };
    let from_files = mfn_data::embed_images(&paths, 8, [112, 112], &device, embed, |_| {}).unwrap();
    let from_bin = mfn_data::embed_encoded(
        set.images.clone().into(),
        &bin,
        8,
        [112, 112],
        &device,
        embed,
        |_| {},
    )
    .unwrap();
    assert_eq!(from_bin.len(), 1200);
    let mut worst = 0f64;
    for (i, [a, b]) in index.iter().enumerate() {
        let want = mfn_eval::cosine(&from_files[*a], &from_files[*b]).unwrap();
        let got = mfn_eval::cosine(&from_bin[2 * i], &from_bin[2 * i + 1]).unwrap();
        worst = worst.max((want - got).abs());
    }
    eprintln!("largest cosine difference over 600 pairs: {worst:e}");
    assert!(worst <= 1e-6, "cosines differ by {worst}");
}

/// The first `n` same and `n` different pairs of each of the first `folds` LFW folds, as a
/// pairs file with `folds` folds.
fn mini_pairs(dir: &Path, folds: usize, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(asset("lfw/pairs.txt")).unwrap();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    let mut out = format!("{folds}\t{n}\n");
    for f in 0..folds {
        let fold = &lines[f * 600..(f + 1) * 600];
        for line in fold[..n].iter().chain(&fold[300..300 + n]) {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.join("mini-pairs.txt");
    std::fs::write(&path, out).unwrap();
    path
}

/// `pack-bin` then `eval --bin` gives, fold for fold, what `eval --pairs` gives on the same
/// list: contiguous folds of a .bin are the pairs file's folds.
#[test]
fn pack_bin_then_eval_bin_matches_eval_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = mini_pairs(dir.path(), 2, 5);
    let images = asset("lfw/aligned-112x112");
    let model = asset("models/mobilefacenet-y1/model-symbol.json");
    let bin = dir.path().join("mini.bin");
    let out = ok(mfn(&[
        "pack-bin",
        "--pairs",
        s(&pairs),
        "--images",
        s(&images),
        "--out",
        s(&bin),
    ]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("20 pairs (10 same), 40 images"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let set = BinSet::read(&bin).unwrap();
    assert_eq!(set.pairs(), 20);
    let list = Pairs::read(&pairs).unwrap();
    assert_eq!(set.issame, list.labels());
    assert_eq!(
        set.images[2],
        std::fs::read(list.pairs[1].a.path(&images, "jpg")).unwrap()
    );

    let json_bin = dir.path().join("bin.json");
    let json_pairs = dir.path().join("pairs.json");
    let roc = dir.path().join("roc.svg");
    let text = ok(mfn(&[
        "eval",
        "--model",
        s(&model),
        "--bin",
        s(&bin),
        "--folds",
        "2",
        "--json",
        s(&json_bin),
        "--roc",
        s(&roc),
    ]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("20 in 2 folds (10 same, 10 different), 40 images"),
        "{text}"
    );
    assert!(std::fs::metadata(&roc).unwrap().len() > 0);
    ok(mfn(&[
        "eval",
        "--model",
        s(&model),
        "--pairs",
        s(&pairs),
        "--images",
        s(&images),
        "--json",
        s(&json_pairs),
    ]));
    let (b, p) = (read_json(&json_bin), read_json(&json_pairs));
    assert_eq!(b["images"], 40);
    for key in ["pairs", "folds", "positives", "negatives"] {
        assert_eq!(b[key], p[key], "{key}");
    }
    assert_eq!(b["folds"], 2);
    for protocol in ["insightface", "exact"] {
        let (x, y) = (&b["accuracy"][protocol], &p["accuracy"][protocol]);
        assert_eq!(x["folds"], y["folds"], "{protocol} fold accuracies");
        assert_eq!(x["thresholds"], y["thresholds"], "{protocol} thresholds");
        let mean = x["mean"].as_f64().unwrap();
        assert!(mean > 0.8, "{protocol} accuracy {mean}");
    }
    let (auc_b, auc_p) = (b["auc"].as_f64().unwrap(), p["auc"].as_f64().unwrap());
    assert!((auc_b - auc_p).abs() < 1e-9, "AUC {auc_b} vs {auc_p}");
}

#[test]
fn eval_bin_refuses_bad_sets_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.bin");
    std::fs::write(&evil, b"\x80\x02cos\nsystem\nX\x0a\0\0\0echo pwned\x85R.").unwrap();
    let o = mfn(&["eval", "--bin", s(&evil)]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("evil.bin: byte 2: forbidden global `os system`"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("pwned"));

    let truncated = dir.path().join("truncated.bin");
    let real = std::fs::read(asset("lfw/lfw-20pairs-protocol2.bin")).unwrap();
    std::fs::write(&truncated, &real[..real.len() / 3]).unwrap();
    let o = mfn(&["eval", "--bin", s(&truncated)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));

    let small = dir.path().join("small.bin");
    BinSet::read(&asset("lfw/lfw-20pairs-protocol2.bin"))
        .unwrap()
        .write(&small)
        .unwrap();
    let o = mfn(&["eval", "--bin", s(&small), "--folds", "21"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("has 20 pairs"), "{}", stderr(&o));

    let o = mfn(&["eval", "--bin", s(&small), "--pairs", "pairs.txt"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    let o = mfn(&["eval", "--folds", "2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bin"), "{}", stderr(&o));
}

#[test]
fn pack_bin_names_missing_images() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.txt");
    std::fs::write(
        &pairs,
        "1\t1\nAbel_Pacheco\t1\t4\nNobody_Here\t1\tAbel_Pacheco\t1\n",
    )
    .unwrap();
    let out = dir.path().join("out.bin");
    let o = mfn(&[
        "pack-bin",
        "--pairs",
        s(&pairs),
        "--images",
        s(&asset("lfw/aligned-112x112")),
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("1 image(s) missing"), "{err}");
    assert!(err.contains("Nobody_Here_0001.jpg"), "{err}");
    assert!(!out.exists());
}
