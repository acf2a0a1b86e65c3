//! `mfn-cli embed`: aligned face images in, embeddings out as JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::json;

use super::{image_size, load_model};

/// Arguments of `mfn-cli embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a native `.safetensors` file or an MXNet `*-symbol.json`
    /// [default: $MFN_ASSETS/models/mobilefacenet-y1/model-symbol.json].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the raw network output instead of unit-length embeddings.
    #[arg(long)]
    no_normalize: bool,
    /// Add the mirrored image's embedding (insightface's flip test); implies normalising.
    #[arg(long, conflicts_with = "no_normalize")]
    flip: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Write the JSON here instead of to standard output.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Aligned face images at the model's input size (112x112 for the presets).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let (ckpt, model) = load_model(args.model.clone(), None)?;
    let missing = mfn_data::missing_files(&args.images);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
        anyhow::bail!(
            "{} image(s) not found:\n  {}",
            missing.len(),
            list.join("\n  ")
        );
    }
    let rows = mfn_data::embed_images(
        &args.images,
        args.batch,
        image_size(model.config()),
        &Device::Cpu,
        |x| -> Result<_> {
            Ok(if args.no_normalize {
                model.forward(x)?
            } else {
                model.embed(x, args.flip)?
            })
        },
        |_| {},
    )?;
    let images: Vec<_> = args
        .images
        .iter()
        .zip(rows)
        .map(|(p, e)| json!({"path": p.display().to_string(), "embedding": e}))
        .collect();
    let out = json!({
        "model": ckpt.source.display().to_string(),
        "normalized": !args.no_normalize,
        "flip": args.flip,
        "images": images,
    });
    let text = serde_json::to_string_pretty(&out)?;
    match &args.json {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => println!("{text}"),
    }
    Ok(())
}
