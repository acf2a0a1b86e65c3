//! `mfn-cli eval`: the LFW pair protocol on a model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use mfn_data::VerificationSet;
use mfn_eval::{KFoldReport, PairScores, Report};
use serde_json::{json, Value};

use super::{asset_or, image_size, load_model_on, DeviceKind, RunArgs, THRESHOLD_KEY};

/// The false accept rates reported.
const FARS: [f64; 3] = [1e-1, 1e-2, 1e-3];

/// Arguments of `mfn-cli eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a native `.safetensors` file or an MXNet `*-symbol.json`
    /// [default: $MFN_ASSETS/models/mobilefacenet-y1/model-symbol.json].
    #[arg(long)]
    model: Option<PathBuf>,
    /// LFW `pairs.txt` [default: $MFN_ASSETS/lfw/pairs.txt].
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Folder of aligned faces, `<Name>/<Name>_<NNNN>.<ext>`
    /// [default: $MFN_ASSETS/lfw/aligned-112x112].
    #[arg(long)]
    images: Option<PathBuf>,
    /// An insightface verification set (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...)
    /// instead of a pairs file and image folder.
    #[arg(long, conflicts_with_all = ["pairs", "images"])]
    bin: Option<PathBuf>,
    /// With --bin: the number of folds of consecutive pairs, as insightface splits them
    /// [default: 10].
    #[arg(long, requires = "bin")]
    folds: Option<usize>,
    /// Extension of the image files.
    #[arg(long, default_value = "jpg")]
    ext: String,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    /// Images per batch (each runs twice with the flip test) [default: 8 on the CPU, where
    /// small batches keep the activations in cache; 256 on a GPU].
    #[arg(long)]
    batch: Option<usize>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the ROC curve (`.svg` or `.png`).
    #[arg(long)]
    roc: Option<PathBuf>,
    /// Store the mean exact-protocol threshold in the model's metadata (`mfn.threshold`),
    /// where `mfn-cli verify` finds it. Needs a native `.safetensors` model.
    #[arg(long)]
    save_threshold: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    // The pairs are read and checked before the model is loaded.
    let input = match &args.bin {
        Some(path) => VerificationSet::bin(path, args.folds.unwrap_or(10))
            .context("reading the verification set")?,
        None => {
            let path = asset_or(args.pairs.clone(), "lfw/pairs.txt", "--pairs")?;
            let root = asset_or(args.images.clone(), "lfw/aligned-112x112", "--images")?;
            VerificationSet::pairs(&path, &root, &args.ext)
                .with_context(|| format!("reading {} and its images", path.display()))?
        }
    };
    let device = args.run.open()?;
    let batch = match (args.batch, args.run.device) {
        (Some(0), _) => anyhow::bail!("--batch takes a positive number"),
        (Some(b), _) => b,
        (None, DeviceKind::Cpu) => 8,
        (None, DeviceKind::Cuda) => 256,
    };
    let (mut ckpt, model) =
        load_model_on(args.model.clone(), None, &device, args.run.dtype.dtype())?;
    if args.save_threshold
        && ckpt.source.extension().and_then(|e| e.to_str()) != Some("safetensors")
    {
        anyhow::bail!(
            "--save-threshold writes into a native model: convert {} with `mfn-cli convert` first",
            ckpt.source.display()
        );
    }
    let flip = !args.no_flip;
    let images = input.images();
    let bar = ProgressBar::new(images as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} embedding [{bar:40}] {pos}/{len} faces  {per_sec}  eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let start = Instant::now();
    // Batches are decoded on the CPU and moved to the device here, on this thread.
    let embeddings = input.embed(
        batch,
        image_size(model.config()),
        &Device::Cpu,
        |x| -> Result<_> { Ok(model.embed(&x.to_device(&device)?, flip)?) },
        |done| bar.set_position(done as u64),
    )?;
    let cosines = mfn_eval::pair_cosines(&embeddings, input.pair_index())?;
    let folds = input
        .folds()
        .context("the verification set has no folds")?
        .to_vec();
    let scores = PairScores::new(cosines, input.labels().to_vec(), folds)?;
    let source = input.source().to_path_buf();
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let report = mfn_eval::evaluate(&scores, &FARS)?;
    let faces_per_second = images as f64 / seconds;
    let model_name = ckpt.source.display().to_string();

    print_table(
        &model_name,
        &report,
        images,
        flip,
        seconds,
        faces_per_second,
    );

    if let Some(path) = &args.json {
        let out = report_json(
            &model_name,
            &report,
            flip,
            images,
            seconds,
            faces_per_second,
        );
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.save_threshold {
        let t = report.exact.mean_threshold_cosine;
        ckpt.metadata.insert(THRESHOLD_KEY.into(), format!("{t}"));
        ckpt.metadata.insert(
            format!("{THRESHOLD_KEY}.source"),
            format!(
                "mean of the {} exact-protocol fold thresholds on {} ({} pairs), flip test {}",
                report.folds,
                source.display(),
                report.pairs,
                if flip { "on" } else { "off" }
            ),
        );
        let path = ckpt.source.clone();
        ckpt.save(&path)
            .with_context(|| format!("storing the threshold in {}", path.display()))?;
        println!("stored threshold {t:.4} in {}", path.display());
    }
    if let Some(path) = &args.roc {
        let curve = mfn_eval::roc(&scores.scores, &scores.labels)?;
        let title = format!(
            "{} on {} ({} pairs)",
            ckpt.config.name,
            source.display(),
            report.pairs
        );
        mfn_eval::plot_roc(&curve, path, &title)?;
    }
    Ok(())
}

fn protocol_json(k: &KFoldReport) -> Value {
    json!({
        "mean": k.mean,
        "std": k.std,
        "folds": k.folds.iter().map(|f| f.accuracy).collect::<Vec<_>>(),
        "thresholds": k.folds.iter().map(|f| f.threshold).collect::<Vec<_>>(),
        "thresholds_cosine": k.folds.iter().map(|f| f.threshold_cosine).collect::<Vec<_>>(),
        "mean_threshold_cosine": k.mean_threshold_cosine,
    })
}

fn report_json(
    model: &str,
    r: &Report,
    flip: bool,
    images: usize,
    seconds: f64,
    faces_per_second: f64,
) -> Value {
    let tar: serde_json::Map<String, Value> = r
        .tar_at_far
        .iter()
        .map(|t| (format!("{}", t.far), json!(t.tar)))
        .collect();
    json!({
        "model": model,
        "pairs": r.pairs,
        "folds": r.folds,
        "positives": r.positives,
        "negatives": r.negatives,
        "flip": flip,
        "accuracy": {
            "insightface": protocol_json(&r.insightface),
            "exact": protocol_json(&r.exact),
        },
        "auc": r.auc,
        "eer": r.eer,
        "eer_threshold": r.eer_threshold,
        "tar_at_far": tar,
        "tar_at_far_detail": r.tar_at_far,
        "images": images,
        "seconds": seconds,
        "faces_per_second": faces_per_second,
    })
}

fn print_table(
    model: &str,
    r: &Report,
    images: usize,
    flip: bool,
    seconds: f64,
    faces_per_second: f64,
) {
    println!("model      {model}");
    println!(
        "pairs      {} in {} folds ({} same, {} different), {} images, flip test {}",
        r.pairs,
        r.folds,
        r.positives,
        r.negatives,
        images,
        if flip { "on" } else { "off" }
    );
    println!();
    println!("protocol       accuracy     std   threshold (cosine)");
    for (name, k) in [("insightface", &r.insightface), ("exact", &r.exact)] {
        println!(
            "{name:<12} {:>9.3}% {:>6.3}%   {:.4}",
            k.mean * 100.0,
            k.std * 100.0,
            k.mean_threshold_cosine
        );
    }
    println!();
    println!(
        "AUC {:.5}   EER {:.3}% (cosine {:.4})",
        r.auc,
        r.eer * 100.0,
        r.eer_threshold
    );
    for t in &r.tar_at_far {
        println!(
            "TAR@FAR={:<6} {:>8.3}%   ({} false accepts of {} negatives, cosine {:.4})",
            t.far,
            t.tar * 100.0,
            t.false_accepts,
            t.negatives,
            t.threshold
        );
    }
    println!();
    println!("wall {seconds:.1} s, {faces_per_second:.1} faces/s");
}
