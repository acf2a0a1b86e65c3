//! MXNet checkpoints: `prefix-symbol.json` (the graph) and `prefix-NNNN.params` (an NDArray
//! list), read in pure Rust.
//!
//! The symbol is walked in graph order and every layer attribute is taken from it: kernel,
//! stride, pad, num_group, num_filter, BatchNorm eps (MXNet's default 1e-3 where a node
//! gives none) and fix_gamma, and the input scaling. The graph must match the config layer
//! for layer; the first node that differs is named in the error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::config::{Config, InputNorm};
use crate::{Error, Result};

/// MXNet's default BatchNorm eps, used where a node gives none.
pub const MXNET_BN_EPS: f64 = 1e-3;
/// Largest symbol file read: 16 MiB (insightface's y1 symbol is about 100 KiB).
pub const MAX_SYMBOL_BYTES: u64 = 16 << 20;
/// Most nodes a symbol may have (weights and no-op nodes included; y1 has about 600).
pub const MAX_SYMBOL_NODES: usize = 65_536;

const LIST_MAGIC: u64 = 0x112;
const NDARRAY_V1_MAGIC: u32 = 0xF993_FAC8;
const NDARRAY_V2_MAGIC: u32 = 0xF993_FAC9;

/// One array of a `.params` file, converted to `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Params {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let left = self.bytes.len() - self.pos;
        if n > left {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes, only {left} left (file is {} bytes)",
                self.bytes.len()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or_default(),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or_default(),
        ))
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(self.u32(what)? as i32)
    }

    fn i64(&mut self, what: &str) -> Result<i64> {
        Ok(self.u64(what)? as i64)
    }

    /// A count that must fit in what is left of the file at `min_bytes` per item.
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            self.pos = at;
            return Err(self.err(format!(
                "{what} is {n}, more than the {left} bytes left can hold"
            )));
        }
        Ok(n as usize)
    }

    fn ndarray(&mut self) -> Result<NdArray> {
        let magic = self.u32("NDArray header")?;
        let dims: Vec<i64> = match magic {
            NDARRAY_V2_MAGIC | NDARRAY_V1_MAGIC => {
                if magic == NDARRAY_V2_MAGIC {
                    let stype = self.i32("storage type")?;
                    if stype != 0 {
                        return Err(self.err(format!(
                            "sparse NDArray (storage type {stype}) is not supported"
                        )));
                    }
                }
                let ndim = self.u32("shape rank")?;
                if ndim > 8 {
                    return Err(self.err(format!("implausible shape rank {ndim}")));
                }
                (0..ndim)
                    .map(|_| self.i64("shape dim"))
                    .collect::<Result<_>>()?
            }
            // Files from before MXNet 0.9 start directly with a u32 rank and u32 dims.
            ndim if ndim <= 8 => (0..ndim)
                .map(|_| Ok(self.u32("shape dim")? as i64))
                .collect::<Result<_>>()?,
            other => return Err(self.err(format!("bad NDArray magic {other:#x}"))),
        };
        if dims.is_empty() {
            return Ok(NdArray {
                shape: vec![],
                data: vec![],
            });
        }
        if let Some(d) = dims.iter().find(|d| **d < 0) {
            return Err(self.err(format!("negative dimension {d} in shape {dims:?}")));
        }
        let shape: Vec<usize> = dims.iter().map(|d| *d as usize).collect();
        let _dev_type = self.i32("context device type")?;
        let _dev_id = self.i32("context device id")?;
        let type_flag = self.i32("dtype flag")?;
        let elem = match type_flag {
            0 => 4,
            1 => 8,
            other => {
                return Err(self.err(format!(
                    "dtype flag {other} is not supported (only float32 and float64)"
                )))
            }
        };
        let n = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .and_then(|n| n.checked_mul(elem))
            .ok_or_else(|| self.err(format!("shape {shape:?} overflows")))?;
        let raw = self.take(n, &format!("data of shape {shape:?}"))?;
        let data = if elem == 4 {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            raw.chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect()
        };
        Ok(NdArray { shape, data })
    }
}

/// Reads an MXNet NDArray list (`.params`): names (without the `arg:`/`aux:` prefixes)
/// to arrays. Truncation and corruption are errors that give the byte offset.
/// The file must be a regular file of at most [`super::MAX_FILE_BYTES`]; every count in it
/// is checked against the bytes left before anything is allocated for it.
pub fn read_params(path: &Path) -> Result<HashMap<String, NdArray>> {
    let bytes = super::read_regular_file(path, super::MAX_FILE_BYTES)?;
    parse_params(&bytes, path)
}

/// Parses the bytes of an MXNet NDArray list, as [`read_params`] does; `path` is only used
/// in error messages.
pub fn parse_params(bytes: &[u8], path: &Path) -> Result<HashMap<String, NdArray>> {
    let mut r = Reader {
        path,
        bytes,
        pos: 0,
    };
    let magic = r.u64("file header")?;
    if magic != LIST_MAGIC {
        r.pos = 0;
        return Err(r.err(format!(
            "not an MXNet NDArray list: header {magic:#x}, expected {LIST_MAGIC:#x}"
        )));
    }
    r.u64("reserved header field")?;
    let n = r.count("array count", 4)?;
    let arrays = (0..n).map(|_| r.ndarray()).collect::<Result<Vec<_>>>()?;
    let names_at = r.pos;
    let n_names = r.count("name count", 8)?;
    if n_names != n {
        r.pos = names_at;
        return Err(r.err(format!("{n} arrays but {n_names} names")));
    }
    let mut out = HashMap::with_capacity(n);
    for array in arrays {
        let len = r.count("name length", 1)?;
        let raw = r.take(len, "name")?;
        let name = std::str::from_utf8(raw).map_err(|_| r.err("name is not UTF-8"))?;
        let name = name
            .strip_prefix("arg:")
            .or_else(|| name.strip_prefix("aux:"))
            .unwrap_or(name);
        out.insert(name.to_string(), array);
    }
    Ok(out)
}

/// A layer of a graph, as far as matching it against a config goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// `Convolution`.
    Conv {
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Stride (both axes must agree).
        stride: [usize; 2],
        /// Padding along height and width.
        pad: [usize; 2],
        /// num_group.
        groups: usize,
        /// num_filter.
        filters: usize,
        /// Whether the node has a bias.
        bias: bool,
    },
    /// `BatchNorm`.
    BatchNorm {
        /// eps.
        eps: f64,
        /// fix_gamma.
        fix_gamma: bool,
    },
    /// `LeakyReLU` with `act_type=prelu`.
    PRelu,
    /// `elemwise_add` (a residual connection).
    Add,
    /// `FullyConnected`.
    FullyConnected {
        /// num_hidden.
        hidden: usize,
        /// Whether the node has a bias.
        bias: bool,
    },
}

/// A named layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's name in the graph.
    pub name: String,
    /// What it computes.
    pub layer: Layer,
}

/// A parsed symbol: its layers in order and the input scaling it applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Symbol {
    /// Layers in graph order (scalar input ops and no-op nodes left out).
    pub nodes: Vec<Node>,
    /// The leading `_minus_scalar`/`_mul_scalar` pair, or the identity.
    pub input_norm: InputNorm,
}

fn attr<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    ["attrs", "attr", "param"]
        .iter()
        .find_map(|k| node.get(k)?.get(key)?.as_str())
}

fn parse_tuple(s: &str) -> Option<Vec<usize>> {
    s.trim_matches(|c| c == '(' || c == ')' || c == '[' || c == ']')
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().ok())
        .collect()
}

fn pair(v: Vec<usize>) -> Option<[usize; 2]> {
    match v.as_slice() {
        [a] => Some([*a, *a]),
        [a, b] => Some([*a, *b]),
        _ => None,
    }
}

fn parse_bool(s: Option<&str>, default: bool) -> bool {
    match s {
        Some(v) => matches!(v.to_ascii_lowercase().as_str(), "true" | "1"),
        None => default,
    }
}

/// Reads an MXNet `*-symbol.json`: a regular file of at most [`MAX_SYMBOL_BYTES`].
pub fn read_symbol(path: &Path) -> Result<Symbol> {
    let bytes = super::read_regular_file(path, MAX_SYMBOL_BYTES)?;
    parse_symbol(&bytes, path)
}

/// Parses the bytes of an MXNet symbol, as [`read_symbol`] does; `path` is only used in
/// error messages. At most [`MAX_SYMBOL_NODES`] nodes; every attribute the layers use must
/// parse (integers as non-negative integers, numbers as finite ones).
pub fn parse_symbol(bytes: &[u8], path: &Path) -> Result<Symbol> {
    let bad = |message: String| Error::Symbol {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() as u64 > MAX_SYMBOL_BYTES {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_SYMBOL_BYTES} a symbol may have",
            bytes.len()
        )));
    }
    // serde_json bounds its nesting depth, so no input overflows the stack.
    let json: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let nodes = json
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `nodes` array: not an MXNet symbol file".into()))?;
    if nodes.len() > MAX_SYMBOL_NODES {
        return Err(bad(format!(
            "{} nodes, more than the {MAX_SYMBOL_NODES} a symbol may have",
            nodes.len()
        )));
    }
    let mut out = Vec::new();
    let mut input_norm = InputNorm::identity();
    for node in nodes {
        let op = node.get("op").and_then(Value::as_str).unwrap_or("");
        let name = node
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let tuple = |key: &str, default: Option<[usize; 2]>| -> Result<[usize; 2]> {
            match attr(node, key) {
                Some(s) => parse_tuple(s)
                    .and_then(pair)
                    .ok_or_else(|| bad(format!("node `{name}`: cannot read {key}={s:?}"))),
                None => default.ok_or_else(|| bad(format!("node `{name}` ({op}) has no `{key}`"))),
            }
        };
        let number = |key: &str, default: Option<f64>| -> Result<f64> {
            match attr(node, key) {
                Some(s) => s
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        bad(format!(
                            "node `{name}`: cannot read {key}={s:?} as a finite number"
                        ))
                    }),
                None => default.ok_or_else(|| bad(format!("node `{name}` ({op}) has no `{key}`"))),
            }
        };
        let integer = |key: &str, default: Option<usize>| -> Result<usize> {
            match attr(node, key) {
                Some(s) => s.trim().parse::<usize>().map_err(|_| {
                    bad(format!(
                        "node `{name}`: cannot read {key}={s:?} as a non-negative integer"
                    ))
                }),
                None => default.ok_or_else(|| bad(format!("node `{name}` ({op}) has no `{key}`"))),
            }
        };
        let layer = match op {
            "null" | "Flatten" | "Dropout" | "_copy" | "identity" => continue,
            "_minus_scalar" if out.is_empty() => {
                input_norm.mean = [number("scalar", None)? as f32; 3];
                continue;
            }
            "_mul_scalar" if out.is_empty() => {
                input_norm.scale = [number("scalar", None)? as f32; 3];
                continue;
            }
            "Convolution" => Layer::Conv {
                kernel: tuple("kernel", None)?,
                stride: tuple("stride", Some([1, 1]))?,
                pad: tuple("pad", Some([0, 0]))?,
                groups: integer("num_group", Some(1))?,
                filters: integer("num_filter", None)?,
                bias: !parse_bool(attr(node, "no_bias"), false),
            },
            "BatchNorm" => Layer::BatchNorm {
                eps: number("eps", Some(MXNET_BN_EPS))?,
                // MXNet's BatchNorm defaults to fix_gamma=True.
                fix_gamma: parse_bool(attr(node, "fix_gamma"), true),
            },
            "LeakyReLU" if attr(node, "act_type") == Some("prelu") => Layer::PRelu,
            "elemwise_add" | "_Plus" | "_plus" | "broadcast_add" => Layer::Add,
            "FullyConnected" => Layer::FullyConnected {
                hidden: integer("num_hidden", None)?,
                bias: !parse_bool(attr(node, "no_bias"), false),
            },
            other => {
                return Err(bad(format!(
                    "node `{name}` has op `{other}`, which a MobileFaceNet does not use"
                )))
            }
        };
        out.push(Node { name, layer });
    }
    Ok(Symbol {
        nodes: out,
        input_norm,
    })
}

/// The graph a config implies, in MXNet's naming and order.
pub fn expected_graph(config: &Config) -> Vec<Node> {
    let plan = config.plan();
    let mut out = Vec::new();
    let conv = |out: &mut Vec<Node>, spec: &crate::ConvSpec| {
        out.push(Node {
            name: format!("{}_conv2d", spec.name),
            layer: Layer::Conv {
                kernel: spec.kernel,
                stride: [spec.stride; 2],
                pad: spec.pad,
                groups: spec.groups,
                filters: spec.out_channels,
                bias: false,
            },
        });
        out.push(Node {
            name: spec.bn_name(),
            layer: Layer::BatchNorm {
                eps: spec.bn_eps,
                fix_gamma: false,
            },
        });
        if spec.has_prelu() {
            out.push(Node {
                name: format!("{}_relu", spec.name),
                layer: Layer::PRelu,
            });
        }
    };
    for (spec, residual) in plan.convs().zip(plan.residual_after()) {
        conv(&mut out, spec);
        if residual {
            out.push(Node {
                name: "(residual add)".into(),
                layer: Layer::Add,
            });
        }
    }
    out.push(Node {
        name: "pre_fc1".into(),
        layer: Layer::FullyConnected {
            hidden: plan.embedding.out_features,
            bias: plan.embedding.bias,
        },
    });
    out.push(Node {
        name: "fc1".into(),
        layer: Layer::BatchNorm {
            eps: plan.embedding.bn_eps,
            fix_gamma: plan.embedding.fix_gamma,
        },
    });
    out
}

fn describe(layer: &Layer) -> String {
    match layer {
        Layer::Conv {
            kernel,
            stride,
            pad,
            groups,
            filters,
            bias,
        } => format!(
            "Convolution kernel {kernel:?} stride {stride:?} pad {pad:?} num_group {groups} num_filter {filters}{}",
            if *bias { " with bias" } else { "" }
        ),
        Layer::BatchNorm { eps, fix_gamma } => format!("BatchNorm eps {eps} fix_gamma {fix_gamma}"),
        Layer::PRelu => "PReLU".into(),
        Layer::Add => "elemwise_add".into(),
        Layer::FullyConnected { hidden, bias } => format!(
            "FullyConnected num_hidden {hidden}{}",
            if *bias { " with bias" } else { "" }
        ),
    }
}

/// Checks a parsed symbol against a config and returns the config with the symbol's eps,
/// fix_gamma and input scaling. Errors name the first node that differs. Both configs must
/// pass [`Config::validate`].
pub fn match_config(symbol: &Symbol, config: &Config, path: &Path) -> Result<Config> {
    let mismatch = |node: &str, expected: String, found: String| Error::GraphMismatch {
        path: path.to_path_buf(),
        node: node.to_string(),
        expected,
        found,
    };
    config.validate().map_err(|e| e.in_file(path))?;
    let mut config = config.clone();
    config.input_norm = symbol.input_norm.clone();
    // eps and fix_gamma come from the symbol: take them from its first body BatchNorm and
    // its last one (the embedding's), then require every node to agree with the result.
    if let Some(Layer::BatchNorm { eps, .. }) = symbol
        .nodes
        .iter()
        .map(|n| &n.layer)
        .find(|l| matches!(l, Layer::BatchNorm { .. }))
    {
        config.bn_eps = *eps;
    }
    if let Some(Node {
        layer: Layer::BatchNorm { eps, fix_gamma },
        ..
    }) = symbol.nodes.last()
    {
        config.head.bn_eps = *eps;
        config.head.fix_gamma = *fix_gamma;
    }
    let expected = expected_graph(&config);
    for (i, want) in expected.iter().enumerate() {
        let Some(got) = symbol.nodes.get(i) else {
            return Err(mismatch(
                &want.name,
                describe(&want.layer),
                "the end of the graph".into(),
            ));
        };
        let same_layer = match (&want.layer, &got.layer) {
            (
                Layer::BatchNorm {
                    eps: a,
                    fix_gamma: fa,
                },
                Layer::BatchNorm {
                    eps: b,
                    fix_gamma: fb,
                },
            ) => fa == fb && (a - b).abs() <= 1e-12 * a.abs().max(1.0),
            (a, b) => a == b,
        };
        let same_name = matches!(want.layer, Layer::Add) || want.name == got.name;
        if !same_layer || !same_name {
            return Err(mismatch(
                &got.name,
                format!("`{}`: {}", want.name, describe(&want.layer)),
                format!("`{}`: {}", got.name, describe(&got.layer)),
            ));
        }
    }
    if let Some(extra) = symbol.nodes.get(expected.len()) {
        return Err(mismatch(
            &extra.name,
            "the end of the graph".into(),
            describe(&extra.layer),
        ));
    }
    config.validate().map_err(|e| e.in_file(path))?;
    Ok(config)
}

/// The `.params` file beside a `prefix-symbol.json`: `prefix-NNNN.params` with the highest
/// epoch number.
pub fn params_beside(symbol: &Path) -> Result<PathBuf> {
    let file = symbol
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let prefix = file
        .strip_suffix("-symbol.json")
        .ok_or_else(|| Error::Symbol {
            path: symbol.to_path_buf(),
            message: "an MXNet symbol file is named `<prefix>-symbol.json`".into(),
        })?;
    let dir = symbol
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let epoch = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(".params"))
            .and_then(|r| r.parse::<u32>().ok());
        if let Some(epoch) = epoch {
            if best.as_ref().is_none_or(|(e, _)| epoch > *e) {
                best = Some((epoch, entry.path()));
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| Error::Io {
        path: dir.join(format!("{prefix}-NNNN.params")),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no params file beside the symbol",
        ),
    })
}

/// Checks arrays against the weights a config needs and turns them into tensors.
pub fn tensors_for(
    config: &Config,
    arrays: &HashMap<String, NdArray>,
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, shape) in config.plan().weights() {
        let array = arrays.get(&name).ok_or_else(|| Error::MissingWeight {
            path: path.to_path_buf(),
            name: name.clone(),
        })?;
        if array.shape != shape {
            return Err(Error::WeightShape {
                path: path.to_path_buf(),
                name,
                expected: shape,
                found: array.shape.clone(),
            });
        }
        let t = Tensor::from_slice(&array.data, shape.as_slice(), device).map_err(|e| {
            Error::BadWeight {
                path: path.to_path_buf(),
                name: name.clone(),
                message: e.to_string(),
            }
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Reads a symbol and its params, checks both against `config` and returns the config as
/// the symbol defines it (which must pass [`Config::validate`]), with the weights (present,
/// shaped and finite).
pub fn load(
    symbol_path: &Path,
    params_path: Option<&Path>,
    config: &Config,
    device: &Device,
) -> Result<(Config, HashMap<String, Tensor>)> {
    config.validate().map_err(|e| e.in_file(symbol_path))?;
    let symbol = read_symbol(symbol_path)?;
    let config = match_config(&symbol, config, symbol_path)?;
    let params_path = match params_path {
        Some(p) => p.to_path_buf(),
        None => params_beside(symbol_path)?,
    };
    let arrays = read_params(&params_path)?;
    let tensors = tensors_for(&config, &arrays, &params_path, device)?;
    crate::checkpoint::check_weights(&config, &tensors, &params_path)?;
    Ok((config, tensors))
}
