//! The combined margin `s · (cos(m1·θ + m2) − m3)` and its presets.

use std::f64::consts::PI;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::acos::acos;
use crate::error::{Error, Result};

/// Default scale of the ArcFace and CosFace presets.
pub const DEFAULT_SCALE: f64 = 64.0;
/// Default additive angular margin of ArcFace.
pub const DEFAULT_ARCFACE_MARGIN: f64 = 0.5;
/// Default additive cosine margin of CosFace.
pub const DEFAULT_COSFACE_MARGIN: f64 = 0.35;
/// `cos` is clamped to `[-1 + CLAMP_EPS, 1 - CLAMP_EPS]` before `acos`.
pub const CLAMP_EPS: f64 = 1e-7;

/// What to do where `m1·θ + m2 > π`, where `cos(m1·θ + m2)` stops decreasing in θ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fallback {
    /// insightface's `easy_margin`: the margin is applied only where `cos θ > 0`;
    /// where `cos θ <= 0` the target logit is the plain `s · cos θ`.
    ///
    /// This is monotonic only when the margin function is monotonic on `[0, π/2]`,
    /// i.e. when `m1·π/2 + m2 <= π`, and it jumps at `cos θ = 0` whenever a margin is set.
    EasyMargin,
    /// insightface's classic ArcFace fallback, made continuous and generalised to m1/m3.
    ///
    /// Let `θ* = (π − m2) / m1` and `c* = cos θ*`. For `θ <= θ*` (`cos θ >= c*`) the target is
    /// `cos(m1·θ + m2) − m3`; beyond (`cos θ < c*`) it is
    /// `(cos θ − c*) + (−1 − m3)`, i.e. the value at the threshold, `cos(π) − m3 = −1 − m3`,
    /// continued linearly in `cos θ` with slope 1. Both pieces decrease in θ, and they meet at
    /// θ*, so the target is continuous and monotonically decreasing on `[0, π]`.
    ///
    /// For ArcFace (`m1 = 1, m3 = 0`) this is `cos θ − (1 − cos m)` against insightface's
    /// `cos θ − m·sin m`: the same slope, but insightface's offset leaves a small jump at the
    /// threshold (`−1` vs `−cos m − m·sin m`), which this offset removes. When `θ* >= π`
    /// (e.g. CosFace, plain normalised softmax) there is no fallback region at all.
    Linear,
}

/// A combined margin: target logit `s · (cos(m1·θ + m2) − m3)` with
/// `θ = acos(clamp(cos, −1 + 1e−7, 1 − 1e−7))`, non-target logits `s · cos`.
///
/// The fields are public; they are checked ([`CombinedMargin::validate`]) each time the margin
/// is used, so invalid values give an [`Error`], never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CombinedMargin {
    /// Scale `s > 0`.
    pub s: f64,
    /// Multiplicative angular margin (SphereFace), `m1 > 0`.
    pub m1: f64,
    /// Additive angular margin (ArcFace), `0 <= m2 < π`.
    pub m2: f64,
    /// Additive cosine margin (CosFace), finite.
    pub m3: f64,
    /// Behaviour where `m1·θ + m2 > π`.
    pub fallback: Fallback,
}

impl Default for CombinedMargin {
    /// ArcFace with `s = 64`, `m = 0.5`.
    fn default() -> Self {
        Self::arcface(DEFAULT_SCALE, DEFAULT_ARCFACE_MARGIN)
    }
}

impl CombinedMargin {
    /// Normalised softmax (NormFace): `m1 = 1, m2 = 0, m3 = 0`, logits `s · cos θ`.
    /// No fallback region exists; `fallback` is [`Fallback::Linear`] nominally.
    ///
    /// Plain un-normalised softmax is just a linear layer plus [`crate::cross_entropy`]
    /// and is out of scope here.
    pub fn softmax(s: f64) -> Self {
        Self::combined(s, 1.0, 0.0, 0.0)
    }

    /// SphereFace-style multiplicative margin `cos(m1·θ)` with [`Fallback::Linear`]
    /// beyond `θ* = π / m1` (a continuous monotonic extension in the spirit of SphereFace's ψ).
    pub fn sphereface(s: f64, m1: f64) -> Self {
        Self::combined(s, m1, 0.0, 0.0)
    }

    /// ArcFace `cos(θ + m2)` with [`Fallback::Linear`] like insightface's original
    /// (see [`Fallback::Linear`] for the continuity fix). Usual values: `s = 64, m2 = 0.5`.
    pub fn arcface(s: f64, m2: f64) -> Self {
        Self::combined(s, 1.0, m2, 0.0)
    }

    /// CosFace `cos θ − m3`. Usual values: `s = 64, m3 = 0.35`. With `m1 = 1, m2 = 0` there is
    /// no fallback region; `fallback` is [`Fallback::Linear`] nominally.
    pub fn cosface(s: f64, m3: f64) -> Self {
        Self::combined(s, 1.0, 0.0, m3)
    }

    /// The general combined margin with [`Fallback::Linear`].
    pub fn combined(s: f64, m1: f64, m2: f64, m3: f64) -> Self {
        Self {
            s,
            m1,
            m2,
            m3,
            fallback: Fallback::Linear,
        }
    }

    /// The same margin with another fallback.
    pub fn with_fallback(self, fallback: Fallback) -> Self {
        Self { fallback, ..self }
    }

    /// Checks `s > 0`, `m1 > 0`, `0 <= m2 < π`, all finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.s.is_finite() && self.s > 0.0) {
            return Err(Error::NonPositiveScale(self.s));
        }
        if !(self.m1.is_finite() && self.m1 > 0.0) {
            return Err(Error::InvalidMargin(format!(
                "m1 must be positive and finite, got {}",
                self.m1
            )));
        }
        if !(self.m2.is_finite() && (0.0..PI).contains(&self.m2)) {
            return Err(Error::InvalidMargin(format!(
                "m2 must be in [0, pi), got {}",
                self.m2
            )));
        }
        if !self.m3.is_finite() {
            return Err(Error::InvalidMargin(format!(
                "m3 must be finite, got {}",
                self.m3
            )));
        }
        Ok(())
    }

    /// The angle `θ* = (π − m2) / m1` beyond which `cos(m1·θ + m2)` stops decreasing.
    pub fn threshold_angle(&self) -> f64 {
        (PI - self.m2) / self.m1
    }

    /// The un-scaled target value `cos(m1·θ + m2) − m3` (with the fallback) for every
    /// element of `cos` (any shape, float dtype). Differentiable.
    pub fn target(&self, cos: &Tensor) -> Result<Tensor> {
        self.validate()?;
        if !cos.dtype().is_float() {
            return Err(Error::Shape(format!(
                "cosines must be a float tensor, got {:?}",
                cos.dtype()
            )));
        }
        let clamped = cos.clamp(-1.0 + CLAMP_EPS, 1.0 - CLAMP_EPS)?;
        let theta = acos(&clamped)?;
        let margin = theta
            .affine(self.m1, self.m2)?
            .cos()?
            .affine(1.0, -self.m3)?;
        let out = match self.fallback {
            Fallback::EasyMargin => {
                let keep = cos.gt(0.0)?;
                keep.where_cond(&margin, cos)?
            }
            Fallback::Linear => {
                let theta_star = self.threshold_angle();
                if theta_star >= PI {
                    margin
                } else {
                    let c_star = theta_star.cos();
                    let keep = clamped.ge(c_star)?;
                    let linear = clamped.affine(1.0, -c_star - 1.0 - self.m3)?;
                    keep.where_cond(&margin, &linear)?
                }
            }
        };
        Ok(out)
    }

    /// `s ·` [`target`](Self::target): the target logit for every element of `cos`.
    pub fn target_logit(&self, cos: &Tensor) -> Result<Tensor> {
        Ok(self.target(cos)?.affine(self.s, 0.0)?)
    }

    /// Logits `[N, C]` from cosines `[N, C]` and labels `[N]` (u32): the margin on each row's
    /// target column (through a one-hot mask, so gradients flow), `s · cos` elsewhere.
    pub fn logits(&self, cos: &Tensor, labels: &Tensor) -> Result<Tensor> {
        margin_logits(self, cos, labels, None)
    }
}

/// Validates `labels` against `[n, classes]` and returns them on the host.
pub(crate) fn check_labels(labels: &Tensor, n: usize, classes: usize) -> Result<Vec<u32>> {
    if labels.dtype() != DType::U32 {
        return Err(Error::LabelDType(labels.dtype()));
    }
    let got = match labels.dims() {
        &[len] => len,
        dims => {
            return Err(Error::Shape(format!(
                "labels must have rank 1, got shape {dims:?}"
            )))
        }
    };
    if got != n {
        return Err(Error::Shape(format!(
            "batch size mismatch: {n} rows but {got} labels"
        )));
    }
    let host = labels.to_vec1::<u32>()?;
    if let Some((index, &label)) = host
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(Error::LabelOutOfRange {
            index,
            label,
            classes,
        });
    }
    Ok(host)
}

/// Shared by [`CombinedMargin::logits`] and [`crate::MarginHead::forward`].
pub(crate) fn margin_logits(
    margin: &CombinedMargin,
    cos: &Tensor,
    labels: &Tensor,
    filter_threshold: Option<f64>,
) -> Result<Tensor> {
    margin.validate()?;
    let (n, classes) = match cos.dims() {
        &[n, c] => (n, c),
        dims => {
            return Err(Error::Shape(format!(
                "cosines must have rank 2, got shape {dims:?}"
            )))
        }
    };
    check_labels(labels, n, classes)?;
    let dtype = cos.dtype();
    let dev = cos.device();
    let labels_col = labels.unsqueeze(1)?;
    let one_hot_u8 = Tensor::arange(0u32, classes as u32, dev)?
        .unsqueeze(0)?
        .broadcast_as((n, classes))?
        .eq(&labels_col.broadcast_as((n, classes))?)?;
    let one_hot = one_hot_u8.to_dtype(dtype)?;
    let t = cos.contiguous()?.gather(&labels_col.contiguous()?, 1)?; // [n, 1]
    let delta = (margin.target(&t)? - &t)?; // [n, 1]
    let unscaled = (cos + one_hot.broadcast_mul(&delta)?)?;
    let logits = unscaled.affine(margin.s, 0.0)?;
    match filter_threshold {
        None => Ok(logits),
        Some(thr) => {
            let non_target = one_hot.affine(-1.0, 1.0)?;
            let drop = cos.gt(thr)?.to_dtype(dtype)?.mul(&non_target)?.gt(0.5)?;
            let neg_inf = Tensor::full(f64::NEG_INFINITY, (n, classes), dev)?.to_dtype(dtype)?;
            Ok(drop.where_cond(&neg_inf, &logits)?)
        }
    }
}
