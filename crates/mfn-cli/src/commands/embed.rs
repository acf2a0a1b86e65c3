//! `mfn-cli embed`: aligned face images in, embeddings out as JSON.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use serde_json::json;

use super::{args, check_output, image_size, progress, write_atomic, DetectorArgs, RunArgs};

/// Arguments of `mfn-cli embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a file (native `.safetensors`, MXNet `*-symbol.json`, `.onnx`, `.pt`) or a
    /// registry name [default: w600k_mbf].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the raw network output instead of unit-length embeddings.
    #[arg(long)]
    no_normalize: bool,
    /// Add the mirrored image's embedding (insightface's flip test); implies normalising.
    #[arg(long, conflicts_with = "no_normalize")]
    flip: bool,
    /// Images per batch (1..=1024).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true, value_parser = args::count(1, args::MAX_BATCH))]
    batch: usize,
    /// Write the JSON here instead of to standard output.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The images are photos: find, align and embed the face each is about (see --pick).
    #[arg(long)]
    detect: bool,
    #[command(flatten)]
    detector: DetectorArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Aligned face images at the model's input size (112x112 for the presets), or photos
    /// with --detect.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.json {
        check_output(path, "--json")?;
    }
    let (device, ckpt, model) = args.run.load(args.model.clone())?;
    let missing = mfn_data::missing_files(&args.images);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        anyhow::bail!(
            "{} image(s) not found:\n  {}",
            missing.len(),
            list.join("\n  ")
        );
    }
    if args.detect {
        return run_detect(&args, &ckpt, &model, &device);
    }
    let bar = progress(args.images.len(), "embedding");
    if args.images.len() <= args.batch {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Batches are decoded on the CPU and moved to the device here, on this thread.
    let rows = mfn_data::embed_images(
        &args.images,
        args.batch,
        image_size(model.config()),
        &Device::Cpu,
        |x| -> Result<_> {
            let x = x.to_device(&device)?;
            Ok(if args.no_normalize {
                model.forward(&x)?
            } else {
                model.embed(&x, args.flip)?
            })
        },
        |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    for (p, e) in args.images.iter().zip(&rows) {
        finite(e, p, &ckpt)?;
    }
    let images: Vec<_> = args
        .images
        .iter()
        .zip(rows)
        .map(|(p, e)| json!({"path": p.display().to_string(), "embedding": e}))
        .collect();
    write_output(&args, &ckpt, images)
}

/// `--detect`: photos in, one entry per face, through the library's pipeline with the
/// model already loaded.
fn run_detect(
    args: &Args,
    ckpt: &mfn_model::Checkpoint,
    model: &mfn_model::MobileFaceNet,
    device: &Device,
) -> Result<()> {
    let size = image_size(model.config()).map(|v| v as u32);
    let aligner = args.detector.aligner(size)?;
    let bar = progress(args.images.len(), "detecting and embedding");
    if args.images.len() < 4 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut entries = Vec::new();
    for path in &args.images {
        let faces = aligner.faces_in_file(path)?;
        if faces.is_empty() {
            anyhow::bail!("{}: no face found", path.display());
        }
        let crops: Vec<_> = faces.iter().map(|f| &f.aligned.image).collect();
        let x = mfn_data::images_to_tensor(&crops, &Device::Cpu)?.to_device(device)?;
        let e: Vec<Vec<f32>> = if args.no_normalize {
            model.forward(&x)?.to_vec2()?
        } else {
            model.embed(&x, args.flip)?.to_vec2()?
        };
        for (k, (f, e)) in faces.iter().zip(e).enumerate() {
            finite(&e, path, ckpt)?;
            entries.push(json!({
                "path": path.display().to_string(),
                "face": k,
                "picked_by": f.picked_by.name(),
                "detector": aligner.detector().name(),
                "bbox": f.face.bbox,
                "score": f.face.score,
                "landmarks": f.face.landmarks,
                "embedding": e,
            }));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_output(args, ckpt, entries)
}

/// Refuses an embedding that is not finite: finite weights with extreme values can still
/// overflow in the forward pass, and JSON would carry the result as `null`.
fn finite(e: &[f32], image: &std::path::Path, ckpt: &mfn_model::Checkpoint) -> Result<()> {
    if let Some(i) = e.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "{}: the embedding is not finite (value {i} is {}) under model {}: the model's \
             weights overflow on this input",
            image.display(),
            e[i],
            ckpt.source.display()
        );
    }
    Ok(())
}

fn write_output(
    args: &Args,
    ckpt: &mfn_model::Checkpoint,
    images: Vec<serde_json::Value>,
) -> Result<()> {
    let out = json!({
        "model": ckpt.source.display().to_string(),
        "normalized": !args.no_normalize,
        "flip": args.flip,
        "images": images,
    });
    let text = serde_json::to_string_pretty(&out)?;
    match &args.json {
        Some(path) => write_atomic(path, text.as_bytes())?,
        None => println!("{text}"),
    }
    Ok(())
}
