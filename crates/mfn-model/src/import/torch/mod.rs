//! PyTorch `state_dict` files (`.pt`, `.pth`), read without Python.
//!
//! Both layouts `torch.save` has used are read: the zip archive of PyTorch >= 1.6 (a
//! `<archive>/data.pkl` pickle, each storage a member `<archive>/data/<key>`), and the
//! older single-stream layout (a magic-number pickle, a protocol pickle, a system-info
//! pickle, the `state_dict` pickle, a pickle listing the storage keys, then each storage
//! as a little-endian element count and raw data).
//!
//! Everything goes through this module's own readers, built for files from anywhere:
//! `pickle` interprets only the opcodes and globals a state dict uses and runs nothing,
//! within memory proportional to the pickle; `zip` reads stored members and checks
//! their CRC-32. Every tensor's view is checked against its storage, every storage against
//! the bytes that hold it, and the tensors kept may take at most [`MAX_EXPANSION`] times
//! their storages' bytes (counted as no more than the file's size, plus
//! [`EXPANSION_SLACK`]) as `f32`, so that views repeating or broadcasting one storage, or
//! zip members overlapping, cannot make the reader allocate more than the file describes.

mod pickle;
mod zip;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{Device, Tensor};

use self::pickle::{shown, Dtype, Fault, Obj, Parsed, Storage, View};
use crate::config::{Config, EmbeddingSpec, Plan, Pooling};
use crate::{Error, Result};

/// The pickled magic number that opens the legacy layout: protocol 2, a 10-byte LONG1
/// holding 0x1950a86a20f9469cfc6c, STOP.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// The legacy layout's protocol version, its second pickle.
const LEGACY_PROTOCOL: i64 = 1001;

/// The tensors kept, as `f32`, may take at most this many times the bytes of the storages
/// they view: a full view of a half-precision storage takes twice its bytes, and a real
/// state dict (each storage viewed once) at most that.
pub const MAX_EXPANSION: usize = 4;
/// Bytes of `f32` tensors any checkpoint may have, whatever its storages.
pub const EXPANSION_SLACK: usize = 1 << 20;

fn torch_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Torch {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A pickle's refusal, placed in the file: `place` names the pickle or zip member.
fn fault(path: &Path, place: &str, f: Fault) -> Error {
    torch_err(
        path,
        format!("{place}, at byte offset {}: {}", f.at, f.message),
    )
}

/// Reads every floating-point tensor of a `state_dict` (as `f32`) by name. Integer
/// buffers such as BatchNorm's `num_batches_tracked` are checked, then left out.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = super::read_regular_file(path, super::MAX_FILE_BYTES)?;
    read_state_dict_bytes(&bytes, path, device)
}

/// [`read_state_dict`] on the bytes of a file; `path` names it in errors.
pub fn read_state_dict_bytes(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let (parsed, storages, layout) = if bytes.starts_with(b"PK\x03\x04") {
        read_zip(bytes, path)?
    } else if bytes.starts_with(&LEGACY_MAGIC) {
        read_legacy(bytes, path)?
    } else {
        return Err(torch_err(
            path,
            "not a PyTorch checkpoint: neither a zip archive nor the legacy pickle layout",
        ));
    };
    let out = tensors(&parsed, &storages, &layout, bytes.len(), path, device)?;
    if out.is_empty() {
        return Err(torch_err(
            path,
            "the checkpoint holds no floating-point tensors",
        ));
    }
    Ok(out)
}

/// Where a layout keeps its storages, for messages about a missing one.
enum Layout {
    Legacy,
    /// The archive's folder, with its trailing `/`.
    Zip(String),
}

impl Layout {
    fn pickle(&self) -> String {
        match self {
            Self::Legacy => "the state_dict pickle".into(),
            Self::Zip(prefix) => format!("zip member `{prefix}data.pkl`"),
        }
    }

    fn missing(&self, s: &Storage) -> String {
        match self {
            Self::Legacy => format!(
                "storage `{}` is missing: the storage key list does not name it",
                shown(&s.key)
            ),
            Self::Zip(prefix) => format!(
                "storage `{}` is missing: there is no zip member `{prefix}data/{}`",
                shown(&s.key),
                shown(&s.key)
            ),
        }
    }
}

/// The state-dict pickle, the bytes of each of its storages (by index; `None` where the
/// file has none), and the layout.
type Read<'a> = (Parsed, Vec<Option<&'a [u8]>>, Layout);

fn read_legacy<'a>(bytes: &'a [u8], path: &Path) -> Result<Read<'a>> {
    let pos = LEGACY_MAGIC.len();
    let place = "the protocol version pickle";
    let proto = pickle::unpickle(bytes, pos).map_err(|f| fault(path, place, f))?;
    match proto.objs.get(proto.root) {
        Some(Obj::Int(LEGACY_PROTOCOL)) => {}
        _ => {
            return Err(torch_err(
                path,
                format!(
                    "{place}, at byte offset {pos}: the protocol version is {}, expected \
                     {LEGACY_PROTOCOL}",
                    proto.kind(proto.root)
                ),
            ))
        }
    }
    let pos = proto.end;
    let place = "the system info pickle";
    let info = pickle::unpickle(bytes, pos).map_err(|f| fault(path, place, f))?;
    let Some(items) = info.dict(info.root) else {
        return Err(torch_err(
            path,
            format!(
                "{place}, at byte offset {pos}: {}, not a dict",
                info.kind(info.root)
            ),
        ));
    };
    for &(k, v) in items {
        if info.str(k) == Some("little_endian")
            && matches!(info.objs.get(v), Some(Obj::Bool(false)))
        {
            return Err(torch_err(
                path,
                format!("{place}, at byte offset {pos}: the checkpoint was saved big-endian"),
            ));
        }
    }
    let pos = info.end;
    let place = format!("the state_dict pickle (from byte offset {pos})");
    let sd = pickle::unpickle(bytes, pos).map_err(|f| fault(path, &place, f))?;
    let pos = sd.end;
    let place = format!("the storage key list pickle (from byte offset {pos})");
    let keys = pickle::unpickle(bytes, pos).map_err(|f| fault(path, &place, f))?;
    let Some(Obj::List(list)) = keys.objs.get(keys.root) else {
        return Err(torch_err(
            path,
            format!("{place}: {}, not a list", keys.kind(keys.root)),
        ));
    };

    // Storages follow the pickles back to back, in the order of the key list.
    let index: HashMap<&str, usize> = sd
        .storages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key.as_str(), i))
        .collect();
    let mut located: Vec<Option<&[u8]>> = vec![None; sd.storages.len()];
    let mut pos = keys.end;
    for &k in list {
        let key = keys.str(k).ok_or_else(|| {
            torch_err(
                path,
                format!("{place}: it lists {}, not a storage key", keys.kind(k)),
            )
        })?;
        let Some(&i) = index.get(key) else {
            return Err(torch_err(
                path,
                format!(
                    "{place}: it lists storage `{}`, which no tensor of the state_dict \
                     pickle names",
                    shown(key)
                ),
            ));
        };
        if located[i].is_some() {
            return Err(torch_err(
                path,
                format!("{place}: it lists storage `{}` twice", shown(key)),
            ));
        }
        let s = &sd.storages[i];
        let head = bytes.get(pos..pos.saturating_add(8)).ok_or_else(|| {
            torch_err(
                path,
                format!(
                    "truncated: storage `{}` needs its 8-byte element count at byte offset \
                     {pos}, the file has {} bytes",
                    shown(key),
                    bytes.len()
                ),
            )
        })?;
        let mut count = [0u8; 8];
        count.copy_from_slice(head);
        let count = u64::from_le_bytes(count);
        if count != s.numel as u64 {
            return Err(torch_err(
                path,
                format!(
                    "storage `{}` at byte offset {pos} holds {count} elements; the state_dict \
                     pickle declares {}",
                    shown(key),
                    s.numel
                ),
            ));
        }
        // The pickle checked that this product fits.
        let len = s.numel.saturating_mul(s.dtype.size());
        let start = pos + 8;
        let data = bytes.get(start..start.saturating_add(len)).ok_or_else(|| {
            torch_err(
                path,
                format!(
                    "truncated: storage `{}` needs {len} bytes at byte offset {start}, the \
                     file has {}",
                    shown(key),
                    bytes.len()
                ),
            )
        })?;
        located[i] = Some(data);
        pos = start + len;
    }
    Ok((sd, located, Layout::Legacy))
}

fn read_zip<'a>(bytes: &'a [u8], path: &Path) -> Result<Read<'a>> {
    let archive =
        zip::Archive::open(bytes).map_err(|m| torch_err(path, format!("zip archive: {m}")))?;
    // `<archive>/data.pkl`, the archive folder being the only one in its name.
    let pkl = archive.names().iter().copied().find(|n| {
        n.strip_suffix("data.pkl")
            .is_some_and(|p| p.find('/').is_some_and(|i| i + 1 == p.len()))
    });
    let Some(pkl) = pkl else {
        let names: Vec<String> = archive.names().iter().take(5).map(|n| shown(n)).collect();
        return Err(torch_err(
            path,
            format!(
                "a zip archive without an `<archive>/data.pkl` member, so not a PyTorch \
                 checkpoint (its first members: {names:?})"
            ),
        ));
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let member = |name: &str| archive.read(name).map_err(|m| torch_err(path, m));
    if let Some(order) = member(&format!("{prefix}byteorder"))? {
        if order != b"little" {
            return Err(torch_err(
                path,
                format!(
                    "zip member `{prefix}byteorder` says `{}`; only little-endian checkpoints \
                     are read",
                    shown(&String::from_utf8_lossy(order))
                ),
            ));
        }
    }
    let data = member(pkl)?.unwrap_or_default();
    let layout = Layout::Zip(prefix.to_string());
    let parsed = pickle::unpickle(data, 0).map_err(|f| fault(path, &layout.pickle(), f))?;
    let mut located = Vec::with_capacity(parsed.storages.len());
    for s in &parsed.storages {
        let name = format!("{prefix}data/{}", s.key);
        let expected = s.numel.saturating_mul(s.dtype.size()) as u64;
        match archive.size(&name) {
            None => located.push(None),
            Some(size) if size != expected => {
                return Err(torch_err(
                    path,
                    format!(
                        "zip member `{}` holds {size} bytes; storage `{}` declares {} \
                         {} elements, {expected} bytes",
                        shown(&name),
                        shown(&s.key),
                        s.numel,
                        s.dtype.name()
                    ),
                ))
            }
            Some(_) => located.push(member(&name)?),
        }
    }
    Ok((parsed, located, layout))
}

/// The floating-point tensors of a state dict, as `f32` on `device`.
fn tensors(
    parsed: &Parsed,
    storages: &[Option<&[u8]>],
    layout: &Layout,
    file_len: usize,
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let place = layout.pickle();
    let root = parsed.dict(parsed.root).ok_or_else(|| {
        torch_err(
            path,
            format!(
                "the checkpoint is not a state_dict (a dict of tensors): {place} holds {}",
                parsed.kind(parsed.root)
            ),
        )
    })?;
    // A training checkpoint may nest the weights under "state_dict".
    let entries = match root
        .iter()
        .rev()
        .find(|(k, _)| parsed.str(*k) == Some("state_dict"))
    {
        Some(&(_, v)) => parsed.dict(v).ok_or_else(|| {
            torch_err(
                path,
                format!(
                    "{place}: the `state_dict` entry is {}, not a dict",
                    parsed.kind(v)
                ),
            )
        })?,
        None => root,
    };
    // Tensors by name, the last of equal names winning as in Python; each name is copied
    // once however often the pickle repeats it.
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, &(k, v)) in entries.iter().enumerate() {
        if let Some(Obj::Tensor(_)) = parsed.objs.get(v) {
            let name = parsed.str(k).ok_or_else(|| {
                torch_err(
                    path,
                    format!(
                        "{place}: a tensor's key is {}, not a string",
                        parsed.kind(k)
                    ),
                )
            })?;
            last.insert(name, i);
        }
    }
    let mut kept: Vec<(&str, usize)> = Vec::new();
    for (i, &(k, v)) in entries.iter().enumerate() {
        let (Some(name), Some(&Obj::Tensor(t))) = (parsed.str(k), parsed.objs.get(v)) else {
            continue;
        };
        let Some(view) = parsed.views.get(t) else {
            continue;
        };
        let Some(storage) = parsed.storages.get(view.storage) else {
            continue;
        };
        if last.get(name) == Some(&i) && storage.dtype.is_float() {
            kept.push((name, t));
        }
    }

    // The budget: f32 bytes of the distinct views kept against their storages' bytes.
    let mut views = HashSet::new();
    let mut used = HashSet::new();
    let mut wanted = 0usize;
    for &(_, t) in &kept {
        let view = &parsed.views[t];
        if views.insert(t) {
            wanted = wanted.saturating_add(view.numel.saturating_mul(4));
        }
        used.insert(view.storage);
    }
    let mut stored = 0usize;
    for &s in &used {
        let storage = &parsed.storages[s];
        if storages.get(s).copied().flatten().is_none() {
            return Err(torch_err(path, layout.missing(storage)));
        }
        stored = stored.saturating_add(storage.numel.saturating_mul(storage.dtype.size()));
    }
    // Zip members may overlap (several central directory entries over the same bytes):
    // the storages are never counted as more than the file.
    let stored = stored.min(file_len);
    let budget = stored
        .saturating_mul(MAX_EXPANSION)
        .saturating_add(EXPANSION_SLACK);
    if wanted > budget {
        return Err(torch_err(
            path,
            format!(
                "the floating-point tensors ({} of them) would take {wanted} bytes as f32, \
                 more than {MAX_EXPANSION} times the {stored} bytes of the storages they view \
                 (plus {EXPANSION_SLACK}): views that repeat or broadcast one storage (stride \
                 0, many entries over the same data) are refused",
                kept.len()
            ),
        ));
    }

    let mut built: HashMap<usize, Tensor> = HashMap::new();
    let mut out = HashMap::new();
    for (name, t) in kept {
        let tensor = match built.get(&t) {
            Some(tensor) => tensor.clone(),
            None => {
                let view = &parsed.views[t];
                let storage = &parsed.storages[view.storage];
                let raw = storages.get(view.storage).copied().flatten().unwrap_or(&[]);
                let values = gather(view, storage.dtype, raw).ok_or_else(|| {
                    torch_err(
                        path,
                        format!(
                            "tensor `{}` lies outside storage `{}`",
                            shown(name),
                            shown(&storage.key)
                        ),
                    )
                })?;
                let tensor = Tensor::from_vec(values, view.shape.clone(), &Device::Cpu)?
                    .to_device(device)?;
                built.insert(t, tensor.clone());
                tensor
            }
        };
        let name = name.strip_prefix("module.").unwrap_or(name);
        out.insert(name.to_string(), tensor);
    }
    Ok(out)
}

/// The elements of a view as `f32`, in row-major order; `None` if one lies outside `raw`
/// (which the checks before make impossible).
fn gather(view: &View, dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    let size = dtype.size();
    let read: fn(&[u8]) -> f32 = match dtype {
        Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::F64 => {
            |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }
        Dtype::F16 => |b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        Dtype::BF16 => |b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        _ => return None,
    };
    let n = view.numel;
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return Some(out);
    }
    // Row-major strides (dimensions of size 1 aside): one slice.
    let mut expected = 1usize;
    let mut contiguous = true;
    for (&d, &s) in view.shape.iter().zip(&view.stride).rev() {
        if d != 1 && s != expected {
            contiguous = false;
            break;
        }
        expected = expected.saturating_mul(d);
    }
    if contiguous {
        let start = view.offset.checked_mul(size)?;
        let bytes = raw.get(start..start.checked_add(n.checked_mul(size)?)?)?;
        out.extend(bytes.chunks_exact(size).map(read));
        return Some(out);
    }
    // A view (a transposed weight, a broadcast): walk its indices like an odometer.
    let rank = view.shape.len();
    let mut index = vec![0usize; rank];
    let mut at = view.offset;
    for _ in 0..n {
        let start = at.checked_mul(size)?;
        out.push(read(raw.get(start..start.checked_add(size)?)?));
        for d in (0..rank).rev() {
            index[d] += 1;
            at = at.wrapping_add(view.stride[d]);
            if index[d] < view.shape[d] {
                break;
            }
            at = at.wrapping_sub(view.stride[d].wrapping_mul(view.shape[d]));
            index[d] = 0;
        }
    }
    Some(out)
}

/// IEEE half precision to single, exactly.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if frac == 0 => sign,
        // Subnormal: frac * 2^-24.
        0 => {
            let v = frac as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// The PyTorch MobileFaceNet layouts whose parameter names map onto this crate's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchLayout {
    /// foamliu/MobileFaceNet: `conv1`, `dw_conv`, `features.N.conv`, `conv2`, `gdconv`,
    /// `conv3`, `bn` ([`Config::foamliu`]).
    Foamliu,
    /// insightface arcface_torch's `get_mbf` / `get_mbf_large`: `layers.K...`,
    /// `conv_sep`, `features` ([`Config::mbf`], [`Config::mbf_large`]).
    ArcfaceTorch,
}

impl TorchLayout {
    /// Recognises a layout by its parameter names.
    pub fn detect(names: &HashMap<String, Tensor>) -> Option<Self> {
        if names.contains_key("dw_conv.pointwise.weight") && names.contains_key("conv3.weight") {
            Some(Self::Foamliu)
        } else if names.contains_key("layers.0.layers.0.weight")
            && names.contains_key("features.layers.2.weight")
        {
            Some(Self::ArcfaceTorch)
        } else {
            None
        }
    }

    /// The configs this layout can hold, most common first.
    fn candidates(self) -> Vec<Config> {
        match self {
            Self::Foamliu => vec![Config::foamliu()],
            Self::ArcfaceTorch => vec![Config::mbf(), Config::mbf_large()],
        }
    }
}

/// Where each conv unit of a plan lives in a PyTorch layout: conv weight, BatchNorm
/// prefix and, for PReLU units, the slope.
struct TorchUnit {
    weight: String,
    bn: String,
    prelu: Option<String>,
}

/// The torch names of every conv of `plan`, in [`Plan::convs`] order, and of the
/// embedding layer (weight, bias, BatchNorm prefix).
fn torch_names(layout: TorchLayout, plan: &Plan) -> (Vec<TorchUnit>, [String; 3]) {
    let unit = |weight: String, bn: String, prelu: Option<String>| TorchUnit { weight, bn, prelu };
    let mut units = Vec::new();
    match layout {
        TorchLayout::Foamliu => {
            let seq = |p: &str| unit(format!("{p}.0.weight"), format!("{p}.1"), None);
            units.push(seq("conv1"));
            units.push(unit(
                "dw_conv.depthwise.weight".into(),
                "dw_conv.bn1".into(),
                None,
            ));
            units.push(unit(
                "dw_conv.pointwise.weight".into(),
                "dw_conv.bn2".into(),
                None,
            ));
            for i in 0..plan.blocks.len() {
                units.push(seq(&format!("features.{i}.conv.0")));
                units.push(seq(&format!("features.{i}.conv.1")));
                units.push(unit(
                    format!("features.{i}.conv.2.weight"),
                    format!("features.{i}.conv.3"),
                    None,
                ));
            }
            units.push(seq("conv2"));
            units.push(unit(
                "gdconv.depthwise.weight".into(),
                "gdconv.bn".into(),
                None,
            ));
            (
                units,
                ["conv3.weight".into(), "conv3.bias".into(), "bn".into()],
            )
        }
        TorchLayout::ArcfaceTorch => {
            // ConvBlock / LinearBlock: `{p}.layers.{0: conv, 1: bn, 2: prelu}`.
            let block = |p: String, prelu: bool| {
                unit(
                    format!("{p}.layers.0.weight"),
                    format!("{p}.layers.1"),
                    prelu.then(|| format!("{p}.layers.2.weight")),
                )
            };
            units.push(block("layers.0".into(), true));
            let mut k = 1;
            if plan.stem_dw.is_some() {
                units.push(block("layers.1".into(), true));
                k = 2;
            }
            // A strided (or widening) block is a `DepthWise` module of its own; runs of
            // residual blocks share one `Residual` module, `layers.K.layers.J`.
            let mut in_residual: Option<(usize, usize)> = None;
            for b in &plan.blocks {
                let prefix = if b.residual {
                    let (module, j) = match in_residual {
                        Some((m, j)) => (m, j + 1),
                        None => {
                            k += 1;
                            (k - 1, 0)
                        }
                    };
                    in_residual = Some((module, j));
                    format!("layers.{module}.layers.{j}")
                } else {
                    in_residual = None;
                    k += 1;
                    format!("layers.{}", k - 1)
                };
                units.push(block(format!("{prefix}.layers.0"), true));
                units.push(block(format!("{prefix}.layers.1"), true));
                units.push(block(format!("{prefix}.layers.2"), false));
            }
            units.push(block("conv_sep".into(), true));
            units.push(block("features.layers.0".into(), false));
            (
                units,
                [
                    "features.layers.2.weight".into(),
                    "features.layers.2.bias".into(),
                    "features.layers.3".into(),
                ],
            )
        }
    }
}

/// Both layouts end in a GDConv; a config with another head has no names in them.
fn check_head(config: &Config, path: &Path) -> Result<()> {
    match config.head.pool {
        Pooling::GdConv => Ok(()),
        Pooling::ConvReduce { .. } => Err(torch_err(
            path,
            format!(
                "config `{}` pools with a 1x1 reduce conv, which no supported PyTorch layout \
                 holds (they end in a GDConv); use its ONNX export or the native format",
                config.name
            ),
        )),
    }
}

/// Renames a layout's tensors to `config`'s checkpoint names, checking every shape.
fn rename(
    layout: TorchLayout,
    config: &Config,
    sd: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    check_head(config, path)?;
    let plan = config.plan();
    let (units, [fc_w, fc_b, fc_bn]) = torch_names(layout, &plan);
    let get = |name: &str| {
        sd.get(name).cloned().ok_or_else(|| Error::MissingWeight {
            path: path.to_path_buf(),
            name: name.to_string(),
        })
    };
    let mut out = HashMap::new();
    let bn = |out: &mut HashMap<String, Tensor>, torch: &str, ours: &str| -> Result<()> {
        for (t, o) in [
            ("weight", "gamma"),
            ("bias", "beta"),
            ("running_mean", "moving_mean"),
            ("running_var", "moving_var"),
        ] {
            out.insert(format!("{ours}_{o}"), get(&format!("{torch}.{t}"))?);
        }
        Ok(())
    };
    for (spec, u) in plan.convs().zip(&units) {
        out.insert(spec.weight_name(), get(&u.weight)?);
        bn(&mut out, &u.bn, &spec.bn_name())?;
        match (&u.prelu, spec.has_prelu()) {
            (Some(p), true) => {
                out.insert(spec.prelu_name(), get(p)?);
            }
            (None, false) => {}
            _ => {
                return Err(torch_err(
                    path,
                    format!("layout and config `{}` disagree on PReLU", config.name),
                ))
            }
        }
    }
    let e = &plan.embedding;
    // foamliu's embedding layer is a 1x1 conv on the 1x1 GDConv output: a linear layer.
    let w = get(&fc_w)?;
    let w = if w.rank() == 4 { w.flatten_from(1)? } else { w };
    out.insert(EmbeddingSpec::WEIGHT.into(), w);
    if e.bias {
        out.insert(EmbeddingSpec::BIAS.into(), get(&fc_b)?);
    }
    bn(&mut out, &fc_bn, EmbeddingSpec::BN)?;
    crate::checkpoint::check_weights(config, &out, path)?;
    Ok(out)
}

/// Reads a PyTorch MobileFaceNet checkpoint in one of the [`TorchLayout`]s, renamed to this
/// crate's names. With `config` the weights must fit it; without, the layout's presets are
/// tried, with the embedding size taken from the checkpoint.
pub fn load(
    path: &Path,
    config: Option<&Config>,
    device: &Device,
) -> Result<(Config, HashMap<String, Tensor>)> {
    from_state_dict(read_state_dict(path, device)?, config, path)
}

/// [`load`] on a state dict already in memory; `path` names it in errors.
pub fn from_state_dict(
    sd: HashMap<String, Tensor>,
    config: Option<&Config>,
    path: &Path,
) -> Result<(Config, HashMap<String, Tensor>)> {
    let layout = TorchLayout::detect(&sd).ok_or_else(|| {
        torch_err(
            path,
            "unknown layout: expected foamliu/MobileFaceNet (`dw_conv.*`, `features.N.conv.*`) \
             or insightface arcface_torch mbf (`layers.K.*`, `conv_sep.*`, `features.layers.*`)",
        )
    })?;
    let candidates = match config {
        Some(c) => vec![c.clone()],
        None => layout.candidates(),
    };
    let mut first_err = None;
    for mut c in candidates {
        if config.is_none() {
            if let Some(w) = sd.get(&torch_names(layout, &c.plan()).1[0]) {
                c.embedding_size = w.dim(0)?;
            }
        }
        match rename(layout, &c, &sd, path) {
            Ok(t) => return Ok((c, t)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| torch_err(path, "no config to match")))
}

/// The inverse of the import: this crate's weights for `config` under a PyTorch layout's
/// names, for handing a model back to PyTorch code. foamliu's embedding weight becomes
/// its `[out, in, 1, 1]` conv again. Both layouts end in a GDConv, so a config with
/// [`Pooling::ConvReduce`] is an error.
pub fn to_layout(
    layout: TorchLayout,
    config: &Config,
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let path = Path::new("(weights in memory)");
    check_head(config, path)?;
    crate::checkpoint::check_weights(config, tensors, path)?;
    let plan = config.plan();
    let (units, [fc_w, fc_b, fc_bn]) = torch_names(layout, &plan);
    let mut out = HashMap::new();
    let bn = |out: &mut HashMap<String, Tensor>, torch: &str, ours: &str| {
        for (t, o) in [
            ("weight", "gamma"),
            ("bias", "beta"),
            ("running_mean", "moving_mean"),
            ("running_var", "moving_var"),
        ] {
            if let Some(v) = tensors.get(&format!("{ours}_{o}")) {
                out.insert(format!("{torch}.{t}"), v.clone());
            }
        }
    };
    for (spec, u) in plan.convs().zip(&units) {
        out.insert(u.weight.clone(), tensors[&spec.weight_name()].clone());
        bn(&mut out, &u.bn, &spec.bn_name());
        if let (Some(p), Some(v)) = (&u.prelu, tensors.get(&spec.prelu_name())) {
            out.insert(p.clone(), v.clone());
        }
    }
    let w = tensors[EmbeddingSpec::WEIGHT].clone();
    let w = match layout {
        TorchLayout::Foamliu => w.unsqueeze(2)?.unsqueeze(3)?,
        TorchLayout::ArcfaceTorch => w,
    };
    out.insert(fc_w, w);
    if let Some(b) = tensors.get(EmbeddingSpec::BIAS) {
        out.insert(fc_b, b.clone());
    }
    bn(&mut out, &fc_bn, EmbeddingSpec::BN);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_decodes_exactly() {
        for (h, f) in [
            (0x0000u16, 0.0f32),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8),
            (0x0400, 6.103_515_6e-5),
            (0x3555, 0.333_251_95),
        ] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    }

    /// `torch.save({"test": torch.arange(1, 9).reshape(2, 4)}, "test.pt")` by PyTorch 2.x,
    /// as candle's tests keep it: members with data descriptors and padding in their local
    /// headers, ZIP64 end records.
    const TORCH_ZIP: &[&str] = &[
        "504b0304000008080000000000000000000000000000000000000d001500746573742f646174612e706b6c46",
        "4211005a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a800263636f6c6c656374696f6e730a4f7264657265644469",
        "63740a710029527101580400000074657374710263746f7263682e5f7574696c730a5f72656275696c645f74",
        "656e736f725f76320a71032828580700000073746f72616765710463746f7263680a4c6f6e6753746f726167",
        "650a71055801000000307106580300000063707571074b08747108514b004b024b048671094b044b0186710a",
        "8968002952710b74710c52710d732e504b07083e6a9759ab000000ab000000504b0304000008080000000000",
        "000000000000000000000000000e001900746573742f627974656f72646572464215005a5a5a5a5a5a5a5a5a",
        "5a5a5a5a5a5a5a5a5a5a5a5a6c6974746c65504b0708853de3190600000006000000504b0304000008080000",
        "000000000000000000000000000000000b004100746573742f646174612f3046423d005a5a5a5a5a5a5a5a5a",
        "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
        "5a5a5a5a5a5a5a5a010000000000000002000000000000000300000000000000040000000000000005000000",
        "00000000060000000000000007000000000000000800000000000000504b0708a6b1b0494000000040000000",
        "504b0304000008080000000000000000000000000000000000000c000600746573742f76657273696f6e4642",
        "02005a5a330a504b0708d19e67550200000002000000504b0304000008080000000000000000000000000000",
        "000000001b003500746573742f2e646174612f73657269616c697a6174696f6e5f6964464231005a5a5a5a5a",
        "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
        "31313436343432373233383439333535303431353030303031303932373032323034353532313731504b0708",
        "b2d616d22800000028000000504b01020000000008080000000000003e6a9759ab000000ab0000000d000000",
        "0000000000000000000000000000746573742f646174612e706b6c504b010200000000080800000000000085",
        "3de31906000000060000000e00000000000000000000000000fb000000746573742f627974656f7264657250",
        "4b0102000000000808000000000000a6b1b04940000000400000000b00000000000000000000000000560100",
        "00746573742f646174612f30504b0102000000000808000000000000d19e675502000000020000000c000000",
        "0000000000000000000010020000746573742f76657273696f6e504b0102000000000808000000000000b2d6",
        "16d228000000280000001b0000000000000000000000000052020000746573742f2e646174612f7365726961",
        "6c697a6174696f6e5f6964504b06062c000000000000001e032d000000000000000000050000000000000005",
        "000000000000003301000000000000f802000000000000504b0607000000002b040000000000000100000050",
        "4b0506000000000500050033010000f80200000000",
    ];

    #[test]
    fn an_archive_written_by_torch_save_is_read() {
        let hex: String = TORCH_ZIP.concat();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(bytes.len(), 1165);
        let path = Path::new("test.pt");
        let (parsed, located, layout) = read_zip(&bytes, path).unwrap();
        assert!(matches!(&layout, Layout::Zip(p) if p == "test/"));
        assert_eq!(parsed.storages.len(), 1);
        assert_eq!(parsed.storages[0].key, "0");
        assert_eq!(parsed.storages[0].dtype, Dtype::I64);
        assert_eq!(parsed.storages[0].numel, 8);
        let view = &parsed.views[0];
        assert_eq!(
            (view.offset, &view.shape[..], &view.stride[..]),
            (0, &[2, 4][..], &[4, 1][..])
        );
        let data = located[0].unwrap();
        let values: Vec<i64> = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Integer tensors are left out, which leaves nothing.
        let err = read_state_dict_bytes(&bytes, path, &Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("no floating-point tensors"),
            "{err}"
        );
        // One flipped bit in the stored data breaks its CRC-32.
        let mut bad = bytes.clone();
        let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
        bad[start + 3] ^= 1;
        let err = read_zip(&bad, path).err().unwrap().to_string();
        assert!(
            err.contains("CRC-32") && err.contains("test/data/0"),
            "{err}"
        );
    }
}
