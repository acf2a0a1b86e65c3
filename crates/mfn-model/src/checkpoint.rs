//! Weights with their config: the native safetensors format, and loading any supported
//! checkpoint by its path.
//!
//! The native format is a safetensors file whose tensors keep the source checkpoint's names
//! and whose metadata holds the config as JSON under `mfn.config`, with `mfn.format`
//! marking the file. Other string metadata (such as `mfn.threshold`, a verification
//! threshold) travels along untouched.
//!
//! Every file is untrusted. Whatever the format, a loaded checkpoint has passed
//! [`Checkpoint::check`]: its config is valid ([`Config::validate`]), every weight the
//! config needs is there with its shape, and every value is finite. A native file's header
//! is checked before any tensor is read: at most [`MAX_HEADER_BYTES`] of header and
//! [`MAX_CONFIG_BYTES`] of config, only floating-point tensors, exactly the config's
//! weights (plus a training checkpoint's state, [`TRAIN_HEAD_WEIGHT`] and
//! [`TRAIN_STATE_PREFIX`]`*`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::Config;
use crate::import::mxnet;
use crate::model::MobileFaceNet;
use crate::quant::{Int8, NativeTensor, INT8_KEY, INT8_PREFIX};
use crate::{Error, Result};

/// Metadata key of the config JSON.
pub const CONFIG_KEY: &str = "mfn.config";
/// Metadata key that marks a native file, with its format version.
pub const FORMAT_KEY: &str = "mfn.format";
/// The value of [`FORMAT_KEY`] this version writes and reads.
pub const FORMAT_VERSION: &str = "mobilefacenet/1";
/// Largest safetensors header (tensor list and metadata) a native file may have: 16 MiB.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Largest config JSON (`mfn.config`) a native file may hold: 1 MiB.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// The one tensor besides the model's that a native file may hold outside
/// [`TRAIN_STATE_PREFIX`]: a training checkpoint's margin head.
pub const TRAIN_HEAD_WEIGHT: &str = "head.weight";
/// Prefix of a training checkpoint's optimiser state tensors, which a native file may hold.
pub const TRAIN_STATE_PREFIX: &str = "optim.";

/// A config, its weights by checkpoint name, and free-form metadata.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The network description.
    pub config: Config,
    /// Weights by checkpoint name.
    pub tensors: HashMap<String, Tensor>,
    /// Extra string metadata (`mfn.*` keys other than the config and format).
    pub metadata: BTreeMap<String, String>,
    /// Where it was read from.
    pub source: PathBuf,
    /// The int8 half (see [`crate::quant`]): when present, [`Checkpoint::build`] runs the
    /// CPU engine's matrix products in int8.
    pub int8: Option<Int8>,
}

impl Checkpoint {
    /// Loads a checkpoint by its path: a native `.safetensors` file, an MXNet
    /// `*-symbol.json` (its `.params` found beside it and checked against `mxnet_config`,
    /// [`Config::y1`] when `None`), an ONNX model (matched against `mxnet_config`, or
    /// against the presets when `None`), or a PyTorch `.pt`/`.pth` state dict in a known
    /// layout (see [`crate::import::torch::TorchLayout`]).
    ///
    /// The file must be a regular file (not a FIFO or a device, after following links) of at
    /// most [`crate::import::MAX_FILE_BYTES`]. What is loaded has passed
    /// [`Checkpoint::check`]: a bad config, a missing or mis-shaped weight or a value that
    /// is not finite is an error naming the file.
    pub fn load(path: &Path, mxnet_config: Option<&Config>, device: &Device) -> Result<Self> {
        if let Some(c) = mxnet_config {
            c.validate().map_err(|e| e.in_file(path))?;
        }
        crate::import::check_regular_file(path, crate::import::MAX_FILE_BYTES)?;
        let ckpt = Self::load_unchecked(path, mxnet_config, device)?;
        ckpt.check()?;
        Ok(ckpt)
    }

    /// A native file's bytes, as [`Checkpoint::load`] reads a `.safetensors` file; `path`
    /// names it in errors and becomes [`Checkpoint::source`].
    pub fn from_native_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let ckpt = native_from_bytes(bytes, path, device)?;
        ckpt.check()?;
        Ok(ckpt)
    }

    /// Checks that the checkpoint can be built: its config passes [`Config::validate`],
    /// every weight the config needs is present with its shape, every tensor (extra ones
    /// too) holds only finite values, and every BatchNorm variance plus its eps is positive.
    /// Errors name [`Checkpoint::source`] and the first offending tensor.
    pub fn check(&self) -> Result<()> {
        check_weights(&self.config, &self.tensors, &self.source)?;
        if let Some(int8) = &self.int8 {
            int8.check(&self.config, &self.source)?;
        }
        let needed: std::collections::HashSet<String> = self
            .config
            .plan()
            .weights()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|n| !needed.contains(*n))
            .collect();
        extra.sort();
        for name in extra {
            check_finite(name, &self.tensors[name], &self.source)?;
        }
        Ok(())
    }

    fn load_unchecked(path: &Path, mxnet_config: Option<&Config>, device: &Device) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "safetensors" => load_native(path, device),
            "onnx" => {
                let (config, tensors) =
                    crate::import::onnx::load(path, mxnet_config, None, device)?;
                let mut metadata = BTreeMap::new();
                metadata.insert("mfn.source".into(), "onnx".into());
                Ok(Self {
                    config,
                    tensors,
                    metadata,
                    source: path.to_path_buf(),
                    int8: None,
                })
            }
            "pt" | "pth" => {
                let (config, tensors) = crate::import::torch::load(path, mxnet_config, device)?;
                let mut metadata = BTreeMap::new();
                metadata.insert("mfn.source".into(), "torch".into());
                Ok(Self {
                    config,
                    tensors,
                    metadata,
                    source: path.to_path_buf(),
                    int8: None,
                })
            }
            "json" => {
                let base = mxnet_config.cloned().unwrap_or_else(Config::y1);
                let (config, tensors) = mxnet::load(path, None, &base, device)?;
                let mut metadata = BTreeMap::new();
                metadata.insert("mfn.source".into(), "mxnet".into());
                Ok(Self {
                    config,
                    tensors,
                    metadata,
                    source: path.to_path_buf(),
                    int8: None,
                })
            }
            _ => Err(Error::Native {
                path: path.to_path_buf(),
                message: "unknown model format: expected a native `.safetensors` file, an MXNet `*-symbol.json`, an `.onnx` model or a PyTorch `.pt`/`.pth` state dict".into(),
            }),
        }
    }

    /// Builds the network on `device`, after [`Checkpoint::check`].
    pub fn build(&self, device: &Device) -> Result<MobileFaceNet> {
        self.check()?;
        let tensors = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(device)?.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = MobileFaceNet::new(&self.config, vb).map_err(|e| e.in_file(&self.source))?;
        match &self.int8 {
            Some(int8) => model.quantized(int8).map_err(|e| e.in_file(&self.source)),
            None => Ok(model),
        }
    }

    /// Builds the network on `device` with its folded inference path in `dtype` (f32, f16
    /// or bf16): the BatchNorm is folded in f32, then the weights are cast (see
    /// [`MobileFaceNet::to_dtype`]).
    pub fn build_with_dtype(&self, device: &Device, dtype: DType) -> Result<MobileFaceNet> {
        let model = self.build(device)?;
        if dtype == DType::F32 {
            return Ok(model);
        }
        model.to_dtype(dtype)
    }

    /// Writes the native format. The file is written next to `path` and renamed into place,
    /// so an interrupted save never leaves a half-written model behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        let native_err = |message: String| Error::Native {
            path: path.to_path_buf(),
            message,
        };
        let mut meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        meta.insert(
            CONFIG_KEY.into(),
            serde_json::to_string(&self.config).map_err(|e| native_err(e.to_string()))?,
        );
        meta.insert(FORMAT_KEY.into(), FORMAT_VERSION.into());
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let data: Vec<(&str, Tensor)> = names
            .into_iter()
            .map(|n| {
                Ok((
                    n.as_str(),
                    self.tensors[n].to_device(&Device::Cpu)?.contiguous()?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        let int8 = self.int8.as_ref().map(Int8::to_native).transpose()?;
        let mut raw: Vec<NativeTensor> = data
            .iter()
            .map(|(n, t)| native_tensor(n, t))
            .collect::<Result<_>>()?;
        if let Some((json, tensors)) = int8 {
            meta.insert(INT8_KEY.into(), json);
            raw.extend(tensors);
        }
        raw.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = safetensors::serialize(raw.iter().map(|t| (t.name.as_str(), t)), Some(meta))
            .map_err(|e| native_err(format!("cannot serialise: {e}")))?;
        // One temporary name per process and call, so that concurrent writers of one path
        // never share (or delete) each other's file.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("safetensors.{}-{seq}.partial", std::process::id()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        // Written in full and flushed to disk before the rename, so that a crash leaves
        // either the old file or the new one, never a torn one; a failed write leaves
        // neither a partial file nor a changed old one.
        let written = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            drop(f);
            std::fs::rename(&tmp, path).map_err(io(path))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Persist the rename itself; not every platform can open a directory.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// A candle tensor's dtype, shape and little-endian bytes, for writing beside the int8
/// tensors candle has no dtype for.
fn native_tensor(name: &str, t: &Tensor) -> Result<NativeTensor> {
    use safetensors::View;
    Ok(NativeTensor {
        name: name.to_string(),
        dtype: t.dtype().into(),
        shape: t.dims().to_vec(),
        data: t.data().into_owned(),
    })
}

fn load_native(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = crate::import::read_regular_file(path, crate::import::MAX_FILE_BYTES)?;
    native_from_bytes(&bytes, path, device)
}

/// Whether a tensor outside the config's weights belongs to a training checkpoint.
fn is_training_state(name: &str) -> bool {
    name == TRAIN_HEAD_WEIGHT || name.starts_with(TRAIN_STATE_PREFIX)
}

fn native_from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Checkpoint> {
    let bad = |message: String| Error::Native {
        path: path.to_path_buf(),
        message,
    };
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .ok_or_else(|| bad("not a safetensors file: shorter than its 8-byte header size".into()))?;
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "a safetensors header of {header_len} bytes, more than the {MAX_HEADER_BYTES} a model needs"
        )));
    }
    // The safetensors reader checks the header (UTF-8 JSON, at most its own cap) and that
    // every tensor's offsets, shape and dtype agree and tile the data exactly, with
    // checked arithmetic, before anything is allocated for the data.
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    match meta.remove(FORMAT_KEY).as_deref() {
        Some(FORMAT_VERSION) => {}
        Some(other) => return Err(bad(format!("format `{other}` is not `{FORMAT_VERSION}`"))),
        None => {
            return Err(bad(format!(
                "no `{FORMAT_KEY}` metadata: not an MFN model (convert it with `mfn-cli convert`)"
            )))
        }
    }
    let config_json = meta
        .remove(CONFIG_KEY)
        .ok_or_else(|| bad(format!("no `{CONFIG_KEY}` metadata")))?;
    if config_json.len() > MAX_CONFIG_BYTES {
        return Err(bad(format!(
            "`{CONFIG_KEY}` is {} bytes, more than the {MAX_CONFIG_BYTES} a config needs",
            config_json.len()
        )));
    }
    let config: Config = serde_json::from_str(&config_json)
        .map_err(|e| bad(format!("bad `{CONFIG_KEY}` metadata: {e}")))?;
    config.validate().map_err(|e| e.in_file(path))?;
    // The tensor list against the config, from the header alone: nothing is converted
    // before every name, shape and dtype is known to be right.
    let infos = header.tensors();
    let float = |name: &str, dtype: safetensors::Dtype| {
        use safetensors::Dtype as D;
        if matches!(dtype, D::F32 | D::F16 | D::BF16 | D::F64) {
            Ok(())
        } else {
            Err(Error::BadWeight {
                path: path.to_path_buf(),
                name: name.to_string(),
                message: format!("dtype {dtype:?} is not floating point (f32, f16, bf16, f64)"),
            })
        }
    };
    let weights = config.plan().weights();
    for (name, shape) in &weights {
        let info = infos.get(name).ok_or_else(|| Error::MissingWeight {
            path: path.to_path_buf(),
            name: name.clone(),
        })?;
        if info.shape != *shape {
            return Err(Error::WeightShape {
                path: path.to_path_buf(),
                name: name.clone(),
                expected: shape.clone(),
                found: info.shape.clone(),
            });
        }
        float(name, info.dtype)?;
    }
    let needed: std::collections::HashSet<&str> = weights.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<(&String, &&safetensors::tensor::TensorInfo)> = infos
        .iter()
        .filter(|(n, _)| !needed.contains(n.as_str()))
        .collect();
    extra.sort_by(|a, b| a.0.cmp(b.0));
    let int8_json = meta.remove(INT8_KEY);
    for (name, info) in extra {
        if name.starts_with(INT8_PREFIX) && int8_json.is_some() {
            // Checked with the int8 metadata once the data is at hand.
            continue;
        }
        if !is_training_state(name) {
            return Err(Error::BadWeight {
                path: path.to_path_buf(),
                name: name.clone(),
                message: format!(
                    "not a weight of config `{}` (nor training state)",
                    config.name
                ),
            });
        }
        float(name, info.dtype)?;
    }
    use candle_core::safetensors::Load;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let int8 = int8_json
        .map(|json| Int8::from_native(&json, &st, &config, path))
        .transpose()?;
    let tensors = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with(INT8_PREFIX) || int8.is_none())
        .map(|(name, view)| {
            let t = view
                .load(device)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(Checkpoint {
        config,
        tensors,
        metadata: meta,
        source: path.to_path_buf(),
        int8,
    })
}

/// The first value of `t` that is not finite, as an error naming `name` and `path`.
fn check_finite(name: &str, t: &Tensor, path: &Path) -> Result<()> {
    for_each_value(name, t, path, |index, value| {
        if value.is_finite() {
            Ok(())
        } else {
            Err(Error::NonFinite {
                path: path.to_path_buf(),
                name: name.to_string(),
                index,
                value,
            })
        }
    })
}

/// Runs `f` on every value of `t` as `f32`, in row-major order.
fn for_each_value(
    name: &str,
    t: &Tensor,
    path: &Path,
    mut f: impl FnMut(usize, f32) -> Result<()>,
) -> Result<()> {
    let values: Vec<f32> = t
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .map_err(|e| Error::BadWeight {
            path: path.to_path_buf(),
            name: name.to_string(),
            message: format!("cannot read its values: {e}"),
        })?;
    for (i, v) in values.into_iter().enumerate() {
        f(i, v)?;
    }
    Ok(())
}

/// Checks that `config` is valid and that `tensors` holds every weight it needs, each with
/// its shape, finite, and each BatchNorm variance above minus its eps.
pub(crate) fn check_weights(
    config: &Config,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    config.validate().map_err(|e| e.in_file(path))?;
    let plan = config.plan();
    let mut eps: HashMap<String, f64> = plan
        .convs()
        .map(|c| (format!("{}_moving_var", c.bn_name()), c.bn_eps))
        .collect();
    eps.insert(
        format!("{}_moving_var", crate::config::EmbeddingSpec::BN),
        plan.embedding.bn_eps,
    );
    for (name, shape) in plan.weights() {
        let t = tensors.get(&name).ok_or_else(|| Error::MissingWeight {
            path: path.to_path_buf(),
            name: name.clone(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::WeightShape {
                path: path.to_path_buf(),
                name,
                expected: shape,
                found: t.dims().to_vec(),
            });
        }
        let eps = eps.get(&name).map(|e| *e as f32);
        for_each_value(&name, t, path, |index, value| {
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    index,
                    value,
                });
            }
            match eps {
                Some(eps) if value + eps <= 0.0 => Err(Error::BadWeight {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message: format!(
                        "variance {value} at index {index} is not above -eps ({eps}): BatchNorm would take the square root of a negative number"
                    ),
                }),
                _ => Ok(()),
            }
        })?;
    }
    Ok(())
}
