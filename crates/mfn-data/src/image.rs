//! Decoding image files into RGB `f32` NCHW tensors, in parallel.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{ImageReader, Limits, RgbImage};
use rayon::prelude::*;

use crate::error::tidy;
use crate::{Error, Result};

/// Widest and tallest image decoded: larger declared sizes are refused from the file's
/// header, before any pixel is allocated. A face photo is far smaller.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Most memory one decoded image may take, both as the decoder's buffer and as the RGB
/// image it becomes (`width * height * 3` bytes): 512 MiB, an RGB image of about 13,000 x
/// 13,000.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

/// Image files longer than this are refused before they are read: no image within
/// [`MAX_IMAGE_BYTES`] needs a bigger file, even stored uncompressed.
pub const MAX_IMAGE_FILE_BYTES: u64 = MAX_IMAGE_BYTES + (1 << 20);

/// Decodes an image file (JPEG, PNG, BMP, WebP; grayscale and RGBA are converted) to RGB.
///
/// Files over [`MAX_IMAGE_FILE_BYTES`], images wider or taller than [`MAX_IMAGE_SIDE`] and
/// images that would take more than [`MAX_IMAGE_BYTES`] are refused with an error that
/// names the file, before their pixels are allocated.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    // A file whose first bytes are no image format's is refused as soon as they are read.
    let mut sniffed = false;
    let sniff = |b: &[u8], _: usize| {
        if sniffed || b.len() < SNIFF_BYTES {
            return Ok(());
        }
        sniffed = true;
        match image::guess_format(&b[..SNIFF_BYTES]) {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::Decode {
                path: path.to_path_buf(),
                message: format!(
                    "not an image: its first bytes ({}) are no JPEG, PNG, BMP or WebP header",
                    hex(&b[..8])
                ),
            }),
        }
    };
    let bytes = crate::text::read_capped(path, MAX_IMAGE_FILE_BYTES, "image file", sniff)?;
    decode_rgb_bytes(&bytes, path)
}

/// How many bytes of a file tell its image format.
const SNIFF_BYTES: usize = 32;

fn hex(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(" ")
}

/// [`decode_rgb`], and the image must be `size` (width x height): an aligned crop, say.
/// A different size is [`Error::ImageSize`], which names the file and both sizes.
pub fn decode_rgb_sized(path: &Path, size: [usize; 2]) -> Result<RgbImage> {
    let img = decode_rgb(path)?;
    check_size(&img, size, path)?;
    Ok(img)
}

/// [`Error::ImageSize`] unless `img` is `size` (width x height); `name` names it.
pub fn check_size(img: &RgbImage, size: [usize; 2], name: &Path) -> Result<()> {
    let found = [img.width() as usize, img.height() as usize];
    if found == size {
        Ok(())
    } else {
        Err(Error::ImageSize {
            path: name.to_path_buf(),
            expected: size,
            found,
        })
    }
}

/// Decodes an encoded image held in memory (a member of a `.bin` set, say) to RGB, with
/// the same formats, checks and limits as [`decode_rgb`]. `name` stands for the image in
/// errors: a file, or a [`member_name`].
pub fn decode_rgb_bytes(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    let fail = |message: String| Error::Decode {
        path: name.to_path_buf(),
        message,
    };
    if is_truncated_jpeg(bytes) {
        return Err(fail(
            "truncated JPEG: no end-of-image marker after the image data".into(),
        ));
    }
    let reader = |side: Option<u32>| -> Result<ImageReader<Cursor<&[u8]>>> {
        let mut r = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| fail(tidy(&e.to_string())))?;
        let mut limits = Limits::default();
        limits.max_image_width = side;
        limits.max_image_height = side;
        limits.max_alloc = Some(MAX_IMAGE_BYTES);
        r.limits(limits);
        Ok(r)
    };
    // The header alone first: the size the image claims, checked (and named in the error)
    // before any pixel is allocated. The decoder then runs with every limit set.
    let (w, h) = reader(None)?
        .into_dimensions()
        .map_err(|e| fail(describe(&e)))?;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || u64::from(w) * u64::from(h) * 3 > MAX_IMAGE_BYTES
    {
        return Err(fail(format!(
            "the image is {w}x{h}: more than the {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels and \
             {} of RGB this reader decodes",
            crate::text::bytes(MAX_IMAGE_BYTES)
        )));
    }
    let img = reader(Some(MAX_IMAGE_SIDE))?
        .decode()
        .map_err(|e| fail(describe(&e)))?;
    Ok(img.to_rgb8())
}

/// The decoder's complaint, with the limits named when it hit one.
fn describe(e: &image::ImageError) -> String {
    match e {
        image::ImageError::Limits(_) => format!(
            "{} (this reader decodes images of at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} \
             pixels and {})",
            tidy(&e.to_string()),
            crate::text::bytes(MAX_IMAGE_BYTES)
        ),
        e => tidy(&e.to_string()),
    }
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
        if [img.width() as usize, img.height() as usize] == size {
            Ok(())
        } else {
            check_size(img, size, &name(i))
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

/// Stacks same-sized RGB images into one `[N, 3, H, W]` tensor of pixels in `0..=255`.
///
/// The images carry no file names, so nothing here can say which file has the wrong size
/// for a network: for files that must already be aligned crops, decode them with
/// [`crate::decode_rgb_sized`] (or [`crate::load_batch`]), whose errors name the file and
/// both sizes.
pub fn images_to_tensor(images: &[&RgbImage], device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        return Err(Error::Alignment {
            message: "no images to stack".into(),
        });
    };
    let (w, h) = first.dimensions();
    let per = 3 * (w * h) as usize;
    let mut data = vec![0f32; images.len() * per];
    for (i, (img, out)) in images.iter().zip(data.chunks_exact_mut(per)).enumerate() {
        if img.dimensions() != (w, h) {
            return Err(Error::Alignment {
                message: format!(
                    "cannot stack a {}x{} image with {w}x{h} ones (image {i} of {})",
                    img.width(),
                    img.height(),
                    images.len()
                ),
            });
        }
        rgb_to_chw(img, out);
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, h as usize, w as usize),
        device,
    )?)
}
