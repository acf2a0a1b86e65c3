//! `mfn-cli pack-bin`: a pair list and its image folder packed as an insightface `.bin`
//! verification set.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mfn_data::{BinSet, Pairs};

/// Arguments of `mfn-cli pack-bin`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Pair list in the LFW `pairs.txt` format.
    #[arg(long)]
    pairs: PathBuf,
    /// Folder of aligned faces, `<Name>/<Name>_<NNNN>.<ext>`.
    #[arg(long)]
    images: PathBuf,
    /// Extension of the image files.
    #[arg(long, default_value = "jpg")]
    ext: String,
    /// The `.bin` file to write.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let pairs = Pairs::read(&args.pairs)?;
    let set = BinSet::from_pairs(&pairs, &args.images, &args.ext)
        .with_context(|| format!("packing the images that {} names", args.pairs.display()))?;
    set.write(&args.out)?;
    let bytes: usize = set.images.iter().map(Vec::len).sum();
    println!(
        "wrote {}: {} pairs ({} same), {} images, {bytes} bytes of image data",
        args.out.display(),
        set.pairs(),
        set.issame.iter().filter(|&&s| s).count(),
        set.images.len(),
    );
    Ok(())
}
