//! Weights with their config: the native safetensors format, and loading any supported
//! checkpoint by its path.
//!
//! The native format is a safetensors file whose tensors keep the source checkpoint's names
//! and whose metadata holds the config as JSON under `mfn.config`, with `mfn.format`
//! marking the file. Other string metadata (such as `mfn.threshold`, a verification
//! threshold) travels along untouched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::Config;
use crate::import::mxnet;
use crate::model::MobileFaceNet;
use crate::{Error, Result};

/// Metadata key of the config JSON.
pub const CONFIG_KEY: &str = "mfn.config";
/// Metadata key that marks a native file, with its format version.
pub const FORMAT_KEY: &str = "mfn.format";
/// The value of [`FORMAT_KEY`] this version writes and reads.
pub const FORMAT_VERSION: &str = "mobilefacenet/1";

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
}

impl Checkpoint {
    /// Loads a checkpoint by its path: a native `.safetensors` file, an MXNet
    /// `*-symbol.json` (its `.params` found beside it and checked against `mxnet_config`,
    /// [`Config::y1`] when `None`), an ONNX model (matched against `mxnet_config`, or
    /// against the presets when `None`), or a PyTorch `.pt`/`.pth` state dict in a known
    /// layout (see [`crate::import::torch::TorchLayout`]).
    pub fn load(path: &Path, mxnet_config: Option<&Config>, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
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
                })
            }
            _ => Err(Error::Native {
                path: path.to_path_buf(),
                message: "unknown model format: expected a native `.safetensors` file, an MXNet `*-symbol.json`, an `.onnx` model or a PyTorch `.pt`/`.pth` state dict".into(),
            }),
        }
    }

    /// Builds the network on `device`.
    pub fn build(&self, device: &Device) -> Result<MobileFaceNet> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(device)?.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        MobileFaceNet::new(&self.config, vb)
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
        let bytes = safetensors::serialize(data, Some(meta))
            .map_err(|e| native_err(format!("cannot serialise: {e}")))?;
        let tmp = path.with_extension("safetensors.partial");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        // Written in full and flushed to disk before the rename, so that a crash leaves
        // either the old file or the new one, never a torn one.
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Persist the rename itself; not every platform can open a directory.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

fn load_native(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |message: String| Error::Native {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
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
    let config: Config = serde_json::from_str(&config_json)
        .map_err(|e| bad(format!("bad `{CONFIG_KEY}` metadata: {e}")))?;
    // Validate the whole file (offsets, sizes) before trusting any tensor in it.
    safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    check_weights(&config, &tensors, path)?;
    Ok(Checkpoint {
        config,
        tensors,
        metadata: meta,
        source: path.to_path_buf(),
    })
}

/// Checks that `tensors` holds every weight `config` needs, each with its shape.
pub(crate) fn check_weights(
    config: &Config,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    for (name, shape) in config.plan().weights() {
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
    }
    Ok(())
}
