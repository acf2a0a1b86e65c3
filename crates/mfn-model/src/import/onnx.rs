//! ONNX models, read in pure Rust by walking the graph.
//!
//! The protobuf wire format is decoded by hand for the few messages a face model needs
//! (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto), so no `protoc` or
//! generated code is involved. Initializers are read from `raw_data`, the typed fields, or
//! external data files beside the model.
//!
//! Exporters give initializers opaque names (`onnx::Conv_548`), so weights are matched to
//! the network by graph order: each Conv (with its BatchNormalization when not folded, and
//! its PRelu, Relu or Clip(0, 6)), each residual Add, and the final Gemm/MatMul (or 1x1
//! Conv) and BatchNormalization, in turn, against the layers a [`Config`] implies. The
//! head's conv is the GDConv or, for [`crate::Pooling::ConvReduce`] (`w600k_mbf`), a 1x1
//! Conv with its PRelu whose map a Flatten hands to the Gemm; Flatten and Reshape only
//! move data, so the walk passes over them. A leading Sub/Mul (or Sub/Div), by a scalar or
//! one value per channel, is taken as the input normalisation, as insightface's
//! `arcface_onnx.py` does.
//!
//! [`parse_graph`] gives the same parse as a read-only [`OnnxGraph`] (nodes with typed
//! attribute getters, initializers with their int64 data kept exact, and the graph's
//! input and output names in order), for interpreting networks other than MobileFaceNet,
//! such as a face detector.
//!
//! The file is untrusted: every length is checked against the bytes left before it is
//! used, a tensor's dims must multiply (without overflow) to exactly the data it holds, an
//! attribute of the wrong type is an error naming the node and the attribute, and external
//! data must be a regular file inside the model's folder once links are resolved, with
//! its offset and length inside that file's real size.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use candle_core::{Device, Tensor};

use crate::config::{Activation, Config, ConvSpec, InputNorm};
use crate::{Error, Result};

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Onnx {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A protobuf field: its number and its value.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates the fields of one protobuf message.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next field, `Ok(None)` at the end, `Err` with the byte offset when malformed.
    fn next_field(&mut self) -> std::result::Result<Option<(u32, Field<'a>)>, usize> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint().ok_or(at)?;
        let number = (key >> 3) as u32;
        let field = match key & 7 {
            0 => Field::Varint(self.varint().ok_or(at)?),
            1 => {
                let b = self.buf.get(self.pos..self.pos + 8).ok_or(at)?;
                self.pos += 8;
                Field::Fixed64(u64::from_le_bytes(b.try_into().map_err(|_| at)?))
            }
            2 => {
                let len = self.varint().ok_or(at)? as usize;
                let end = self.pos.checked_add(len).ok_or(at)?;
                let b = self.buf.get(self.pos..end).ok_or(at)?;
                self.pos = end;
                Field::Bytes(b)
            }
            5 => {
                let b = self.buf.get(self.pos..self.pos + 4).ok_or(at)?;
                self.pos += 4;
                Field::Fixed32(u32::from_le_bytes(b.try_into().map_err(|_| at)?))
            }
            _ => return Err(at),
        };
        Ok(Some((number, field)))
    }
}

/// Visits every field of a message; `what` names it in errors.
fn each_field<'a>(
    buf: &'a [u8],
    path: &Path,
    what: &str,
    mut f: impl FnMut(u32, Field<'a>) -> Result<()>,
) -> Result<()> {
    let mut it = Fields::new(buf);
    loop {
        match it.next_field() {
            Ok(Some((n, v))) => f(n, v)?,
            Ok(None) => return Ok(()),
            Err(at) => {
                return Err(err(
                    path,
                    format!("malformed {what} at byte {at} of the message"),
                ))
            }
        }
    }
}

fn string(b: &[u8], path: &Path) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| err(path, "a name is not UTF-8"))
}

/// Repeated int64: packed (bytes) or one varint per field.
fn push_ints(v: Field, out: &mut Vec<i64>, path: &Path) -> Result<()> {
    match v {
        Field::Varint(x) => out.push(x as i64),
        Field::Bytes(b) => {
            let mut f = Fields::new(b);
            while f.pos < b.len() {
                out.push(
                    f.varint()
                        .ok_or_else(|| err(path, "malformed packed ints"))?
                        as i64,
                );
            }
        }
        _ => return Err(err(path, "ints field of the wrong wire type")),
    }
    Ok(())
}

/// Repeated float: packed or one fixed32 per field.
fn push_floats(v: Field, out: &mut Vec<f32>, path: &Path) -> Result<()> {
    match v {
        Field::Fixed32(x) => out.push(f32::from_bits(x)),
        Field::Bytes(b) => {
            if b.len() % 4 != 0 {
                return Err(err(
                    path,
                    "packed floats whose length is not a multiple of 4",
                ));
            }
            out.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        _ => return Err(err(path, "floats field of the wrong wire type")),
    }
    Ok(())
}

/// A float tensor from an initializer.
#[derive(Clone, Debug)]
struct Array {
    dims: Vec<usize>,
    data: Vec<f32>,
}

/// The `bytes` bytes of a tensor's external data. The location must be a relative path of
/// plain names that, with every link resolved, names a regular file inside the model's
/// folder (so neither `../x`, an absolute path, a link out of the folder nor a FIFO or a
/// device such as `/dev/zero`); its offset and length must lie inside the file's real size
/// and the length must be what the tensor's shape needs. Nothing more is read.
fn read_external(
    path: &Path,
    name: &str,
    external: &HashMap<String, String>,
    bytes: usize,
) -> Result<Vec<u8>> {
    let location = external.get("location").map(String::as_str).unwrap_or("");
    let fail = |message: String| {
        err(
            path,
            format!("tensor `{name}`: external data `{location}`: {message}"),
        )
    };
    let rel = Path::new(location);
    if location.is_empty() {
        return Err(fail("no location".into()));
    }
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(fail("outside the model's folder".into()));
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir
        .canonicalize()
        .map_err(|e| fail(format!("cannot resolve the model's folder: {e}")))?;
    let file = dir
        .join(rel)
        .canonicalize()
        .map_err(|e| fail(format!("cannot resolve it: {e}")))?;
    if !file.starts_with(&dir) {
        return Err(fail(format!(
            "resolves to {}, outside the model's folder",
            file.display()
        )));
    }
    let size = super::check_regular_file(&file, u64::MAX).map_err(|e| fail(e.to_string()))?;
    let number = |key: &str| -> Result<Option<u64>> {
        external
            .get(key)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| fail(format!("`{key}` is {v:?}, not a byte count")))
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    if offset > size {
        return Err(fail(format!(
            "offset {offset} is past the end of the {size}-byte file"
        )));
    }
    let length = number("length")?.unwrap_or(size - offset);
    if length > size - offset {
        return Err(fail(format!(
            "{length} bytes at offset {offset} run past the end of the {size}-byte file"
        )));
    }
    if length != bytes as u64 {
        return Err(fail(format!(
            "{length} bytes, the tensor's shape needs {bytes}"
        )));
    }
    let io = |e: std::io::Error| fail(e.to_string());
    let mut f = std::fs::File::open(&file).map_err(io)?;
    if !f.metadata().map_err(io)?.is_file() {
        return Err(fail("not a regular file".into()));
    }
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut out = Vec::with_capacity(bytes);
    f.take(length).read_to_end(&mut out).map_err(io)?;
    if out.len() != bytes {
        return Err(fail(format!(
            "the file ended after {} of {bytes} bytes",
            out.len()
        )));
    }
    Ok(out)
}

/// What a stored tensor's data decodes to.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorValues {
    /// Float or double data, as `f32`.
    F32(Vec<f32>),
    /// Int64 or int32 data, as `i64`: shapes, axes and indices keep every bit (a slice end
    /// of `i64::MAX` would not survive a float).
    I64(Vec<i64>),
}

fn parse_tensor(buf: &[u8], path: &Path) -> Result<(String, Array)> {
    let (name, dims, values) = parse_tensor_values(buf, path, false)?;
    let data = match values {
        TensorValues::F32(v) => v,
        // Initializers a face network reads are float; int64 ones (shapes) are cast.
        TensorValues::I64(v) => v.into_iter().map(|x| x as f32).collect(),
    };
    Ok((name, Array { dims, data }))
}

/// A TensorProto's name, dims and values. Float, double and int64 data are read; int32
/// data too when `int32` is set (the graph view reads it, the MobileFaceNet walk refuses
/// it as it always has).
fn parse_tensor_values(
    buf: &[u8],
    path: &Path,
    int32: bool,
) -> Result<(String, Vec<usize>, TensorValues)> {
    let mut dims = Vec::new();
    let mut dtype = 0i64;
    let mut name = String::new();
    let mut raw: Option<&[u8]> = None;
    let mut floats = Vec::new();
    let mut doubles = Vec::new();
    let mut int64s = Vec::new();
    let mut int32s = Vec::new();
    let mut external: HashMap<String, String> = HashMap::new();
    let mut external_location = false;
    each_field(buf, path, "TensorProto", |n, v| {
        match (n, v) {
            (1, v) => push_ints(v, &mut dims, path)?,
            (2, Field::Varint(t)) => dtype = t as i64,
            (4, v) => push_floats(v, &mut floats, path)?,
            (5, v) if int32 => push_ints(v, &mut int32s, path)?,
            (7, v) => push_ints(v, &mut int64s, path)?,
            (8, Field::Bytes(b)) => name = string(b, path)?,
            (9, Field::Bytes(b)) => raw = Some(b),
            (10, Field::Fixed64(x)) => doubles.push(f64::from_bits(x)),
            (10, Field::Bytes(b)) => {
                if b.len() % 8 != 0 {
                    return Err(err(
                        path,
                        "packed doubles whose length is not a multiple of 8",
                    ));
                }
                doubles.extend(
                    b.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default())),
                )
            }
            (13, Field::Bytes(b)) => {
                let (mut k, mut val) = (String::new(), String::new());
                each_field(b, path, "external data entry", |n, v| {
                    match (n, v) {
                        (1, Field::Bytes(s)) => k = string(s, path)?,
                        (2, Field::Bytes(s)) => val = string(s, path)?,
                        _ => {}
                    }
                    Ok(())
                })?;
                external.insert(k, val);
            }
            (14, Field::Varint(v)) => external_location = v == 1,
            _ => {}
        }
        Ok(())
    })?;
    let dims: Vec<usize> = dims
        .iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| err(path, format!("tensor `{name}` has dimension {d}")))
        })
        .collect::<Result<_>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| err(path, format!("tensor `{name}` is too large")))?;
    let elem = match dtype {
        1 => 4,
        6 if int32 => 4,
        7 | 11 => 8,
        t if int32 => {
            return Err(err(
                path,
                format!("tensor `{name}` has data type {t}, not float, double, int32 or int64"),
            ))
        }
        t => {
            return Err(err(
                path,
                format!("tensor `{name}` has data type {t}, not float"),
            ))
        }
    };
    let bytes_needed = count
        .checked_mul(elem)
        .ok_or_else(|| err(path, format!("tensor `{name}` is too large")))?;
    let ext_bytes;
    let raw = if external_location || !external.is_empty() {
        ext_bytes = read_external(path, &name, &external, bytes_needed)?;
        Some(&ext_bytes[..])
    } else {
        raw
    };
    if let Some(b) = raw {
        if b.len() != bytes_needed {
            return Err(err(
                path,
                format!(
                    "tensor `{name}` has {} bytes of data, its shape {dims:?} needs {bytes_needed}",
                    b.len()
                ),
            ));
        }
    }
    let values = match (dtype, raw) {
        (1, Some(b)) => TensorValues::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        (11, Some(b)) => TensorValues::F32(
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32)
                .collect(),
        ),
        (7, Some(b)) => TensorValues::I64(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ),
        (6, Some(b)) => TensorValues::I64(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        (1, None) => TensorValues::F32(floats),
        (11, None) => TensorValues::F32(doubles.iter().map(|v| *v as f32).collect()),
        // int32_data holds each value as a varint of its 64-bit sign extension.
        (6, None) => TensorValues::I64(int32s.into_iter().map(|v| v as i32 as i64).collect()),
        (_, None) => TensorValues::I64(int64s),
        (t, Some(_)) => {
            return Err(err(
                path,
                format!("tensor `{name}` has data type {t}, not float"),
            ))
        }
    };
    let len = match &values {
        TensorValues::F32(v) => v.len(),
        TensorValues::I64(v) => v.len(),
    };
    if len != count {
        return Err(err(
            path,
            format!("tensor `{name}` holds {len} values, its shape {dims:?} needs {count}"),
        ));
    }
    Ok((name, dims, values))
}

/// One attribute of a node, as far as a face network's ops read them.
#[derive(Clone, Debug, Default)]
struct Attr {
    /// `AttributeProto.type`, when the exporter wrote it.
    kind: Option<u64>,
    float: Option<f32>,
    int: Option<i64>,
    floats: Vec<f32>,
    ints: Vec<i64>,
    /// A STRING attribute's bytes, kept for the graph view.
    string: Option<Vec<u8>>,
    /// A TENSOR attribute's TensorProto, decoded only when the graph view asks for it.
    tensor: Option<Vec<u8>>,
    /// Whether it holds something else: a string, tensor, graph or list of those.
    other: bool,
}

/// `AttributeProto.AttributeType` values.
const ATTR_FLOAT: u64 = 1;
const ATTR_INT: u64 = 2;
const ATTR_STRING: u64 = 3;
const ATTR_TENSOR: u64 = 4;
const ATTR_FLOATS: u64 = 6;
const ATTR_INTS: u64 = 7;

impl Attr {
    /// What the attribute holds, for errors.
    fn describe(&self) -> String {
        match self.kind {
            Some(1) => "a float".into(),
            Some(2) => "an int".into(),
            Some(3) => "a string".into(),
            Some(4) => "a tensor".into(),
            Some(5) => "a graph".into(),
            Some(6) => "floats".into(),
            Some(7) => "ints".into(),
            Some(8) => "strings".into(),
            Some(k) => format!("type {k}"),
            None if self.float.is_some() => "a float".into(),
            None if self.int.is_some() => "an int".into(),
            None if !self.floats.is_empty() => "floats".into(),
            None if !self.ints.is_empty() => "ints".into(),
            None if self.other => "a string, tensor or graph".into(),
            None => "no value".into(),
        }
    }
}

/// One node of the graph.
#[derive(Clone, Debug, Default)]
struct Node {
    name: String,
    op: String,
    /// The operator set the op belongs to; empty for the default one.
    domain: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: HashMap<String, Attr>,
}

impl Node {
    fn wrong_type(&self, key: &str, a: &Attr, expected: &str, path: &Path) -> Error {
        err(
            path,
            format!(
                "node `{}` ({}): attribute `{key}` is not {expected}: it holds {}",
                self.name,
                self.op,
                a.describe()
            ),
        )
    }

    /// An INT attribute; `None` when the node has no such attribute.
    fn int(&self, key: &str, path: &Path) -> Result<Option<i64>> {
        let Some(a) = self.attrs.get(key) else {
            return Ok(None);
        };
        match (a.kind, a.int) {
            (None | Some(ATTR_INT), Some(v)) => Ok(Some(v)),
            _ => Err(self.wrong_type(key, a, "an int", path)),
        }
    }

    /// An INTS attribute; `None` when the node has no such attribute.
    fn ints(&self, key: &str, path: &Path) -> Result<Option<Vec<i64>>> {
        let Some(a) = self.attrs.get(key) else {
            return Ok(None);
        };
        match a.kind {
            Some(ATTR_INTS) if a.int.is_none() => Ok(Some(a.ints.clone())),
            None if a.int.is_none() && !a.ints.is_empty() => Ok(Some(a.ints.clone())),
            _ => Err(self.wrong_type(key, a, "a list of ints", path)),
        }
    }

    /// A FLOAT attribute; `None` when the node has no such attribute.
    fn float(&self, key: &str, path: &Path) -> Result<Option<f32>> {
        let Some(a) = self.attrs.get(key) else {
            return Ok(None);
        };
        match (a.kind, a.float) {
            (None | Some(ATTR_FLOAT), Some(v)) => Ok(Some(v)),
            _ => Err(self.wrong_type(key, a, "a float", path)),
        }
    }

    /// A FLOATS attribute; `None` when the node has no such attribute.
    fn floats(&self, key: &str, path: &Path) -> Result<Option<Vec<f32>>> {
        let Some(a) = self.attrs.get(key) else {
            return Ok(None);
        };
        match a.kind {
            Some(ATTR_FLOATS) if a.float.is_none() => Ok(Some(a.floats.clone())),
            None if a.float.is_none() && !a.floats.is_empty() => Ok(Some(a.floats.clone())),
            _ => Err(self.wrong_type(key, a, "a list of floats", path)),
        }
    }

    /// A STRING attribute as text; `None` when the node has no such attribute.
    fn string(&self, key: &str, path: &Path) -> Result<Option<String>> {
        let Some(a) = self.attrs.get(key) else {
            return Ok(None);
        };
        match (a.kind, &a.string) {
            (None | Some(ATTR_STRING), Some(s)) => String::from_utf8(s.clone())
                .map(Some)
                .map_err(|_| self.wrong_type(key, a, "UTF-8 text", path)),
            _ => Err(self.wrong_type(key, a, "a string", path)),
        }
    }

    /// A TENSOR attribute, decoded; `None` when the node has no such attribute.
    fn tensor(&self, key: &str, path: &Path) -> Result<Option<OnnxTensor>> {
        let Some(a) = self.attrs.get(key) else {
            return Ok(None);
        };
        match (a.kind, &a.tensor) {
            (None | Some(ATTR_TENSOR), Some(t)) => {
                let (_, dims, values) = parse_tensor_values(t, path, true).map_err(|e| {
                    err(
                        path,
                        format!(
                            "node `{}` ({}): attribute `{key}`: {}",
                            self.name,
                            self.op,
                            match e {
                                Error::Onnx { message, .. } => message,
                                other => other.to_string(),
                            }
                        ),
                    )
                })?;
                Ok(Some(OnnxTensor { dims, values }))
            }
            _ => Err(self.wrong_type(key, a, "a tensor", path)),
        }
    }
}

fn parse_node(buf: &[u8], path: &Path) -> Result<Node> {
    let mut node = Node::default();
    each_field(buf, path, "NodeProto", |n, v| {
        match (n, v) {
            (1, Field::Bytes(b)) => node.inputs.push(string(b, path)?),
            (2, Field::Bytes(b)) => node.outputs.push(string(b, path)?),
            (3, Field::Bytes(b)) => node.name = string(b, path)?,
            (4, Field::Bytes(b)) => node.op = string(b, path)?,
            // Only the graph view reads it, so a malformed one is not an error.
            (7, Field::Bytes(b)) => node.domain = String::from_utf8_lossy(b).into_owned(),
            (5, Field::Bytes(b)) => {
                let mut name = String::new();
                let mut a = Attr::default();
                each_field(b, path, "AttributeProto", |n, v| {
                    match (n, v) {
                        (1, Field::Bytes(s)) => name = string(s, path)?,
                        (2, Field::Fixed32(x)) => a.float = Some(f32::from_bits(x)),
                        (3, Field::Varint(x)) => a.int = Some(x as i64),
                        (7, v) => push_floats(v, &mut a.floats, path)?,
                        (8, v) => push_ints(v, &mut a.ints, path)?,
                        (20, Field::Varint(k)) => a.kind = Some(k),
                        (4, Field::Bytes(s)) => {
                            a.string = Some(s.to_vec());
                            a.other = true
                        }
                        (5, Field::Bytes(t)) => {
                            a.tensor = Some(t.to_vec());
                            a.other = true
                        }
                        (4..=6 | 9..=11 | 22 | 23, _) => a.other = true,
                        _ => {}
                    }
                    Ok(())
                })?;
                node.attrs.insert(name, a);
            }
            _ => {}
        }
        Ok(())
    })?;
    // Unnamed nodes are known by what they compute.
    if node.name.is_empty() {
        node.name = node.outputs.first().cloned().unwrap_or_default();
    }
    Ok(node)
}

/// The parts of a model a face network needs.
struct Graph {
    nodes: Vec<Node>,
    init: HashMap<String, Array>,
}

fn parse_model(bytes: &[u8], path: &Path) -> Result<Graph> {
    let mut graph: Option<&[u8]> = None;
    each_field(bytes, path, "ModelProto", |n, v| {
        if let (7, Field::Bytes(b)) = (n, v) {
            graph = Some(b);
        }
        Ok(())
    })
    .map_err(|_| err(path, "not an ONNX model (cannot parse the ModelProto)"))?;
    let graph = graph.ok_or_else(|| err(path, "not an ONNX model (no graph)"))?;
    let mut nodes = Vec::new();
    let mut init = HashMap::new();
    each_field(graph, path, "GraphProto", |n, v| {
        match (n, v) {
            (1, Field::Bytes(b)) => nodes.push(parse_node(b, path)?),
            (5, Field::Bytes(b)) => {
                let (name, a) = parse_tensor(b, path)?;
                init.insert(name, a);
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(Graph { nodes, init })
}

/// A tensor stored in an ONNX model: an initializer, or the value of a `Constant` node.
/// Its dims always multiply to exactly the number of values it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxTensor {
    dims: Vec<usize>,
    values: TensorValues,
}

impl OnnxTensor {
    /// The dims; empty for a scalar.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The values, row-major.
    pub fn values(&self) -> &TensorValues {
        &self.values
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        match &self.values {
            TensorValues::F32(v) => v.len(),
            TensorValues::I64(v) => v.len(),
        }
    }

    /// Whether it holds no value (a zero dim).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of a float tensor; `None` for an integer one.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.values {
            TensorValues::F32(v) => Some(v),
            TensorValues::I64(_) => None,
        }
    }

    /// The values of an integer tensor; `None` for a float one.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.values {
            TensorValues::I64(v) => Some(v),
            TensorValues::F32(_) => None,
        }
    }
}

/// A read-only view of an ONNX model's graph, for code that interprets other networks
/// than MobileFaceNet (a face detector, say): nodes in file order, initializers, and the
/// names of the graph's inputs and outputs in order.
///
/// It is parsed with the same bounds as [`load`]: every length is checked against the
/// bytes left, every tensor's dims must match its data, external data must lie in the
/// model's folder. Nothing is checked about what the graph computes; that is the caller's
/// to do, and the node getters report errors that name the node.
#[derive(Debug)]
pub struct OnnxGraph {
    path: std::path::PathBuf,
    nodes: Vec<Node>,
    init: HashMap<String, OnnxTensor>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    opset: Option<i64>,
}

impl OnnxGraph {
    /// The file the graph came from, as errors name it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many nodes the graph has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The nodes, in file order (which ONNX requires to be a topological order, though a
    /// caller should not trust a hostile file on that).
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = OnnxNode<'_>> + '_ {
        self.nodes.iter().map(|node| OnnxNode {
            node,
            path: &self.path,
        })
    }

    /// The initializer called `name`.
    pub fn initializer(&self, name: &str) -> Option<&OnnxTensor> {
        self.init.get(name)
    }

    /// Every initializer, by name, in no particular order.
    pub fn initializers(&self) -> impl Iterator<Item = (&str, &OnnxTensor)> + '_ {
        self.init.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The names of the graph's inputs, in order. Files of IR version 3 and before list
    /// the initializers here too; the inputs a caller feeds are those that are not.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The names of the graph's outputs, in order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The version of the default operator set the model imports, when it says.
    pub fn opset(&self) -> Option<i64> {
        self.opset
    }
}

/// One node of an [`OnnxGraph`]. Attribute getters give `Ok(None)` when the node has no
/// such attribute and an error naming the node and the attribute when it holds something
/// of another type.
#[derive(Clone, Copy, Debug)]
pub struct OnnxNode<'a> {
    node: &'a Node,
    path: &'a Path,
}

impl<'a> OnnxNode<'a> {
    /// The node's name; an unnamed node is known by its first output.
    pub fn name(&self) -> &'a str {
        &self.node.name
    }

    /// The op type (`Conv`, `Resize`, ...).
    pub fn op(&self) -> &'a str {
        &self.node.op
    }

    /// The operator set the op belongs to: empty (or `ai.onnx`) for the standard ops.
    pub fn domain(&self) -> &'a str {
        &self.node.domain
    }

    /// Input tensor names, in order; an empty name is an omitted optional input.
    pub fn inputs(&self) -> &'a [String] {
        &self.node.inputs
    }

    /// Output tensor names, in order.
    pub fn outputs(&self) -> &'a [String] {
        &self.node.outputs
    }

    /// The names of the node's attributes, in no particular order.
    pub fn attribute_names(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.node.attrs.keys().map(String::as_str)
    }

    /// An INT attribute.
    pub fn attr_int(&self, key: &str) -> Result<Option<i64>> {
        self.node.int(key, self.path)
    }

    /// An INTS attribute.
    pub fn attr_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.node.ints(key, self.path)
    }

    /// A FLOAT attribute.
    pub fn attr_float(&self, key: &str) -> Result<Option<f32>> {
        self.node.float(key, self.path)
    }

    /// A FLOATS attribute.
    pub fn attr_floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.node.floats(key, self.path)
    }

    /// A STRING attribute, which must be UTF-8.
    pub fn attr_string(&self, key: &str) -> Result<Option<String>> {
        self.node.string(key, self.path)
    }

    /// A TENSOR attribute (a `Constant`'s `value`), decoded with the same checks as an
    /// initializer.
    pub fn attr_tensor(&self, key: &str) -> Result<Option<OnnxTensor>> {
        self.node.tensor(key, self.path)
    }
}

/// The names of a graph's inputs or outputs: the `name` of each ValueInfoProto.
fn value_info_name(buf: &[u8], path: &Path) -> Result<String> {
    let mut name = String::new();
    each_field(buf, path, "ValueInfoProto", |n, v| {
        if let (1, Field::Bytes(b)) = (n, v) {
            name = string(b, path)?;
        }
        Ok(())
    })?;
    Ok(name)
}

/// Parses an ONNX model in memory into its [`OnnxGraph`]; `path` names it in errors and
/// locates external data.
pub fn parse_graph(bytes: &[u8], path: &Path) -> Result<OnnxGraph> {
    let mut graph: Option<&[u8]> = None;
    let mut opset = None;
    each_field(bytes, path, "ModelProto", |n, v| {
        match (n, v) {
            (7, Field::Bytes(b)) => graph = Some(b),
            (8, Field::Bytes(b)) => {
                let (mut domain, mut version) = (String::new(), None);
                each_field(b, path, "OperatorSetIdProto", |n, v| {
                    match (n, v) {
                        (1, Field::Bytes(s)) => domain = String::from_utf8_lossy(s).into_owned(),
                        (2, Field::Varint(x)) => version = Some(x as i64),
                        _ => {}
                    }
                    Ok(())
                })?;
                if domain.is_empty() || domain == "ai.onnx" {
                    opset = version;
                }
            }
            _ => {}
        }
        Ok(())
    })
    .map_err(|_| err(path, "not an ONNX model (cannot parse the ModelProto)"))?;
    let graph = graph.ok_or_else(|| err(path, "not an ONNX model (no graph)"))?;
    let mut nodes = Vec::new();
    let mut init = HashMap::new();
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    each_field(graph, path, "GraphProto", |n, v| {
        match (n, v) {
            (1, Field::Bytes(b)) => nodes.push(parse_node(b, path)?),
            (5, Field::Bytes(b)) => {
                let (name, dims, values) = parse_tensor_values(b, path, true)?;
                init.insert(name, OnnxTensor { dims, values });
            }
            (11, Field::Bytes(b)) => inputs.push(value_info_name(b, path)?),
            (12, Field::Bytes(b)) => outputs.push(value_info_name(b, path)?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(OnnxGraph {
        path: path.to_path_buf(),
        nodes,
        init,
        inputs,
        outputs,
        opset,
    })
}

/// Reads an ONNX model file into its [`OnnxGraph`]. The file must be a regular file of at
/// most [`super::MAX_FILE_BYTES`].
pub fn read_graph(path: &Path) -> Result<OnnxGraph> {
    let bytes = super::read_regular_file(path, super::MAX_FILE_BYTES)?;
    parse_graph(&bytes, path)
}

/// A conv as found in the graph, with what follows it.
struct ConvUnit {
    node: String,
    weight: Array,
    bias: Option<Array>,
    /// gamma, beta, mean, var, eps.
    bn: Option<(Array, Array, Array, Array, f32)>,
    act: Option<Activation>,
    /// PReLU slopes, when `act` is PReLU.
    slope: Option<Array>,
    groups: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
}

/// What the graph computes, in order.
#[allow(clippy::large_enum_variant)] // a few dozen per model, built once
enum Layer {
    Conv(Box<ConvUnit>),
    Add(String),
    Linear {
        node: String,
        /// `[out, in]`.
        weight: Array,
        bias: Option<Array>,
        bn: Option<(Array, Array, Array, Array, f32)>,
    },
}

/// Walks the graph into layers and the input normalisation it applies, if any.
fn layers(g: &Graph, path: &Path) -> Result<(Vec<Layer>, Option<InputNorm>)> {
    // Identity nodes only alias tensors (exporters use them to share initializers).
    let mut alias: HashMap<&str, &str> = HashMap::new();
    for n in &g.nodes {
        if n.op == "Identity" && n.inputs.len() == 1 && n.outputs.len() == 1 {
            alias.insert(&n.outputs[0], &n.inputs[0]);
        }
    }
    let resolve = |name: &str| -> Option<&Array> {
        let mut name = name;
        for _ in 0..16 {
            if let Some(a) = g.init.get(name) {
                return Some(a);
            }
            name = alias.get(name)?;
        }
        None
    };
    let weight = |node: &Node, i: usize| -> Result<Array> {
        let name = node.inputs.get(i).ok_or_else(|| {
            err(
                path,
                format!("node `{}` ({}) lacks input {i}", node.name, node.op),
            )
        })?;
        resolve(name).cloned().ok_or_else(|| {
            err(
                path,
                format!(
                    "node `{}` ({}): input `{name}` is not a constant",
                    node.name, node.op
                ),
            )
        })
    };
    // A constant operand of one value, or of one value per RGB channel.
    let per_channel = |node: &Node| -> Option<[f32; 3]> {
        let a = node.inputs.iter().find_map(|i| resolve(i))?;
        match a.data[..] {
            [v] => Some([v; 3]),
            [r, g, b] => Some([r, g, b]),
            _ => None,
        }
    };
    let mut out: Vec<Layer> = Vec::new();
    let mut norm: Option<InputNorm> = None;
    let mut pending_sub: Option<[f32; 3]> = None;
    for n in &g.nodes {
        let bn_of = |n: &Node| -> Result<(Array, Array, Array, Array, f32)> {
            Ok((
                weight(n, 1)?,
                weight(n, 2)?,
                weight(n, 3)?,
                weight(n, 4)?,
                n.float("epsilon", path)?.unwrap_or(1e-5),
            ))
        };
        match n.op.as_str() {
            "Identity" | "Flatten" | "Reshape" | "Dropout" => {}
            "Sub" if out.is_empty() => {
                pending_sub = Some(per_channel(n).ok_or_else(|| {
                    err(
                        path,
                        format!(
                            "node `{}`: Sub by something other than a scalar or 3 values",
                            n.name
                        ),
                    )
                })?)
            }
            "Mul" | "Div" if out.is_empty() => {
                let v = per_channel(n).ok_or_else(|| {
                    err(
                        path,
                        format!(
                            "node `{}`: {} by something other than a scalar or 3 values",
                            n.name, n.op
                        ),
                    )
                })?;
                let scale = if n.op == "Div" { v.map(|v| 1.0 / v) } else { v };
                norm = Some(InputNorm {
                    mean: pending_sub.unwrap_or([0.0; 3]),
                    scale,
                });
            }
            "Conv" => {
                // Sizes, strides and pads as `usize`: a negative one is an error.
                let ints = |k: &str, d: Vec<usize>| -> Result<Vec<usize>> {
                    match n.ints(k, path)? {
                        None => Ok(d),
                        Some(v) => v
                            .iter()
                            .map(|x| {
                                usize::try_from(*x).map_err(|_| {
                                    err(
                                        path,
                                        format!(
                                            "node `{}`: attribute `{k}` holds {x}, not a size",
                                            n.name
                                        ),
                                    )
                                })
                            })
                            .collect(),
                    }
                };
                let w = weight(n, 1)?;
                let k = ints("kernel_shape", w.dims.iter().skip(2).copied().collect())?;
                let s = ints("strides", vec![1, 1])?;
                let p = ints("pads", vec![0, 0, 0, 0])?;
                let groups = match n.int("group", path)?.unwrap_or(1) {
                    g if g >= 1 => usize::try_from(g).unwrap_or(usize::MAX),
                    g => {
                        return Err(err(
                            path,
                            format!("node `{}`: attribute `group` is {g}, not positive", n.name),
                        ))
                    }
                };
                if k.len() != 2
                    || s.len() != 2
                    || p.len() != 4
                    || ints("dilations", vec![1, 1])? != [1, 1]
                {
                    return Err(err(
                        path,
                        format!(
                            "node `{}`: only 2-d convs without dilation are supported",
                            n.name
                        ),
                    ));
                }
                out.push(Layer::Conv(Box::new(ConvUnit {
                    node: n.name.clone(),
                    weight: w,
                    bias: if n.inputs.len() > 2 {
                        Some(weight(n, 2)?)
                    } else {
                        None
                    },
                    bn: None,
                    act: None,
                    slope: None,
                    groups,
                    kernel: [k[0], k[1]],
                    stride: [s[0], s[1]],
                    pads: [p[0], p[1], p[2], p[3]],
                })));
            }
            "BatchNormalization" => match out.last_mut() {
                Some(Layer::Conv(c)) if c.bn.is_none() && c.act.is_none() => c.bn = Some(bn_of(n)?),
                Some(Layer::Linear { bn, .. }) if bn.is_none() => *bn = Some(bn_of(n)?),
                _ => {
                    return Err(err(
                        path,
                        format!(
                            "node `{}`: a BatchNormalization that follows no conv or linear layer",
                            n.name
                        ),
                    ))
                }
            },
            "Relu" | "Clip" => {
                let act = if n.op == "Relu" {
                    Activation::Relu
                } else {
                    // Opset 11+ gives the bounds as inputs, older opsets as attributes.
                    let bound = |i: usize, key: &str| -> Result<Option<f32>> {
                        match n
                            .inputs
                            .get(i)
                            .filter(|name| !name.is_empty())
                            .and_then(|name| resolve(name))
                            .and_then(|a| a.data.first().copied())
                        {
                            Some(v) => Ok(Some(v)),
                            None => n.float(key, path),
                        }
                    };
                    match (bound(1, "min")?, bound(2, "max")?) {
                        (Some(lo), Some(hi)) if lo == 0.0 && hi == 6.0 => Activation::Relu6,
                        (lo, hi) => {
                            return Err(err(
                                path,
                                format!("node `{}`: Clip({lo:?}, {hi:?}) is not a ReLU6", n.name),
                            ))
                        }
                    }
                };
                match out.last_mut() {
                    Some(Layer::Conv(c)) if c.act.is_none() => c.act = Some(act),
                    _ => {
                        return Err(err(
                            path,
                            format!("node `{}`: a {} that follows no conv", n.name, n.op),
                        ))
                    }
                }
            }
            "PRelu" => match out.last_mut() {
                Some(Layer::Conv(c)) if c.act.is_none() => {
                    c.act = Some(Activation::PRelu);
                    c.slope = Some(weight(n, 1)?)
                }
                _ => {
                    return Err(err(
                        path,
                        format!("node `{}`: a PRelu that follows no conv", n.name),
                    ))
                }
            },
            "Add" => out.push(Layer::Add(n.name.clone())),
            "Gemm" => {
                let mut w = weight(n, 1)?;
                let trans_b = n.int("transB", path)? == Some(1);
                if n.int("transA", path)?.unwrap_or(0) != 0 {
                    return Err(err(
                        path,
                        format!("node `{}`: a Gemm with transA is not supported", n.name),
                    ));
                }
                if !trans_b {
                    w = transpose(&w, path, &n.name)?;
                }
                out.push(Layer::Linear {
                    node: n.name.clone(),
                    weight: w,
                    bias: if n.inputs.len() > 2 {
                        Some(weight(n, 2)?)
                    } else {
                        None
                    },
                    bn: None,
                });
            }
            "MatMul" => out.push(Layer::Linear {
                node: n.name.clone(),
                weight: transpose(&weight(n, 1)?, path, &n.name)?,
                bias: None,
                bn: None,
            }),
            other => {
                return Err(err(
                    path,
                    format!(
                        "node `{}` has op `{other}`, which a MobileFaceNet does not use",
                        n.name
                    ),
                ))
            }
        }
    }
    Ok((out, norm))
}

fn transpose(a: &Array, path: &Path, node: &str) -> Result<Array> {
    let [r, c] = a.dims[..] else {
        return Err(err(
            path,
            format!(
                "node `{node}`: weight of shape {:?} is not a matrix",
                a.dims
            ),
        ));
    };
    if r.checked_mul(c) != Some(a.data.len()) {
        return Err(err(
            path,
            format!(
                "node `{node}`: weight of shape {:?} holds {} values",
                a.dims,
                a.data.len()
            ),
        ));
    }
    if a.data.is_empty() {
        // A zero dimension: nothing to move, however large the other.
        return Ok(Array {
            dims: vec![c, r],
            data: Vec::new(),
        });
    }
    let mut data = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            data[j * r + i] = a.data[i * c + j];
        }
    }
    Ok(Array {
        dims: vec![c, r],
        data,
    })
}

/// Weights of a model file, named for `config`, with the config as the graph defines it.
/// `matched` counts the layers that agreed with the config before any mismatch.
fn assign(
    layers: Vec<Layer>,
    norm: Option<InputNorm>,
    config: &Config,
    path: &Path,
    matched: &mut usize,
) -> Result<(Config, HashMap<String, Array>)> {
    let mut config = config.clone();
    if let Some(n) = norm {
        config.input_norm = n;
    }
    let plan = config.plan();
    let convs: Vec<&ConvSpec> = plan.convs().collect();
    let residuals = plan.residual_after();
    let mut out: HashMap<String, Array> = HashMap::new();
    let mut it = layers.into_iter().peekable();
    let mismatch = |node: &str, what: String| Error::GraphMismatch {
        path: path.to_path_buf(),
        node: node.to_string(),
        expected: format!("{what} (config `{}`)", config.name),
        found: "something else".into(),
    };
    for (spec, residual) in convs.iter().zip(&residuals) {
        let c = match it.next() {
            Some(Layer::Conv(c)) => c,
            Some(other) => {
                return Err(mismatch(
                    layer_node(&other),
                    format!("conv `{}`", spec.name),
                ))
            }
            None => return Err(mismatch("(end of graph)", format!("conv `{}`", spec.name))),
        };
        let want_w = [
            spec.out_channels,
            spec.in_channels / spec.groups,
            spec.kernel[0],
            spec.kernel[1],
        ];
        let ok = c.weight.dims == want_w
            && c.groups == spec.groups
            && c.kernel == spec.kernel
            && c.stride == [spec.stride; 2]
            && c.pads == [spec.pad[0], spec.pad[1], spec.pad[0], spec.pad[1]]
            && c.act == spec.act;
        if !ok {
            return Err(Error::GraphMismatch {
                path: path.to_path_buf(),
                node: c.node.clone(),
                expected: format!(
                    "`{}`: weight {want_w:?}, groups {}, stride {}, pad {:?}, activation {:?}",
                    spec.name, spec.groups, spec.stride, spec.pad, spec.act
                ),
                found: format!(
                    "weight {:?}, groups {}, stride {:?}, pads {:?}, activation {:?}",
                    c.weight.dims, c.groups, c.stride, c.pads, c.act
                ),
            });
        }
        let cout = spec.out_channels;
        let vector = |v: Vec<f32>| Array {
            dims: vec![cout],
            data: v,
        };
        // Every per-channel operand holds one value per output channel.
        let per_channel = c
            .bias
            .iter()
            .map(|b| ("conv bias", b))
            .chain(c.bn.iter().flat_map(|(g, b, m, v, _)| {
                [
                    ("BatchNorm scale", g),
                    ("BatchNorm bias", b),
                    ("BatchNorm mean", m),
                    ("BatchNorm variance", v),
                ]
            }));
        for (what, a) in per_channel {
            if a.data.len() != cout {
                return Err(Error::GraphMismatch {
                    path: path.to_path_buf(),
                    node: c.node.clone(),
                    expected: format!("`{}`: a {what} of {cout} values", spec.name),
                    found: format!("{} values", a.data.len()),
                });
            }
        }
        let (gamma, beta, mean, var) = match (c.bn, c.bias) {
            (Some((g, b, m, v, eps)), conv_bias) => {
                // A conv bias before BatchNorm shifts the mean it subtracts.
                let m = match conv_bias {
                    Some(cb) => vector(m.data.iter().zip(&cb.data).map(|(m, b)| m - b).collect()),
                    None => m,
                };
                // Rescale the variance so that our eps gives the graph's eps.
                let v = vector(
                    v.data
                        .iter()
                        .map(|v| v + eps - spec.bn_eps as f32)
                        .collect(),
                );
                (g, b, m, v)
            }
            // BatchNorm folded into the conv: an identity BatchNorm whose beta is the bias.
            (None, bias) => (
                vector(vec![1.0; cout]),
                bias.unwrap_or_else(|| vector(vec![0.0; cout])),
                vector(vec![0.0; cout]),
                vector(vec![1.0 - spec.bn_eps as f32; cout]),
            ),
        };
        let w = Array {
            dims: want_w.to_vec(),
            data: c.weight.data,
        };
        out.insert(spec.weight_name(), w);
        for (part, a) in [
            ("gamma", gamma),
            ("beta", beta),
            ("moving_mean", mean),
            ("moving_var", var),
        ] {
            out.insert(format!("{}_{part}", spec.bn_name()), vector(a.data));
        }
        if let Some(s) = c.slope {
            let data = if s.data.len() == 1 {
                vec![s.data[0]; cout]
            } else {
                s.data
            };
            if data.len() != cout {
                return Err(mismatch(&c.node, format!("{cout} PReLU slopes")));
            }
            out.insert(spec.prelu_name(), vector(data));
        }
        *matched += 1;
        if *residual {
            match it.next() {
                Some(Layer::Add(_)) => *matched += 1,
                _ => {
                    return Err(mismatch(
                        &c.node,
                        format!("a residual Add after `{}`", spec.name),
                    ))
                }
            }
        }
    }
    let e = &plan.embedding;
    // Some exporters keep the embedding layer as a 1x1 conv on the 1x1 GDConv output.
    let head = match it.next() {
        Some(Layer::Conv(c))
            if c.kernel == [1, 1]
                && c.groups == 1
                && c.act.is_none()
                && c.weight.dims.len() == 4
                && c.weight.dims[2..] == [1, 1] =>
        {
            let dims = vec![c.weight.dims[0], c.weight.dims[1]];
            Some(Layer::Linear {
                node: c.node,
                weight: Array {
                    dims,
                    data: c.weight.data,
                },
                bias: c.bias,
                bn: c.bn,
            })
        }
        other => other,
    };
    let (node, weight, bias, bn) = match head {
        Some(Layer::Linear {
            node,
            weight,
            bias,
            bn,
        }) => (node, weight, bias, bn),
        other => {
            return Err(mismatch(
                other.as_ref().map_or("(end of graph)", layer_node),
                "the embedding layer (Gemm or MatMul)".into(),
            ))
        }
    };
    if weight.dims != [e.out_features, e.in_features] || bias.is_some() != e.bias {
        return Err(mismatch(
            &node,
            format!(
                "a {}x{} linear layer, bias {}",
                e.out_features, e.in_features, e.bias
            ),
        ));
    }
    let Some((g, b, m, v, eps)) = bn else {
        return Err(mismatch(
            &node,
            "a BatchNormalization after the embedding layer".into(),
        ));
    };
    for (what, a) in bias
        .iter()
        .map(|b| ("bias", b))
        .chain([("BatchNorm scale", &g), ("BatchNorm bias", &b)])
        .chain([("BatchNorm mean", &m), ("BatchNorm variance", &v)])
    {
        if a.data.len() != e.out_features {
            return Err(Error::GraphMismatch {
                path: path.to_path_buf(),
                node: node.clone(),
                expected: format!("the embedding layer: a {what} of {} values", e.out_features),
                found: format!("{} values", a.data.len()),
            });
        }
    }
    // The arrays take the shapes the checkpoint names them with.
    let vector = |a: Array| Array {
        dims: vec![e.out_features],
        data: a.data,
    };
    let (bias, g, b, m, v) = (bias.map(vector), vector(g), vector(b), vector(m), vector(v));
    config.head.bn_eps = eps as f64;
    config.head.fix_gamma = false;
    out.insert(crate::config::EmbeddingSpec::WEIGHT.into(), weight);
    if let Some(b) = bias {
        out.insert(crate::config::EmbeddingSpec::BIAS.into(), b);
    }
    for (part, a) in [
        ("gamma", g),
        ("beta", b),
        ("moving_mean", m),
        ("moving_var", v),
    ] {
        out.insert(format!("{}_{part}", crate::config::EmbeddingSpec::BN), a);
    }
    *matched += 1;
    if let Some(extra) = it.next() {
        return Err(mismatch(layer_node(&extra), "the end of the graph".into()));
    }
    Ok((config, out))
}

/// The name of the node a layer came from.
fn layer_node(layer: &Layer) -> &str {
    match layer {
        Layer::Conv(c) => &c.node,
        Layer::Add(n) | Layer::Linear { node: n, .. } => n,
    }
}

/// Reads an ONNX MobileFaceNet. With `config`, the graph must match it; without, every
/// preset is tried in turn (the first that matches wins) and, when none does, the error is
/// that of the preset that matched the most layers before its first differing node.
/// `input_norm` overrides the normalisation; otherwise the graph's own (a leading Sub/Mul)
/// is used, and failing that the config's.
///
/// The file must be a regular file of at most [`super::MAX_FILE_BYTES`]; the config that
/// comes out passes [`Config::validate`] and the weights are checked against it (present,
/// shaped, finite).
pub fn load(
    path: &Path,
    config: Option<&Config>,
    input_norm: Option<InputNorm>,
    device: &Device,
) -> Result<(Config, HashMap<String, Tensor>)> {
    let bytes = super::read_regular_file(path, super::MAX_FILE_BYTES)?;
    load_bytes(&bytes, path, config, input_norm, device)
}

/// [`load`] on a model's bytes; `path` names it in errors and locates external data.
pub fn load_bytes(
    bytes: &[u8],
    path: &Path,
    config: Option<&Config>,
    input_norm: Option<InputNorm>,
    device: &Device,
) -> Result<(Config, HashMap<String, Tensor>)> {
    if let Some(c) = config {
        c.validate().map_err(|e| e.in_file(path))?;
    }
    let g = parse_model(bytes, path)?;
    let (_, norm) = layers(&g, path)?;
    let norm = input_norm.or(norm);
    let candidates: Vec<Config> = match config {
        Some(c) => vec![c.clone()],
        None => Config::PRESETS
            .iter()
            .filter_map(|n| Config::preset(n))
            .collect(),
    };
    let mut best_err: Option<(usize, Error)> = None;
    for c in &candidates {
        // Matching consumes the layers, so each candidate walks the graph afresh.
        let (found, _) = layers(&g, path)?;
        let mut matched = 0;
        match assign(found, norm.clone(), c, path, &mut matched) {
            Ok((config, arrays)) => {
                let tensors = arrays
                    .into_iter()
                    .map(|(k, a)| {
                        let t = Tensor::from_vec(a.data, a.dims, device)
                            .map_err(|e| err(path, format!("weight `{k}`: {e}")))?;
                        Ok((k, t))
                    })
                    .collect::<Result<HashMap<_, _>>>()?;
                crate::checkpoint::check_weights(&config, &tensors, path)?;
                return Ok((config, tensors));
            }
            Err(e) => {
                if best_err.as_ref().is_none_or(|(m, _)| matched > *m) {
                    best_err = Some((matched, e));
                }
            }
        }
    }
    Err(best_err.map_or_else(|| err(path, "no config to match"), |(_, e)| e))
}

/// Parses the graph of an ONNX model in memory and reports what does not fit a
/// MobileFaceNet: for fuzzing and for validating files without loading weights.
pub fn check(bytes: &[u8], path: &Path) -> Result<usize> {
    let g = parse_model(bytes, path)?;
    Ok(layers(&g, path)?.0.len())
}
