//! Decoding image files into RGB `f32` NCHW tensors, in parallel.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::{Error, Result};

/// Decodes an image file (JPEG, PNG, BMP, WebP; grayscale and RGBA are converted) to RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if is_truncated_jpeg(&bytes) {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            message: "truncated JPEG: no end-of-image marker after the image data".into(),
        });
    }
    let img = image::load_from_memory(&bytes).map_err(|e| Error::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// JPEG decoders fill in whatever a cut-off file lacks and report success, which would give
/// a silently wrong face. Entropy-coded data never holds `FF D9` (a literal `FF` is stuffed
/// as `FF 00`), so a complete file has an end-of-image marker after its last start-of-scan.
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi < sos,
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

/// Writes an RGB image into `out` as planar CHW `f32` in `0..=255`.
pub fn rgb_to_chw(img: &RgbImage, out: &mut [f32]) {
    let plane = (img.width() * img.height()) as usize;
    debug_assert_eq!(out.len(), 3 * plane);
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.pixels().enumerate() {
        r[i] = p[0] as f32;
        g[i] = p[1] as f32;
        b[i] = p[2] as f32;
    }
}

/// Decodes images in parallel into one `[N, 3, H, W]` tensor of RGB pixels in `0..=255`.
///
/// Every image must be `size` (width x height) already: faces for a recognition network
/// are aligned crops, and resizing one silently would change its embedding. All files are
/// tried; the first failure in path order is returned.
pub fn load_batch(paths: &[PathBuf], size: [usize; 2], device: &Device) -> Result<Tensor> {
    let [w, h] = size;
    let per_image = 3 * w * h;
    let mut data = vec![0f32; paths.len() * per_image];
    data.par_chunks_mut(per_image)
        .zip(paths.par_iter())
        .map(|(out, path)| {
            let img = decode_rgb(path)?;
            let found = [img.width() as usize, img.height() as usize];
            if found != size {
                return Err(Error::ImageSize {
                    path: path.clone(),
                    expected: size,
                    found,
                });
            }
            rgb_to_chw(&img, out);
            Ok(())
        })
        .collect::<Vec<Result<()>>>()
        .into_iter()
        .collect::<Result<()>>()?;
    Ok(Tensor::from_vec(data, (paths.len(), 3, h, w), device)?)
}

/// Every path in `paths` that is not a file, so that a run can fail before it starts and
/// name all of them at once.
pub fn missing_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.par_iter().filter(|p| !p.is_file()).cloned().collect()
}
