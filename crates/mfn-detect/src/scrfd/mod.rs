//! SCRFD (Guo et al., *Sample and Computation Redistribution for Efficient Face
//! Detection*, 2021), insightface's detector, read from its ONNX export by walking the
//! graph.
//!
//! The same network ships in several exports (insightface's `det_500m.onnx`, the
//! `scrfd_500m_bnkps.onnx` of other packages) that differ in output names and order,
//! whether outputs keep a batch dim, BatchNorm folding and how shapes are computed. So
//! nothing is matched by name: the graph is compiled into a small interpreter (see
//! `graph.rs`) and its nine outputs are told apart by what they hold: 1, 4 or 10 values
//! per anchor (score, box distances, landmark offsets), and as many anchors as the
//! stride's feature map has cells times the anchors per cell. A probe run at load sizes
//! them; insightface's own order (scores, boxes, landmarks, each by stride) is the
//! fallback when the channel counts do not decide.
//!
//! Pre-processing and decoding follow insightface's `scrfd.py` exactly: RGB,
//! `(x - 127.5) / 128`; anchor centres `(x * stride, y * stride)` row-major, each
//! repeated once per anchor; boxes `centre -/+ distance * stride`; landmarks
//! `centre + offset * stride`; NMS with insightface's `+1` pixel areas.

mod graph;
mod kernels;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use mfn_model::import::onnx::{parse_graph, OnnxGraph};

use crate::face::nms;
use crate::{Detector, Error, Face, Result};
use graph::{detector_error, Net};

/// Largest side of the network's input. Letterbox and fit sizes, and images given to
/// [`Scrfd::anchors`], must not exceed it: activations grow with the input's area (the
/// first conv alone makes 4 values per input pixel), so a 4096 x 4096 search already
/// holds about a gigabyte of them.
pub const MAX_INPUT_SIDE: u32 = 4096;

/// Largest detector file read: SCRFD-34GF, the largest of the family, is under 40 MB.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The feature-map strides of SCRFD's three heads.
pub const STRIDES: [u32; 3] = [8, 16, 32];

/// How a photo is sized for the network, which takes any size that is a multiple of 32.
///
/// Two policies, because they serve different callers: [`InputSize::Letterbox`] is what
/// insightface does, so its faces (and the thresholds tuned on them) are reproduced
/// exactly, and small faces in large photos are searched at the same fixed cost;
/// [`InputSize::Fit`] never enlarges a photo and pads it only to the next multiple of 32,
/// so a small photo costs little and a large one keeps its detail up to `max_side`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSize {
    /// insightface's `SCRFD.detect(input_size=(n, n))`: scale the photo so that its longer
    /// side is `n` (up or down), paste it at the top left of a black `n` x `n` canvas.
    /// `n` must be a multiple of 32 of at most [`MAX_INPUT_SIDE`].
    Letterbox(u32),
    /// Scale the photo down only, so that its longer side is at most `max_side`, and pad
    /// it on the right and bottom to a multiple of 32.
    Fit {
        /// The longest side searched, at most [`MAX_INPUT_SIDE`].
        max_side: u32,
    },
}

impl std::str::FromStr for InputSize {
    type Err = String;

    /// `letterbox:N` or `fit:N`, N a multiple of 32 in 32..=[`MAX_INPUT_SIDE`].
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not letterbox:N or fit:N");
        let (kind, n) = s.split_once(':').ok_or_else(bad)?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        if !(32..=MAX_INPUT_SIDE).contains(&n) || !n.is_multiple_of(32) {
            return Err(format!(
                "{n}: the side must be a multiple of 32 in 32..={MAX_INPUT_SIDE}"
            ));
        }
        match kind {
            "letterbox" => Ok(Self::Letterbox(n)),
            "fit" => Ok(Self::Fit { max_side: n }),
            _ => Err(bad()),
        }
    }
}

/// A photo sized for the network, and the factor that maps it back.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// The network's input: both sides multiples of 32.
    pub image: RgbImage,
    /// How much the photo was scaled (insightface's `det_scale`): positions found in
    /// `image` divided by it are positions in the photo.
    pub scale: f32,
}

fn image_error(message: String) -> Error {
    Error::Detector {
        path: PathBuf::new(),
        message,
    }
}

/// insightface's integer sizing: the longer side becomes `n`, the other
/// `int(n * ratio)` (never below one pixel); the scale is `new_height / height`.
fn scaled_size(w: u32, h: u32, n: u32) -> (u32, u32, f64) {
    let ratio = h as f64 / w as f64;
    let (nw, nh) = if ratio > 1.0 {
        ((n as f64 / ratio) as u32, n)
    } else {
        (n, (n as f64 * ratio) as u32)
    };
    let (nw, nh) = (nw.max(1), nh.max(1));
    (nw, nh, nh as f64 / h as f64)
}

/// PIL's bilinear resampling (antialiased when it shrinks), as insightface's reference
/// resized: `fast_image_resize`'s SIMD convolution, within one level of the `image`
/// crate's `Triangle` filter and about ten times faster (0.7 against 8.5 ms for a
/// 250x250 photo to 640x640).
fn bilinear(image: &RgbImage, nw: u32, nh: u32) -> RgbImage {
    use fast_image_resize as fr;
    let (w, h) = image.dimensions();
    let fallback = || image::imageops::resize(image, nw, nh, image::imageops::FilterType::Triangle);
    let Ok(src) = fr::images::ImageRef::new(w, h, image.as_raw(), fr::PixelType::U8x3) else {
        return fallback();
    };
    let mut dst = fr::images::Image::new(nw, nh, fr::PixelType::U8x3);
    let options =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
    match fr::Resizer::new().resize(&src, &mut dst, &options) {
        Ok(()) => RgbImage::from_raw(nw, nh, dst.into_vec()).unwrap_or_else(fallback),
        Err(_) => fallback(),
    }
}

impl InputSize {
    /// Sizes `image` for the network.
    pub fn prepare(self, image: &RgbImage) -> Result<Prepared> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(image_error(format!("empty image ({w}x{h})")));
        }
        let resize = |nw: u32, nh: u32| {
            if (nw, nh) == (w, h) {
                image.clone()
            } else {
                bilinear(image, nw, nh)
            }
        };
        let paste = |small: &RgbImage, cw: u32, ch: u32| {
            let mut canvas = RgbImage::new(cw, ch);
            image::imageops::replace(&mut canvas, small, 0, 0);
            canvas
        };
        match self {
            InputSize::Letterbox(n) => {
                if n == 0 || n % 32 != 0 || n > MAX_INPUT_SIDE {
                    return Err(image_error(format!(
                        "letterbox size {n}: must be a positive multiple of 32 of at most \
                         {MAX_INPUT_SIDE}"
                    )));
                }
                let (nw, nh, scale) = scaled_size(w, h, n);
                Ok(Prepared {
                    image: paste(&resize(nw, nh), n, n),
                    scale: scale as f32,
                })
            }
            InputSize::Fit { max_side } => {
                if max_side == 0 || max_side > MAX_INPUT_SIDE {
                    return Err(image_error(format!(
                        "fit size {max_side}: must be between 1 and {MAX_INPUT_SIDE}"
                    )));
                }
                let (nw, nh, scale) = if w.max(h) > max_side {
                    scaled_size(w, h, max_side)
                } else {
                    (w, h, 1.0)
                };
                let (cw, ch) = (nw.next_multiple_of(32), nh.next_multiple_of(32));
                let small = resize(nw, nh);
                let image = if (cw, ch) == (nw, nh) {
                    small
                } else {
                    paste(&small, cw, ch)
                };
                Ok(Prepared {
                    image,
                    scale: scale as f32,
                })
            }
        }
    }
}

/// Thresholds and input sizing of [`Scrfd`].
#[derive(Clone, Debug, PartialEq)]
pub struct ScrfdOptions {
    /// Minimum face score (insightface: 0.5).
    pub score_threshold: f32,
    /// NMS IoU, with insightface's `+1` pixel-area convention (insightface: 0.4).
    pub nms_threshold: f32,
    /// How photos are sized for the network.
    pub input: InputSize,
}

/// The default sizing is `Fit { max_side: 640 }`: photos larger than 640 pixels are
/// scaled down as insightface's letterbox scales them, and smaller ones are searched as
/// they are. On the 100 raw 250x250 LFW photos that costs a sixth of the letterbox's work
/// (a 256x256 input instead of 640x640) and decides the 4,950 pairs as well (SCRFD +
/// `w600k_mbf`: AUC 1.0 with either; 99.64% agreement with the truth at the registry
/// threshold against 99.58%); the landmarks of the upscaled photos are slightly closer to
/// the annotation (0.056 against 0.063 inter-ocular distances). `Letterbox(640)`
/// reproduces insightface's faces to the pixel.
impl Default for ScrfdOptions {
    fn default() -> Self {
        Self {
            score_threshold: 0.5,
            nms_threshold: 0.4,
            input: InputSize::Fit { max_side: 640 },
        }
    }
}

/// One anchor's decoded output, before thresholding and NMS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Anchor {
    /// The feature map's stride: 8, 16 or 32.
    pub stride: u32,
    /// The anchor's index in its stride's output: `(row * columns + column) * 2 + k`.
    pub index: usize,
    /// Score, box and landmarks, in the pixels of the network's input.
    pub face: Face,
}

/// Which graph outputs hold one stride's scores, box distances and landmark offsets.
#[derive(Clone, Copy, Debug)]
struct Head {
    stride: u32,
    score: usize,
    bbox: usize,
    kps: usize,
}

/// SCRFD with 5 keypoints (`scrfd_500m_bnkps`, insightface's `det_500m`).
pub struct Scrfd {
    /// Thresholds and input sizing.
    pub options: ScrfdOptions,
    net: Net,
    heads: [Head; 3],
    anchors_per_cell: usize,
    device: Device,
    path: PathBuf,
}

impl std::fmt::Debug for Scrfd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrfd")
            .field("path", &self.path)
            .field("options", &self.options)
            .field("heads", &self.heads)
            .field("anchors_per_cell", &self.anchors_per_cell)
            .finish_non_exhaustive()
    }
}

/// Rows (anchors) and values per row of an output: `[N, C]` or `[1, N, C]`.
fn rows_and_channels(dims: &[usize]) -> Option<(usize, usize)> {
    match dims {
        [n, c] | [1, n, c] => Some((*n, *c)),
        _ => None,
    }
}

/// The probe input's size: both sides multiples of 32, unequal, so that each stride's
/// cell count differs from the others'.
const PROBE: (usize, usize) = (64, 96);

impl Scrfd {
    /// Loads an ONNX export of SCRFD with keypoints: a regular file of at most
    /// [`MAX_FILE_BYTES`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = mfn_model::import::read_regular_file(path, MAX_FILE_BYTES)
            .map_err(|e| detector_error(path, Error::from(e)))?;
        Self::load_bytes(&bytes, path, device)
    }

    /// [`Scrfd::load`] on a model's bytes; `path` names it in errors and locates any
    /// external data.
    pub fn load_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let graph = parse_graph(bytes, path).map_err(|e| detector_error(path, Error::from(e)))?;
        Self::from_graph(&graph, device)
    }

    /// Builds the detector from a parsed ONNX graph.
    pub fn from_graph(graph: &OnnxGraph, device: &Device) -> Result<Self> {
        let path = graph.path().to_path_buf();
        let net = Net::compile(graph, device)?;
        let fail = |message: String| Error::Detector {
            path: path.clone(),
            message,
        };
        // One run on a blank probe gives every output's shape.
        let (ph, pw) = PROBE;
        let probe = Tensor::zeros((1, 3, ph, pw), candle_core::DType::F32, device)?;
        let outs = net.run(probe, run_cap(ph, pw))?;
        let names = graph.outputs();
        let mut shape = Vec::with_capacity(outs.len());
        for (t, name) in outs.iter().zip(names) {
            shape.push(rows_and_channels(t.dims()).ok_or_else(|| {
                fail(format!(
                    "output `{name}` has shape {:?} on a {pw}x{ph} input, not [anchors, values] \
                     or [1, anchors, values]",
                    t.dims()
                ))
            })?);
        }
        if outs.len() != 9 {
            return Err(fail(format!(
                "{} outputs; SCRFD with keypoints has 9 (scores, boxes and landmarks at \
                 strides 8, 16 and 32)",
                outs.len()
            )));
        }
        let cells = |s: u32| (ph / s as usize) * (pw / s as usize);
        // By what they hold: 1, 4 or 10 values per anchor, more anchors at finer strides.
        let by_channels = || -> Option<[Head; 3]> {
            let group = |c: usize| -> Option<Vec<usize>> {
                let mut idx: Vec<usize> = (0..9).filter(|i| shape[*i].1 == c).collect();
                idx.sort_by_key(|i| std::cmp::Reverse(shape[*i].0));
                let distinct = idx.windows(2).all(|p| shape[p[0]].0 > shape[p[1]].0);
                (idx.len() == 3 && distinct).then_some(idx)
            };
            let (s, b, k) = (group(1)?, group(4)?, group(10)?);
            Some([0, 1, 2].map(|i| Head {
                stride: STRIDES[i],
                score: s[i],
                bbox: b[i],
                kps: k[i],
            }))
        };
        // insightface's `scrfd.py` order: scores, boxes, landmarks, each by stride.
        let by_position = [0, 1, 2].map(|i| Head {
            stride: STRIDES[i],
            score: i,
            bbox: 3 + i,
            kps: 6 + i,
        });
        let heads = by_channels().unwrap_or(by_position);
        let h0 = heads[0];
        let anchors_per_cell = shape[h0.score].0 / cells(h0.stride);
        let fits = anchors_per_cell > 0
            && heads.iter().all(|h| {
                let n = anchors_per_cell * cells(h.stride);
                shape[h.score] == (n, 1) && shape[h.bbox] == (n, 4) && shape[h.kps] == (n, 10)
            });
        if !fits {
            let listed: Vec<String> = names
                .iter()
                .zip(&shape)
                .map(|(n, (r, c))| format!("`{n}` {r}x{c}"))
                .collect();
            return Err(fail(format!(
                "the outputs on a {pw}x{ph} input ({}) are not SCRFD's: scores (1 value), boxes \
                 (4) and landmarks (10) per anchor, with (height / stride) x (width / stride) x \
                 anchors-per-cell anchors at strides 8, 16 and 32",
                listed.join(", ")
            )));
        }
        Ok(Self {
            options: ScrfdOptions::default(),
            net,
            heads,
            anchors_per_cell,
            device: device.clone(),
            path,
        })
    }

    /// The model file, as errors name it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Anchors per feature-map cell (2 for every released SCRFD).
    pub fn anchors_per_cell(&self) -> usize {
        self.anchors_per_cell
    }

    /// Every anchor of `input`, whose sides must be multiples of 32, with a score of at
    /// least `min_score`, decoded, in input pixels.
    pub fn anchors(&self, input: &RgbImage, min_score: f32) -> Result<Vec<Anchor>> {
        let (w, h) = input.dimensions();
        if w == 0 || h == 0 || w % 32 != 0 || h % 32 != 0 {
            return Err(image_error(format!(
                "a {w}x{h} input: the network takes sides that are positive multiples of 32"
            )));
        }
        if w.max(h) > MAX_INPUT_SIDE {
            return Err(image_error(format!(
                "a {w}x{h} input: sides of at most {MAX_INPUT_SIDE} are searched"
            )));
        }
        let (w, h) = (w as usize, h as usize);
        let x = to_tensor(input, &self.device)?;
        let outs = self.net.run(x, run_cap(h, w))?;
        let values = |i: usize| -> Result<Vec<f32>> {
            Ok(outs[i]
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?)
        };
        let mut found = Vec::new();
        for head in &self.heads {
            let s = head.stride as usize;
            let (fh, fw) = (h / s, w / s);
            let n = fh * fw * self.anchors_per_cell;
            let (scores, boxes, kps) = (values(head.score)?, values(head.bbox)?, values(head.kps)?);
            if scores.len() != n || boxes.len() != 4 * n || kps.len() != 10 * n {
                return Err(Error::Detector {
                    path: self.path.clone(),
                    message: format!(
                        "stride {s} on a {w}x{h} input: {} scores, {} box values and {} \
                         landmark values for {n} anchors",
                        scores.len(),
                        boxes.len(),
                        kps.len()
                    ),
                });
            }
            let stride = head.stride as f32;
            for (i, &score) in scores.iter().enumerate() {
                if score < min_score {
                    continue;
                }
                let cell = i / self.anchors_per_cell;
                let cx = (cell % fw) as f32 * stride;
                let cy = (cell / fw) as f32 * stride;
                let d = &boxes[4 * i..4 * i + 4];
                let bbox = [
                    cx - d[0] * stride,
                    cy - d[1] * stride,
                    cx + d[2] * stride,
                    cy + d[3] * stride,
                ];
                let k = &kps[10 * i..10 * i + 10];
                let landmarks =
                    std::array::from_fn(|j| [cx + k[2 * j] * stride, cy + k[2 * j + 1] * stride]);
                found.push(Anchor {
                    stride: head.stride,
                    index: i,
                    face: Face {
                        bbox,
                        score,
                        landmarks,
                    },
                });
            }
        }
        Ok(found)
    }

    /// The faces in `image` with `options` rather than [`Scrfd::options`]: sized as
    /// `options.input` says, anchors of at least `options.score_threshold`, NMS, best
    /// score first, in the pixels of `image`.
    pub fn detect_with(&self, image: &RgbImage, options: &ScrfdOptions) -> Result<Vec<Face>> {
        let prepared = options.input.prepare(image)?;
        let scale = prepared.scale;
        let faces = self
            .anchors(&prepared.image, options.score_threshold)?
            .into_iter()
            .map(|a| {
                let mut f = a.face;
                // Divided, not multiplied by the inverse, as insightface does.
                f.bbox.iter_mut().for_each(|v| *v /= scale);
                f.landmarks.iter_mut().flatten().for_each(|v| *v /= scale);
                f
            })
            .collect();
        Ok(nms(faces, options.nms_threshold, 1.0))
    }
}

/// The most values any tensor may hold while searching an `h` x `w` input: SCRFD's
/// largest holds about 1.3 per input value, so 64 per input value is room for any
/// detector and stops a hostile graph long before memory runs out.
fn run_cap(h: usize, w: usize) -> usize {
    64 * 3 * h * w + (1 << 20)
}

/// The network's input: RGB planes, `(x - 127.5) / 128`, `[1, 3, h, w]`.
fn to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let lut: [f32; 256] = std::array::from_fn(|v| (v as f32 - 127.5) / 128.0);
    let mut chw = vec![0f32; 3 * plane];
    let (r, rest) = chw.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[px[0] as usize];
        g[i] = lut[px[1] as usize];
        b[i] = lut[px[2] as usize];
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), device)?)
}

impl Detector for Scrfd {
    fn name(&self) -> &'static str {
        "scrfd"
    }

    fn detect(&self, image: &RgbImage) -> Result<Vec<Face>> {
        self.detect_with(image, &self.options)
    }
}
