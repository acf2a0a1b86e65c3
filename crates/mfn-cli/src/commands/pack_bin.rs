//! `mfn-cli pack-bin`: a pair list and its image folder packed as an insightface `.bin`
//! verification set.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mfn_data::{BinSet, Pairs};

use super::{args, check_output, progress, write_atomic};

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
    #[arg(long, default_value = "jpg", value_parser = args::extension)]
    ext: String,
    /// The `.bin` file to write; an existing one is replaced only once the new one is
    /// complete on disk.
    #[arg(long)]
    out: PathBuf,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    check_output(&args.out, "--out")?;
    let pairs = Pairs::read(&args.pairs)?;
    let bar = progress(2 * pairs.pairs.len(), "reading images");
    let set = BinSet::from_pairs_with_progress(&pairs, &args.images, &args.ext, |_| bar.inc(1))
        .with_context(|| format!("packing the images that {} names", args.pairs.display()))?;
    bar.finish_and_clear();
    set.validate(&args.out)?;
    write_atomic(&args.out, &set.to_pickle())?;
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
