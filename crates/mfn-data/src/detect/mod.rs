//! Face detection with 5 landmarks (left eye, right eye, nose tip, left and right mouth
//! corners): MTCNN and RetinaFace-MobileNet-0.25, in candle, from their PyTorch weights.
//!
//! MTCNN is the default. On the 100 raw LFW photos that come with 5 given landmarks, its
//! landmarks lie 0.061 inter-ocular distances from the given ones on average (facenet-pytorch,
//! whose weights and steps it follows, measures 0.0615), against 0.069 for
//! RetinaFace-MobileNet-0.25, whose light landmark head is less precise on faces of about
//! 100 pixels. RetinaFace is faster: about 25 ms per 250x250 photo against 50 ms, and one
//! pass instead of a pyramid on large photos.

mod mtcnn;
mod retinaface;

use std::path::Path;

use candle_core::Device;
use image::RgbImage;

pub use mtcnn::Mtcnn;
pub use retinaface::RetinaFace;

use crate::{Error, Result};

/// A detected face: box, confidence and 5 landmarks (left eye, right eye, nose tip, left
/// and right mouth corners), in the pixels of the image passed in.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Face probability in `0..=1`.
    pub score: f32,
    /// The 5 landmarks, `[x, y]` each.
    pub landmarks: [[f32; 2]; 5],
}

impl Detection {
    /// Box area in square pixels.
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]).max(0.0) * (self.bbox[3] - self.bbox[1]).max(0.0)
    }
}

/// Detection thresholds.
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

/// Which network finds the faces.
pub enum Detector {
    /// MTCNN (facenet-pytorch weights: a folder with `pnet.pt`, `rnet.pt`, `onet.pt`).
    Mtcnn(Box<Mtcnn>),
    /// RetinaFace-MobileNet-0.25 (`mobilenet0.25_Final.pth`).
    RetinaFace(Box<RetinaFace>),
}

impl Detector {
    /// MTCNN from a folder holding `pnet.pt`, `rnet.pt` and `onet.pt`.
    pub fn mtcnn(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self::Mtcnn(Box::new(Mtcnn::load(dir, device)?)))
    }

    /// RetinaFace from `mobilenet0.25_Final.pth`.
    pub fn retinaface(path: &Path, device: &Device) -> Result<Self> {
        Ok(Self::RetinaFace(Box::new(RetinaFace::load(path, device)?)))
    }

    /// Every face in `image`, best first. Images larger than `options.max_side` are
    /// searched at a smaller scale; boxes and landmarks are in the original pixels.
    pub fn detect(&self, image: &RgbImage, options: &DetectorOptions) -> Result<Vec<Detection>> {
        let (w0, h0) = image.dimensions();
        if w0 == 0 || h0 == 0 {
            return Err(Error::Detector {
                path: Default::default(),
                message: format!("empty image ({w0}x{h0})"),
            });
        }
        let longest = w0.max(h0);
        let scale = if longest > options.max_side {
            options.max_side as f32 / longest as f32
        } else {
            1.0
        };
        let resized;
        let img = if scale < 1.0 {
            let w = ((w0 as f32 * scale).round() as u32).max(1);
            let h = ((h0 as f32 * scale).round() as u32).max(1);
            resized = image::imageops::resize(image, w, h, image::imageops::FilterType::Triangle);
            &resized
        } else {
            image
        };
        let found = match self {
            Self::Mtcnn(m) => m.detect(img, options)?,
            Self::RetinaFace(r) => nms(
                r.detect(img, options.score_threshold, options.min_face * scale)?,
                options.nms_threshold,
            ),
        };
        let back = 1.0 / scale;
        Ok(found
            .into_iter()
            .map(|mut d| {
                d.bbox.iter_mut().for_each(|v| *v *= back);
                d.landmarks.iter_mut().flatten().for_each(|v| *v *= back);
                d
            })
            .collect())
    }
}

/// The largest face, the one a portrait or an ID photo is about.
pub fn largest(faces: &[Detection]) -> Option<&Detection> {
    faces.iter().max_by(|a, b| a.area().total_cmp(&b.area()))
}

/// The face a photo is centred on: the largest of those whose box holds the image centre,
/// or the largest overall when none does (LFW's photos are centred on their subject).
pub fn central(faces: &[Detection], width: u32, height: u32) -> Option<&Detection> {
    let (cx, cy) = (width as f32 / 2.0, height as f32 / 2.0);
    let holds =
        |d: &&Detection| d.bbox[0] <= cx && cx <= d.bbox[2] && d.bbox[1] <= cy && cy <= d.bbox[3];
    faces
        .iter()
        .filter(holds)
        .max_by(|a, b| a.area().total_cmp(&b.area()))
        .or_else(|| largest(faces))
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression, best score first.
fn nms(mut dets: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Detection> = Vec::new();
    for d in dets {
        if keep.iter().all(|k| iou(&k.bbox, &d.bbox) <= threshold) {
            keep.push(d);
        }
    }
    keep
}
