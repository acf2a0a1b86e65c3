//! From a photo to aligned faces: decode, detect, pick, align.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::align::{align, Aligned, Landmarks};
use crate::detect::{largest, Detection, Detector, DetectorOptions};
use crate::{decode_rgb, Error, Result};

/// Which of the faces in a photo to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The largest face only.
    Largest,
    /// Every face, best score first.
    All,
}

/// A face found in a photo and its aligned crop.
#[derive(Clone, Debug)]
pub struct Face {
    /// What the detector found.
    pub detection: Detection,
    /// The crop aligned to the template, with its transform and landmark residual.
    pub aligned: Aligned,
}

/// How faces are cut out of photos.
pub struct FaceAligner {
    /// The detector.
    pub detector: Detector,
    /// Its thresholds.
    pub options: DetectorOptions,
    /// Where the 5 landmarks go in the crop.
    pub template: Landmarks,
    /// Crop width and height.
    pub size: [u32; 2],
}

impl FaceAligner {
    /// Faces in a decoded photo; `path` only names the photo in errors.
    pub fn faces(&self, image: &RgbImage, pick: Pick, path: &Path) -> Result<Vec<Face>> {
        let found = self
            .detector
            .detect(image, &self.options)
            .map_err(|e| match e {
                Error::Detector { message, .. } => Error::Detector {
                    path: path.to_path_buf(),
                    message,
                },
                other => other,
            })?;
        let chosen: Vec<Detection> = match pick {
            Pick::Largest => largest(&found).cloned().into_iter().collect(),
            Pick::All => found,
        };
        if chosen.is_empty() {
            return Err(Error::NoFace {
                path: path.to_path_buf(),
            });
        }
        chosen
            .into_iter()
            .map(|d| {
                let aligned = align(image, &d.landmarks, &self.template, self.size)?;
                Ok(Face {
                    detection: d,
                    aligned,
                })
            })
            .collect()
    }

    /// Faces in a photo file.
    pub fn faces_in_file(&self, path: &Path, pick: Pick) -> Result<Vec<Face>> {
        self.faces(&decode_rgb(path)?, pick, path)
    }
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
        crate::image::rgb_to_chw(img, out);
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, h as usize, w as usize),
        device,
    )?)
}
