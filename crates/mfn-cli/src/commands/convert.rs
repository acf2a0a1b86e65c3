//! `mfn-cli convert`: any supported checkpoint to the native safetensors format.

use std::path::PathBuf;

use anyhow::Result;

use super::{args, check_output, load_model, write_atomic_with, THRESHOLD_KEY};

/// Arguments of `mfn-cli convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source checkpoint: an MXNet `*-symbol.json` (its `.params` beside it), an `.onnx`
    /// model, a PyTorch `.pt`/`.pth` state dict or a native file.
    input: PathBuf,
    /// The native `.safetensors` file to write.
    #[arg(value_parser = args::safetensors_file)]
    output: PathBuf,
    /// Config preset the source graph is checked against (`paper`, `y1`, `mbf`,
    /// `mbf_large`, `foamliu`) [default: `y1` for MXNet; for ONNX and PyTorch, the preset
    /// the weights match].
    #[arg(long)]
    preset: Option<String>,
    /// Verification threshold (a cosine) to store in the model's metadata; `mfn-cli eval
    /// --save-threshold` measures one on LFW instead. A cosine in -1..=1.
    #[arg(long, allow_negative_numbers = true, value_parser = args::cosine)]
    threshold: Option<f64>,
    /// Input normalisation to store, for weights whose file does not carry it (an ONNX
    /// graph without a leading Sub/Mul, a state dict): `mxnet` (x - 127.5) / 128, `torch`
    /// (x - 127.5) / 127.5, `imagenet`, `none`, or `MEAN,SCALE` for (x - MEAN) * SCALE
    /// [default: what the file or the preset says].
    #[arg(long, value_parser = parse_norm)]
    input_norm: Option<mfn_model::InputNorm>,
}

fn parse_norm(text: &str) -> Result<mfn_model::InputNorm, String> {
    mfn_model::InputNorm::parse(text).ok_or_else(|| {
        format!(
            "expected one of {} or MEAN,SCALE with a non-zero SCALE",
            mfn_model::InputNorm::NAMES.join(", ")
        )
    })
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    check_output(&args.output, "OUTPUT")?;
    // Building the network proves the weights fit the config before anything is written.
    let (mut ckpt, _model) = load_model(Some(args.input.clone()), args.preset.as_deref())?;
    if let Some(t) = args.threshold {
        ckpt.metadata.insert(THRESHOLD_KEY.into(), format!("{t}"));
        ckpt.metadata.insert(
            format!("{THRESHOLD_KEY}.source"),
            "given to mfn-cli convert".into(),
        );
    }
    if let Some(norm) = args.input_norm {
        ckpt.config.input_norm = norm;
    }
    write_atomic_with(&args.output, |tmp| ckpt.save(tmp))?;
    let c = ckpt.config.complexity();
    println!(
        "wrote {} ({} tensors, {} parameters, {:.1}M MACs, config `{}`)",
        args.output.display(),
        ckpt.tensors.len(),
        c.params,
        c.macs as f64 / 1e6,
        ckpt.config.name
    );
    Ok(())
}
