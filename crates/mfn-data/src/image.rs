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
    decode_rgb_bytes(&bytes, path)
}

/// Decodes an encoded image held in memory (a member of a `.bin` set, say) to RGB, with
/// the same formats and checks as [`decode_rgb`]. `name` stands for the image in errors:
/// a file, or a [`member_name`].
pub fn decode_rgb_bytes(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    if is_truncated_jpeg(bytes) {
        return Err(Error::Decode {
            path: name.to_path_buf(),
            message: "truncated JPEG: no end-of-image marker after the image data".into(),
        });
    }
    let img = image::load_from_memory(bytes).map_err(|e| Error::Decode {
        path: name.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// How errors name image `index` (0-based) inside a container file such as a `.bin` set.
pub fn member_name(container: &Path, index: usize) -> PathBuf {
    PathBuf::from(format!("{}, image {index}", container.display()))
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
    decode_batch(
        paths.len(),
        size,
        device,
        |i| decode_rgb(&paths[i]),
        |i| paths[i].clone(),
    )
}

/// [`load_batch`] for encoded images held in memory: `images` are members `first..` of
/// `container`, which names them in errors (see [`member_name`]).
pub fn load_batch_encoded<B: AsRef<[u8]> + Sync>(
    images: &[B],
    first: usize,
    container: &Path,
    size: [usize; 2],
    device: &Device,
) -> Result<Tensor> {
    let name = |i: usize| member_name(container, first + i);
    decode_batch(
        images.len(),
        size,
        device,
        |i| decode_rgb_bytes(images[i].as_ref(), &name(i)),
        name,
    )
}

/// Decodes `n` images in parallel into one tensor; `decode(i)` gives image `i`, `name(i)`
/// names it in a size error.
fn decode_batch(
    n: usize,
    size: [usize; 2],
    device: &Device,
    decode: impl Fn(usize) -> Result<RgbImage> + Sync,
    name: impl Fn(usize) -> PathBuf + Sync,
) -> Result<Tensor> {
    let [w, h] = size;
    let per_image = 3 * w * h;
    let check = |i: usize, img: &RgbImage| {
        let found = [img.width() as usize, img.height() as usize];
        if found == size {
            Ok(())
        } else {
            Err(Error::ImageSize {
                path: name(i),
                expected: size,
                found,
            })
        }
    };
    if per_image == 0 && n > 0 {
        // Zero-pixel chunks cannot split the buffer below; no decodable image is that small,
        // so the first one gives the size error.
        check(0, &decode(0)?)?;
    }
    let mut data = vec![0f32; n * per_image];
    data.par_chunks_mut(per_image.max(1))
        .enumerate()
        .map(|(i, out)| {
            let img = decode(i)?;
            check(i, &img)?;
            rgb_to_chw(&img, out);
            Ok(())
        })
        .collect::<Vec<Result<()>>>()
        .into_iter()
        .collect::<Result<()>>()?;
    Ok(Tensor::from_vec(data, (n, 3, h, w), device)?)
}

/// Every path in `paths` that is not a file, so that a run can fail before it starts and
/// name all of them at once.
pub fn missing_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.par_iter().filter(|p| !p.is_file()).cloned().collect()
}
