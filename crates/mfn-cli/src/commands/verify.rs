//! `mfn-cli verify`: do two photos show the same person?

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use mfn_data::face::{images_to_tensor, Pick};
use serde_json::json;

use super::{args, check_output, hub, image_size, load_model, write_atomic, DetectorArgs};

/// Arguments of `mfn-cli verify`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a file (native `.safetensors`, MXNet `*-symbol.json`, `.onnx`, `.pt`) or a
    /// registry name [default: w600k_mbf].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Cosine threshold; "same" when the cosine is at least this [default: the model's
    /// `mfn.threshold` metadata, else the registry's threshold for its weights]; a cosine
    /// in -1..=1.
    #[arg(long, allow_negative_numbers = true, value_parser = args::cosine)]
    threshold: Option<f64>,
    /// The photos are already aligned crops at the model's input size: skip detection.
    #[arg(long)]
    aligned: bool,
    /// Embed each face alone, without adding its mirror image.
    #[arg(long)]
    no_flip: bool,
    /// Also write the decision as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    detector: DetectorArgs,
    /// First photo.
    a: PathBuf,
    /// Second photo.
    b: PathBuf,
}

/// Runs the command; `Ok(true)` when both photos show the same person.
pub fn run(args: Args) -> Result<bool> {
    if let Some(path) = &args.json {
        check_output(path, "--json")?;
    }
    let (ckpt, model) = load_model(args.model.clone(), None)?;
    let (threshold, from, derivation) = match args.threshold {
        Some(t) => (
            t,
            "--threshold".to_string(),
            "given on the command line".to_string(),
        ),
        None => match mfn_hub::find_threshold(&hub()?.registry, &ckpt)? {
            Some(t) => {
                // A registry model's converted copy carries the entry's threshold.
                let registry_entry = t
                    .derivation
                    .strip_prefix("registry entry `")
                    .and_then(|r| r.split_once('`'))
                    .map(|(name, _)| name.to_string());
                let from = match (&t.origin, registry_entry) {
                    (mfn_hub::ThresholdOrigin::Registry { entry }, _) => {
                        format!("registry entry `{entry}`")
                    }
                    (mfn_hub::ThresholdOrigin::Metadata, Some(entry)) => {
                        format!("registry entry `{entry}`")
                    }
                    (mfn_hub::ThresholdOrigin::Metadata, None) => {
                        format!("the metadata of {}", ckpt.source.display())
                    }
                };
                (t.cosine, from, t.derivation)
            }
            None => bail!(
                "{} has no verification threshold: neither its metadata nor the registry \
                 (by the sha256 of its weights) gives one. Pass --threshold, or measure one \
                 with `mfn-cli convert` then `mfn-cli eval --model MODEL.safetensors \
                 --save-threshold`",
                ckpt.source.display()
            ),
        },
    };
    eprintln!("threshold {threshold:.4} from {from}");
    let size = image_size(model.config()).map(|v| v as u32);
    let crops = if args.aligned {
        // Crops at the network's input size; another size is an error naming the file.
        let size = image_size(model.config());
        vec![
            mfn_data::decode_rgb_sized(&args.a, size)?,
            mfn_data::decode_rgb_sized(&args.b, size)?,
        ]
    } else {
        let aligner = args.detector.aligner(size)?;
        let mut crops = Vec::new();
        for photo in [&args.a, &args.b] {
            let face = aligner.faces_in_file(photo, Pick::Largest)?.remove(0);
            crops.push(face.aligned.image);
        }
        crops
    };
    let x = images_to_tensor(&[&crops[0], &crops[1]], &Device::Cpu)?;
    let e: Vec<Vec<f32>> = model.embed(&x, !args.no_flip)?.to_vec2()?;
    let cosine = mfn_eval::cosine(&e[0], &e[1])?;
    let same = cosine >= threshold;
    if same {
        println!("same person: yes  (cosine {cosine:.2} ≥ threshold {threshold:.2})");
    } else {
        println!("same person: no   (cosine {cosine:.2} < threshold {threshold:.2})");
    }
    if let Some(path) = &args.json {
        let out = json!({
            "model": ckpt.source.display().to_string(),
            "a": args.a.display().to_string(),
            "b": args.b.display().to_string(),
            "cosine": cosine,
            "threshold": threshold,
            "threshold_source": from,
            "threshold_derivation": derivation,
            "same": same,
        });
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    Ok(same)
}
