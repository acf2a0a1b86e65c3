//! `mfn-cli align`: photos in, aligned face crops out, in the same folder layout.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use mfn_data::align::{align, read_landmarks_file, Landmarks};
use serde_json::json;

use super::{
    args, check_output, progress, template_for, write_atomic, write_atomic_with, DetectorArgs,
    PickArg,
};

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
    /// Folder for the crops. Each photo's path below --root is kept, with the extension
    /// `.png` (`Name/Name_0001.jpg` -> `OUT/Name/Name_0001.png`; with `--pick all`,
    /// `Name_0001_<k>.png`), so `eval --images OUT --ext png` reads the output as it is.
    #[arg(long)]
    out: PathBuf,
    /// The folder the photos' paths are taken relative to [default: the deepest folder
    /// that holds them all].
    #[arg(long)]
    root: Option<PathBuf>,
    /// Also write, as JSON, each crop's photo, face (box, score, landmarks), the rule that
    /// picked it and the alignment's residual.
    #[arg(long)]
    json: Option<PathBuf>,
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

/// The photos' paths below their root: `--root`, or the deepest folder holding them all.
/// Paths are compared as written, made absolute against the working folder, without
/// following links.
fn relative_paths(images: &[PathBuf], root: Option<&Path>) -> Result<Vec<PathBuf>> {
    let abs = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("{}: cannot make it absolute", p.display()))
    };
    let images: Vec<PathBuf> = images.iter().map(|p| abs(p)).collect::<Result<_>>()?;
    let root = match root {
        Some(r) => abs(r)?,
        None => {
            let mut common: Vec<Component> = images[0]
                .parent()
                .map(|p| p.components().collect())
                .unwrap_or_default();
            for p in &images[1..] {
                let parent: Vec<Component> = p
                    .parent()
                    .map(|p| p.components().collect())
                    .unwrap_or_default();
                let same = common
                    .iter()
                    .zip(&parent)
                    .take_while(|(a, b)| a == b)
                    .count();
                common.truncate(same);
            }
            common.iter().collect()
        }
    };
    let mut seen = HashSet::new();
    images
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).map_err(|_| {
                anyhow::anyhow!("{}: not inside --root {}", p.display(), root.display())
            })?;
            if rel.components().any(|c| !matches!(c, Component::Normal(_)))
                || rel.as_os_str().is_empty()
            {
                bail!(
                    "{}: its path below {} climbs out of it",
                    p.display(),
                    root.display()
                );
            }
            if !seen.insert(rel.to_path_buf()) {
                bail!("{}: given twice", p.display());
            }
            Ok(rel.to_path_buf())
        })
        .collect()
}

/// `OUT/<rel with extension png>`, or `..._<k>.png` for one of several faces.
fn crop_path(out: &Path, rel: &Path, face: Option<usize>) -> PathBuf {
    let stem = rel
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match face {
        Some(k) => format!("{stem}_{k}.png"),
        None => format!("{stem}.png"),
    };
    out.join(rel).with_file_name(name)
}

/// Writes a crop, creating its folder.
fn write_crop(path: &Path, crop: &mfn_data::align::Aligned) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_atomic_with(path, |tmp| crop.image.save(tmp))
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.json {
        check_output(path, "--json")?;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    mfn_train::atomic::check_writable(&args.out)
        .with_context(|| format!("--out {}: cannot create files there", args.out.display()))?;
    let rels = relative_paths(&args.images, args.root.as_deref())?;
    let bar = progress(args.images.len(), "aligning");
    let mut report = Vec::new();
    if let Some(file) = &args.landmarks {
        let table: HashMap<PathBuf, Landmarks> = read_landmarks_file(file)?.into_iter().collect();
        let template = template_for(args.size)?;
        for (image, rel) in args.images.iter().zip(&rels) {
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
            let out = crop_path(&args.out, rel, None);
            write_crop(&out, &a)?;
            bar.suspend(|| {
                println!(
                    "{}\t{}\tresidual {:.2}px",
                    image.display(),
                    out.display(),
                    a.residual
                )
            });
            report.push(json!({
                "photo": image.display().to_string(),
                "crop": out.display().to_string(),
                "landmarks": points,
                "residual": a.residual,
            }));
            bar.inc(1);
        }
    } else {
        let aligner = args.detector.aligner(args.size)?;
        let all = args.detector.pick == PickArg::All;
        for (image, rel) in args.images.iter().zip(&rels) {
            let faces = aligner.faces_in_file(image)?;
            if faces.is_empty() {
                bail!("{}: no face found", image.display());
            }
            for (k, f) in faces.iter().enumerate() {
                let out = crop_path(&args.out, rel, all.then_some(k));
                write_crop(&out, &f.aligned)?;
                bar.suspend(|| {
                    println!(
                        "{}\t{}\tscore {:.3}\tresidual {:.2}px",
                        image.display(),
                        out.display(),
                        f.face.score,
                        f.aligned.residual
                    )
                });
                report.push(json!({
                    "photo": image.display().to_string(),
                    "crop": out.display().to_string(),
                    "face": k,
                    "picked_by": f.picked_by.name(),
                    "detector": aligner.detector().name(),
                    "bbox": f.face.bbox,
                    "score": f.face.score,
                    "landmarks": f.face.landmarks,
                    "residual": f.aligned.residual,
                }));
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&json!({ "crops": report }))?;
        write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn photos_keep_their_folders_below_the_common_root() {
        let images = [
            PathBuf::from("/d/lfw/a/a_0001.jpg"),
            PathBuf::from("/d/lfw/b/a_0001.jpg"),
        ];
        let rels = relative_paths(&images, None).unwrap();
        assert_eq!(
            rels,
            [PathBuf::from("a/a_0001.jpg"), PathBuf::from("b/a_0001.jpg")]
        );
        let out = Path::new("/o");
        assert_eq!(crop_path(out, &rels[0], None), Path::new("/o/a/a_0001.png"));
        assert_eq!(
            crop_path(out, &rels[1], Some(2)),
            Path::new("/o/b/a_0001_2.png")
        );
        // One photo: its own folder is the root.
        let one = relative_paths(&images[..1], None).unwrap();
        assert_eq!(one, [PathBuf::from("a_0001.jpg")]);
        let rooted = relative_paths(&images[..1], Some(Path::new("/d"))).unwrap();
        assert_eq!(rooted, [PathBuf::from("lfw/a/a_0001.jpg")]);
        assert!(relative_paths(&images[..1], Some(Path::new("/elsewhere"))).is_err());
        assert!(relative_paths(&[images[0].clone(), images[0].clone()], None).is_err());
    }
}
