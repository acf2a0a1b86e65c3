//! What the `mfn-cli` integration tests share: their files, running the binary, reading JSON.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Files committed with the project, laid out as in the assets folder (`golden/...`).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// A file or folder by its path in the assets layout (`models/mtcnn/onet.pt`,
/// `golden/images/Abel_Pacheco_0001.png`, `lfw/aligned-112x112`): a committed fixture,
/// else through the registry of pinned public sources (assets folder, cache, or a checked
/// download), else the assets folder (see `mfn_hub::Hub::locate`). A file none of them
/// has fails the test with a message that names it and says whether it has a public
/// source.
pub fn asset(rel: &str) -> PathBuf {
    mfn_hub::Hub::from_env()
        .and_then(|hub| hub.locate(rel, Some(&fixtures())))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the `mfn-cli` binary built for these tests, with its cache (converted registry
/// models) under the build's temporary folder rather than the user's home.
pub fn mfn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mfn-cli"))
        .env(
            "MFN_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("mfn-home"),
        )
        .args(args)
        .output()
        .expect("running mfn-cli")
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The output of a run that must have succeeded.
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "mfn-cli failed: {}", stderr(&o));
    o
}

/// A JSON file.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A JSON array of numbers.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// insightface's y1 from its MXNet files, on the CPU.
pub fn y1() -> mfn_model::MobileFaceNet {
    let device = candle_core::Device::Cpu;
    mfn_model::Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &device,
    )
    .unwrap()
    .build(&device)
    .unwrap()
}

/// Address space a run on hostile input may use: 2 GiB.
pub const HOSTILE_MEMORY_KIB: u64 = 2 << 20;
/// Time a run on hostile input may take.
pub const HOSTILE_SECONDS: u64 = 30;

/// Runs `mfn-cli` on hostile input within [`HOSTILE_MEMORY_KIB`] of address space and
/// [`HOSTILE_SECONDS`], and checks that it ended by itself: no signal (panic=abort, stack
/// overflow, out of memory), no hang. Returns the output for the caller's own checks.
pub fn mfn_bounded(args: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v {HOSTILE_MEMORY_KIB}; exec timeout -s KILL {HOSTILE_SECONDS} \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_mfn-cli"))
        .args(args)
        .env(
            "MFN_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("mfn-home"),
        )
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running mfn-cli under bash");
    match out.status.code() {
        None => panic!("mfn-cli {args:?} was killed by a signal: {}", stderr(&out)),
        Some(137) => panic!("mfn-cli {args:?} ran past {HOSTILE_SECONDS} s or was killed"),
        Some(101) => panic!("mfn-cli {args:?} panicked: {}", stderr(&out)),
        Some(_) => out,
    }
}

/// A clean refusal: exit status 2, and a message that names `file`.
pub fn assert_refused(out: &Output, file: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2: {err}");
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(name.as_ref()),
        "the message must name {name}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `mfn-cli embed --no-normalize --model <model>` on the golden PNGs listed under `list` in
/// the reference file, and on their mirror images, against the reference's raw outputs
/// (`embedding` and `flipped_key`). Returns the largest absolute difference, plain and
/// mirrored, after checking the paths, the size `dim` and that outputs are raw.
pub fn golden_embed_diffs(
    model: &Path,
    reference: &str,
    list: &str,
    flipped_key: &str,
    dim: usize,
) -> (f32, f32) {
    let reference = read_json(&asset(reference));
    let entries = reference[list].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    let mut expected = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let png = asset(e["path"].as_str().unwrap());
        let mirrored = dir.path().join(format!("{i}-flipped.png"));
        image::imageops::flip_horizontal(&image::open(&png).unwrap().to_rgb8())
            .save(&mirrored)
            .unwrap();
        inputs.push(png);
        expected.push(floats(&e["embedding"]));
        inputs.push(mirrored);
        expected.push(floats(&e[flipped_key]));
    }
    let out = dir.path().join("emb.json");
    let mut args = vec![
        "embed".to_string(),
        "--no-normalize".into(),
        "--model".into(),
        model.display().to_string(),
        "--json".into(),
        out.display().to_string(),
    ];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    ok(mfn(&args.iter().map(String::as_str).collect::<Vec<_>>()));

    let got = read_json(&out);
    let rows = got["images"].as_array().unwrap();
    assert_eq!(rows.len(), 2 * entries.len());
    let (mut plain, mut mirrored) = (0f32, 0f32);
    for (i, (row, (want, path))) in rows.iter().zip(expected.iter().zip(&inputs)).enumerate() {
        assert_eq!(row["path"].as_str().unwrap(), path.display().to_string());
        let e = floats(&row["embedding"]);
        assert_eq!(e.len(), dim);
        let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm > 1.0, "raw outputs are not unit length (norm {norm})");
        let diff = e
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let worst = if i % 2 == 0 {
            &mut plain
        } else {
            &mut mirrored
        };
        *worst = worst.max(diff);
    }
    (plain, mirrored)
}

/// Four identities of `per_person` aligned LFW images each.
pub fn tiny_set(dir: &Path, per_person: usize) {
    for name in [
        "Colin_Powell",
        "Donald_Rumsfeld",
        "George_W_Bush",
        "Tony_Blair",
    ] {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for i in 1..=per_person {
            let file = format!("{name}_{i:04}.jpg");
            std::fs::copy(
                asset(&format!("lfw/aligned-112x112/{name}/{file}")),
                to.join(&file),
            )
            .unwrap();
        }
    }
}

/// Training flags that make a run take seconds: a quarter-width network, small batches.
pub const SMALL: [&str; 8] = [
    "--width", "0.25", "--batch", "8", "--scale", "16", "--lr", "0.05",
];
