//! What the `mfn-cli` integration tests share: assets, running the binary, reading JSON.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A file under `MFN_ASSETS`; a missing one fails the test and names it.
pub fn asset(rel: &str) -> PathBuf {
    mfn_data::assets::path(rel).unwrap_or_else(|e| panic!("{e}"))
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
