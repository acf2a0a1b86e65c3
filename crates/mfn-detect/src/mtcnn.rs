//! MTCNN (Zhang et al., 2016): a proposal network run over an image pyramid, then two
//! refinement networks on 24x24 and 48x48 crops, the last of which gives 5 landmarks.
//! Weights and post-processing follow facenet-pytorch 2.6.0 (`pnet.pt`, `rnet.pt`,
//! `onet.pt`), step for step, so that boxes and landmarks match it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use mfn_model::import::torch::read_state_dict;

use crate::{detect_downscaled, Detector, DetectorOptions, Error, Face, Result};

/// Minimum face size of the pyramid, thresholds of the three stages, and the pyramid's
/// scale step, as facenet-pytorch's `MTCNN()` defaults.
const THRESHOLDS: [f32; 3] = [0.6, 0.7, 0.7];
const FACTOR: f32 = 0.709;

struct Net {
    w: HashMap<String, Tensor>,
}

impl Net {
    fn load(path: &Path, device: &Device, names: &[&str]) -> Result<Self> {
        let w = read_state_dict(path, device).map_err(|e| Error::Detector {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(missing) = names.iter().find(|n| !w.contains_key(**n)) {
            return Err(Error::Detector {
                path: path.to_path_buf(),
                message: format!("missing weight `{missing}`: not an MTCNN checkpoint"),
            });
        }
        Ok(Self { w })
    }

    fn conv(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = &self.w[&format!("{name}.weight")];
        let b = &self.w[&format!("{name}.bias")];
        Ok(x.conv2d(w, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, (), 1, 1))?)?)
    }

    fn dense(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = &self.w[&format!("{name}.weight")];
        let b = &self.w[&format!("{name}.bias")];
        Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
    }

    fn prelu(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let a = &self.w[&format!("{name}.weight")];
        let mut shape = vec![1; x.rank()];
        shape[1] = a.elem_count();
        let zeros = x.zeros_like()?;
        Ok((x.maximum(&zeros)? + x.minimum(&zeros)?.broadcast_mul(&a.reshape(shape)?)?)?)
    }
}

/// Max pooling with PyTorch's `ceil_mode=True`: a last, partial window is kept.
fn max_pool_ceil(x: &Tensor, k: usize, s: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let need = |d: usize| -> usize {
        let out = (d.saturating_sub(k)).div_ceil(s) + 1;
        ((out - 1) * s + k).saturating_sub(d)
    };
    let (ph, pw) = (need(h), need(w));
    let mut x = x.clone();
    if ph > 0 {
        let pad = Tensor::full(f32::NEG_INFINITY, (n, c, ph, w), x.device())?;
        x = Tensor::cat(&[&x, &pad], 2)?;
    }
    if pw > 0 {
        let pad = Tensor::full(f32::NEG_INFINITY, (n, c, h + ph, pw), x.device())?;
        x = Tensor::cat(&[&x, &pad], 3)?;
    }
    Ok(x.max_pool2d_with_stride(k, s)?)
}

/// softmax(logits)[:, 1] of `[n, 2, ...]` logits, along dim 1.
fn face_prob(logits: &Tensor) -> Result<Tensor> {
    let a = logits.narrow(1, 0, 1)?;
    let b = logits.narrow(1, 1, 1)?;
    // 1 / (1 + exp(a - b)).
    Ok(((a - b)?.exp()? + 1.0)?.recip()?)
}

/// An RGB image as planar `f32` CHW, in `0..=255`.
struct Planes {
    data: Vec<f32>,
    h: usize,
    w: usize,
}

impl Planes {
    fn new(img: &RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut data = vec![0f32; 3 * w * h];
        mfn_data::image::rgb_to_chw(img, &mut data);
        Self { data, h, w }
    }

    /// Area resampling (`F.interpolate(mode="area")`, i.e. adaptive average pooling) of
    /// rows `y0..y1` and columns `x0..x1` to `oh x ow`, normalised as MTCNN expects.
    fn resample(
        &self,
        (y0, y1, x0, x1): (usize, usize, usize, usize),
        oh: usize,
        ow: usize,
    ) -> Vec<f32> {
        let (ih, iw) = (y1 - y0, x1 - x0);
        let mut out = vec![0f32; 3 * oh * ow];
        for c in 0..3 {
            let plane = &self.data[c * self.h * self.w..(c + 1) * self.h * self.w];
            for oy in 0..oh {
                let (sy, ey) = (oy * ih / oh, ((oy + 1) * ih).div_ceil(oh));
                for ox in 0..ow {
                    let (sx, ex) = (ox * iw / ow, ((ox + 1) * iw).div_ceil(ow));
                    let mut sum = 0f32;
                    for y in sy..ey {
                        let row = &plane[(y0 + y) * self.w + x0..];
                        sum += row[sx..ex].iter().sum::<f32>();
                    }
                    let mean = sum / ((ey - sy) * (ex - sx)) as f32;
                    out[(c * oh + oy) * ow + ox] = (mean - 127.5) * 0.0078125;
                }
            }
        }
        out
    }
}

/// A candidate box `[x1, y1, x2, y2]`, its score and its regression offsets.
#[derive(Clone, Debug)]
struct Candidate {
    b: [f32; 4],
    score: f32,
    reg: [f32; 4],
    points: [[f32; 2]; 5],
}

/// Greedy NMS; `min` divides the overlap by the smaller box (facenet-pytorch's "Min"),
/// `plus_one` counts pixels inclusively as its numpy NMS does.
fn nms(mut c: Vec<Candidate>, threshold: f32, min: bool, plus_one: bool) -> Vec<Candidate> {
    c.sort_by(|a, b| b.score.total_cmp(&a.score));
    let one = if plus_one { 1.0 } else { 0.0 };
    let area = |b: &[f32; 4]| (b[2] - b[0] + one) * (b[3] - b[1] + one);
    let mut keep: Vec<Candidate> = Vec::new();
    for d in c {
        let ok = keep.iter().all(|k| {
            let w = (k.b[2].min(d.b[2]) - k.b[0].max(d.b[0]) + one).max(0.0);
            let h = (k.b[3].min(d.b[3]) - k.b[1].max(d.b[1]) + one).max(0.0);
            let inter = w * h;
            let o = if min {
                inter / area(&k.b).min(area(&d.b))
            } else {
                inter / (area(&k.b) + area(&d.b) - inter)
            };
            o <= threshold
        });
        if ok {
            keep.push(d);
        }
    }
    keep
}

fn bbreg(c: &mut Candidate) {
    let w = c.b[2] - c.b[0] + 1.0;
    let h = c.b[3] - c.b[1] + 1.0;
    c.b = [
        c.b[0] + c.reg[0] * w,
        c.b[1] + c.reg[1] * h,
        c.b[2] + c.reg[2] * w,
        c.b[3] + c.reg[3] * h,
    ];
}

/// Squares a box around its centre.
fn rerec(c: &mut Candidate) {
    let h = c.b[3] - c.b[1];
    let w = c.b[2] - c.b[0];
    let l = w.max(h);
    c.b[0] += w * 0.5 - l * 0.5;
    c.b[1] += h * 0.5 - l * 0.5;
    c.b[2] = c.b[0] + l;
    c.b[3] = c.b[1] + l;
}

/// The crop a box covers, clipped to the image, as `(y0, y1, x0, x1)`; `None` when empty.
fn crop(b: &[f32; 4], w: usize, h: usize) -> Option<(usize, usize, usize, usize)> {
    let x = (b[0].trunc() as i64).max(1);
    let y = (b[1].trunc() as i64).max(1);
    let ex = (b[2].trunc() as i64).min(w as i64);
    let ey = (b[3].trunc() as i64).min(h as i64);
    (ey > y - 1 && ex > x - 1)
        .then(|| ((y - 1) as usize, ey as usize, (x - 1) as usize, ex as usize))
}

/// MTCNN with facenet-pytorch's weights.
pub struct Mtcnn {
    pnet: Net,
    rnet: Net,
    onet: Net,
    device: Device,
    /// Thresholds and input sizing.
    pub options: DetectorOptions,
}

impl Mtcnn {
    /// Loads `pnet.pt`, `rnet.pt` and `onet.pt` from a folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let net = |file: &str, names: &[&str]| Net::load(&dir.join(file), device, names);
        Ok(Self {
            pnet: net(
                "pnet.pt",
                &["conv1.weight", "conv4_1.weight", "conv4_2.weight"],
            )?,
            rnet: net(
                "rnet.pt",
                &["conv1.weight", "dense4.weight", "dense5_2.weight"],
            )?,
            onet: net(
                "onet.pt",
                &["conv1.weight", "dense5.weight", "dense6_3.weight"],
            )?,
            device: device.clone(),
            options: DetectorOptions::default(),
        })
    }

    fn stage1(&self, img: &Planes, min_face: f32) -> Result<Vec<Candidate>> {
        let m = 12.0 / min_face;
        let mut minl = img.h.min(img.w) as f32 * m;
        let mut scale = m;
        let mut all = Vec::new();
        while minl >= 12.0 {
            let (h, w) = (
                (img.h as f32 * scale + 1.0) as usize,
                (img.w as f32 * scale + 1.0) as usize,
            );
            let data = img.resample((0, img.h, 0, img.w), h, w);
            let x = Tensor::from_vec(data, (1, 3, h, w), &self.device)?;
            let p = &self.pnet;
            let y = p.prelu(&p.conv(&x, "conv1")?, "prelu1")?;
            let y = max_pool_ceil(&y, 2, 2)?;
            let y = p.prelu(&p.conv(&y, "conv2")?, "prelu2")?;
            let y = p.prelu(&p.conv(&y, "conv3")?, "prelu3")?;
            let prob = face_prob(&p.conv(&y, "conv4_1")?)?.squeeze(0)?.squeeze(0)?;
            let reg = p.conv(&y, "conv4_2")?.squeeze(0)?;
            let prob: Vec<Vec<f32>> = prob.to_vec2()?;
            let reg: Vec<Vec<Vec<f32>>> = reg.to_vec3()?;
            let mut level = Vec::new();
            for (yy, row) in prob.iter().enumerate() {
                for (xx, &score) in row.iter().enumerate() {
                    if score < THRESHOLDS[0] {
                        continue;
                    }
                    let q = |v: usize| (v as f32 / scale).floor();
                    level.push(Candidate {
                        b: [q(2 * xx + 1), q(2 * yy + 1), q(2 * xx + 12), q(2 * yy + 12)],
                        score,
                        reg: [
                            reg[0][yy][xx],
                            reg[1][yy][xx],
                            reg[2][yy][xx],
                            reg[3][yy][xx],
                        ],
                        points: [[0.0; 2]; 5],
                    });
                }
            }
            all.extend(nms(level, 0.5, false, false));
            scale *= FACTOR;
            minl *= FACTOR;
        }
        let mut boxes = nms(all, 0.7, false, false);
        for c in &mut boxes {
            let (w, h) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
            c.b = [
                c.b[0] + c.reg[0] * w,
                c.b[1] + c.reg[1] * h,
                c.b[2] + c.reg[2] * w,
                c.b[3] + c.reg[3] * h,
            ];
            rerec(c);
        }
        Ok(boxes)
    }

    /// Crops every box, resampled to `size`, as one batch; boxes with empty crops are
    /// dropped from `boxes`.
    fn crops(
        &self,
        img: &Planes,
        boxes: &mut Vec<Candidate>,
        size: usize,
    ) -> Result<Option<Tensor>> {
        let mut data = Vec::new();
        boxes.retain(|c| match crop(&c.b, img.w, img.h) {
            Some(r) => {
                data.extend(img.resample(r, size, size));
                true
            }
            None => false,
        });
        if boxes.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            data,
            (boxes.len(), 3, size, size),
            &self.device,
        )?))
    }

    fn stage2(&self, img: &Planes, mut boxes: Vec<Candidate>) -> Result<Vec<Candidate>> {
        let Some(x) = self.crops(img, &mut boxes, 24)? else {
            return Ok(vec![]);
        };
        let r = &self.rnet;
        let y = max_pool_ceil(&r.prelu(&r.conv(&x, "conv1")?, "prelu1")?, 3, 2)?;
        let y = max_pool_ceil(&r.prelu(&r.conv(&y, "conv2")?, "prelu2")?, 3, 2)?;
        let y = r.prelu(&r.conv(&y, "conv3")?, "prelu3")?;
        // facenet-pytorch flattens in (W, H, C) order.
        let y = y.permute((0, 3, 2, 1))?.contiguous()?.flatten_from(1)?;
        let y = r.prelu(&r.dense(&y, "dense4")?, "prelu4")?;
        let prob: Vec<f32> = face_prob(&r.dense(&y, "dense5_1")?)?
            .flatten_all()?
            .to_vec1()?;
        let reg: Vec<Vec<f32>> = r.dense(&y, "dense5_2")?.to_vec2()?;
        let mut kept = Vec::new();
        for ((mut c, p), g) in boxes.into_iter().zip(prob).zip(reg) {
            if p > THRESHOLDS[1] {
                c.score = p;
                c.reg = [g[0], g[1], g[2], g[3]];
                kept.push(c);
            }
        }
        let mut kept = nms(kept, 0.7, false, false);
        for c in &mut kept {
            bbreg(c);
            rerec(c);
        }
        Ok(kept)
    }

    fn stage3(&self, img: &Planes, mut boxes: Vec<Candidate>) -> Result<Vec<Candidate>> {
        let Some(x) = self.crops(img, &mut boxes, 48)? else {
            return Ok(vec![]);
        };
        let o = &self.onet;
        let y = max_pool_ceil(&o.prelu(&o.conv(&x, "conv1")?, "prelu1")?, 3, 2)?;
        let y = max_pool_ceil(&o.prelu(&o.conv(&y, "conv2")?, "prelu2")?, 3, 2)?;
        let y = max_pool_ceil(&o.prelu(&o.conv(&y, "conv3")?, "prelu3")?, 2, 2)?;
        let y = o.prelu(&o.conv(&y, "conv4")?, "prelu4")?;
        let y = y.permute((0, 3, 2, 1))?.contiguous()?.flatten_from(1)?;
        let y = o.prelu(&o.dense(&y, "dense5")?, "prelu5")?;
        let prob: Vec<f32> = face_prob(&o.dense(&y, "dense6_1")?)?
            .flatten_all()?
            .to_vec1()?;
        let reg: Vec<Vec<f32>> = o.dense(&y, "dense6_2")?.to_vec2()?;
        let pts: Vec<Vec<f32>> = o.dense(&y, "dense6_3")?.to_vec2()?;
        let mut kept = Vec::new();
        for (((mut c, p), g), l) in boxes.into_iter().zip(prob).zip(reg).zip(pts) {
            if p <= THRESHOLDS[2] {
                continue;
            }
            c.score = p;
            c.reg = [g[0], g[1], g[2], g[3]];
            let w = c.b[2] - c.b[0] + 1.0;
            let h = c.b[3] - c.b[1] + 1.0;
            for k in 0..5 {
                c.points[k] = [w * l[k] + c.b[0] - 1.0, h * l[k + 5] + c.b[1] - 1.0];
            }
            bbreg(&mut c);
            kept.push(c);
        }
        Ok(nms(kept, 0.7, true, true))
    }

    /// Every face in `image` at its own scale, best first.
    fn detect_at_scale(&self, image: &RgbImage, options: &DetectorOptions) -> Result<Vec<Face>> {
        let img = Planes::new(image);
        let boxes = self.stage1(&img, options.min_face.max(12.0))?;
        let boxes = self.stage2(&img, boxes)?;
        let boxes = self.stage3(&img, boxes)?;
        Ok(boxes
            .into_iter()
            .filter(|c| c.score >= options.score_threshold)
            .map(|c| Face {
                bbox: c.b,
                score: c.score,
                landmarks: c.points,
            })
            .collect())
    }
}

impl Detector for Mtcnn {
    fn name(&self) -> &'static str {
        "mtcnn"
    }

    fn detect(&self, image: &RgbImage) -> Result<Vec<Face>> {
        let options = &self.options;
        detect_downscaled(image, options.max_side, |img, scale| {
            let scaled = DetectorOptions {
                min_face: options.min_face * scale,
                ..options.clone()
            };
            self.detect_at_scale(img, &scaled)
        })
    }
}
