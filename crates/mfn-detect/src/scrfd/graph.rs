//! A bounded interpreter for the ONNX op subset a detector export uses, compiled once at
//! load into a list of steps over numbered slots.
//!
//! Exports of one network differ in how they compute shapes (Shape/Gather/Concat chains,
//! or constants), whether BatchNorm is folded, where Identity nodes sit and what the
//! outputs are called, so the graph is interpreted rather than pattern-matched. At load
//! everything that does not depend on the input is folded into constants, Identity and
//! Dropout become aliases, BatchNormalization and ReLU are folded into the conv before
//! them, convs that read one input with one geometry (the score, box and landmark heads)
//! become one, each conv picks its kernel (the project's native depthwise op, 1x1 as one
//! matrix product, other dense convs as im2col products tile by tile, candle's conv for
//! grouped convs and other devices), and every slot gets the step after which it is
//! dropped. Running is then a walk over the steps with no name lookups; the shape
//! arithmetic that remains (the FPN's upsampling sizes, the heads' reshapes) runs on
//! small `i64` vectors.
//!
//! The file is untrusted: node counts, every tensor a step makes and every shape value
//! are bounded, operands are checked before use, and a graph that reads a tensor no
//! earlier node computes is refused, so a cycle cannot hide in it. Errors name the node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use mfn_model::import::onnx::{OnnxGraph, OnnxNode, OnnxTensor, TensorValues};
use mfn_model::ops::{BiasPrelu, DepthwiseConv2d};

use super::kernels::{Dense, Pointwise};
use crate::{Error, Result};

/// Most nodes a graph may have: SCRFD-500M has under 200, the largest SCRFD under 1,000.
const MAX_NODES: usize = 10_000;
/// Most values a shape-like (host) value may hold.
const MAX_HOST_VALUES: usize = 1 << 16;
/// Most dims a tensor may have.
const MAX_RANK: usize = 8;

/// Small data computed on the host: shapes, indices, sizes, scales, and the constants
/// they are made from.
#[derive(Clone, Debug, PartialEq)]
enum HostData {
    I(Vec<i64>),
    F(Vec<f32>),
}

/// A host value with its dims.
#[derive(Clone, Debug, PartialEq)]
struct Host {
    dims: Vec<usize>,
    data: HostData,
}

impl Host {
    fn ints(dims: Vec<usize>, v: Vec<i64>) -> Self {
        Self {
            dims,
            data: HostData::I(v),
        }
    }

    fn len(&self) -> usize {
        match &self.data {
            HostData::I(v) => v.len(),
            HostData::F(v) => v.len(),
        }
    }

    /// The values as integers; floats must be whole numbers.
    fn as_ints(&self) -> std::result::Result<Vec<i64>, String> {
        match &self.data {
            HostData::I(v) => Ok(v.clone()),
            HostData::F(v) => v
                .iter()
                .map(|x| {
                    if x.fract() == 0.0 && x.abs() < 9.0e15 {
                        Ok(*x as i64)
                    } else {
                        Err(format!("{x} is not an integer"))
                    }
                })
                .collect(),
        }
    }

    fn as_floats(&self) -> Vec<f32> {
        match &self.data {
            HostData::I(v) => v.iter().map(|x| *x as f32).collect(),
            HostData::F(v) => v.clone(),
        }
    }
}

impl From<&OnnxTensor> for Host {
    fn from(t: &OnnxTensor) -> Self {
        Host {
            dims: t.dims().to_vec(),
            data: match t.values() {
                TensorValues::F32(v) => HostData::F(v.clone()),
                TensorValues::I64(v) => HostData::I(v.clone()),
            },
        }
    }
}

/// A value flowing through the graph.
#[derive(Clone, Debug)]
enum Value {
    /// A float tensor on the device.
    T(Tensor),
    /// Host data.
    H(Host),
}

/// Where a step reads an operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// An omitted optional input.
    None,
    /// A constant, folded at load.
    Const(usize),
    /// A value computed while running: slot 0 is the network's input.
    Slot(usize),
}

/// How a conv runs.
#[derive(Clone, Debug)]
enum ConvKernel {
    /// Not chosen yet (before fusion).
    Pending,
    /// One filter per channel: the project's native kernel, bias and ReLU fused.
    Depthwise(DepthwiseConv2d),
    /// 1x1, stride 1, no padding: one matrix product, bias and ReLU fused.
    Pointwise(Pointwise),
    /// Any other conv without groups: im2col and a matrix product, tile by tile.
    Dense(Dense),
    /// Anything else (grouped convs, other devices): candle's conv, then bias and ReLU.
    Candle {
        weight: Tensor,
        /// The bias (and ReLU) on CPU, as one fused op.
        epilogue: Option<BiasPrelu>,
        /// The bias as `[1, cout, 1, 1]`, on other devices.
        bias: Tensor,
    },
}

/// A conv with its BatchNorm and ReLU folded in.
#[derive(Clone, Debug)]
struct Conv {
    /// `[cout, cin / groups, kh, kw]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    cout: usize,
    cin: usize,
    groups: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
    relu: bool,
    run: ConvKernel,
}

/// What a step computes.
#[derive(Clone, Debug)]
enum Op {
    Conv(Box<Conv>),
    /// A BatchNormalization that follows no conv: `x * scale + shift` per channel.
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Clip(Option<f32>, Option<f32>),
    Arith(Arith),
    Resize(Resize),
    Transpose(Option<Vec<i64>>),
    Reshape {
        allow_zero: bool,
    },
    Flatten(i64),
    Squeeze(Option<Vec<i64>>),
    Unsqueeze(Option<Vec<i64>>),
    Concat(i64),
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Gather(i64),
    /// Slice; the opset-1 form carries starts, ends and axes as attributes.
    Slice(Option<[Vec<i64>; 3]>),
    /// Cast to float (`true`) or to an integer type.
    Cast(bool),
    /// Channels `start..start + len` of a merged conv's output (a view, no copy).
    Narrow {
        start: usize,
        len: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

/// How output coordinates map to input ones in a nearest-neighbour Resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CoordMode {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNearest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// A nearest-neighbour Resize (or Upsample).
#[derive(Clone, Debug)]
struct Resize {
    coord: CoordMode,
    nearest: NearestMode,
    /// Input positions: (scales, sizes). Opset 10 and Upsample take scales second, opset
    /// 11 and later take `roi, scales, sizes`.
    scales_at: usize,
    sizes_at: Option<usize>,
    /// Upsample (opset 7) gives its scales as an attribute.
    attr_scales: Option<Vec<f32>>,
}

/// One step of the compiled graph.
#[derive(Clone, Debug)]
struct Step {
    /// The node, for errors.
    node: String,
    op_type: String,
    op: Op,
    inputs: Vec<Src>,
    out: usize,
    /// Slots no later step reads, dropped after this one.
    free: Vec<usize>,
}

/// A compiled graph.
#[derive(Debug)]
pub(super) struct Net {
    steps: Vec<Step>,
    consts: Vec<Value>,
    slots: usize,
    outputs: Vec<Src>,
    /// The graph's output names, in order, for errors.
    output_names: Vec<String>,
    device: Device,
    path: PathBuf,
}

fn fail(path: &Path, message: impl Into<String>) -> Error {
    Error::Detector {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The model reader's errors (a malformed file, an attribute of the wrong type) as the
/// detector's own, so that every load failure is an [`Error::Detector`] naming the file.
pub(super) fn detector_error(path: &Path, e: Error) -> Error {
    use mfn_model::Error as M;
    match e {
        Error::Model(m) => match *m {
            M::Onnx { message, .. } | M::File { message, .. } => fail(path, message),
            M::Io { source, .. } => fail(path, source.to_string()),
            other => fail(path, other.to_string()),
        },
        other => other,
    }
}

/// Normalises a possibly negative axis against `rank` (`rank + 1` for Unsqueeze).
fn axis(a: i64, rank: usize) -> std::result::Result<usize, String> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if (0..r).contains(&v) {
        Ok(v as usize)
    } else {
        Err(format!("axis {a} is outside a rank-{rank} value"))
    }
}

fn count(dims: &[usize]) -> std::result::Result<usize, String> {
    dims.iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| format!("dims {dims:?} overflow"))
}

/// Builds the constant a `Constant` node holds.
fn constant(n: &OnnxNode, path: &Path) -> Result<Host> {
    if let Some(t) = n.attr_tensor("value")? {
        return Ok(Host::from(&t));
    }
    if let Some(v) = n.attr_float("value_float")? {
        return Ok(Host {
            dims: vec![],
            data: HostData::F(vec![v]),
        });
    }
    if let Some(v) = n.attr_floats("value_floats")? {
        return Ok(Host {
            dims: vec![v.len()],
            data: HostData::F(v),
        });
    }
    if let Some(v) = n.attr_int("value_int")? {
        return Ok(Host::ints(vec![], vec![v]));
    }
    if let Some(v) = n.attr_ints("value_ints")? {
        return Ok(Host::ints(vec![v.len()], v));
    }
    Err(fail(
        path,
        format!(
            "node `{}` (Constant) has no value this reader takes (tensor, float(s), int(s))",
            n.name()
        ),
    ))
}

/// Non-negative int attributes, with a default.
fn sizes(n: &OnnxNode, key: &str, default: Vec<usize>, path: &Path) -> Result<Vec<usize>> {
    match n.attr_ints(key)? {
        None => Ok(default),
        Some(v) => v
            .iter()
            .map(|x| {
                usize::try_from(*x)
                    .ok()
                    .filter(|x| *x <= 1 << 20)
                    .ok_or_else(|| {
                        fail(
                            path,
                            format!(
                                "node `{}` ({}): attribute `{key}` holds {x}, not a size",
                                n.name(),
                                n.op()
                            ),
                        )
                    })
            })
            .collect(),
    }
}

/// The op for a node, reading its attributes and the constant operands it needs at load.
/// Returns the op and the inputs it reads while running.
fn build_op(n: &OnnxNode, inputs: &[Src], consts: &[Value], path: &Path) -> Result<(Op, Vec<Src>)> {
    let node_err = |m: String| fail(path, format!("node `{}` ({}): {m}", n.name(), n.op()));
    let need = |k: usize| -> Result<()> {
        if inputs.len() < k || inputs[..k].contains(&Src::None) {
            Err(node_err(format!("needs {k} inputs, has {}", inputs.len())))
        } else {
            Ok(())
        }
    };
    // A constant float operand, as the node's parameter.
    let const_floats = |i: usize, what: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        match inputs.get(i) {
            Some(Src::Const(c)) => match &consts[*c] {
                Value::H(
                    h @ Host {
                        data: HostData::F(_),
                        ..
                    },
                ) => Ok((h.dims.clone(), h.as_floats())),
                _ => Err(node_err(format!("the {what} is not a float constant"))),
            },
            _ => Err(node_err(format!(
                "the {what} is not a constant (a weight computed while running is not supported)"
            ))),
        }
    };
    let op = match n.op() {
        "Conv" => {
            need(2)?;
            let (wdims, weight) = const_floats(1, "weight")?;
            let [cout, cin_g, kh, kw] = wdims[..] else {
                return Err(node_err(format!(
                    "weight of shape {wdims:?} is not that of a 2-d conv"
                )));
            };
            let groups = match n.attr_int("group")?.unwrap_or(1) {
                g if (1..=1 << 20).contains(&g) => g as usize,
                g => return Err(node_err(format!("group {g}"))),
            };
            if cout == 0 || cin_g == 0 || kh == 0 || kw == 0 || cout % groups != 0 {
                return Err(node_err(format!(
                    "weight of shape {wdims:?} does not fit {groups} groups"
                )));
            }
            let kernel = sizes(n, "kernel_shape", vec![kh, kw], path)?;
            let stride = sizes(n, "strides", vec![1, 1], path)?;
            let pads = sizes(n, "pads", vec![0; 4], path)?;
            let dil = sizes(n, "dilations", vec![1, 1], path)?;
            if kernel != [kh, kw] || stride.len() != 2 || pads.len() != 4 || dil != [1, 1] {
                return Err(node_err(format!(
                    "kernel {kernel:?}, strides {stride:?}, pads {pads:?}, dilations {dil:?}: \
                     only 2-d convs without dilation whose kernel matches the weight are supported"
                )));
            }
            if stride.contains(&0) {
                return Err(node_err("a zero stride".into()));
            }
            match n.attr_string("auto_pad")?.as_deref() {
                None | Some("NOTSET") | Some("") => {}
                Some("VALID") if pads.iter().all(|p| *p == 0) => {}
                Some(other) => {
                    return Err(node_err(format!("auto_pad {other} is not supported")));
                }
            }
            let bias = if inputs.get(2).is_some_and(|s| *s != Src::None) {
                let (bd, b) = const_floats(2, "bias")?;
                if b.len() != cout {
                    return Err(node_err(format!(
                        "bias of shape {bd:?} for {cout} output channels"
                    )));
                }
                b
            } else {
                vec![0.0; cout]
            };
            let cin = cin_g
                .checked_mul(groups)
                .ok_or_else(|| node_err("too many channels".into()))?;
            let conv = Conv {
                weight,
                bias,
                cout,
                cin,
                groups,
                kernel: [kh, kw],
                stride: [stride[0], stride[1]],
                pads: [pads[0], pads[1], pads[2], pads[3]],
                relu: false,
                run: ConvKernel::Pending,
            };
            return Ok((Op::Conv(Box::new(conv)), vec![inputs[0]]));
        }
        "BatchNormalization" => {
            need(5)?;
            let eps = n.attr_float("epsilon")?.unwrap_or(1e-5);
            let mut p = Vec::new();
            for (i, what) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")] {
                p.push(const_floats(i, what)?.1);
            }
            let c = p[0].len();
            if p.iter().any(|v| v.len() != c) || eps.is_nan() || eps < 0.0 {
                return Err(node_err(format!(
                    "parameters of {:?} values, epsilon {eps}",
                    p.iter().map(Vec::len).collect::<Vec<_>>()
                )));
            }
            let (scale, shift) = fold_bn(&p[0], &p[1], &p[2], &p[3], eps);
            return Ok((Op::Affine { scale, shift }, vec![inputs[0]]));
        }
        "Relu" => Op::Relu,
        "LeakyRelu" => Op::LeakyRelu(n.attr_float("alpha")?.unwrap_or(0.01)),
        "Sigmoid" => Op::Sigmoid,
        "Clip" => {
            // Opset 11+ gives the bounds as inputs (kept as inputs: read while running),
            // older opsets as attributes.
            let lo = n.attr_float("min")?;
            let hi = n.attr_float("max")?;
            Op::Clip(lo, hi)
        }
        "Add" => Op::Arith(Arith::Add),
        "Sub" => Op::Arith(Arith::Sub),
        "Mul" => Op::Arith(Arith::Mul),
        "Div" => Op::Arith(Arith::Div),
        "Resize" | "Upsample" => {
            let mode = n.attr_string("mode")?.unwrap_or_else(|| "nearest".into());
            if mode != "nearest" {
                return Err(node_err(format!(
                    "mode `{mode}`: only nearest-neighbour resizing is supported"
                )));
            }
            let legacy = n.op() == "Upsample" || inputs.len() <= 2;
            let coord = match n.attr_string("coordinate_transformation_mode")?.as_deref() {
                // Before opset 11 Resize and Upsample had no attribute: asymmetric.
                None if legacy => CoordMode::Asymmetric,
                None | Some("half_pixel") => CoordMode::HalfPixel,
                Some("pytorch_half_pixel") => CoordMode::PytorchHalfPixel,
                Some("align_corners") => CoordMode::AlignCorners,
                Some("asymmetric") => CoordMode::Asymmetric,
                Some("tf_half_pixel_for_nearest") => CoordMode::TfHalfPixelForNearest,
                Some(other) => {
                    return Err(node_err(format!(
                        "coordinate_transformation_mode `{other}` is not supported"
                    )))
                }
            };
            let nearest = match n.attr_string("nearest_mode")?.as_deref() {
                None if legacy => NearestMode::Floor,
                None | Some("round_prefer_floor") => NearestMode::RoundPreferFloor,
                Some("round_prefer_ceil") => NearestMode::RoundPreferCeil,
                Some("floor") => NearestMode::Floor,
                Some("ceil") => NearestMode::Ceil,
                Some(other) => {
                    return Err(node_err(format!("nearest_mode `{other}` is not supported")))
                }
            };
            let attr_scales = n.attr_floats("scales")?;
            if attr_scales.is_none() {
                need(2)?;
            }
            Op::Resize(Resize {
                coord,
                nearest,
                scales_at: if legacy { 1 } else { 2 },
                sizes_at: (!legacy).then_some(3),
                attr_scales,
            })
        }
        "Transpose" => Op::Transpose(n.attr_ints("perm")?),
        "Reshape" => {
            need(2)?;
            Op::Reshape {
                allow_zero: n.attr_int("allowzero")?.unwrap_or(0) != 0,
            }
        }
        "Flatten" => Op::Flatten(n.attr_int("axis")?.unwrap_or(1)),
        "Squeeze" => Op::Squeeze(n.attr_ints("axes")?),
        "Unsqueeze" => Op::Unsqueeze(n.attr_ints("axes")?),
        "Concat" => Op::Concat(
            n.attr_int("axis")?
                .ok_or_else(|| node_err("no axis".into()))?,
        ),
        "Shape" => Op::Shape {
            start: n.attr_int("start")?.unwrap_or(0),
            end: n.attr_int("end")?,
        },
        "Gather" => Op::Gather(n.attr_int("axis")?.unwrap_or(0)),
        "Slice" => {
            let attrs = match (
                n.attr_ints("starts")?,
                n.attr_ints("ends")?,
                n.attr_ints("axes")?,
            ) {
                (Some(s), Some(e), a) => {
                    let a = a.unwrap_or_else(|| (0..s.len() as i64).collect());
                    Some([s, e, a])
                }
                _ => {
                    need(3)?;
                    None
                }
            };
            Op::Slice(attrs)
        }
        "Cast" => {
            let to = n
                .attr_int("to")?
                .ok_or_else(|| node_err("no `to`".into()))?;
            match to {
                1 | 10 | 11 | 16 => Op::Cast(true),
                2..=7 | 12 | 13 => Op::Cast(false),
                t => return Err(node_err(format!("cast to data type {t} is not supported"))),
            }
        }
        other => {
            return Err(node_err(format!(
                "op `{other}` is not one a SCRFD export uses (supported: Conv, \
                 BatchNormalization, Relu, LeakyRelu, Sigmoid, Clip, Add, Sub, Mul, Div, \
                 Resize/Upsample (nearest), Transpose, Reshape, Flatten, Squeeze, Unsqueeze, \
                 Concat, Shape, Gather, Slice, Cast, Constant, Identity, Dropout)"
            )))
        }
    };
    Ok((op, inputs.to_vec()))
}

/// BatchNorm as a per-channel scale and shift, computed in `f64`.
fn fold_bn(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let mut scale = Vec::with_capacity(gamma.len());
    let mut shift = Vec::with_capacity(gamma.len());
    for i in 0..gamma.len() {
        let s = gamma[i] as f64 / (var[i] as f64 + eps as f64).sqrt();
        scale.push(s as f32);
        shift.push((beta[i] as f64 - mean[i] as f64 * s) as f32);
    }
    (scale, shift)
}

impl Net {
    /// Compiles `g`, whose one input is an NCHW float image, to run on `device`.
    pub fn compile(g: &OnnxGraph, device: &Device) -> Result<Self> {
        let path = g.path().to_path_buf();
        let p = path.as_path();
        if g.node_count() > MAX_NODES {
            return Err(fail(
                p,
                format!("{} nodes, more than the {MAX_NODES} read", g.node_count()),
            ));
        }
        let feeds: Vec<&String> = g
            .inputs()
            .iter()
            .filter(|i| g.initializer(i).is_none())
            .collect();
        let [input] = feeds[..] else {
            return Err(fail(
                p,
                format!(
                    "the graph has {} inputs ({:?}); a detector has one, the image",
                    feeds.len(),
                    feeds
                ),
            ));
        };
        if g.outputs().is_empty() || g.outputs().len() > 64 {
            return Err(fail(
                p,
                format!("the graph has {} outputs", g.outputs().len()),
            ));
        }
        let mut names: HashMap<String, Src> = HashMap::new();
        names.insert(input.clone(), Src::Slot(0));
        let mut consts: Vec<Value> = Vec::new();
        let mut steps: Vec<Option<Step>> = Vec::new();
        let mut slots = 1usize;
        for n in g.nodes() {
            let node_err = |m: String| fail(p, format!("node `{}` ({}): {m}", n.name(), n.op()));
            if !(n.domain().is_empty() || n.domain() == "ai.onnx") {
                return Err(node_err(format!(
                    "op of domain `{}`, not a standard ONNX op",
                    n.domain()
                )));
            }
            let mut inputs = Vec::with_capacity(n.inputs().len());
            for name in n.inputs() {
                if name.is_empty() {
                    inputs.push(Src::None);
                } else if let Some(s) = names.get(name) {
                    inputs.push(*s);
                } else if let Some(t) = g.initializer(name) {
                    consts.push(Value::H(Host::from(t)));
                    let s = Src::Const(consts.len() - 1);
                    names.insert(name.clone(), s);
                    inputs.push(s);
                } else {
                    return Err(node_err(format!(
                        "reads `{name}`, which is neither the graph's input, an initializer \
                         nor the output of an earlier node"
                    )));
                }
            }
            let Some(out_name) = n.outputs().first().filter(|o| !o.is_empty()) else {
                return Err(node_err("no output".into()));
            };
            if names.contains_key(out_name) {
                return Err(node_err(format!("`{out_name}` is computed twice")));
            }
            let src = match n.op() {
                "Identity" | "Dropout" => {
                    if inputs.first().is_none_or(|s| *s == Src::None) {
                        return Err(node_err("no input".into()));
                    }
                    inputs[0]
                }
                "Constant" => {
                    let h = constant(&n, p).map_err(|e| detector_error(p, e))?;
                    consts.push(Value::H(h));
                    Src::Const(consts.len() - 1)
                }
                _ => {
                    let (op, args) =
                        build_op(&n, &inputs, &consts, p).map_err(|e| detector_error(p, e))?;
                    let step = Step {
                        node: n.name().to_string(),
                        op_type: n.op().to_string(),
                        op,
                        inputs: args,
                        out: slots,
                        free: Vec::new(),
                    };
                    let foldable = step.inputs.iter().all(|s| !matches!(s, Src::Slot(_)))
                        && !matches!(step.op, Op::Conv(_));
                    if foldable {
                        // Everything it reads is known: compute it now.
                        let args: Vec<Option<&Value>> = step
                            .inputs
                            .iter()
                            .map(|s| match s {
                                Src::Const(c) => Some(&consts[*c]),
                                _ => None,
                            })
                            .collect();
                        let v = exec(&step, &args, MAX_HOST_VALUES, device, p)?;
                        consts.push(v);
                        Src::Const(consts.len() - 1)
                    } else {
                        steps.push(Some(step));
                        slots += 1;
                        Src::Slot(slots - 1)
                    }
                }
            };
            names.insert(out_name.clone(), src);
        }
        let mut outputs = Vec::new();
        for o in g.outputs() {
            match names.get(o) {
                Some(s @ Src::Slot(_)) => outputs.push(*s),
                Some(_) => {
                    return Err(fail(
                        p,
                        format!("output `{o}` does not depend on the input"),
                    ))
                }
                None => return Err(fail(p, format!("no node computes the output `{o}`"))),
            }
        }
        let mut net = Net {
            steps: Vec::new(),
            consts,
            slots,
            outputs,
            output_names: g.outputs().to_vec(),
            device: device.clone(),
            path: path.clone(),
        };
        fuse(&mut steps, &net.outputs);
        let mut steps = prune(steps, &net.outputs, slots);
        if device.is_cpu() {
            net.slots += merge_siblings(&mut steps, net.slots);
        }
        net.steps = steps;
        for s in &mut net.steps {
            if let Op::Conv(c) = &mut s.op {
                c.run = conv_kernel(c, device)
                    .map_err(|e| fail(p, format!("node `{}` ({}): {e}", s.node, s.op_type)))?;
            }
        }
        net.plan_frees();
        Ok(net)
    }

    /// Sets, for each step, the slots it is the last to read.
    fn plan_frees(&mut self) {
        let mut last: Vec<Option<usize>> = vec![None; self.slots];
        for (i, s) in self.steps.iter().enumerate() {
            for src in &s.inputs {
                if let Src::Slot(k) = src {
                    last[*k] = Some(i);
                }
            }
        }
        for o in &self.outputs {
            if let Src::Slot(k) = o {
                last[*k] = None;
            }
        }
        for (k, l) in last.iter().enumerate() {
            if let Some(i) = l {
                self.steps[*i].free.push(k);
            }
        }
    }

    /// The graph's outputs for an NCHW input, in the graph's output order. Every tensor a
    /// step makes must hold at most `cap` values.
    pub fn run(&self, x: Tensor, cap: usize) -> Result<Vec<Tensor>> {
        let mut slots: Vec<Option<Value>> = vec![None; self.slots];
        slots[0] = Some(Value::T(x));
        for step in &self.steps {
            let v = {
                let args: Vec<Option<&Value>> = step
                    .inputs
                    .iter()
                    .map(|s| match s {
                        Src::None => None,
                        Src::Const(c) => Some(&self.consts[*c]),
                        Src::Slot(k) => slots[*k].as_ref(),
                    })
                    .collect();
                exec(step, &args, cap, &self.device, &self.path)?
            };
            slots[step.out] = Some(v);
            for f in &step.free {
                slots[*f] = None;
            }
        }
        self.outputs
            .iter()
            .zip(&self.output_names)
            .map(|(s, name)| {
                let v = match s {
                    Src::Slot(k) => slots[*k].take(),
                    _ => None,
                };
                match v {
                    Some(Value::T(t)) => Ok(t),
                    _ => Err(fail(
                        &self.path,
                        format!("output `{name}` is not a float tensor"),
                    )),
                }
            })
            .collect()
    }
}

/// Folds each BatchNormalization and then each ReLU into the conv before it, where the
/// conv's output feeds nothing else.
fn fuse(steps: &mut [Option<Step>], outputs: &[Src]) {
    let mut uses: HashMap<usize, usize> = HashMap::new();
    for s in steps.iter().flatten() {
        for src in &s.inputs {
            if let Src::Slot(k) = src {
                *uses.entry(*k).or_default() += 1;
            }
        }
    }
    for o in outputs {
        if let Src::Slot(k) = o {
            // A graph output must keep its value: never fold past it.
            *uses.entry(*k).or_default() += 2;
        }
    }
    let mut consumer: HashMap<usize, usize> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        if let Some(s) = s {
            for src in &s.inputs {
                if let Src::Slot(k) = src {
                    consumer.insert(*k, i);
                }
            }
        }
    }
    for i in 0..steps.len() {
        // A conv takes its BatchNorm, then its ReLU, one at a time.
        while let Some(Step {
            op: Op::Conv(c),
            out,
            ..
        }) = &steps[i]
        {
            let out = *out;
            if uses.get(&out) != Some(&1) {
                break;
            }
            let Some(&j) = consumer.get(&out) else { break };
            let Some(next) = &steps[j] else { break };
            if next.inputs.first() != Some(&Src::Slot(out)) {
                break;
            }
            let folded = match (&next.op, c.relu) {
                (Op::Affine { scale, shift }, false) if scale.len() == c.cout => {
                    let mut c = c.clone();
                    let per = c.weight.len() / c.cout;
                    for (co, (s, t)) in scale.iter().zip(shift).enumerate() {
                        c.weight[co * per..(co + 1) * per]
                            .iter_mut()
                            .for_each(|w| *w *= s);
                        c.bias[co] = c.bias[co] * s + t;
                    }
                    c
                }
                (Op::Relu, false) => {
                    let mut c = c.clone();
                    c.relu = true;
                    c
                }
                _ => break,
            };
            let new_out = next.out;
            steps[j] = None;
            if let Some(s) = &mut steps[i] {
                s.op = Op::Conv(folded);
                s.out = new_out;
            }
        }
    }
}

/// Merges convs without groups that read the same input with the same geometry (SCRFD's
/// score, box and landmark heads) into one conv over all their output channels, so that
/// the input's im2col matrix is built once and the product has rows enough to fill the
/// matrix kernels; each original output becomes a view of its channels. New slots are
/// numbered from `first_slot`; returns how many were added.
fn merge_siblings(steps: &mut Vec<Step>, first_slot: usize) -> usize {
    type Key = (Src, [usize; 2], [usize; 2], [usize; 4], bool, usize);
    let key = |s: &Step| -> Option<Key> {
        match &s.op {
            Op::Conv(c) if c.groups == 1 && c.kernel != [1, 1] => {
                Some((s.inputs[0], c.kernel, c.stride, c.pads, c.relu, c.cin))
            }
            _ => None,
        }
    };
    let mut groups: Vec<(Key, Vec<usize>)> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        if let Some(k) = key(s) {
            match groups.iter_mut().find(|(g, _)| *g == k) {
                Some((_, members)) => members.push(i),
                None => groups.push((k, vec![i])),
            }
        }
    }
    let mut added = 0;
    let mut inserts: Vec<(usize, Step)> = Vec::new();
    for ((input, ..), members) in groups.into_iter().filter(|(_, m)| m.len() > 1) {
        let slot = first_slot + added;
        added += 1;
        let mut merged: Option<Conv> = None;
        let mut names = Vec::new();
        for &i in &members {
            let Op::Conv(c) = &steps[i].op else { continue };
            let c = (**c).clone();
            let start = merged.as_ref().map_or(0, |m| m.cout);
            let len = c.cout;
            names.push(steps[i].node.clone());
            merged = Some(match merged {
                None => c,
                Some(mut m) => {
                    m.weight.extend_from_slice(&c.weight);
                    m.bias.extend_from_slice(&c.bias);
                    m.cout += c.cout;
                    m
                }
            });
            let s = &mut steps[i];
            s.op = Op::Narrow { start, len };
            s.op_type = "Conv (merged)".into();
            s.inputs = vec![Src::Slot(slot)];
        }
        if let Some(m) = merged {
            let first = members[0];
            inserts.push((
                first,
                Step {
                    node: names.join("+"),
                    op_type: "Conv".into(),
                    inputs: vec![input],
                    op: Op::Conv(Box::new(m)),
                    out: slot,
                    free: Vec::new(),
                },
            ));
        }
    }
    // The merged conv runs where its first member did, before that member's view; its
    // input was read there already.
    inserts.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, step) in inserts {
        steps.insert(i, step);
    }
    added
}

/// Drops steps whose values no output needs, and folded ones.
fn prune(steps: Vec<Option<Step>>, outputs: &[Src], slots: usize) -> Vec<Step> {
    let steps: Vec<Step> = steps.into_iter().flatten().collect();
    let mut live = vec![false; slots];
    for o in outputs {
        if let Src::Slot(k) = o {
            live[*k] = true;
        }
    }
    let mut keep = vec![false; steps.len()];
    for (i, s) in steps.iter().enumerate().rev() {
        if live[s.out] {
            keep[i] = true;
            for src in &s.inputs {
                if let Src::Slot(k) = src {
                    live[*k] = true;
                }
            }
        }
    }
    steps
        .into_iter()
        .zip(keep)
        .filter_map(|(s, k)| k.then_some(s))
        .collect()
}

/// Picks how a conv runs on `device`, once its BatchNorm and ReLU are folded in.
fn conv_kernel(c: &Conv, device: &Device) -> candle_core::Result<ConvKernel> {
    let native_dw = device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda());
    let [kh, kw] = c.kernel;
    let [t, l, b, r] = c.pads;
    let depthwise = c.groups == c.cin && c.groups == c.cout;
    if depthwise && native_dw && c.stride[0] == c.stride[1] && t == b && l == r {
        return Ok(ConvKernel::Depthwise(DepthwiseConv2d {
            weight: Arc::new(c.weight.clone()),
            bias: Arc::new(c.bias.clone()),
            // ReLU is PReLU with a zero slope.
            prelu: c.relu.then(|| Arc::new(vec![0.0; c.cout])),
            cap: None,
            kernel: [kh, kw],
            stride: c.stride[0],
            pad: [t, l],
        }));
    }
    if device.is_cpu()
        && c.groups == 1
        && c.kernel == [1, 1]
        && c.stride == [1, 1]
        && c.pads == [0; 4]
    {
        return Ok(ConvKernel::Pointwise(Pointwise::new(
            c.weight.clone(),
            c.bias.clone(),
            c.relu,
            c.cin,
            c.cout,
        )));
    }
    if device.is_cpu() && c.groups == 1 {
        return Ok(ConvKernel::Dense(Dense::new(
            c.weight.clone(),
            c.bias.clone(),
            c.relu,
            c.cin,
            c.cout,
            c.kernel,
            c.stride,
            c.pads,
        )));
    }
    let weight = Tensor::from_vec(c.weight.clone(), (c.cout, c.cin / c.groups, kh, kw), device)?;
    let bias = Tensor::from_vec(c.bias.clone(), (1, c.cout, 1, 1), device)?;
    let epilogue = device.is_cpu().then(|| BiasPrelu {
        bias: Arc::new(c.bias.clone()),
        prelu: c.relu.then(|| Arc::new(vec![0.0; c.cout])),
        cap: None,
    });
    Ok(ConvKernel::Candle {
        weight,
        epilogue,
        bias,
    })
}

/// A host value as a float tensor on `device`.
fn host_tensor(h: &Host, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(h.as_floats(), h.dims.clone(), device)
}

/// Runs one step on its operands (`None` for an omitted optional input). Every tensor it
/// makes holds at most `cap` values.
fn exec(
    step: &Step,
    args: &[Option<&Value>],
    cap: usize,
    device: &Device,
    path: &Path,
) -> Result<Value> {
    exec_inner(step, args, cap, device).map_err(|m| {
        fail(
            path,
            format!("node `{}` ({}): {m}", step.node, step.op_type),
        )
    })
}

type Res<T> = std::result::Result<T, String>;

fn exec_inner(step: &Step, args: &[Option<&Value>], cap: usize, device: &Device) -> Res<Value> {
    let arg = |i: usize| -> Res<&Value> {
        args.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("input {i} is missing"))
    };
    let tensor = |i: usize| -> Res<Tensor> {
        match arg(i)? {
            Value::T(t) => Ok(t.clone()),
            Value::H(h) => host_tensor(h, device).map_err(|e| e.to_string()),
        }
    };
    let host = |i: usize| -> Res<&Host> {
        match arg(i)? {
            Value::H(h) => Ok(h),
            Value::T(_) => Err(format!(
                "input {i} is computed from the image; a shape value was expected"
            )),
        }
    };
    let ce = |e: candle_core::Error| e.to_string();
    let bounded = |n: usize| -> Res<()> {
        if n > cap {
            Err(format!(
                "would make {n} values, more than the {cap} allowed for this input"
            ))
        } else {
            Ok(())
        }
    };
    let t = |t: Tensor| -> Res<Value> {
        bounded(t.elem_count())?;
        Ok(Value::T(t))
    };
    match &step.op {
        Op::Conv(c) => {
            let x = tensor(0)?;
            let (n, ci, h, w) = x
                .dims4()
                .map_err(|_| format!("input of shape {:?} is not NCHW", x.dims()))?;
            if ci != c.cin {
                return Err(format!(
                    "input has {ci} channels, the weight takes {}",
                    c.cin
                ));
            }
            let [t0, l0, b0, r0] = c.pads;
            let (hp, wp) = (h + t0 + b0, w + l0 + r0);
            if hp < c.kernel[0] || wp < c.kernel[1] {
                return Err(format!(
                    "a {h}x{w} input is smaller than the {:?} kernel",
                    c.kernel
                ));
            }
            let oh = (hp - c.kernel[0]) / c.stride[0] + 1;
            let ow = (wp - c.kernel[1]) / c.stride[1] + 1;
            let taps = c.weight.len() / c.cout;
            // The output, and the im2col matrix a dense conv works through.
            for size in [[n, c.cout, oh, ow], [n, taps, oh, ow]] {
                bounded(count(&size)?)?;
            }
            let y = match &c.run {
                ConvKernel::Depthwise(op) => op.forward(&x).map_err(ce)?,
                ConvKernel::Pointwise(op) => op.forward(&x).map_err(ce)?,
                ConvKernel::Dense(op) => op.forward(&x).map_err(ce)?,
                ConvKernel::Candle {
                    weight,
                    epilogue,
                    bias,
                } => {
                    let symmetric = t0 == b0 && l0 == r0 && t0 == l0;
                    let (x, pad) = if symmetric {
                        (x, t0)
                    } else {
                        let x = x
                            .pad_with_zeros(2, t0, b0)
                            .and_then(|x| x.pad_with_zeros(3, l0, r0))
                            .map_err(ce)?;
                        (x, 0)
                    };
                    if c.stride[0] != c.stride[1] {
                        return Err(format!("strides {:?} differ", c.stride));
                    }
                    let y = x
                        .conv2d(weight, pad, c.stride[0], 1, c.groups)
                        .map_err(ce)?;
                    match epilogue {
                        Some(op) => op.forward(&y).map_err(ce)?,
                        None => {
                            let y = y.broadcast_add(bias).map_err(ce)?;
                            if c.relu {
                                y.relu().map_err(ce)?
                            } else {
                                y
                            }
                        }
                    }
                }
                ConvKernel::Pending => return Err("conv not compiled".into()),
            };
            t(y)
        }
        Op::Affine { scale, shift } => {
            let x = tensor(0)?;
            let dims = x.dims();
            if dims.len() < 2 || dims[1] != scale.len() {
                return Err(format!(
                    "input of shape {dims:?} does not have {} channels",
                    scale.len()
                ));
            }
            let mut shape = vec![1usize; dims.len()];
            shape[1] = scale.len();
            let s = Tensor::from_vec(scale.clone(), shape.clone(), device).map_err(ce)?;
            let b = Tensor::from_vec(shift.clone(), shape, device).map_err(ce)?;
            t(x.broadcast_mul(&s)
                .and_then(|y| y.broadcast_add(&b))
                .map_err(ce)?)
        }
        Op::Relu => t(tensor(0)?.relu().map_err(ce)?),
        Op::LeakyRelu(a) => {
            let x = tensor(0)?;
            let y = (&x * *a as f64).and_then(|ax| x.maximum(&ax)).map_err(ce)?;
            let y = if *a > 1.0 {
                (&x * *a as f64).and_then(|ax| x.minimum(&ax)).map_err(ce)?
            } else {
                y
            };
            t(y)
        }
        Op::Sigmoid => {
            let x = tensor(0)?;
            t(x.neg()
                .and_then(|y| y.exp())
                .and_then(|y| y + 1.0)
                .and_then(|y| y.recip())
                .map_err(ce)?)
        }
        Op::Clip(lo, hi) => {
            let bound = |i: usize, attr: Option<f32>| -> Res<Option<f32>> {
                match args.get(i).copied().flatten() {
                    Some(Value::H(h)) if h.len() == 1 => Ok(Some(h.as_floats()[0])),
                    Some(_) => Err(format!("bound {i} is not a constant scalar")),
                    None => Ok(attr),
                }
            };
            let (lo, hi) = (bound(1, *lo)?, bound(2, *hi)?);
            let mut y = tensor(0)?;
            if let Some(lo) = lo {
                y = y.maximum(lo).map_err(ce)?;
            }
            if let Some(hi) = hi {
                y = y.minimum(hi).map_err(ce)?;
            }
            t(y)
        }
        Op::Arith(op) => match (arg(0)?, arg(1)?) {
            (Value::H(a), Value::H(b)) => Ok(Value::H(host_arith(*op, a, b)?)),
            _ => {
                let (a, b) = (tensor(0)?, tensor(1)?);
                // Checked before candle allocates it: broadcasting can square a size.
                bounded(count(&broadcast_dims(a.dims(), b.dims())?)?)?;
                let y = match op {
                    Arith::Add => a.broadcast_add(&b),
                    Arith::Sub => a.broadcast_sub(&b),
                    Arith::Mul => a.broadcast_mul(&b),
                    Arith::Div => a.broadcast_div(&b),
                }
                .map_err(ce)?;
                t(y)
            }
        },
        Op::Resize(r) => {
            let x = tensor(0)?;
            let (n, c, h, w) = x
                .dims4()
                .map_err(|_| format!("input of shape {:?} is not NCHW", x.dims()))?;
            let present = |i: usize| -> Option<&Host> {
                match args.get(i).copied().flatten() {
                    Some(Value::H(h)) if h.len() > 0 => Some(h),
                    _ => None,
                }
            };
            let (oh, ow, scale) = if let Some(s) = r.sizes_at.and_then(present) {
                let s = s.as_ints()?;
                if s.len() != 4 || s[0] != n as i64 || s[1] != c as i64 {
                    return Err(format!("sizes {s:?} for an input of {:?}", x.dims()));
                }
                let side = |v: i64| usize::try_from(v).map_err(|_| format!("size {v}"));
                (side(s[2])?, side(s[3])?, None)
            } else {
                let s = match (&r.attr_scales, present(r.scales_at)) {
                    (_, Some(s)) => s.as_floats(),
                    (Some(s), None) => s.clone(),
                    (None, None) => return Err("neither scales nor sizes".into()),
                };
                if s.len() != 4 || s[0] != 1.0 || s[1] != 1.0 || !(s[2] > 0.0 && s[3] > 0.0) {
                    return Err(format!("scales {s:?}: only height and width may scale"));
                }
                let side = |v: usize, f: f32| -> Res<usize> {
                    let o = (v as f64 * f as f64).floor();
                    if o.is_finite() && o <= (1u64 << 32) as f64 {
                        Ok(o as usize)
                    } else {
                        Err(format!("scale {f}"))
                    }
                };
                (side(h, s[2])?, side(w, s[3])?, Some([s[2], s[3]]))
            };
            let total = n
                .checked_mul(c)
                .and_then(|v| v.checked_mul(oh))
                .and_then(|v| v.checked_mul(ow))
                .ok_or("output too large")?;
            bounded(total)?;
            if h == 0 || w == 0 || oh == 0 || ow == 0 {
                return Err(format!("a {h}x{w} input resized to {oh}x{ow}"));
            }
            let ys = nearest_indices(r, h, oh, scale.map(|s| s[0]));
            let xs = nearest_indices(r, w, ow, scale.map(|s| s[1]));
            // candle's own nearest upsampling picks floor(o * in / out).
            let floor = |len: usize, out: usize, idx: &[usize]| {
                let f = len as f64 / out as f64;
                idx.iter()
                    .enumerate()
                    .all(|(o, i)| *i == usize::min(len - 1, (o as f64 * f) as usize))
            };
            let y = if floor(h, oh, &ys) && floor(w, ow, &xs) {
                x.upsample_nearest2d(oh, ow).map_err(ce)?
            } else {
                let index = |v: Vec<usize>| {
                    let v: Vec<u32> = v.into_iter().map(|i| i as u32).collect();
                    let len = v.len();
                    Tensor::from_vec(v, len, device)
                };
                let iy = index(ys).map_err(ce)?;
                let ix = index(xs).map_err(ce)?;
                x.index_select(&iy, 2)
                    .and_then(|y| y.index_select(&ix, 3))
                    .map_err(ce)?
            };
            t(y)
        }
        Op::Transpose(perm) => {
            let x = tensor(0)?;
            let rank = x.rank();
            let perm: Vec<usize> = match perm {
                None => (0..rank).rev().collect(),
                Some(p) => p.iter().map(|a| axis(*a, rank)).collect::<Res<_>>()?,
            };
            let mut seen = vec![false; rank];
            for a in &perm {
                if std::mem::replace(&mut seen[*a], true) {
                    return Err(format!("perm {perm:?} repeats an axis"));
                }
            }
            if perm.len() != rank {
                return Err(format!("perm {perm:?} for a rank-{rank} input"));
            }
            t(x.permute(perm).map_err(ce)?)
        }
        Op::Reshape { allow_zero } => {
            let shape = host(1)?.as_ints()?;
            match arg(0)? {
                Value::T(x) => {
                    let dims = reshape_dims(x.dims(), &shape, *allow_zero)?;
                    t(x.reshape(dims).map_err(ce)?)
                }
                Value::H(h) => {
                    let dims = reshape_dims(&h.dims, &shape, *allow_zero)?;
                    Ok(Value::H(Host {
                        dims,
                        data: h.data.clone(),
                    }))
                }
            }
        }
        Op::Flatten(a) => {
            let x = tensor(0)?;
            let rank = x.rank();
            let a = if *a == rank as i64 {
                rank
            } else {
                axis(*a, rank)?
            };
            let outer: usize = x.dims()[..a].iter().product();
            let inner: usize = x.dims()[a..].iter().product();
            t(x.reshape((outer, inner)).map_err(ce)?)
        }
        Op::Squeeze(axes) | Op::Unsqueeze(axes) => {
            let unsqueeze = matches!(step.op, Op::Unsqueeze(_));
            let axes = match axes {
                Some(a) => Some(a.clone()),
                None => match args.get(1).copied().flatten() {
                    Some(Value::H(h)) => Some(h.as_ints()?),
                    Some(Value::T(_)) => return Err("axes computed from the image".into()),
                    None => None,
                },
            };
            let dims = match arg(0)? {
                Value::T(x) => x.dims().to_vec(),
                Value::H(h) => h.dims.clone(),
            };
            let new = if unsqueeze {
                let axes = axes.ok_or("no axes")?;
                let rank = dims.len() + axes.len();
                if rank > MAX_RANK {
                    return Err(format!("rank {rank}"));
                }
                let mut axes: Vec<usize> =
                    axes.iter().map(|a| axis(*a, rank)).collect::<Res<_>>()?;
                axes.sort_unstable();
                axes.dedup();
                if axes.len() + dims.len() != rank {
                    return Err("repeated axes".into());
                }
                let mut it = dims.iter();
                (0..rank)
                    .map(|i| {
                        if axes.contains(&i) {
                            1
                        } else {
                            *it.next().unwrap_or(&1)
                        }
                    })
                    .collect::<Vec<_>>()
            } else {
                let rank = dims.len();
                let axes: Vec<usize> = match axes {
                    Some(a) => a.iter().map(|a| axis(*a, rank)).collect::<Res<_>>()?,
                    None => (0..rank).filter(|i| dims[*i] == 1).collect(),
                };
                if let Some(a) = axes.iter().find(|a| dims[**a] != 1) {
                    return Err(format!("axis {a} of {dims:?} is not 1"));
                }
                dims.iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, d)| *d)
                    .collect()
            };
            match arg(0)? {
                Value::T(x) => t(x.reshape(new).map_err(ce)?),
                Value::H(h) => Ok(Value::H(Host {
                    dims: new,
                    data: h.data.clone(),
                })),
            }
        }
        Op::Concat(a) => {
            let parts: Vec<&Value> = (0..args.len()).map(arg).collect::<Res<_>>()?;
            if parts.is_empty() {
                return Err("nothing to concatenate".into());
            }
            if parts.iter().all(|v| matches!(v, Value::H(_))) {
                let hs: Vec<&Host> = parts
                    .iter()
                    .filter_map(|v| match v {
                        Value::H(h) => Some(h),
                        Value::T(_) => None,
                    })
                    .collect();
                return Ok(Value::H(host_concat(&hs, *a)?));
            }
            let ts: Vec<Tensor> = (0..parts.len()).map(tensor).collect::<Res<_>>()?;
            let rank = ts[0].rank();
            let ax = axis(*a, rank)?;
            let total: usize = ts.iter().map(|t| t.elem_count()).sum();
            bounded(total)?;
            t(Tensor::cat(&ts, ax).map_err(ce)?)
        }
        Op::Shape { start, end } => {
            let dims = match arg(0)? {
                Value::T(x) => x.dims().to_vec(),
                Value::H(h) => h.dims.clone(),
            };
            let r = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (clamp(*start), clamp(end.unwrap_or(r)));
            let v: Vec<i64> = dims[s..e.max(s)].iter().map(|d| *d as i64).collect();
            Ok(Value::H(Host::ints(vec![v.len()], v)))
        }
        Op::Gather(a) => {
            let data = host(0)?;
            let idx = host(1)?;
            if data.dims.len() != 1 || axis(*a, 1)? != 0 {
                return Err(format!(
                    "gathering from a value of dims {:?} on axis {a}: only 1-d values are supported",
                    data.dims
                ));
            }
            let len = data.dims[0] as i64;
            let picks: Vec<usize> = idx
                .as_ints()?
                .iter()
                .map(|i| {
                    let j = if *i < 0 { i + len } else { *i };
                    if (0..len).contains(&j) {
                        Ok(j as usize)
                    } else {
                        Err(format!("index {i} outside {len} values"))
                    }
                })
                .collect::<Res<_>>()?;
            let dims = idx.dims.clone();
            Ok(Value::H(Host {
                dims,
                data: match &data.data {
                    HostData::I(v) => HostData::I(picks.iter().map(|i| v[*i]).collect()),
                    HostData::F(v) => HostData::F(picks.iter().map(|i| v[*i]).collect()),
                },
            }))
        }
        Op::Slice(attrs) => {
            let (starts, ends, axes, steps) = match attrs {
                Some([s, e, a]) => (s.clone(), e.clone(), a.clone(), vec![1; s.len()]),
                None => {
                    let s = host(1)?.as_ints()?;
                    let e = host(2)?.as_ints()?;
                    let opt = |i: usize| -> Res<Option<Vec<i64>>> {
                        match args.get(i).copied().flatten() {
                            Some(Value::H(h)) => h.as_ints().map(Some),
                            Some(Value::T(_)) => {
                                Err(format!("input {i} is computed from the image"))
                            }
                            None => Ok(None),
                        }
                    };
                    let a = opt(3)?.unwrap_or_else(|| (0..s.len() as i64).collect());
                    let st = opt(4)?.unwrap_or_else(|| vec![1; s.len()]);
                    (s, e, a, st)
                }
            };
            if starts.len() != ends.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return Err("starts, ends, axes and steps differ in length".into());
            }
            match arg(0)? {
                Value::H(h) => {
                    if h.dims.len() != 1 || starts.len() != 1 || axis(axes[0], 1)? != 0 {
                        return Err("only 1-d shape values can be sliced".into());
                    }
                    let picks = slice_range(h.dims[0], starts[0], ends[0], steps[0])?;
                    Ok(Value::H(Host {
                        dims: vec![picks.len()],
                        data: match &h.data {
                            HostData::I(v) => HostData::I(picks.iter().map(|i| v[*i]).collect()),
                            HostData::F(v) => HostData::F(picks.iter().map(|i| v[*i]).collect()),
                        },
                    }))
                }
                Value::T(x) => {
                    let mut y = x.clone();
                    for i in 0..starts.len() {
                        let ax = axis(axes[i], x.rank())?;
                        let picks = slice_range(y.dims()[ax], starts[i], ends[i], steps[i])?;
                        if steps[i] != 1 {
                            return Err("slicing an image tensor with a step".into());
                        }
                        let start = picks.first().copied().unwrap_or(0);
                        y = y.narrow(ax, start, picks.len()).map_err(ce)?;
                    }
                    t(y)
                }
            }
        }
        Op::Narrow { start, len } => t(tensor(0)?.narrow(1, *start, *len).map_err(ce)?),
        Op::Cast(to_float) => match arg(0)? {
            Value::T(x) if *to_float => Ok(Value::T(x.clone())),
            Value::T(_) => Err("casting an image tensor to integers".into()),
            Value::H(h) => Ok(Value::H(Host {
                dims: h.dims.clone(),
                data: if *to_float {
                    HostData::F(h.as_floats())
                } else {
                    match &h.data {
                        HostData::I(v) => HostData::I(v.clone()),
                        // Saturating, truncating toward zero, as C casts do in range.
                        HostData::F(v) => HostData::I(v.iter().map(|x| *x as i64).collect()),
                    }
                },
            })),
        },
    }
}

/// The dims two operands broadcast to (numpy rules).
fn broadcast_dims(a: &[usize], b: &[usize]) -> Res<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |d: &[usize], i: usize| (i + d.len()).checked_sub(rank).map_or(1, |j| d[j]);
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            _ => Err(format!("dims {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

/// The indices `start..end` by `step` selects along an axis of `len`, ONNX-clamped.
fn slice_range(len: usize, start: i64, end: i64, step: i64) -> Res<Vec<usize>> {
    if step == 0 {
        return Err("a zero step".into());
    }
    let l = len as i64;
    let norm = |v: i64| if v < 0 { v.saturating_add(l) } else { v };
    let (s, e) = (norm(start), norm(end));
    let mut out = Vec::new();
    if step > 0 {
        let (mut i, e) = (s.clamp(0, l), e.clamp(0, l));
        while i < e {
            out.push(i as usize);
            i = i.saturating_add(step);
        }
    } else {
        let (mut i, e) = (s.clamp(-1, l - 1), e.clamp(-1, l - 1));
        while i > e {
            out.push(i as usize);
            i = i.saturating_add(step);
        }
    }
    Ok(out)
}

/// The dims a Reshape to `shape` gives `dims`: 0 copies the input's dim (unless
/// `allow_zero`), one -1 takes what is left.
fn reshape_dims(dims: &[usize], shape: &[i64], allow_zero: bool) -> Res<Vec<usize>> {
    if shape.len() > MAX_RANK {
        return Err(format!("shape {shape:?} has too many dims"));
    }
    let total = count(dims)?;
    let mut out = Vec::with_capacity(shape.len());
    let mut hole = None;
    for (i, s) in shape.iter().enumerate() {
        match *s {
            -1 if hole.is_none() => {
                hole = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(
                *dims
                    .get(i)
                    .ok_or_else(|| format!("shape {shape:?} copies a dim {dims:?} lacks"))?,
            ),
            v if v >= 0 => out.push(usize::try_from(v).map_err(|_| format!("dim {v}"))?),
            v => return Err(format!("shape {shape:?} has dim {v}")),
        }
    }
    let known = count(&out)?;
    if let Some(i) = hole {
        if known == 0 || total % known != 0 {
            return Err(format!("cannot reshape {dims:?} to {shape:?}"));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(format!("cannot reshape {dims:?} to {shape:?}"));
    }
    Ok(out)
}

/// Elementwise arithmetic on host values: same dims, or one of them a single value.
fn host_arith(op: Arith, a: &Host, b: &Host) -> Res<Host> {
    let dims = if a.dims == b.dims || b.len() == 1 && a.dims.len() >= b.dims.len() {
        a.dims.clone()
    } else if a.len() == 1 && b.dims.len() >= a.dims.len() {
        b.dims.clone()
    } else {
        return Err(format!(
            "shape values of dims {:?} and {:?} do not broadcast",
            a.dims, b.dims
        ));
    };
    let n = count(&dims)?;
    if n > MAX_HOST_VALUES {
        return Err(format!("{n} shape values"));
    }
    let pick = |len: usize, i: usize| if len == 1 { 0 } else { i };
    match (&a.data, &b.data) {
        (HostData::I(x), HostData::I(y)) => {
            let v = (0..n)
                .map(|i| {
                    let (p, q) = (x[pick(x.len(), i)], y[pick(y.len(), i)]);
                    match op {
                        Arith::Add => p.checked_add(q),
                        Arith::Sub => p.checked_sub(q),
                        Arith::Mul => p.checked_mul(q),
                        // Integer Div truncates toward zero, as ONNX Runtime's does.
                        Arith::Div => p.checked_div(q),
                    }
                    .ok_or_else(|| format!("{p} {op:?} {q} overflows or divides by zero"))
                })
                .collect::<Res<_>>()?;
            Ok(Host::ints(dims, v))
        }
        _ => {
            let (x, y) = (a.as_floats(), b.as_floats());
            let v = (0..n)
                .map(|i| {
                    let (p, q) = (x[pick(x.len(), i)], y[pick(y.len(), i)]);
                    match op {
                        Arith::Add => p + q,
                        Arith::Sub => p - q,
                        Arith::Mul => p * q,
                        Arith::Div => p / q,
                    }
                })
                .collect();
            Ok(Host {
                dims,
                data: HostData::F(v),
            })
        }
    }
}

/// Concatenates 1-d host values (the only kind shape arithmetic makes).
fn host_concat(parts: &[&Host], a: i64) -> Res<Host> {
    if parts.iter().any(|h| h.dims.len() != 1) || axis(a, 1)? != 0 {
        return Err("only 1-d shape values can be concatenated".into());
    }
    let n: usize = parts.iter().map(|h| h.len()).sum();
    if n > MAX_HOST_VALUES {
        return Err(format!("{n} shape values"));
    }
    if parts.iter().all(|h| matches!(h.data, HostData::I(_))) {
        let v: Vec<i64> = parts
            .iter()
            .flat_map(|h| match &h.data {
                HostData::I(v) => v.clone(),
                HostData::F(_) => Vec::new(),
            })
            .collect();
        Ok(Host::ints(vec![n], v))
    } else {
        let v: Vec<f32> = parts.iter().flat_map(|h| h.as_floats()).collect();
        Ok(Host {
            dims: vec![n],
            data: HostData::F(v),
        })
    }
}

/// For each output position of a nearest-neighbour resize from `len` to `out`, the
/// input position ONNX's Resize reads. `scale` is the scale the graph gave, if any.
fn nearest_indices(r: &Resize, len: usize, out: usize, scale: Option<f32>) -> Vec<usize> {
    let s = scale.map_or(out as f64 / len as f64, |s| s as f64);
    (0..out)
        .map(|o| {
            let o = o as f64;
            let x = match r.coord {
                CoordMode::HalfPixel => (o + 0.5) / s - 0.5,
                CoordMode::PytorchHalfPixel => {
                    if out > 1 {
                        (o + 0.5) / s - 0.5
                    } else {
                        0.0
                    }
                }
                CoordMode::AlignCorners => {
                    if out > 1 {
                        o * (len as f64 - 1.0) / (out as f64 - 1.0)
                    } else {
                        0.0
                    }
                }
                CoordMode::Asymmetric => o / s,
                CoordMode::TfHalfPixelForNearest => (o + 0.5) / s,
            };
            let i = match r.nearest {
                NearestMode::Floor => x.floor(),
                NearestMode::Ceil => x.ceil(),
                NearestMode::RoundPreferFloor => {
                    if x.fract() == 0.5 {
                        x.floor()
                    } else {
                        x.round()
                    }
                }
                NearestMode::RoundPreferCeil => {
                    if x.fract() == 0.5 {
                        x.ceil()
                    } else {
                        x.round()
                    }
                }
            };
            i.clamp(0.0, len as f64 - 1.0) as usize
        })
        .collect()
}
