//! The `mfn-cli` binary end to end, on the real y1 weights and LFW files.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::{asset, floats, mfn, ok, read_json, stderr};

/// `embed --no-normalize` on the golden PNGs and on their mirror images, against ONNX
/// Runtime's raw outputs.
#[test]
fn embed_matches_the_golden_embeddings() {
    let model = asset("models/mobilefacenet-y1/model-symbol.json");
    let (plain, mirrored) = common::golden_embed_diffs(
        &model,
        "golden/mobilefacenet-y1-embeddings.json",
        "images",
        "embedding_hflip",
        128,
    );
    assert!(plain <= 1e-3, "plain: max abs difference {plain}");
    assert!(mirrored <= 1e-3, "mirrored: max abs difference {mirrored}");
}

#[test]
fn convert_writes_a_native_model_that_embeds_identically() {
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("y1.safetensors");
    let symbol = asset("models/mobilefacenet-y1/model-symbol.json");
    ok(mfn(&[
        "convert",
        symbol.to_str().unwrap(),
        native.to_str().unwrap(),
    ]));
    let face = asset("golden/images/Dean_Barker_0001.png");
    let embed = |model: &Path| -> Vec<f32> {
        let out = ok(mfn(&[
            "embed",
            "--flip",
            "--model",
            model.to_str().unwrap(),
            face.to_str().unwrap(),
        ]));
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        floats(&json["images"][0]["embedding"])
    };
    let (a, b) = (embed(&symbol), embed(&native));
    assert_eq!(a, b);
    let norm = a.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn convert_reads_pytorch_and_stores_a_given_input_norm() {
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("foamliu.safetensors");
    let pt = asset("models/foamliu-mobilefacenet/mobilefacenet.pt");
    let out = ok(mfn(&[
        "convert",
        pt.to_str().unwrap(),
        native.to_str().unwrap(),
    ]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config `foamliu`"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ckpt = mfn_model::Checkpoint::load(&native, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ckpt.config.input_norm, mfn_model::InputNorm::imagenet());

    ok(mfn(&[
        "convert",
        "--input-norm",
        "127.5,0.0078125",
        pt.to_str().unwrap(),
        native.to_str().unwrap(),
    ]));
    let ckpt = mfn_model::Checkpoint::load(&native, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(ckpt.config.input_norm, mfn_model::InputNorm::insightface());

    let out = mfn(&[
        "convert",
        "--input-norm",
        "127.5,0",
        pt.to_str().unwrap(),
        native.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("MEAN,SCALE"), "{}", stderr(&out));
}

/// Writes a pairs file of the given lines with a `folds n` header.
fn pairs_file(dir: &Path, header: &str, lines: &[String]) -> PathBuf {
    let p = dir.join("pairs.txt");
    std::fs::write(&p, format!("{header}\n{}\n", lines.join("\n"))).unwrap();
    p
}

fn lfw_lines() -> Vec<String> {
    std::fs::read_to_string(asset("lfw/pairs.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn eval_writes_the_report_json_and_roc() {
    // Two folds of 10 same and 10 different pairs from the start of fold 1.
    let lines = lfw_lines();
    let mut picked: Vec<String> = Vec::new();
    for half in 0..2 {
        picked.extend(lines[half * 10..half * 10 + 10].iter().cloned());
        picked.extend(lines[300 + half * 10..300 + half * 10 + 10].iter().cloned());
    }
    let dir = tempfile::tempdir().unwrap();
    let pairs = pairs_file(dir.path(), "2 10", &picked);
    let json = dir.path().join("report.json");
    let roc = dir.path().join("roc.svg");
    let images = asset("lfw/aligned-112x112");
    let out = ok(mfn(&[
        "eval",
        "--pairs",
        pairs.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--roc",
        roc.to_str().unwrap(),
    ]));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("insightface") && table.contains("TAR@FAR"),
        "{table}"
    );
    let r = read_json(&json);
    assert_eq!(r["pairs"], 40);
    assert_eq!(r["folds"], 2);
    assert_eq!(r["flip"], true);
    assert_eq!(r["negatives"], 20);
    for proto in ["insightface", "exact"] {
        let folds = r["accuracy"][proto]["folds"].as_array().unwrap();
        assert_eq!(folds.len(), 2);
        let mean = r["accuracy"][proto]["mean"].as_f64().unwrap();
        assert!(mean >= 0.9, "{proto} accuracy {mean} on easy LFW pairs");
    }
    assert!(r["auc"].as_f64().unwrap() > 0.95);
    for far in ["0.1", "0.01", "0.001"] {
        assert!(r["tar_at_far"][far].is_number(), "tar_at_far[{far}]");
    }
    assert!(r["images"].as_u64().unwrap() > 0 && r["faces_per_second"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(&roc).unwrap();
    assert!(svg.contains("<svg"));
}

#[test]
fn eval_lists_every_missing_image() {
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![
        "Nobody_Here\t1\t2".to_string(),
        "Aaron_Peirsol\t1\tNot_A_Person\t7".to_string(),
    ];
    let pairs = pairs_file(dir.path(), "1 1", &lines);
    // Only whether each file exists matters here.
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("Aaron_Peirsol")).unwrap();
    std::fs::write(images.join("Aaron_Peirsol/Aaron_Peirsol_0001.jpg"), b"").unwrap();
    let out = mfn(&[
        "eval",
        "--pairs",
        pairs.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("3 image(s) missing"), "{err}");
    for name in [
        "Nobody_Here_0001.jpg",
        "Nobody_Here_0002.jpg",
        "Not_A_Person_0007.jpg",
    ] {
        assert!(err.contains(name), "{name} not listed in: {err}");
    }
}

#[test]
fn malformed_and_empty_pairs_files_fail_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = pairs_file(dir.path(), "1 1", &["A\t1\t2".into(), "A\t1\tB".into()]);
    let images = dir.path().to_str().unwrap();
    let out = mfn(&[
        "eval",
        "--pairs",
        pairs.to_str().unwrap(),
        "--images",
        images,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("pairs.txt:3:"), "{err}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = mfn(&[
        "eval",
        "--pairs",
        empty.to_str().unwrap(),
        "--images",
        images,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
}

#[test]
fn corrupt_image_and_missing_model_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"\xFF\xD8\xFF\xE0 not really a jpeg").unwrap();
    let out = mfn(&["embed", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bad.jpg"), "{}", stderr(&out));

    let out = mfn(&[
        "embed",
        "--model",
        "/nonexistent/model-symbol.json",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/model-symbol.json"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn without_assets_or_network_eval_says_what_to_pass_or_set() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mfn-cli"))
        .arg("eval")
        .env_remove("MFN_ASSETS")
        .env("MFN_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("`lfw`") && last.contains("MFN_ASSETS") && last.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(err.contains("--pairs"), "{err}");
}

#[test]
fn save_threshold_keeps_the_one_measured_on_more_pairs_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("y1.safetensors");
    let symbol = asset("models/mobilefacenet-y1/model-symbol.json");
    ok(mfn(&[
        "convert",
        symbol.to_str().unwrap(),
        native.to_str().unwrap(),
    ]));
    let model = native.to_str().unwrap();
    let fold1 = asset("lfw/lfw-fold1.bin");
    let small = asset("lfw/lfw-20pairs-protocol2.bin");
    let json = dir.path().join("e.json");
    let out = ok(mfn(&[
        "eval",
        "--model",
        model,
        "--bin",
        fold1.to_str().unwrap(),
        "--save-threshold",
        "far=1e-2",
        "--json",
        json.to_str().unwrap(),
    ]));
    let report = read_json(&json);
    let at = report["tar_at_far_detail"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["far"] == 0.01)
        .unwrap()
        .clone();
    let stored = |path: &std::path::Path| {
        let c = mfn_model::Checkpoint::load(path, None, &candle_core::Device::Cpu).unwrap();
        (
            c.metadata["mfn.threshold"].parse::<f64>().unwrap(),
            c.metadata["mfn.threshold.pairs"].clone(),
            c.metadata["mfn.threshold.source"].clone(),
        )
    };
    let (t, pairs, how) = stored(&native);
    assert_eq!(t, at["threshold"].as_f64().unwrap(), "{}", stderr(&out));
    assert_eq!(pairs, "600");
    assert!(how.contains("FAR <= 0.01"), "{how}");

    // 20 pairs do not silently replace a threshold measured on 600.
    let small_run = |force: bool| {
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--bin",
            small.to_str().unwrap(),
            "--folds",
            "2",
            "--save-threshold",
        ];
        if force {
            args.push("--force");
        }
        mfn(&args)
    };
    let out = small_run(false);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("600 pairs"), "{}", stderr(&out));
    assert_eq!(stored(&native).0, t, "the stored threshold must stay");
    ok(small_run(true));
    let (t2, pairs2, how2) = stored(&native);
    assert_eq!(pairs2, "20");
    assert!(how2.contains("exact-protocol"), "{how2}");
    assert_ne!(t2, t);

    // verify says which threshold it used and where it came from.
    let a = raw("Colin_Powell/Colin_Powell_0001.jpg");
    let b = raw("Colin_Powell/Colin_Powell_0002.jpg");
    let out = mfn(&["verify", "--model", model, &a, &b]);
    assert!(
        stderr(&out).contains(&format!("threshold {t2:.4} from")),
        "{}",
        stderr(&out)
    );
    for bad in ["far=0", "far=2", "median", "far=nan"] {
        let out = mfn(&[
            "eval",
            "--bin",
            small.to_str().unwrap(),
            "--save-threshold",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
}

fn raw(rel: &str) -> String {
    asset(&format!("lfw-raw-subset/images/{rel}"))
        .display()
        .to_string()
}

#[test]
fn verify_exits_0_for_same_1_for_different_2_for_errors() {
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("y1.safetensors");
    let symbol = asset("models/mobilefacenet-y1/model-symbol.json");
    // No threshold yet: verify says how to get one.
    ok(mfn(&[
        "convert",
        symbol.to_str().unwrap(),
        native.to_str().unwrap(),
    ]));
    let (a, b, c) = (
        raw("Colin_Powell/Colin_Powell_0001.jpg"),
        raw("Colin_Powell/Colin_Powell_0002.jpg"),
        raw("Tony_Blair/Tony_Blair_0002.jpg"),
    );
    let out = mfn(&["verify", "--model", native.to_str().unwrap(), &a, &b]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--save-threshold"),
        "{}",
        stderr(&out)
    );

    ok(mfn(&[
        "convert",
        "--threshold",
        "0.2687",
        symbol.to_str().unwrap(),
        native.to_str().unwrap(),
    ]));
    let json = dir.path().join("v.json");
    let out = mfn(&[
        "verify",
        "--model",
        native.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        &a,
        &b,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("same person: yes  (cosine "), "{text}");
    let v = read_json(&json);
    assert_eq!(v["same"], true);
    assert!((v["threshold"].as_f64().unwrap() - 0.2687).abs() < 1e-9);

    let out = mfn(&["verify", "--model", native.to_str().unwrap(), &a, &c]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("same person: no "));

    // An explicit threshold wins over the stored one.
    let out = mfn(&[
        "verify",
        "--model",
        native.to_str().unwrap(),
        "--threshold=-1",
        &a,
        &c,
    ]);
    assert_eq!(out.status.code(), Some(0));

    let blank = dir.path().join("blank.png");
    image::RgbImage::from_pixel(80, 80, image::Rgb([40, 40, 40]))
        .save(&blank)
        .unwrap();
    let out = mfn(&[
        "verify",
        "--model",
        native.to_str().unwrap(),
        &a,
        blank.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("blank.png: no face found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn align_and_embed_detect_work_on_photos() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        raw("Hugo_Chavez/Hugo_Chavez_0001.jpg"),
        raw("Hugo_Chavez/Hugo_Chavez_0002.jpg"),
    );
    let out_dir = dir.path().join("crops");
    ok(mfn(&["align", "--out", out_dir.to_str().unwrap(), &a, &b]));
    let crop = image::open(out_dir.join("Hugo_Chavez_0001.png")).unwrap();
    assert_eq!((crop.width(), crop.height()), (112, 112));
    // --pick all: one crop per face, numbered.
    let every = dir.path().join("every");
    ok(mfn(&[
        "align",
        "--pick",
        "all",
        "--out",
        every.to_str().unwrap(),
        &a,
    ]));
    assert!(every.join("Hugo_Chavez_0001_0.png").is_file());

    let given = asset("lfw-raw-subset/landmarks.txt");
    let sphere = dir.path().join("sphere");
    ok(mfn(&[
        "align",
        "--landmarks",
        given.to_str().unwrap(),
        "--size",
        "96x112",
        "--out",
        sphere.to_str().unwrap(),
        &a,
    ]));
    let crop = image::open(sphere.join("Hugo_Chavez_0001.png")).unwrap();
    assert_eq!((crop.width(), crop.height()), (96, 112));

    let out = ok(mfn(&["embed", "--detect", "--flip", &a, &b]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["images"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let (e1, e2) = (floats(&rows[0]["embedding"]), floats(&rows[1]["embedding"]));
    let cos: f32 = e1.iter().zip(&e2).map(|(x, y)| x * y).sum();
    assert!(cos > 0.4, "same person, cosine {cos}");
    assert_eq!(rows[0]["landmarks"].as_array().unwrap().len(), 5);
}

#[test]
fn align_keeps_each_photo_folder_and_eval_reads_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let photos = [
        "Colin_Powell/Colin_Powell_0001.jpg",
        "Colin_Powell/Colin_Powell_0002.jpg",
        "Colin_Powell/Colin_Powell_0003.jpg",
        "George_W_Bush/George_W_Bush_0001.jpg",
    ];
    let paths: Vec<String> = photos.iter().map(|p| raw(p)).collect();
    let out = dir.path().join("aligned");
    let report = dir.path().join("align.json");
    let mut args = vec![
        "align",
        "--out",
        out.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ];
    args.extend(paths.iter().map(String::as_str));
    ok(mfn(&args));
    for p in photos {
        let crop = out.join(p).with_extension("png");
        assert!(crop.is_file(), "{} missing", crop.display());
    }
    let v = read_json(&report);
    let crops = v["crops"].as_array().unwrap();
    assert_eq!(crops.len(), 4);
    for c in crops {
        assert_eq!(c["picked_by"], "central");
        assert_eq!(c["detector"], "scrfd");
        assert_eq!(c["landmarks"].as_array().unwrap().len(), 5);
    }
    // The output is an image folder `eval --images` reads as it is.
    let pairs = dir.path().join("pairs.txt");
    std::fs::write(
        &pairs,
        "2\t1\nColin_Powell\t1\t2\nColin_Powell\t1\tGeorge_W_Bush\t1\n\
         Colin_Powell\t2\t3\nColin_Powell\t3\tGeorge_W_Bush\t1\n",
    )
    .unwrap();
    ok(mfn(&[
        "eval",
        "--pairs",
        pairs.to_str().unwrap(),
        "--images",
        out.to_str().unwrap(),
        "--ext",
        "png",
    ]));

    // Two photos of the same name in different folders never overwrite each other.
    for sub in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let (x, y) = (dir.path().join("a/x.jpg"), dir.path().join("b/x.jpg"));
    std::fs::copy(&paths[0], &x).unwrap();
    std::fs::copy(&paths[3], &y).unwrap();
    let twins = dir.path().join("twins");
    ok(mfn(&[
        "align",
        "--out",
        twins.to_str().unwrap(),
        x.to_str().unwrap(),
        y.to_str().unwrap(),
    ]));
    let (ax, bx) = (
        image::open(twins.join("a/x.png")).unwrap(),
        image::open(twins.join("b/x.png")).unwrap(),
    );
    assert_ne!(ax.as_bytes(), bx.as_bytes());
}
