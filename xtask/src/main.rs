//! `cargo xtask`: checks too slow for the test suite.
//!
//! `cargo xtask bench` times the CPU inference path (see `bench.rs`).
//!
//! `cargo xtask accuracy` runs `mfn-cli eval` on all of LFW (6,000 pairs) with y1, with
//! and without the flip test, and compares every mean accuracy with the ONNX Runtime
//! reference in `$MFN_ASSETS/golden/lfw-y1-reference.json` for the JPEG decoder this
//! project uses (the `image` crate).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

mod bench;

/// How far a mean accuracy may be from the reference, in accuracy points (0.05%).
const TOLERANCE: f64 = 0.0005;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("accuracy") => accuracy(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask accuracy [--no-flip | --flip-only] [--out DIR]\n       \
                 cargo xtask bench [--model PATH] [--threads 1,2] [--batches 1,32] [--runs N] [--json OUT]\n\n\
                 accuracy  full-LFW accuracy of y1 against the ONNX Runtime reference\n\
                 bench     CPU latency and throughput, with the time per layer kind"
            );
            std::process::exit(2)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn assets() -> Result<PathBuf> {
    let root = std::env::var_os("MFN_ASSETS")
        .map(PathBuf::from)
        .context("MFN_ASSETS is not set: point it at the assets folder")?;
    let reference = root.join("golden/lfw-y1-reference.json");
    if !reference.exists() {
        bail!("{} does not exist", reference.display());
    }
    Ok(root)
}

fn accuracy(args: &[String]) -> Result<()> {
    let assets = assets()?;
    let mut runs = vec![("flip", true), ("noflip", false)];
    let mut out_dir = std::env::temp_dir().join("mfn-xtask-accuracy");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-flip" => runs.retain(|r| !r.1),
            "--flip-only" => runs.retain(|r| r.1),
            "--out" => out_dir = PathBuf::from(it.next().context("--out needs a folder")?),
            other => bail!("unknown argument `{other}`"),
        }
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let reference_path = assets.join("golden/lfw-y1-reference.json");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(&reference_path)
            .with_context(|| format!("reading {}", reference_path.display()))?,
    )
    .with_context(|| format!("parsing {}", reference_path.display()))?;
    let expected = &reference["results_image_crate"];

    let mut failures = Vec::new();
    for (name, flip) in runs {
        let json = out_dir.join(format!("lfw-y1-{name}.json"));
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(workspace_root())
            .args([
                "run",
                "--release",
                "-q",
                "-p",
                "mfn-cli",
                "--",
                "eval",
                "--json",
            ])
            .arg(&json);
        if !flip {
            cmd.arg("--no-flip");
        }
        let status = cmd.status().context("running mfn-cli eval")?;
        if !status.success() {
            bail!("mfn-cli eval failed ({status})");
        }
        let got: Value = serde_json::from_str(
            &std::fs::read_to_string(&json)
                .with_context(|| format!("reading {}", json.display()))?,
        )?;
        for proto in ["insightface", "exact"] {
            let want = expected[name][proto]["accuracy_mean"]
                .as_f64()
                .with_context(|| format!("reference has no {name}/{proto} mean"))?;
            let have = got["accuracy"][proto]["mean"]
                .as_f64()
                .with_context(|| format!("{} has no {proto} mean", json.display()))?;
            let verdict = if (have - want).abs() <= TOLERANCE + 1e-9 {
                "ok"
            } else {
                failures.push(format!("{name}/{proto}"));
                "FAIL"
            };
            println!(
                "{name:<7} {proto:<12} {:>8.3}%  reference {:>8.3}%  {verdict}",
                have * 100.0,
                want * 100.0
            );
        }
    }
    if !failures.is_empty() {
        bail!("accuracy differs from the reference by more than 0.05 points: {failures:?}");
    }
    Ok(())
}
