//! `mfn-cli align`: photos in, aligned face crops out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mfn_data::align::{align, read_landmarks_file, Landmarks};
use mfn_data::face::Pick;

use super::{args, template_for, write_atomic_with, DetectorArgs};

/// Arguments of `mfn-cli align`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Landmarks file (`path` then 10 integers per line, tab-separated); photos are matched
    /// by the end of their path. Without it, faces are detected.
    #[arg(long)]
    landmarks: Option<PathBuf>,
    /// Crop size, WIDTHxHEIGHT: 112x112 (ArcFace layout) or 96x112 (SphereFace layout);
    /// each side 16..=1024.
    #[arg(long, default_value = "112x112", value_parser = args::crop_size)]
    size: [u32; 2],
    /// Keep every detected face, not only the largest.
    #[arg(long)]
    all: bool,
    /// Folder for the crops (`<photo stem>.png`, or `<stem>_<k>.png` with --all).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    detector: DetectorArgs,
    /// Photos.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

fn find_landmarks<'a>(
    table: &'a HashMap<PathBuf, Landmarks>,
    image: &Path,
) -> Option<&'a Landmarks> {
    table
        .iter()
        .find(|(rel, _)| image.ends_with(rel))
        .map(|(_, l)| l)
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    mfn_train::atomic::check_writable(&args.out)
        .with_context(|| format!("--out {}: cannot create files there", args.out.display()))?;
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if let Some(file) = &args.landmarks {
        let table: HashMap<PathBuf, Landmarks> = read_landmarks_file(file)?.into_iter().collect();
        let template = template_for(args.size)?;
        for image in &args.images {
            let Some(points) = find_landmarks(&table, image) else {
                bail!(
                    "{}: no landmarks for it in {}",
                    image.display(),
                    file.display()
                );
            };
            let photo = mfn_data::decode_rgb(image)?;
            let a = align(&photo, points, &template, args.size)
                .with_context(|| format!("aligning {}", image.display()))?;
            let out = args.out.join(format!("{}.png", stem(image)));
            write_atomic_with(&out, |tmp| a.image.save(tmp))?;
            println!(
                "{}\t{}\tresidual {:.2}px",
                image.display(),
                out.display(),
                a.residual
            );
        }
        return Ok(());
    }
    let aligner = args.detector.aligner(args.size)?;
    let pick = if args.all { Pick::All } else { Pick::Largest };
    for image in &args.images {
        let faces = aligner.faces_in_file(image, pick)?;
        for (k, f) in faces.iter().enumerate() {
            let name = if args.all {
                format!("{}_{k}.png", stem(image))
            } else {
                format!("{}.png", stem(image))
            };
            let out = args.out.join(name);
            write_atomic_with(&out, |tmp| f.aligned.image.save(tmp))?;
            println!(
                "{}\t{}\tscore {:.3}\tresidual {:.2}px",
                image.display(),
                out.display(),
                f.detection.score,
                f.aligned.residual
            );
        }
    }
    Ok(())
}
