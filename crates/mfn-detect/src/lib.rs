#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod face;
pub mod mtcnn;
pub mod pipeline;
pub mod retinaface;
pub mod scrfd;

use image::RgbImage;

/// The device type the networks run on, re-exported so that callers need no direct
/// `candle-core` dependency.
pub use candle_core::Device;
pub use error::{Error, Result};
pub use face::{Face, Pick};
pub use mtcnn::Mtcnn;
pub use pipeline::{
    AlignedFace, Decision, DetectorKind, EmbeddedFace, FaceAligner, Pipeline, PipelineBuilder,
    Threshold,
};
pub use retinaface::RetinaFace;
pub use scrfd::Scrfd;

/// A face detector: every face in an image, with its box, score and 5 landmarks.
///
/// Implemented by [`Scrfd`] (the default of the pipeline), [`Mtcnn`] and [`RetinaFace`];
/// each holds its own thresholds and input sizing. Detectors are `Send + Sync`, so one
/// can serve many threads.
pub trait Detector: Send + Sync {
    /// The network's short name (`scrfd`, `mtcnn`, `retinaface`), for reports.
    fn name(&self) -> &'static str;

    /// Every face in `image` that clears the detector's thresholds, best score first, in
    /// the pixels of `image`. An image with no face gives an empty list; an image the
    /// detector cannot search (empty, say) gives [`Error::Detector`].
    fn detect(&self, image: &RgbImage) -> Result<Vec<Face>>;
}

/// Thresholds of the MTCNN and RetinaFace detectors.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectorOptions {
    /// Minimum face probability.
    pub score_threshold: f32,
    /// Boxes overlapping a better one by more than this IoU are dropped.
    pub nms_threshold: f32,
    /// Faces whose box is smaller than this many pixels on its shorter side are dropped.
    pub min_face: f32,
    /// Images whose longer side exceeds this are scaled down for detection; results are
    /// mapped back to the original pixels.
    pub max_side: u32,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        Self {
            score_threshold: 0.6,
            nms_threshold: 0.4,
            min_face: 20.0,
            max_side: 1280,
        }
    }
}

/// Runs `find` on `image`, scaled down first when its longer side exceeds `max_side`, and
/// maps what it finds back to the pixels of `image`. `find` gets the image it searches
/// and the scale applied.
pub(crate) fn detect_downscaled(
    image: &RgbImage,
    max_side: u32,
    find: impl FnOnce(&RgbImage, f32) -> Result<Vec<Face>>,
) -> Result<Vec<Face>> {
    let (w0, h0) = image.dimensions();
    if w0 == 0 || h0 == 0 {
        return Err(Error::Detector {
            path: Default::default(),
            message: format!("empty image ({w0}x{h0})"),
        });
    }
    let longest = w0.max(h0);
    if longest <= max_side.max(1) {
        return find(image, 1.0);
    }
    let scale = max_side.max(1) as f32 / longest as f32;
    let w = ((w0 as f32 * scale).round() as u32).max(1);
    let h = ((h0 as f32 * scale).round() as u32).max(1);
    let small = image::imageops::resize(image, w, h, image::imageops::FilterType::Triangle);
    Ok(find(&small, scale)?
        .into_iter()
        .map(|f| f.scaled(1.0 / scale))
        .collect())
}
