//! `mfn-cli eval`: the LFW pair protocol on a model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use mfn_data::Pairs;
use mfn_eval::{KFoldReport, PairScores, Report};
use serde_json::{json, Value};

use super::{asset_or, image_size, load_model, THRESHOLD_KEY};

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
    /// Extension of the image files.
    #[arg(long, default_value = "jpg")]
    ext: String,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    /// Images per batch (each runs twice with the flip test). Small batches keep the
    /// activations in cache; large ones only add memory traffic on a CPU.
    #[arg(long, default_value_t = 8)]
    batch: usize,
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
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let pairs_path = asset_or(args.pairs.clone(), "lfw/pairs.txt", "--pairs")?;
    let root = asset_or(args.images.clone(), "lfw/aligned-112x112", "--images")?;
    let pairs = Pairs::read(&pairs_path)?;
    let (unique, index) = pairs.index();
    let paths: Vec<PathBuf> = unique.iter().map(|r| r.path(&root, &args.ext)).collect();
    let missing = mfn_data::missing_files(&paths);
    if !missing.is_empty() {
        return Err(mfn_data::Error::MissingImages {
            root: root.clone(),
            paths: missing,
        })
        .with_context(|| format!("checking the images that {} names", pairs_path.display()));
    }
    let (mut ckpt, model) = load_model(args.model.clone(), None)?;
    if args.save_threshold
        && ckpt.source.extension().and_then(|e| e.to_str()) != Some("safetensors")
    {
        anyhow::bail!(
            "--save-threshold writes into a native model: convert {} with `mfn-cli convert` first",
            ckpt.source.display()
        );
    }
    let flip = !args.no_flip;

    let bar = ProgressBar::new(paths.len() as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} embedding [{bar:40}] {pos}/{len} faces  {per_sec}  eta {eta}",
        )?
        .progress_chars("=> "),
    );
    let start = Instant::now();
    let embeddings = mfn_data::embed_images(
        &paths,
        args.batch,
        image_size(model.config()),
        &Device::Cpu,
        |x| -> Result<_> { Ok(model.embed(x, flip)?) },
        |done| bar.set_position(done as u64),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let scores = index
        .iter()
        .map(|[a, b]| mfn_eval::cosine(&embeddings[*a], &embeddings[*b]))
        .collect::<mfn_eval::Result<Vec<f64>>>()?;
    let scores = PairScores::new(scores, pairs.labels(), pairs.fold_ids())?;
    let report = mfn_eval::evaluate(&scores, &FARS)?;
    let faces_per_second = paths.len() as f64 / seconds;
    let model_name = ckpt.source.display().to_string();

    print_table(
        &model_name,
        &report,
        paths.len(),
        flip,
        seconds,
        faces_per_second,
    );

    if let Some(path) = &args.json {
        let out = report_json(
            &model_name,
            &report,
            flip,
            paths.len(),
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
                pairs_path.display(),
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
            pairs_path.display(),
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
