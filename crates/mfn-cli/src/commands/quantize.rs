//! `mfn-cli quantize`: a model's int8 half, calibrated on aligned faces, written into the
//! native format beside its f32 weights.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mfn_model::quant::{QuantizeOptions, DEFAULT_CALIBRATION_IMAGES};

use super::{args, check_output, load_model, progress, write_atomic_with};

/// Arguments of `mfn-cli quantize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to quantise: a file (native, MXNet, ONNX, PyTorch) or a registry name.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder of aligned faces at the model's input size (searched recursively: `.jpg`,
    /// `.jpeg`, `.png`).
    #[arg(long, value_name = "DIR")]
    calib: PathBuf,
    /// How many faces of the folder to calibrate on, evenly spaced in path order.
    #[arg(long, default_value_t = DEFAULT_CALIBRATION_IMAGES, value_parser = args::count(1, 1_000_000))]
    images: usize,
    /// Keep the embedding layer in f32.
    #[arg(long)]
    f32_head: bool,
    /// The native `.safetensors` file to write.
    #[arg(long, value_parser = args::safetensors_file)]
    out: PathBuf,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    check_output(&args.out, "--out")?;
    let (mut ckpt, model) = load_model(args.model.clone(), None)?;
    let bar = progress(args.images, "calibrating");
    let int8 = mfn_data::calibration::calibrate(
        &model.dequantized()?,
        &args.calib,
        args.images,
        QuantizeOptions {
            head: !args.f32_head,
        },
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| format!("calibrating on {}", args.calib.display()))?;
    bar.finish_and_clear();
    let layers = int8.layers.len();
    let images = int8.calibration.images;
    ckpt.int8 = Some(int8);
    write_atomic_with(&args.out, |tmp| ckpt.save(tmp))?;
    println!(
        "wrote {} ({layers} int8 layers, calibrated on {images} faces of {})",
        args.out.display(),
        args.calib.display()
    );
    Ok(())
}
