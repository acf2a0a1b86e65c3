//! `mfn-cli convert`: any supported checkpoint to the native safetensors format.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::load_model;

/// Arguments of `mfn-cli convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source checkpoint: an MXNet `*-symbol.json` (its `.params` beside it) or a native file.
    input: PathBuf,
    /// The native `.safetensors` file to write.
    output: PathBuf,
    /// Config preset the source graph is checked against (`y1`, `paper`).
    #[arg(long, default_value = "y1")]
    preset: String,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    // Building the network proves the weights fit the config before anything is written.
    let (ckpt, _model) = load_model(Some(args.input.clone()), Some(&args.preset))?;
    ckpt.save(&args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
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
