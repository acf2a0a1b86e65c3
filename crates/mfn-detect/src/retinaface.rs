//! RetinaFace with a MobileNet-0.25 body (Deng et al., CVPR 2020) from the widely used
//! PyTorch checkpoint `mobilenet0.25_Final.pth` (biubug6/Pytorch_Retinaface layout): one
//! pass over the whole image, anchors at strides 8, 16 and 32.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use mfn_model::import::torch::read_state_dict;
use mfn_model::ops::DepthwiseConv2d;

use crate::face::nms;
use crate::{detect_downscaled, Detector, DetectorOptions, Error, Face, Result};

#[derive(Clone, Copy, Debug)]
enum Act {
    None,
    Leaky(f32),
}

/// A conv with its BatchNorm folded in, and an activation.
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
    act: Act,
    depthwise: Option<DepthwiseConv2d>,
}

impl Conv {
    /// `{prefix}.{conv}.weight` followed by the BatchNorm `{prefix}.{bn}.*`.
    fn load(
        sd: &Weights,
        prefix: &str,
        (conv, bn): (usize, usize),
        stride: usize,
        groups: usize,
        act: Act,
    ) -> Result<Self> {
        let w = sd.get(&format!("{prefix}.{conv}.weight"))?;
        let gamma = sd.get(&format!("{prefix}.{bn}.weight"))?;
        let beta = sd.get(&format!("{prefix}.{bn}.bias"))?;
        let mean = sd.get(&format!("{prefix}.{bn}.running_mean"))?;
        let var = sd.get(&format!("{prefix}.{bn}.running_var"))?;
        // PyTorch's BatchNorm2d default eps.
        let scale = gamma.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let bias = (beta - mean.mul(&scale)?)?;
        let weight = w.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
        Self::new(weight, bias, stride, groups, act)
    }

    fn new(weight: Tensor, bias: Tensor, stride: usize, groups: usize, act: Act) -> Result<Self> {
        let (cout, _, k, _) = weight.dims4()?;
        let pad = k / 2;
        let depthwise = if groups > 1 && groups == cout && weight.device().is_cpu() {
            let slope = match act {
                Act::Leaky(a) => Some(Arc::new(vec![a; cout])),
                Act::None => None,
            };
            Some(DepthwiseConv2d {
                weight: Arc::new(weight.flatten_all()?.to_vec1()?),
                bias: Arc::new(bias.to_vec1()?),
                prelu: slope,
                cap: None,
                kernel: [k, k],
                stride,
                pad: [pad, pad],
            })
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            pad,
            groups,
            act,
            depthwise,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(op) = &self.depthwise {
            if x.device().is_cpu() {
                return Ok(op.forward(x)?);
            }
        }
        let y = x
            .conv2d(&self.weight, self.pad, self.stride, 1, self.groups)?
            .broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        Ok(match self.act {
            Act::None => y,
            Act::Leaky(a) => y.maximum(&(&y * a as f64)?)?,
        })
    }
}

struct Weights<'a> {
    map: &'a std::collections::HashMap<String, Tensor>,
    path: &'a Path,
}

impl Weights<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.map.get(name).cloned().ok_or_else(|| Error::Detector {
            path: self.path.to_path_buf(),
            message: format!("missing weight `{name}`: not a RetinaFace MobileNet-0.25 checkpoint"),
        })
    }
}

/// SSH context module: 3x3, 5x5 and 7x7 receptive fields from stacked 3x3 convs.
struct Ssh {
    conv3: Conv,
    conv5_1: Conv,
    conv5_2: Conv,
    conv7_2: Conv,
    conv7_3: Conv,
}

impl Ssh {
    fn load(sd: &Weights, prefix: &str) -> Result<Self> {
        let leaky = Act::Leaky(0.1);
        Ok(Self {
            conv3: Conv::load(sd, &format!("{prefix}.conv3X3"), (0, 1), 1, 1, Act::None)?,
            conv5_1: Conv::load(sd, &format!("{prefix}.conv5X5_1"), (0, 1), 1, 1, leaky)?,
            conv5_2: Conv::load(sd, &format!("{prefix}.conv5X5_2"), (0, 1), 1, 1, Act::None)?,
            conv7_2: Conv::load(sd, &format!("{prefix}.conv7X7_2"), (0, 1), 1, 1, leaky)?,
            conv7_3: Conv::load(sd, &format!("{prefix}.conv7x7_3"), (0, 1), 1, 1, Act::None)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.conv3.forward(x)?;
        let c5 = self.conv5_1.forward(x)?;
        let b = self.conv5_2.forward(&c5)?;
        let c = self.conv7_3.forward(&self.conv7_2.forward(&c5)?)?;
        Ok(Tensor::cat(&[a, b, c], 1)?.relu()?)
    }
}

/// Per-level anchor sizes and strides of the MobileNet-0.25 configuration.
const MIN_SIZES: [[f32; 2]; 3] = [[16.0, 32.0], [64.0, 128.0], [256.0, 512.0]];
const STEPS: [usize; 3] = [8, 16, 32];
const VARIANCE: [f32; 2] = [0.1, 0.2];
/// The BGR means the checkpoint was trained with.
const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];

/// RetinaFace-MobileNet-0.25.
pub struct RetinaFace {
    body: Vec<Conv>,
    fpn_out: [Conv; 3],
    fpn_merge: [Conv; 2],
    ssh: [Ssh; 3],
    class_head: [Conv; 3],
    box_head: [Conv; 3],
    landmark_head: [Conv; 3],
    device: Device,
    /// Thresholds and input sizing.
    pub options: DetectorOptions,
}

impl RetinaFace {
    /// Loads `mobilenet0.25_Final.pth` (a PyTorch `state_dict`, legacy or zip layout).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let map = read_state_dict(path, device).map_err(|e| Error::Detector {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let sd = Weights { map: &map, path };
        let leaky = Act::Leaky(0.1);
        let mut body = vec![Conv::load(&sd, "body.stage1.0", (0, 1), 2, 1, leaky)?];
        // (stage, block, in channels, stride) of each depthwise-separable block.
        let blocks = [
            (1, 1, 8, 1),
            (1, 2, 16, 2),
            (1, 3, 32, 1),
            (1, 4, 32, 2),
            (1, 5, 64, 1),
            (2, 0, 64, 2),
            (2, 1, 128, 1),
            (2, 2, 128, 1),
            (2, 3, 128, 1),
            (2, 4, 128, 1),
            (2, 5, 128, 1),
            (3, 0, 128, 2),
            (3, 1, 256, 1),
        ];
        for (stage, block, cin, stride) in blocks {
            let p = format!("body.stage{stage}.{block}");
            body.push(Conv::load(&sd, &p, (0, 1), stride, cin, leaky)?);
            body.push(Conv::load(&sd, &p, (3, 4), 1, 1, leaky)?);
        }
        let head = |kind: &str, k: usize| -> Result<Conv> {
            let p = format!("{kind}.{k}.conv1x1");
            Conv::new(
                sd.get(&format!("{p}.weight"))?,
                sd.get(&format!("{p}.bias"))?,
                1,
                1,
                Act::None,
            )
        };
        let fpn = |name: &str| Conv::load(&sd, &format!("fpn.{name}"), (0, 1), 1, 1, leaky);
        Ok(Self {
            body,
            fpn_out: [fpn("output1")?, fpn("output2")?, fpn("output3")?],
            fpn_merge: [fpn("merge1")?, fpn("merge2")?],
            ssh: [
                Ssh::load(&sd, "ssh1")?,
                Ssh::load(&sd, "ssh2")?,
                Ssh::load(&sd, "ssh3")?,
            ],
            class_head: [
                head("ClassHead", 0)?,
                head("ClassHead", 1)?,
                head("ClassHead", 2)?,
            ],
            box_head: [
                head("BboxHead", 0)?,
                head("BboxHead", 1)?,
                head("BboxHead", 2)?,
            ],
            landmark_head: [
                head("LandmarkHead", 0)?,
                head("LandmarkHead", 1)?,
                head("LandmarkHead", 2)?,
            ],
            device: device.clone(),
            options: DetectorOptions::default(),
        })
    }

    /// Raw head outputs for a `[1, 3, H, W]` BGR-minus-mean tensor: per anchor, the face
    /// logits `[n, 2]`, box offsets `[n, 4]` and landmark offsets `[n, 10]`.
    fn heads(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mut y = x.clone();
        let mut taps = Vec::new();
        // Stage outputs after blocks 5 (stride 8), 11 (stride 16) and 13 (stride 32).
        for (i, conv) in self.body.iter().enumerate() {
            y = conv.forward(&y)?;
            if i == 10 || i == 22 || i == 26 {
                taps.push(y.clone());
            }
        }
        let o1 = self.fpn_out[0].forward(&taps[0])?;
        let o2 = self.fpn_out[1].forward(&taps[1])?;
        let o3 = self.fpn_out[2].forward(&taps[2])?;
        let (_, _, h2, w2) = o2.dims4()?;
        let o2 = self.fpn_merge[1].forward(&(o2 + o3.upsample_nearest2d(h2, w2)?)?)?;
        let (_, _, h1, w1) = o1.dims4()?;
        let o1 = self.fpn_merge[0].forward(&(o1 + o2.upsample_nearest2d(h1, w1)?)?)?;
        let features = [
            self.ssh[0].forward(&o1)?,
            self.ssh[1].forward(&o2)?,
            self.ssh[2].forward(&o3)?,
        ];
        let flat = |heads: &[Conv; 3], per: usize| -> Result<Tensor> {
            let parts = features
                .iter()
                .zip(heads)
                .map(|(f, h)| {
                    let y = h.forward(f)?.permute((0, 2, 3, 1))?.contiguous()?;
                    Ok(y.reshape(((), per))?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        Ok((
            flat(&self.class_head, 2)?,
            flat(&self.box_head, 4)?,
            flat(&self.landmark_head, 10)?,
        ))
    }

    /// Faces with a probability of at least `score_threshold` and a box side of at least
    /// `min_face` pixels, before non-maximum suppression.
    fn detect_at_scale(
        &self,
        img: &RgbImage,
        score_threshold: f32,
        min_face: f32,
    ) -> Result<Vec<Face>> {
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let plane = w * h;
        let mut chw = vec![0f32; 3 * plane];
        for (i, p) in img.pixels().enumerate() {
            // RGB in, BGR planes out.
            for c in 0..3 {
                chw[c * plane + i] = p[2 - c] as f32 - MEAN_BGR[c];
            }
        }
        let x = Tensor::from_vec(chw, (1, 3, h, w), &self.device)?;
        let (logits, boxes, marks) = self.heads(&x)?;
        let scores = face_probability(&logits)?;
        let boxes: Vec<Vec<f32>> = boxes.to_dtype(DType::F32)?.to_vec2()?;
        let marks: Vec<Vec<f32>> = marks.to_dtype(DType::F32)?.to_vec2()?;
        let priors = priors(h, w);
        if priors.len() != scores.len() {
            return Err(Error::Detector {
                path: Default::default(),
                message: format!(
                    "{} anchors but {} scores for a {w}x{h} image",
                    priors.len(),
                    scores.len()
                ),
            });
        }
        let mut found = Vec::new();
        for (i, p) in priors.iter().enumerate() {
            let score = scores[i];
            if score < score_threshold {
                continue;
            }
            let (b, m) = (&boxes[i], &marks[i]);
            let cx = p[0] + b[0] * VARIANCE[0] * p[2];
            let cy = p[1] + b[1] * VARIANCE[0] * p[3];
            let bw = p[2] * (b[2] * VARIANCE[1]).exp();
            let bh = p[3] * (b[3] * VARIANCE[1]).exp();
            let bbox = [
                (cx - bw / 2.0) * w as f32,
                (cy - bh / 2.0) * h as f32,
                (cx + bw / 2.0) * w as f32,
                (cy + bh / 2.0) * h as f32,
            ];
            let mut landmarks = [[0f32; 2]; 5];
            for (k, l) in landmarks.iter_mut().enumerate() {
                l[0] = (p[0] + m[2 * k] * VARIANCE[0] * p[2]) * w as f32;
                l[1] = (p[1] + m[2 * k + 1] * VARIANCE[0] * p[3]) * h as f32;
            }
            let side = (bbox[2] - bbox[0]).min(bbox[3] - bbox[1]);
            if side >= min_face && bbox.iter().all(|v| v.is_finite()) {
                found.push(Face {
                    bbox,
                    score,
                    landmarks,
                });
            }
        }
        Ok(found)
    }
}

/// Probability of the face class from `[n, 2]` logits.
fn face_probability(logits: &Tensor) -> Result<Vec<f32>> {
    let l: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(l.iter()
        .map(|v| 1.0 / (1.0 + (v[0] - v[1]).exp()))
        .collect())
}

/// Anchors `[cx, cy, w, h]`, relative to the image size, in the order the heads emit them.
fn priors(h: usize, w: usize) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for (sizes, step) in MIN_SIZES.iter().zip(STEPS) {
        let (fh, fw) = (h.div_ceil(step), w.div_ceil(step));
        for i in 0..fh {
            for j in 0..fw {
                for s in sizes {
                    out.push([
                        (j as f32 + 0.5) * step as f32 / w as f32,
                        (i as f32 + 0.5) * step as f32 / h as f32,
                        s / w as f32,
                        s / h as f32,
                    ]);
                }
            }
        }
    }
    out
}

impl Detector for RetinaFace {
    fn name(&self) -> &'static str {
        "retinaface"
    }

    fn detect(&self, image: &RgbImage) -> Result<Vec<Face>> {
        let o = &self.options;
        detect_downscaled(image, o.max_side, |img, scale| {
            let found = self.detect_at_scale(img, o.score_threshold, o.min_face * scale)?;
            // Plain geometry, as the RetinaFace reference's `py_cpu_nms` without its +1.
            Ok(nms(found, o.nms_threshold, 0.0))
        })
    }
}
