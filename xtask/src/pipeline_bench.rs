//! `cargo xtask bench-pipeline`: photo to embedding (decode + detect + align + embed) per
//! photo, against ONNX Runtime running insightface's own pipeline on the same photos and
//! the same two networks (`bench/detect_pipeline_ort.py`), alternating the two engines
//! round by round in one run so that a noisy shared machine favours neither.
//!
//! Each round times every photo once with MFN's pipeline in this process, then runs the
//! peer script for one pass over the same photos at the same thread count and reads its
//! per-photo median. A round's figure is the ratio of the two medians; the report gives
//! each round's and their median.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mfn_detect::scrfd::InputSize;
use mfn_detect::Pipeline;
use serde_json::{json, Value};

/// Arguments of `cargo xtask bench-pipeline`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder of photos (every .jpg/.jpeg/.png below it) [default: the 100 raw LFW photos,
    /// `lfw-raw-subset/images` through the registry].
    #[arg(long)]
    photos: Option<PathBuf>,
    /// Thread counts, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Rounds per thread count (each: one pass of MFN, then one of the peer).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// SCRFD's input sizing for MFN: `letterbox:640` (insightface's, what the peer does)
    /// or `fit:640` (never scales a photo up).
    #[arg(long, default_value = "letterbox:640")]
    det_size: String,
    /// Embed each face with its mirror image too (insightface's pipeline does not).
    #[arg(long)]
    flip: bool,
    /// Python with onnxruntime, numpy, opencv-python-headless and scikit-image
    /// [default: the peer venv `~/.cache/mfn-peer-bench-venv`, else `python3`].
    #[arg(long)]
    python: Option<PathBuf>,
    /// Time MFN only.
    #[arg(long)]
    no_peer: bool,
    /// Write the rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<InputSize> {
    s.parse()
        .map_err(|e: String| anyhow::anyhow!("--det-size: {e}"))
}

fn photos_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            photos_under(&p, out)?;
        } else if matches!(
            p.extension()
                .and_then(|x| x.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("jpg" | "jpeg" | "png")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One pass of MFN's pipeline: milliseconds per photo, decoding included.
fn mfn_pass(pipeline: &Pipeline, photos: &[PathBuf]) -> Result<Vec<f64>> {
    photos
        .iter()
        .map(|p| {
            let start = Instant::now();
            let faces = pipeline.faces(p)?;
            std::hint::black_box(&faces);
            Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// One pass of the peer at `threads` threads: its per-photo median in milliseconds.
fn peer_pass(
    python: &Path,
    det: &Path,
    rec: &Path,
    list: &Path,
    threads: usize,
    out: &Path,
) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/detect_pipeline_ort.py");
    let status = Command::new(python)
        .arg(&script)
        .args(["--det", &det.display().to_string()])
        .args(["--rec", &rec.display().to_string()])
        .args(["--photos", &list.display().to_string()])
        .args([
            "--threads",
            &threads.to_string(),
            "--rounds",
            "1",
            "--warmup",
            "5",
        ])
        .arg("--no-spin")
        .args(["--json", &out.display().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !status.success() {
        bail!(
            "the peer script failed ({status}); it needs onnxruntime, numpy, \
             opencv-python-headless and scikit-image (see bench/README.md)"
        );
    }
    let rows: Value = serde_json::from_str(&std::fs::read_to_string(out)?)?;
    rows[0]["median_ms"]
        .as_f64()
        .context("the peer's JSON has no median_ms")
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let hub = mfn_hub::Hub::from_env()?;
    let size = parse_size(&args.det_size)?;
    let photo_dir = match &args.photos {
        Some(p) => p.clone(),
        None => hub.asset_dir("lfw-raw-subset/images")?,
    };
    let mut photos = Vec::new();
    photos_under(&photo_dir, &mut photos)?;
    if photos.is_empty() {
        bail!("no photos under {}", photo_dir.display());
    }
    let pack = hub.registry.pack(mfn_hub::DEFAULT_PACK)?.clone();
    let det = hub.first_at_hand(&pack.detector)?.path;
    let rec = hub.file(&pack.model)?.path;
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache/mfn-peer-bench-venv/bin/python");
        if venv.is_file() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let tmp = tempfile::tempdir()?;
    let list = tmp.path().join("photos.txt");
    let text: Vec<String> = photos.iter().map(|p| p.display().to_string()).collect();
    std::fs::write(&list, text.join("\n"))?;

    let pipeline = Pipeline::builder()
        .hub(hub.clone())
        .detector_weights(&det)
        .model(&pack.model)
        .scrfd_input(size)
        .flip(args.flip)
        .build()?;
    println!(
        "{} photos from {}; MFN: SCRFD {} + {} ({}), peer: ONNX Runtime with insightface's \
         pipeline (letterbox 640, no flip), intra-op spinning off",
        photos.len(),
        photo_dir.display(),
        args.det_size,
        pack.model,
        if args.flip { "flip" } else { "no flip" }
    );
    let mut rows = Vec::new();
    for &threads in &args.threads {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .context("building a thread pool")?;
        let mut ours = Vec::new();
        let mut peers = Vec::new();
        let mut ratios = Vec::new();
        pool.install(|| -> Result<()> {
            mfn_pass(&pipeline, &photos[..photos.len().min(5)])?;
            Ok(())
        })?;
        for round in 0..args.rounds {
            let mut ms = pool.install(|| mfn_pass(&pipeline, &photos))?;
            let mine = median(&mut ms);
            ours.push(mine);
            if args.no_peer {
                println!("threads {threads} round {round}: MFN {mine:.2} ms/photo");
                continue;
            }
            let out = tmp.path().join("peer.json");
            let peer = peer_pass(&python, &det, &rec, &list, threads, &out)?;
            peers.push(peer);
            ratios.push(mine / peer);
            println!(
                "threads {threads} round {round}: MFN {mine:.2} ms/photo, ONNX Runtime \
                 {peer:.2} ms/photo, ratio {:.3}",
                mine / peer
            );
        }
        let row = json!({
            "threads": threads,
            "photos": photos.len(),
            "det_size": args.det_size,
            "flip": args.flip,
            "mfn_median_ms": median(&mut ours.clone()),
            "peer_median_ms": if peers.is_empty() { Value::Null } else { json!(median(&mut peers.clone())) },
            "ratio_median": if ratios.is_empty() { Value::Null } else { json!(median(&mut ratios.clone())) },
            "ratios": ratios,
        });
        println!(
            "threads {threads}: MFN {:.2} ms/photo, ratio to ONNX Runtime (median of rounds) {}",
            row["mfn_median_ms"].as_f64().unwrap_or(f64::NAN),
            row["ratio_median"]
                .as_f64()
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "-".into())
        );
        rows.push(row);
    }
    if let Some(path) = &args.json {
        // Through a temporary file beside it, synced and renamed: never a half-written file.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut tmp, serde_json::to_string_pretty(&rows)?.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
