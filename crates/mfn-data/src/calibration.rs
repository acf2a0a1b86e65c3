//! Calibration faces for int8 quantisation ([`mfn_model::quant`]): which faces of a folder
//! are used, and the calibration run over them.
//!
//! The choice is a fixed rule, so that another tool (ONNX Runtime's `quantize_static` in
//! the project's benchmarks) calibrates on exactly the same faces: every `.jpg`, `.jpeg`
//! or `.png` file (any case) under the folder, sorted by its path relative to the folder
//! with `/` separators compared as bytes, and of those the `n` evenly spaced ones at
//! indices `floor(i * len / n)`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use mfn_model::quant::{Calibrator, Int8, QuantizeOptions};
use mfn_model::MobileFaceNet;

use crate::{Error, Result};

/// Deepest folder level searched below the calibration folder: aligned-face folders are
/// one level (one folder per person) or flat; a deeper tree is someone else's.
pub const MAX_DEPTH: usize = 8;
/// Most image files a calibration folder may list; the listing is held in memory.
pub const MAX_FILES: usize = 10_000_000;
/// Faces per calibration batch.
const BATCH: usize = 32;

fn is_face_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

/// The `n` calibration faces of `dir` by the rule above (all of them when it holds `n` or
/// fewer). Symbolic links to folders are not followed. An empty folder, one deeper than
/// [`MAX_DEPTH`] or with more than [`MAX_FILES`] images is an error naming it.
pub fn calibration_faces(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let bad = |message: String| Error::ImageFolder {
        path: dir.to_path_buf(),
        message,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    if n == 0 {
        return Err(bad("asked for 0 calibration faces".into()));
    }
    let mut found: Vec<(Vec<u8>, PathBuf)> = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((folder, rel, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&folder).map_err(io(&folder))? {
            let entry = entry.map_err(io(&folder))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    return Err(bad(format!(
                        "`{rel}` is more than {MAX_DEPTH} folders deep"
                    )));
                }
                stack.push((path, rel, depth + 1));
            } else if is_face_file(&path) && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                if found.len() == MAX_FILES {
                    return Err(bad(format!("more than {MAX_FILES} images")));
                }
                found.push((rel.into_bytes(), path));
            }
        }
    }
    if found.is_empty() {
        return Err(bad(
            "no .jpg, .jpeg or .png files to calibrate on".to_string()
        ));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let len = found.len();
    if len <= n {
        return Ok(found.into_iter().map(|(_, p)| p).collect());
    }
    Ok((0..n)
        .map(|i| {
            found[(i as u128 * len as u128 / n as u128) as usize]
                .1
                .clone()
        })
        .collect())
}

/// Calibrates `model` on `n` faces of `dir` (see [`calibration_faces`]; each must be the
/// model's input size) and returns its int8 half. `progress` sees the faces done and the
/// total after each batch.
pub fn calibrate(
    model: &MobileFaceNet,
    dir: &Path,
    n: usize,
    options: QuantizeOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Int8> {
    let faces = calibration_faces(dir, n)?;
    let [h, w] = model.config().input_size;
    let mut calibrator = Calibrator::new(model);
    for (b, chunk) in faces.chunks(BATCH).enumerate() {
        let batch = crate::load_batch(chunk, [w, h], &Device::Cpu)?;
        calibrator.observe(&batch)?;
        progress((b * BATCH + chunk.len()).min(faces.len()), faces.len());
    }
    let source = format!("{} faces of {}", faces.len(), dir.display());
    Ok(calibrator.finish(options, &source)?)
}

/// `model` with its matrix products in int8, calibrated on `n` faces of `dir` (any int8
/// half it had is dropped first, so the ranges are the f32 network's), and that int8 half,
/// for saving with [`mfn_model::Checkpoint::int8`].
pub fn quantize(
    model: &MobileFaceNet,
    dir: &Path,
    n: usize,
    options: QuantizeOptions,
    progress: impl FnMut(usize, usize),
) -> Result<(MobileFaceNet, Int8)> {
    let f32_model = model.dequantized()?;
    let int8 = calibrate(&f32_model, dir, n, options, progress)?;
    Ok((f32_model.quantized(&int8)?, int8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faces_are_picked_by_the_documented_rule() {
        let dir = tempfile::tempdir().unwrap();
        for (who, n) in [("b", 3), ("a", 2), ("C", 1)] {
            std::fs::create_dir(dir.path().join(who)).unwrap();
            for i in 0..n {
                std::fs::write(dir.path().join(who).join(format!("{who}_{i}.JPG")), b"x").unwrap();
            }
        }
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let rel = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| {
                    p.strip_prefix(dir.path())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        // Sorted as bytes: "C/..." before "a/..." before "b/...".
        let all = rel(calibration_faces(dir.path(), 10).unwrap());
        assert_eq!(
            all,
            [
                "C/C_0.JPG",
                "a/a_0.JPG",
                "a/a_1.JPG",
                "b/b_0.JPG",
                "b/b_1.JPG",
                "b/b_2.JPG"
            ]
        );
        // floor(i * 6 / 4) = 0, 1, 3, 4.
        let some = rel(calibration_faces(dir.path(), 4).unwrap());
        assert_eq!(some, ["C/C_0.JPG", "a/a_0.JPG", "b/b_0.JPG", "b/b_1.JPG"]);
        let empty = tempfile::tempdir().unwrap();
        let err = calibration_faces(empty.path(), 4).unwrap_err().to_string();
        assert!(err.contains("no .jpg"), "{err}");
        assert!(calibration_faces(dir.path(), 0).is_err());
    }
}
