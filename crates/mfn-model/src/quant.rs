//! Post-training int8 quantisation of the CPU engine's matrix products.
//!
//! The 1x1 convs and the embedding layer carry 90% and more of MobileFaceNet's
//! multiply-adds; they run in int8, calibrated on aligned faces ([`Calibrator`]):
//! - **Activations** as u8. Each input channel has a scale and zero point from its
//!   calibrated range, which puts it on a common 0..=255 grid; each channel's scale goes
//!   with the square root of its range ([`CHANNEL_BALANCE`]). At run time each row (one
//!   pixel) is then quantised over the part of that grid it spans, with its own step: one
//!   pixel rarely spans every channel's calibrated range.
//! - **Weights** symmetric with one scale per output channel, the input channels' scales
//!   folded in before rounding (so the product needs no per-channel rescaling), rounded
//!   with GPTQ's error feedback over the calibration inputs' second moments
//!   ([`quantize_weights_gptq`]).
//!
//! Accumulation is exact in i32; bias, PReLU, the cap and the residual add stay in f32.
//! The stem, the depthwise convs and the global depthwise conv stay in f32: they are a few
//! percent of the work and the most sensitive to rounding.
//!
//! Measured on the golden faces, worst cosine of the int8 embeddings to f32 (`w600k_mbf` /
//! y1): calibrated activations and plain rounding 0.9972 / 0.9975; with GPTQ rounding
//! 0.9982 / 0.9977; with per-row steps too 0.9993 / 0.9995.
//!
//! An [`Int8`] travels inside the native safetensors format next to the f32 weights, which
//! every other path (GPU, training, `--precision f32`) still needs: each quantised layer
//! adds the tensors `int8.{weight}` (i8, `[out, in]` in the source weight's order),
//! `int8.{weight}.scale` (f32, `[out]`), `int8.{weight}.input_scale` (f32, `[in]`) and
//! `int8.{weight}.input_zero` (u8, `[in]`); the metadata key [`INT8_KEY`] lists the layers
//! and the calibration as JSON, marked with [`INT8_FORMAT`]. A loaded
//! [`crate::Checkpoint`] with int8 data builds the int8 engine.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{Config, PoolSpec};
use crate::model::MobileFaceNet;
use crate::{Error, Result};

/// Metadata key of the int8 description (JSON) in a native file.
pub const INT8_KEY: &str = "mfn.int8";
/// The int8 format this version writes and reads.
pub const INT8_FORMAT: &str = "mfn-int8/2";
/// Prefix of the int8 tensors in a native file.
pub const INT8_PREFIX: &str = "int8.";
/// Suffix of a quantised weight's per-output-channel scales.
pub const SCALE_SUFFIX: &str = ".scale";
/// Suffix of a quantised layer's per-input-channel activation scales.
pub const INPUT_SCALE_SUFFIX: &str = ".input_scale";
/// Suffix of a quantised layer's per-input-channel zero points.
pub const INPUT_ZERO_SUFFIX: &str = ".input_zero";
/// Calibration faces used when none is said: enough for stable ranges, a few seconds.
pub const DEFAULT_CALIBRATION_IMAGES: usize = 512;

/// What the CPU engine computes its matrix products in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// int8 1x1 convs and embedding layer, f32 elsewhere.
    Int8,
}

impl Precision {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

/// How a layer's activation range is taken from the calibration faces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RangeMethod {
    /// The smallest and largest value seen (ONNX Runtime's default). The mean over
    /// batches of 32 of each batch's extremes, which clips rare outliers, did worse on the
    /// golden faces (worst cosine to f32 0.990 against 0.997 on `w600k_mbf`).
    #[default]
    MinMax,
}

/// Where an [`Int8`]'s activation ranges came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationInfo {
    /// Faces the ranges were measured on.
    pub images: usize,
    /// How the ranges were taken.
    pub method: RangeMethod,
    /// Free text naming the faces (a folder, a data set).
    pub source: String,
}

/// Which layers run in int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// The embedding layer too (the last product before the embedding).
    pub head: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self { head: true }
    }
}

/// One quantised product: a 1x1 conv or the embedding layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Layer {
    /// Output channels.
    pub out_features: usize,
    /// Input channels (features).
    pub in_features: usize,
    /// `[out][in]` weights in `-127..=127`, in the source weight's order: the
    /// BatchNorm-folded weight times its input channel's scale, so that
    /// `weight[o][i] * weight_scale[o] ≈ folded[o][i] * input_scale[i]`.
    pub weight: Vec<i8>,
    /// Per output channel.
    pub weight_scale: Vec<f32>,
    /// Per input channel: the calibrated grid is `u = x / input_scale + input_zero`, on
    /// which the channel's calibration range spans at most 0..=255. Each row's u8 values
    /// then step over its own span of that grid.
    pub input_scale: Vec<f32>,
    /// Per input channel: the grid's zero point.
    pub input_zero: Vec<u8>,
}

/// The int8 half of a model: its quantised layers by the name of the f32 weight each
/// replaces (`{conv}_conv2d_weight`, or `fc1_weight` for the embedding layer).
#[derive(Clone, Debug, PartialEq)]
pub struct Int8 {
    /// Quantised layers by weight name.
    pub layers: BTreeMap<String, Int8Layer>,
    /// How the activation ranges were measured.
    pub calibration: CalibrationInfo,
}

/// A layer the engine can run in int8: its weight name and `(out, in)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductLayer {
    /// Name of its f32 weight.
    pub weight: String,
    /// Output channels.
    pub out_features: usize,
    /// Input channels (features).
    pub in_features: usize,
}

/// The engine's matrix products in the order it runs them: the stem's 1x1 conv, each
/// block's expansion and projection, the 1x1 conv to the last width, the reduce conv of
/// [`crate::Pooling::ConvReduce`], and the embedding layer.
pub fn product_layers(config: &Config) -> Vec<ProductLayer> {
    let plan = config.plan();
    let conv = |c: &crate::ConvSpec| ProductLayer {
        weight: c.weight_name(),
        out_features: c.out_channels,
        in_features: c.in_channels,
    };
    let mut out: Vec<ProductLayer> = plan.stem_pw.iter().map(conv).collect();
    for b in &plan.blocks {
        out.push(conv(&b.expand));
        out.push(conv(&b.project));
    }
    out.push(conv(&plan.last));
    if let PoolSpec::ConvReduce(c) = &plan.pool {
        out.push(conv(c));
    }
    out.push(ProductLayer {
        weight: crate::config::EmbeddingSpec::WEIGHT.to_string(),
        out_features: plan.embedding.out_features,
        in_features: plan.embedding.in_features,
    });
    out
}

/// [`product_layers`] by weight name.
fn products_by_name(config: &Config) -> BTreeMap<String, ProductLayer> {
    product_layers(config)
        .into_iter()
        .map(|l| (l.weight.clone(), l))
        .collect()
}

/// The JSON under [`INT8_KEY`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Int8Meta {
    format: String,
    calibration: CalibrationInfo,
    /// The quantised layers by weight name.
    layers: Vec<String>,
}

/// Largest [`INT8_KEY`] JSON a file may hold: 1 MiB is thousands of layers.
const MAX_INT8_META_BYTES: usize = 1 << 20;

impl Int8 {
    /// Checks every layer against `config`: each is one of its products with the right
    /// shape, weights in `-127..=127`, scales finite and positive. Errors name `path`.
    pub fn check(&self, config: &Config, path: &Path) -> Result<()> {
        let known = products_by_name(config);
        let bad = |name: &str, message: String| Error::BadWeight {
            path: path.to_path_buf(),
            name: format!("{INT8_PREFIX}{name}"),
            message,
        };
        if self.layers.is_empty() {
            return Err(Error::Native {
                path: path.to_path_buf(),
                message: format!("`{INT8_KEY}` names no layer"),
            });
        }
        for (name, l) in &self.layers {
            let want = known.get(name).ok_or_else(|| {
                bad(
                    name,
                    format!(
                        "not a 1x1 conv or embedding layer of config `{}`",
                        config.name
                    ),
                )
            })?;
            if (l.out_features, l.in_features) != (want.out_features, want.in_features) {
                return Err(bad(
                    name,
                    format!(
                        "shape [{}, {}], the layer is [{}, {}]",
                        l.out_features, l.in_features, want.out_features, want.in_features
                    ),
                ));
            }
            if l.weight.len() != l.out_features * l.in_features
                || l.weight_scale.len() != l.out_features
                || l.input_scale.len() != l.in_features
                || l.input_zero.len() != l.in_features
            {
                return Err(bad(name, "weights or scales of the wrong length".into()));
            }
            if let Some(i) = l.weight.iter().position(|&v| v == i8::MIN) {
                return Err(bad(
                    name,
                    format!("value -128 at index {i}: weights are symmetric, -127..=127"),
                ));
            }
            for (suffix, what, scales) in [
                (SCALE_SUFFIX, "scale", &l.weight_scale),
                (INPUT_SCALE_SUFFIX, "input scale", &l.input_scale),
            ] {
                if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(bad(
                        &format!("{name}{suffix}"),
                        format!(
                            "{what} {} at index {i} is not finite and positive",
                            scales[i]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The metadata value and the tensors (name, i8 bytes or f32 values, shape) that store
    /// it in a native file.
    pub(crate) fn to_native(&self) -> Result<(String, Vec<NativeTensor>)> {
        let meta = Int8Meta {
            format: INT8_FORMAT.to_string(),
            calibration: self.calibration.clone(),
            layers: self.layers.keys().cloned().collect(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| Error::Native {
            path: Default::default(),
            message: format!("cannot serialise `{INT8_KEY}`: {e}"),
        })?;
        let mut tensors = Vec::new();
        for (name, l) in &self.layers {
            tensors.push(NativeTensor {
                name: format!("{INT8_PREFIX}{name}"),
                dtype: safetensors::Dtype::I8,
                shape: vec![l.out_features, l.in_features],
                data: l.weight.iter().map(|&v| v as u8).collect(),
            });
            tensors.push(NativeTensor {
                name: format!("{INT8_PREFIX}{name}{SCALE_SUFFIX}"),
                dtype: safetensors::Dtype::F32,
                shape: vec![l.out_features],
                data: l
                    .weight_scale
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            });
            tensors.push(NativeTensor {
                name: format!("{INT8_PREFIX}{name}{INPUT_SCALE_SUFFIX}"),
                dtype: safetensors::Dtype::F32,
                shape: vec![l.in_features],
                data: l.input_scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
            });
            tensors.push(NativeTensor {
                name: format!("{INT8_PREFIX}{name}{INPUT_ZERO_SUFFIX}"),
                dtype: safetensors::Dtype::U8,
                shape: vec![l.in_features],
                data: l.input_zero.clone(),
            });
        }
        Ok((json, tensors))
    }

    /// Reads the int8 half of a native file: the [`INT8_KEY`] JSON and the `int8.*`
    /// tensors of `st`, checked against `config`. Every int8 tensor must belong to a
    /// layer the JSON names, and every such layer must have both of its tensors.
    pub(crate) fn from_native(
        json: &str,
        st: &safetensors::SafeTensors<'_>,
        config: &Config,
        path: &Path,
    ) -> Result<Self> {
        let bad = |message: String| Error::Native {
            path: path.to_path_buf(),
            message,
        };
        if json.len() > MAX_INT8_META_BYTES {
            return Err(bad(format!(
                "`{INT8_KEY}` is {} bytes, more than the {MAX_INT8_META_BYTES} it needs",
                json.len()
            )));
        }
        let meta: Int8Meta =
            serde_json::from_str(json).map_err(|e| bad(format!("bad `{INT8_KEY}`: {e}")))?;
        if meta.format != INT8_FORMAT {
            return Err(bad(format!(
                "`{INT8_KEY}` format `{}` is not `{INT8_FORMAT}`: quantise the f32 model again \
                 (`mfn-cli quantize`)",
                meta.format
            )));
        }
        let known = products_by_name(config);
        let mut layers = BTreeMap::new();
        if meta.layers.len() > known.len() {
            return Err(bad(format!(
                "`{INT8_KEY}` lists {} layers; config `{}` has {} products",
                meta.layers.len(),
                config.name,
                known.len()
            )));
        }
        for name in &meta.layers {
            if layers.contains_key(name) {
                return Err(bad(format!("`{INT8_KEY}` lists layer `{name}` twice")));
            }
            let shape = known.get(name).ok_or_else(|| Error::BadWeight {
                path: path.to_path_buf(),
                name: format!("{INT8_PREFIX}{name}"),
                message: format!(
                    "not a 1x1 conv or embedding layer of config `{}`",
                    config.name
                ),
            })?;
            let tensor = |suffix: &str, dtype: safetensors::Dtype, want: Vec<usize>| {
                let full = format!("{INT8_PREFIX}{name}{suffix}");
                let view = st.tensor(&full).map_err(|_| Error::MissingWeight {
                    path: path.to_path_buf(),
                    name: full.clone(),
                })?;
                if view.dtype() != dtype {
                    return Err(Error::BadWeight {
                        path: path.to_path_buf(),
                        name: full,
                        message: format!("dtype {:?}, expected {dtype:?}", view.dtype()),
                    });
                }
                if view.shape() != want.as_slice() {
                    return Err(Error::WeightShape {
                        path: path.to_path_buf(),
                        name: full,
                        expected: want,
                        found: view.shape().to_vec(),
                    });
                }
                Ok(view.data().to_vec())
            };
            let (o, i) = (shape.out_features, shape.in_features);
            let weight = tensor("", safetensors::Dtype::I8, vec![o, i])?
                .into_iter()
                .map(|b| b as i8)
                .collect();
            let floats = |bytes: Vec<u8>| -> Vec<f32> {
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            let weight_scale = floats(tensor(SCALE_SUFFIX, safetensors::Dtype::F32, vec![o])?);
            let input_scale = floats(tensor(
                INPUT_SCALE_SUFFIX,
                safetensors::Dtype::F32,
                vec![i],
            )?);
            let input_zero = tensor(INPUT_ZERO_SUFFIX, safetensors::Dtype::U8, vec![i])?;
            layers.insert(
                name.clone(),
                Int8Layer {
                    out_features: o,
                    in_features: i,
                    weight,
                    weight_scale,
                    input_scale,
                    input_zero,
                },
            );
        }
        for (name, _) in st.tensors() {
            let Some(rest) = name.strip_prefix(INT8_PREFIX) else {
                continue;
            };
            let layer = [SCALE_SUFFIX, INPUT_SCALE_SUFFIX, INPUT_ZERO_SUFFIX]
                .iter()
                .find_map(|s| rest.strip_suffix(s))
                .unwrap_or(rest);
            if !layers.contains_key(layer) {
                return Err(Error::BadWeight {
                    path: path.to_path_buf(),
                    name,
                    message: format!("an int8 tensor of no layer that `{INT8_KEY}` names"),
                });
            }
        }
        let int8 = Int8 {
            layers,
            calibration: meta.calibration,
        };
        int8.check(config, path)?;
        Ok(int8)
    }
}

/// A tensor of a native file outside candle's dtypes (candle has no i8).
pub(crate) struct NativeTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &NativeTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Symmetric per-row quantisation of `[rows][cols]` weights: each row's largest magnitude
/// maps to 127. A row of zeros gets scale 1.
pub fn quantize_weights(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    debug_assert_eq!(w.len(), rows * cols);
    let mut q = vec![0i8; rows * cols];
    let mut scales = vec![1f32; rows];
    for ((row, qrow), scale) in w
        .chunks_exact(cols.max(1))
        .zip(q.chunks_exact_mut(cols.max(1)))
        .zip(&mut scales)
    {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max > 0.0 && max.is_finite() {
            *scale = max / 127.0;
            for (q, v) in qrow.iter_mut().zip(row) {
                *q = (v / *scale).round().clamp(-127.0, 127.0) as i8;
            }
        }
    }
    (q, scales)
}

/// Widest input the error-compensating rounding takes on: its `in x in` sums cost
/// `in^2` doubles and Cholesky factorisations of that size. Wider inputs are the embedding
/// layers after a conv-reduce pool (`w600k_mbf`'s 3,136 = 64 x 7 x 7), which see one row
/// per face, too few for that many second moments: rounding them plainly measured the
/// same golden-face cosines (0.99924 against 0.99927) in a second instead of 25.
const MAX_GPTQ_INPUTS: usize = 1024;

/// Rows of one layer's input that one batch adds to its second moments: every
/// `rows / GRAM_ROWS`-th row of a larger input. 512 faces give each layer 16 times this;
/// the full 3,136 pixels a face of the early layers took six times as long to calibrate
/// for the same golden-face cosines.
const GRAM_ROWS: usize = 8192;

/// Adds `x^T x` of the `rows x k` matrix `x` (every `step`-th row of it when it has more
/// than [`GRAM_ROWS`]) to `acc` (`k x k`, row-major).
fn add_gram(acc: &mut [f64], scratch: &mut Vec<f32>, x: &[f32], k: usize) {
    let all = x.len() / k.max(1);
    let step = all.div_ceil(GRAM_ROWS).max(1);
    let rows = all.div_ceil(step);
    if rows == 0 || k == 0 {
        return;
    }
    scratch.clear();
    scratch.resize(k * k, 0.0);
    let stride = (step * k) as isize;
    // SAFETY: `scratch` holds `k x k` (row stride k); rows `0, step, .., (rows - 1) * step`
    // of `x` are within its `all x k` values, and the strides address only those.
    unsafe {
        gemm::gemm(
            k,
            k,
            rows,
            scratch.as_mut_ptr(),
            1,
            k as isize,
            false,
            x.as_ptr(),
            stride,
            1,
            x.as_ptr(),
            1,
            stride,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    for (a, &v) in acc.iter_mut().zip(scratch.iter()) {
        *a += v as f64;
    }
}

/// Symmetric per-row int8 rounding of `[rows][cols]` weights that carries each rounding
/// error onto the columns not yet rounded, weighted by the inputs' second moments `h`
/// (`cols x cols`, `sum x x^T` over the calibration inputs): GPTQ (Frantar et al., 2023)
/// with 1% dampening. It minimises the error of the layer's outputs rather than of its
/// weights. Falls back to plain rounding when `h` is not positive definite.
pub fn quantize_weights_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
) -> (Vec<i8>, Vec<f32>) {
    use rayon::prelude::*;
    debug_assert_eq!(h.len(), cols * cols);
    let (_, scales) = quantize_weights(w, rows, cols);
    let mut h = nalgebra::DMatrix::<f64>::from_row_slice(cols, cols, h);
    for c in 0..cols {
        if h[(c, c)] <= 0.0 {
            h[(c, c)] = 1.0;
        }
    }
    let mean_diag = (0..cols).map(|c| h[(c, c)]).sum::<f64>() / cols.max(1) as f64;
    for c in 0..cols {
        h[(c, c)] += 0.01 * mean_diag;
    }
    let upper = h
        .cholesky()
        .map(|ch| ch.inverse())
        .and_then(|inv| inv.cholesky())
        .map(|ch| ch.l().transpose());
    let Some(u) = upper else {
        return quantize_weights(w, rows, cols);
    };
    let u: Vec<f64> = (0..cols * cols).map(|i| u[(i / cols, i % cols)]).collect();
    let mut q = vec![0i8; rows * cols];
    q.par_chunks_mut(cols.max(1))
        .zip(w.par_chunks(cols.max(1)))
        .zip(scales.par_iter())
        .for_each(|((qrow, row), &s)| {
            // A channel the calibration never moved has no second moments: it neither
            // takes nor passes on errors, and keeps its plain rounding.
            let mut row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let s = s as f64;
            for c in 0..cols {
                let v = row[c];
                let qv = (v / s).round().clamp(-127.0, 127.0);
                qrow[c] = qv as i8;
                let err = (v - qv * s) / u[c * cols + c];
                for (r, uu) in row[c + 1..]
                    .iter_mut()
                    .zip(&u[c * cols + c + 1..(c + 1) * cols])
                {
                    *r -= err * uu;
                }
            }
        });
    (q, scales)
}

/// The u8 scale and zero point that cover `[min, max]` (widened to hold 0, so that zero
/// padding and ReLU's zeros are exact).
pub fn activation_params(min: f32, max: f32) -> (f32, u8) {
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return (1.0, 0);
    }
    let scale = span / 255.0;
    let zero = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zero)
}

/// How far activation scales follow each channel's own range (see [`channel_params`]).
///
/// Measured on the golden faces (worst cosine to f32 of `w600k_mbf` / y1, 512 calibration
/// faces): 1 (a scale per channel) 0.9957 / 0.9972, 0 (one per tensor) 0.9956 / 0.9969,
/// 0.5 0.9971 / 0.9975; 0.35 and 0.65 are within 0.0003 of 0.5. A scale per channel
/// leaves the channels with small ranges fine steps but coarsens the weights they are
/// folded into; halfway shares the rounding between the two.
pub const CHANNEL_BALANCE: f32 = 0.5;

/// Per-channel scales and zero points that cover each channel's range, with channel `c`'s
/// scale proportional to `span_c ^ alpha`: `alpha = 1` gives each channel its own scale,
/// `alpha = 0` one scale for all.
fn channel_params(ranges: &[(f32, f32)], alpha: f32) -> (Vec<f32>, Vec<u8>) {
    let span = |&(lo, hi): &(f32, f32)| {
        let s = hi.max(0.0) - lo.min(0.0);
        if s.is_finite() && s > 0.0 {
            s
        } else {
            f32::MIN_POSITIVE
        }
    };
    // Every channel must fit: span_c / scale_c <= 255.
    let m = ranges
        .iter()
        .map(|r| span(r).powf(1.0 - alpha))
        .fold(0f32, f32::max)
        / 255.0;
    ranges
        .iter()
        .map(|r| {
            let (lo, hi) = (r.0.min(0.0), r.1.max(0.0));
            let scale = (span(r).powf(alpha) * m).max(f32::MIN_POSITIVE);
            let zero = if hi - lo > 0.0 {
                (-lo / scale).round().clamp(0.0, 255.0) as u8
            } else {
                0
            };
            (scale, zero)
        })
        .unzip()
}

/// Measures each matrix product's input range per channel over calibration faces, then
/// quantises the model: `Calibrator::new(&model)`, [`Calibrator::observe`] on batches of
/// aligned faces (as [`MobileFaceNet::forward`] takes them), [`Calibrator::finish`].
#[derive(Debug)]
pub struct Calibrator<'m> {
    model: &'m MobileFaceNet,
    layers: Vec<ProductLayer>,
    /// Per layer, per input channel in the engine's order: smallest and largest value.
    ranges: Vec<Vec<(f32, f32)>>,
    /// Per layer: `in x in` sums of input products (row-major), empty for layers too wide.
    hessians: Vec<Vec<f64>>,
    images: usize,
}

impl<'m> Calibrator<'m> {
    /// A calibrator for `model`'s f32 engine.
    pub fn new(model: &'m MobileFaceNet) -> Self {
        let layers = product_layers(model.config());
        let ranges = layers
            .iter()
            .map(|l| vec![(f32::INFINITY, f32::NEG_INFINITY); l.in_features])
            .collect();
        let hessians = layers
            .iter()
            .map(|l| {
                if l.in_features <= MAX_GPTQ_INPUTS {
                    vec![0f64; l.in_features * l.in_features]
                } else {
                    Vec::new()
                }
            })
            .collect();
        Self {
            model,
            layers,
            ranges,
            hessians,
            images: 0,
        }
    }

    /// Runs a batch of faces (`[N, 3, H, W]` f32 RGB in `0..=255`) through the f32 engine
    /// and widens each layer's per-channel ranges to hold its input. Values that are not
    /// finite are an error: a face that makes them is no calibration face.
    pub fn observe(&mut self, faces: &Tensor) -> Result<()> {
        let faces = faces.to_device(&Device::Cpu)?;
        let mut bad = None;
        let ranges = &mut self.ranges;
        let hessians = &mut self.hessians;
        let mut scratch = Vec::new();
        self.model.observe_products(&faces, &mut |i, x| {
            let k = ranges[i].len();
            if !hessians[i].is_empty() && x.iter().all(|v| v.is_finite()) {
                add_gram(&mut hessians[i], &mut scratch, x, k);
            }
            let r = &mut ranges[i];
            for row in x.chunks_exact(r.len()) {
                for ((lo, hi), &v) in r.iter_mut().zip(row) {
                    if !v.is_finite() {
                        bad.get_or_insert(i);
                        continue;
                    }
                    *lo = lo.min(v);
                    *hi = hi.max(v);
                }
            }
        })?;
        if let Some(i) = bad {
            return Err(candle_core::Error::Msg(format!(
                "calibration: the input of `{}` is not finite",
                self.layers[i].weight
            ))
            .into());
        }
        self.images += faces.dim(0)?;
        Ok(())
    }

    /// Faces observed so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// The int8 half of the model: activation scales from the observed ranges, weights
    /// (BatchNorm folded, times their input channel's scale) quantised per output channel
    /// with GPTQ over the observed inputs (plain rounding for inputs wider than 1,024).
    /// `source` names the faces.
    pub fn finish(self, options: QuantizeOptions, source: &str) -> Result<Int8> {
        if self.images == 0 {
            return Err(
                candle_core::Error::Msg("calibration: no faces were observed".to_string()).into(),
            );
        }
        let folded = self.model.folded_products()?;
        let head = crate::config::EmbeddingSpec::WEIGHT;
        let (channels, hw) = self.model.head_input_layout();
        let mut layers = BTreeMap::new();
        for (((layer, ranges), w), hessian) in self
            .layers
            .iter()
            .zip(self.ranges)
            .zip(folded)
            .zip(self.hessians)
        {
            let is_head = layer.weight == head;
            if is_head && !options.head {
                continue;
            }
            let ranges = if is_head {
                // The engine sees the head's input in NHWC order, the weight is stored for
                // an NCHW flatten: feature `p * channels + c` is `c * hw + p`. Each
                // channel's range covers all its positions: one position alone sees too
                // few values for its tails.
                let mut per_channel = vec![(f32::INFINITY, f32::NEG_INFINITY); channels];
                for (f, &(lo, hi)) in ranges.iter().enumerate() {
                    let r = &mut per_channel[f % channels];
                    *r = (r.0.min(lo), r.1.max(hi));
                }
                let mut nchw = ranges.clone();
                for c in 0..channels {
                    for p in 0..hw {
                        nchw[c * hw + p] = per_channel[c];
                    }
                }
                nchw
            } else {
                ranges
            };
            let (input_scale, input_zero) = channel_params(&ranges, CHANNEL_BALANCE);
            let (o, i) = (layer.out_features, layer.in_features);
            let mut scaled = w;
            for row in scaled.chunks_exact_mut(i) {
                for (v, s) in row.iter_mut().zip(&input_scale) {
                    *v *= s;
                }
            }
            let (weight, weight_scale) = if !hessian.is_empty() {
                let mut h = hessian;
                if is_head && hw > 1 {
                    // The sums were taken in the engine's NHWC order; the weight is NCHW.
                    let nhwc = |f: usize| (f % hw) * channels + f / hw;
                    let src = h.clone();
                    for a in 0..i {
                        for b in 0..i {
                            h[a * i + b] = src[nhwc(a) * i + nhwc(b)];
                        }
                    }
                }
                for a in 0..i {
                    for b in 0..i {
                        h[a * i + b] /= input_scale[a] as f64 * input_scale[b] as f64;
                    }
                }
                quantize_weights_gptq(&scaled, o, i, &h)
            } else {
                quantize_weights(&scaled, o, i)
            };
            layers.insert(
                layer.weight.clone(),
                Int8Layer {
                    out_features: o,
                    in_features: i,
                    weight,
                    weight_scale,
                    input_scale,
                    input_zero,
                },
            );
        }
        Ok(Int8 {
            layers,
            calibration: CalibrationInfo {
                images: self.images,
                method: RangeMethod::MinMax,
                source: source.to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.13)
            .collect();
        let (q, s) = quantize_weights(&w, 4, 6);
        for r in 0..4 {
            let max = q[r * 6..(r + 1) * 6]
                .iter()
                .map(|v| v.unsigned_abs())
                .max()
                .unwrap();
            assert_eq!(max, 127, "row {r} uses the whole range");
            for c in 0..6 {
                let back = q[r * 6 + c] as f32 * s[r];
                assert!((back - w[r * 6 + c]).abs() <= s[r] / 2.0 + 1e-6);
            }
        }
        let (q, s) = quantize_weights(&[0.0; 3], 1, 3);
        assert_eq!((q, s), (vec![0; 3], vec![1.0]));
    }

    /// On inputs whose channels move together, error feedback gives outputs closer to the
    /// f32 ones than plain rounding, with the same scales and in range.
    #[test]
    fn gptq_rounding_beats_plain_rounding_on_the_outputs() {
        let (rows, cols, n) = (8, 24, 400);
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next() * 0.3).collect();
        // Two shared factors plus a little noise per channel.
        let x: Vec<f32> = (0..n)
            .flat_map(|_| {
                let (a, b) = (next(), next());
                (0..cols)
                    .map(|c| {
                        a * (c as f32 * 0.3).cos() + b * (c as f32 * 0.7).sin() + 0.05 * next()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut h = vec![0f64; cols * cols];
        for r in x.chunks_exact(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += r[i] as f64 * r[j] as f64;
                }
            }
        }
        let err = |q: &[i8], s: &[f32]| -> f64 {
            let mut e = 0.0;
            for r in x.chunks_exact(cols) {
                for o in 0..rows {
                    let (mut want, mut got) = (0f64, 0f64);
                    for c in 0..cols {
                        want += w[o * cols + c] as f64 * r[c] as f64;
                        got += q[o * cols + c] as f64 * s[o] as f64 * r[c] as f64;
                    }
                    e += (want - got).powi(2);
                }
            }
            e
        };
        let (pq, ps) = quantize_weights(&w, rows, cols);
        let (gq, gs) = quantize_weights_gptq(&w, rows, cols, &h);
        assert_eq!(ps, gs);
        assert!(gq.iter().all(|&v| v != i8::MIN));
        let (plain, gptq) = (err(&pq, &ps), err(&gq, &gs));
        assert!(gptq < 0.5 * plain, "GPTQ {gptq} against plain {plain}");
        // Second moments of nothing: plain rounding.
        let (zq, zs) = quantize_weights_gptq(&w, rows, cols, &vec![0.0; cols * cols]);
        assert_eq!((zq, zs), (pq, ps));
    }

    #[test]
    fn activation_params_hold_zero_exactly() {
        let (scale, zero) = activation_params(-1.0, 3.0);
        assert!((scale - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(zero, 64);
        // Only positive values: zero stays representable, at q = 0.
        assert_eq!(activation_params(0.5, 2.0).1, 0);
        assert_eq!(activation_params(-2.0, -0.5).1, 255);
        assert_eq!(activation_params(0.0, 0.0), (1.0, 0));
    }
}
