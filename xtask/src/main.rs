//! `cargo xtask`: the project's gates and chores that are too slow, too machine-bound or
//! too network-bound for the test suite.
//!
//! - `fetch` makes the registry's pinned sources (`mfn-hub`) ready on disk: found in the
//!   assets folder or the cache or downloaded, sha256-checked, and models converted to the
//!   native safetensors format (`fetch.rs`).
//! - `accuracy` evaluates every model of the committed expectation file
//!   (`xtask/accuracy.json`) and fails when an accuracy leaves its tolerance
//!   (`accuracy.rs`).
//! - `bench` times the CPU inference path (or, with `--device cuda`, the GPU path) and
//!   fails when it is slower than the committed baseline of the machine it runs on
//!   (`bench.rs`).
//! - `bench-depthwise` times the training depthwise conv, native against candle's grouped
//!   conv, and checks that they agree, on the GPU against the CPU too (`depthwise.rs`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod accuracy;
mod bench;
mod depthwise;
mod eval;
mod fetch;
mod machine;
mod pipeline_bench;

/// Project tasks: model downloads, accuracy and speed gates.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Find or download the registry's pinned files, check them, and convert models to the
    /// native format.
    Fetch(fetch::Args),
    /// Evaluate the models of the expectation file; exit 1 when an accuracy regressed.
    Accuracy(accuracy::Args),
    /// Time the CPU inference path (or the GPU's); exit 1 when slower than the machine's
    /// baseline.
    Bench(bench::Args),
    /// Time the training depthwise conv against candle's grouped conv, forward and
    /// backward, and check that they agree.
    BenchDepthwise(depthwise::Args),
    /// Time photo to embedding (decode, SCRFD, align, w600k_mbf) per photo against ONNX
    /// Runtime running insightface's pipeline, alternating the two.
    BenchPipeline(pipeline_bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fetch(a) => fetch::run(a),
        Command::Accuracy(a) => accuracy::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchDepthwise(a) => depthwise::run(a),
        Command::BenchPipeline(a) => pipeline_bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root, where the committed expectation, model and baseline files live.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The assets folder: `explicit` (a `--assets` flag), else `$MFN_ASSETS`.
pub fn assets(explicit: Option<&Path>) -> Result<PathBuf> {
    let root = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os(mfn_data::assets::ENV)
            .map(PathBuf::from)
            .with_context(|| {
                format!(
                    "{} is not set: point it at the assets folder, or pass --assets DIR",
                    mfn_data::assets::ENV
                )
            })?,
    };
    if !root.is_dir() {
        anyhow::bail!("the assets folder {} does not exist", root.display());
    }
    Ok(root)
}

/// Reads and parses a JSON file, naming it in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Writes `value` as pretty JSON, creating the parent folder, through a temporary file so
/// an interrupted write never leaves half a file behind.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    let tmp = path.with_extension("json.partial");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
