//! PyTorch `state_dict` files (`.pt`, `.pth`), read without Python.
//!
//! Both layouts `torch.save` has used are read: the zip archive of PyTorch >= 1.6, through
//! candle's pickle reader, and the older single-stream layout (a magic-number pickle, a
//! protocol pickle, a system-info pickle, the `state_dict` pickle, a pickle listing the
//! storage keys, then each storage as a little-endian element count and raw data). Only
//! the pickle opcodes needed for tensors are interpreted; nothing is executed.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::config::{Config, EmbeddingSpec, Plan, Pooling};
use crate::{Error, Result};

/// The pickled magic number that opens the legacy layout: protocol 2, a 10-byte LONG1
/// holding 0x1950a86a20f9469cfc6c, STOP.
const LEGACY_MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

fn torch_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Torch {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads every floating-point tensor of a `state_dict` (as `f32`) by name. Integer
/// buffers such as BatchNorm's `num_batches_tracked` are left out.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let tensors = if bytes.starts_with(b"PK\x03\x04") {
        candle_core::pickle::read_all(path)
            .map_err(|e| torch_err(path, format!("cannot read the zip checkpoint: {e}")))?
    } else if bytes.starts_with(&LEGACY_MAGIC) {
        read_legacy(&bytes, path)?
    } else {
        return Err(torch_err(
            path,
            "not a PyTorch checkpoint: neither a zip archive nor the legacy pickle layout",
        ));
    };
    let mut out = HashMap::new();
    for (name, t) in tensors {
        if matches!(
            t.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        ) {
            let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
            out.insert(name, t.to_dtype(DType::F32)?.to_device(device)?);
        }
    }
    if out.is_empty() {
        return Err(torch_err(
            path,
            "the checkpoint holds no floating-point tensors",
        ));
    }
    Ok(out)
}

fn read_pickle(cur: &mut Cursor<&[u8]>, path: &Path, what: &str) -> Result<Object> {
    let at = cur.position();
    let mut stack = Stack::empty();
    stack
        .read_loop(cur)
        .and_then(|_| stack.finalize())
        .map_err(|e| torch_err(path, format!("{what} pickle at byte offset {at}: {e}")))
}

fn read_legacy(bytes: &[u8], path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut cur = Cursor::new(bytes);
    cur.set_position(LEGACY_MAGIC.len() as u64);
    read_pickle(&mut cur, path, "protocol version")?;
    read_pickle(&mut cur, path, "system info")?;
    let root = read_pickle(&mut cur, path, "state_dict")?;
    let keys = read_pickle(&mut cur, path, "storage keys")?;

    let entries = match root {
        Object::Dict(entries) => entries,
        _ => {
            return Err(torch_err(
                path,
                "the checkpoint is not a state_dict (a dict of tensors)",
            ))
        }
    };
    // A training checkpoint may nest the weights under "state_dict".
    let entries = match entries
        .iter()
        .position(|(k, _)| *k == Object::Unicode("state_dict".into()))
    {
        Some(i) => match entries.into_iter().nth(i).map(|(_, v)| v) {
            Some(Object::Dict(inner)) => inner,
            _ => return Err(torch_err(path, "`state_dict` entry is not a dict")),
        },
        None => entries,
    };
    let infos: Vec<_> = entries
        .into_iter()
        .filter_map(|(name, value)| value.into_tensor_info(name, Path::new("")).transpose())
        .collect::<candle_core::Result<_>>()
        .map_err(|e| torch_err(path, format!("bad tensor entry: {e}")))?;
    let keys: Vec<String> = match keys {
        Object::List(items) => items
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|_| torch_err(path, "storage key is not a string"))
            })
            .collect::<Result<_>>()?,
        _ => return Err(torch_err(path, "storage key list is not a list")),
    };
    let key_of = |info_path: &str| info_path.trim_start_matches('/').to_string();
    let dtype_of: HashMap<String, DType> =
        infos.iter().map(|i| (key_of(&i.path), i.dtype)).collect();

    // Storages follow the pickles back to back, in the order of the key list.
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let mut pos = cur.position() as usize;
    for key in keys {
        let dtype = *dtype_of
            .get(&key)
            .ok_or_else(|| torch_err(path, format!("storage `{key}` is used by no tensor")))?;
        let head = bytes.get(pos..pos + 8).ok_or_else(|| {
            torch_err(
                path,
                format!("truncated: storage `{key}` header at byte offset {pos}"),
            )
        })?;
        let count = u64::from_le_bytes(head.try_into().unwrap_or_default()) as usize;
        let len = count
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| torch_err(path, format!("storage `{key}` size overflows")))?;
        let data = bytes.get(pos + 8..pos + 8 + len).ok_or_else(|| {
            torch_err(
                path,
                format!(
                    "truncated: storage `{key}` needs {len} bytes at byte offset {}, the file has {}",
                    pos + 8,
                    bytes.len()
                ),
            )
        })?;
        storages.insert(key, data);
        pos += 8 + len;
    }

    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let data = storages[&key_of(&info.path)];
        let layout = &info.layout;
        let size = info.dtype.size_in_bytes();
        let outside = || {
            torch_err(
                path,
                format!("tensor `{}` lies outside its storage", info.name),
            )
        };
        let t = if layout.is_contiguous() {
            let start = layout.start_offset();
            let len = layout.shape().elem_count() * size;
            let raw = data.get(start..start + len).ok_or_else(outside)?;
            Tensor::from_raw_buffer(raw, info.dtype, layout.dims(), &Device::Cpu)?
        } else {
            // A view (e.g. a transposed weight): gather its elements from the storage.
            let storage =
                Tensor::from_raw_buffer(data, info.dtype, &[data.len() / size], &Device::Cpu)?;
            let first = layout.start_offset() / size;
            let mut index = Vec::with_capacity(layout.shape().elem_count());
            let dims = layout.dims();
            let mut at = vec![0usize; dims.len()];
            for _ in 0..layout.shape().elem_count() {
                let offset = first
                    + at.iter()
                        .zip(layout.stride())
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                if offset >= storage.elem_count() {
                    return Err(outside());
                }
                index.push(offset as u32);
                for d in (0..dims.len()).rev() {
                    at[d] += 1;
                    if at[d] < dims[d] {
                        break;
                    }
                    at[d] = 0;
                }
            }
            let index = Tensor::from_vec(index, layout.shape().elem_count(), &Device::Cpu)?;
            storage.index_select(&index, 0)?.reshape(dims)?
        };
        out.push((info.name, t));
    }
    Ok(out)
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
