//! Hostile arguments: every bad value is refused when the command line is parsed (exit
//! status 2, quickly, with a message naming the flag), before it can panic, crash, hang or
//! allocate; outputs are checked before the long work; a checkpoint cannot make a resume
//! allocate more than it holds.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{asset, mfn_bounded, ok, stderr};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `args` is refused at once with exit status 2 and a message that names `flag`.
fn refused(args: &[&str], flag: &str) {
    let start = Instant::now();
    let out = mfn_bounded(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        err.contains(flag),
        "{args:?}: the message must name {flag}: {err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{args:?} took {:?}",
        start.elapsed()
    );
}

#[test]
fn bad_numbers_are_refused_at_parse_time() {
    for (args, flag) in [
        // Durations: NaN panicked in `Duration`.
        (&["train", "--minutes", "NaN"][..], "--minutes"),
        (&["train", "--minutes", "inf"], "--minutes"),
        (&["train", "--minutes", "-1"], "--minutes"),
        (&["train", "--minutes", "1e300"], "--minutes"),
        (&["train", "--minutes", "0"], "--minutes"),
        // Threads: 100000 crashed the process.
        (&["--threads", "100000", "eval"], "--threads"),
        (&["eval", "--threads", "0"], "--threads"),
        (&["embed", "--threads", "-3", "x.png"], "--threads"),
        // Thresholds are cosines.
        (
            &["verify", "--threshold", "NaN", "a.jpg", "b.jpg"],
            "--threshold",
        ),
        (
            &["verify", "--threshold", "1.5", "a.jpg", "b.jpg"],
            "--threshold",
        ),
        (
            &["convert", "--threshold", "NaN", "a.onnx", "b.safetensors"],
            "--threshold",
        ),
        (&["eval", "--save-threshold", "far=NaN"], "--save-threshold"),
        // Crop sizes: 65536x65536 allocated GBs.
        (
            &["align", "--size", "65536x65536", "--out", "o", "a.jpg"],
            "--size",
        ),
        (&["align", "--size", "8x8", "--out", "o", "a.jpg"], "--size"),
        (&["align", "--size", "112", "--out", "o", "a.jpg"], "--size"),
        (
            &["align", "--min-face", "NaN", "--out", "o", "a.jpg"],
            "--min-face",
        ),
        // Batches.
        (&["eval", "--batch", "0"], "--batch"),
        (&["eval", "--batch", "100000000"], "--batch"),
        (&["embed", "--batch", "0", "x.png"], "--batch"),
        (&["train", "--batch", "1"], "--batch"),
        (&["train", "--batch", "1000000"], "--batch"),
        // Folds.
        (&["eval", "--folds", "1"], "--folds"),
        (&["eval", "--folds", "0"], "--folds"),
        // Training settings.
        (&["train", "--lr", "NaN"], "--lr"),
        (&["train", "--lr", "0"], "--lr"),
        (&["train", "--lr", "-0.1"], "--lr"),
        (&["train", "--epochs", "NaN"], "--epochs"),
        (&["train", "--epochs", "0"], "--epochs"),
        (&["train", "--steps", "0"], "--steps"),
        (&["train", "--gamma", "inf"], "--gamma"),
        (&["train", "--momentum", "1"], "--momentum"),
        (&["train", "--wd", "-1"], "--wd"),
        (&["train", "--wd-head", "NaN"], "--wd-head"),
        (&["train", "--scale", "0"], "--scale"),
        (&["train", "--m1", "0"], "--m1"),
        (&["train", "--m2", "-0.5"], "--m2"),
        (&["train", "--m3", "NaN"], "--m3"),
        (&["train", "--sub-centers", "0"], "--sub-centers"),
        (&["train", "--sub-centers", "100000"], "--sub-centers"),
        (&["train", "--width", "0"], "--width"),
        (&["train", "--width", "100"], "--width"),
        (&["train", "--min-images", "0"], "--min-images"),
        (&["train", "--hold-out", "0"], "--hold-out"),
        (&["train", "--milestones", "5,0"], "--milestones"),
        (&["train", "--seed", "-1"], "--seed"),
        (&["train", "--save-every", "-1"], "--save-every"),
        // Names joined to paths, and output formats.
        (&["eval", "--ext", "../../x"], "--ext"),
        (
            &[
                "pack-bin", "--pairs", "p", "--images", "i", "--ext", "", "--out", "o",
            ],
            "--ext",
        ),
        (&["eval", "--roc", "roc.pdf"], "--roc"),
        (&["convert", "a.onnx", "b.bin"], "OUTPUT"),
    ] {
        refused(args, flag);
    }
}

#[test]
fn outputs_are_checked_before_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e.json");
    let bin = asset("lfw/lfw-20pairs-protocol2.bin");
    let missing = dir.path().join("missing");
    for (args, flag) in [
        (
            vec!["eval", "--bin", s(&bin), "--json", s(&json), "--roc"],
            "--roc",
        ),
        (vec!["eval", "--bin", s(&bin), "--json"], "--json"),
    ] {
        let mut args = args;
        let target = missing.join(if flag == "--roc" { "r.svg" } else { "e.json" });
        args.push(s(&target));
        refused(&args, flag);
        assert!(
            !json.exists(),
            "{flag}: the JSON was written before the check"
        );
    }
    refused(
        &["eval", "--bin", s(&bin), "--json", s(dir.path())],
        "--json",
    );
    let pairs = dir.path().join("pairs.txt");
    std::fs::write(
        &pairs,
        "1\t1\nAbel_Pacheco\t1\t4\nAbel_Pacheco\t1\tAbel_Pacheco\t1\n",
    )
    .unwrap();
    refused(
        &[
            "pack-bin",
            "--pairs",
            s(&pairs),
            "--images",
            s(&asset("lfw/aligned-112x112")),
            "--out",
            s(&missing.join("lfw.bin")),
        ],
        "--out",
    );
    refused(
        &["convert", "a.onnx", s(&missing.join("m.safetensors"))],
        "OUTPUT",
    );
    refused(
        &["embed", "--json", s(&missing.join("e.json")), "x.png"],
        "--json",
    );
}

#[test]
fn a_checkpoint_claiming_a_billion_classes_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for name in ["Colin_Powell", "Tony_Blair"] {
        std::fs::create_dir_all(data.join(name)).unwrap();
        for i in 1..=2 {
            let file = format!("{name}_{i:04}.jpg");
            std::fs::copy(
                asset(&format!("lfw/aligned-112x112/{name}/{file}")),
                data.join(name).join(&file),
            )
            .unwrap();
        }
    }
    let run = dir.path().join("run");
    ok(common::mfn(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "1",
        "--width",
        "0.25",
        "--batch",
        "4",
    ]));
    let device = candle_core::Device::Cpu;
    let mut ckpt =
        mfn_model::Checkpoint::load(&run.join("last.safetensors"), None, &device).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&ckpt.metadata["mfn.train.config"]).unwrap();
    c["classes"] = 1_000_000_000u64.into();
    c["steps"] = 5.into();
    ckpt.metadata
        .insert("mfn.train.config".into(), c.to_string());
    let huge = run.join("huge.safetensors");
    ckpt.save(&huge).unwrap();
    // 1e9 x 512 floats would be 2 TB: refused within the 2 GiB limit, naming the counts.
    let out = mfn_bounded(&["train", "--resume", s(&huge)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("1000000000"), "{err}");
    // The resume itself also checks the claim against the stored head (mfn-train's
    // tests), for a data set that had as many classes.
}

#[test]
fn eval_warns_of_folds_that_lack_a_class() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e.json");
    let model = asset("models/mobilefacenet-y1/model-symbol.json");
    let bin = asset("lfw/lfw-20pairs-protocol2.bin");
    // One pair per fold: every test fold holds one class only.
    let out = ok(common::mfn(&[
        "eval",
        "--model",
        s(&model),
        "--bin",
        s(&bin),
        "--folds",
        "20",
        "--no-flip",
        "--json",
        s(&json),
    ]));
    let err = stderr(&out);
    assert!(
        err.contains("warning: ") && err.contains("one class only"),
        "{err}"
    );
    let warnings = common::read_json(&json)["warnings"]
        .as_array()
        .unwrap()
        .len();
    assert!(warnings >= 2, "{warnings}");
}
