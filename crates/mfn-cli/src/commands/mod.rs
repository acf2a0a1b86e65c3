//! One module per subcommand, plus the argument handling they share.

pub mod align;
pub mod convert;
pub mod embed;
pub mod eval;
pub mod pack_bin;
pub mod train;
pub mod verify;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use mfn_model::{Checkpoint, Config, MobileFaceNet};

use mfn_data::assets::ENV as ASSETS_ENV;

/// `explicit`, or `$MFN_ASSETS/<rel>` when it is absent; `flag` names the option in the
/// message when neither is there.
pub fn asset_or(explicit: Option<PathBuf>, rel: &str, flag: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    match mfn_data::assets::root() {
        Some(root) => Ok(root.join(rel)),
        None => bail!(
            "no {flag} given and {ASSETS_ENV} is not set: pass {flag} PATH, or set {ASSETS_ENV} \
             to an assets folder that holds {rel}"
        ),
    }
}

/// The default model: insightface's MobileFaceNet y1 under the assets folder.
pub const DEFAULT_MODEL: &str = "models/mobilefacenet-y1/model-symbol.json";

/// Where a network runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// The dtype of the inference path.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeArg {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit IEEE floats (CUDA only).
    F16,
    /// bfloat16 (CUDA only).
    Bf16,
}

impl DtypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// The device a command was asked to run on. `cuda` in a build without the `cuda` feature
/// is an error that says how to get one.
pub fn open_device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if !cfg!(feature = "cuda") => bail!(
            "--device cuda: this mfn-cli was built without CUDA support; rebuild it with \
             `cargo build --release --features cuda -p mfn-cli` (needs the CUDA toolkit)"
        ),
        DeviceKind::Cuda => Device::new_cuda(0).context(
            "--device cuda: cannot open CUDA device 0 (is there a GPU, with its driver and \
             the CUDA libraries on the library path?)",
        ),
    }
}

/// `--device` and `--dtype` of the commands that run the network.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct RunArgs {
    /// Where the network runs.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Precision of the network's inference path; f16 and bf16 need `--device cuda` (the
    /// CPU engine computes in f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
}

impl RunArgs {
    /// Checks the combination and opens the device.
    pub fn open(&self) -> Result<Device> {
        if self.device == DeviceKind::Cpu && self.dtype != DtypeArg::F32 {
            bail!(
                "--dtype {}: reduced precision runs on --device cuda only; the CPU engine \
                 computes in f32",
                match self.dtype {
                    DtypeArg::F16 => "f16",
                    _ => "bf16",
                }
            );
        }
        open_device(self.device)
    }
}

/// [`load_model`] on `device`, with the inference path in `dtype`.
pub fn load_model_on(
    model: Option<PathBuf>,
    preset: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<(Checkpoint, MobileFaceNet)> {
    let path = asset_or(model, DEFAULT_MODEL, "--model")?;
    let config = match preset {
        Some(name) => Some(Config::preset(name).with_context(|| {
            format!(
                "unknown preset `{name}`; known: {}",
                Config::PRESETS.join(", ")
            )
        })?),
        None => None,
    };
    let ckpt = Checkpoint::load(&path, config.as_ref(), &Device::Cpu)
        .with_context(|| format!("loading model {}", path.display()))?;
    let model = ckpt
        .build_with_dtype(device, dtype)
        .with_context(|| format!("building model from {}", path.display()))?;
    Ok((ckpt, model))
}

/// Loads a checkpoint by path (`preset` picks the config an MXNet symbol or ONNX graph is
/// checked against) and builds the network on the CPU.
pub fn load_model(
    model: Option<PathBuf>,
    preset: Option<&str>,
) -> Result<(Checkpoint, MobileFaceNet)> {
    load_model_on(model, preset, &Device::Cpu, DType::F32)
}

/// The input size of a model as width x height, the order image files use.
pub fn image_size(config: &Config) -> [usize; 2] {
    let [h, w] = config.input_size;
    [w, h]
}

/// The metadata key of a model's verification threshold (a cosine).
pub const THRESHOLD_KEY: &str = "mfn.threshold";

/// Which face detector to use and where its weights are.
#[derive(clap::Args, Debug, Clone)]
pub struct DetectorArgs {
    /// Face detector.
    #[arg(long, value_enum, default_value_t = DetectorKind::Mtcnn)]
    pub detector: DetectorKind,
    /// Detector weights: MTCNN's folder (`pnet.pt`, `rnet.pt`, `onet.pt`) or RetinaFace's
    /// `mobilenet0.25_Final.pth` [default: under $MFN_ASSETS/models].
    #[arg(long)]
    pub detector_weights: Option<PathBuf>,
    /// Smallest face to look for, in pixels.
    #[arg(long, default_value_t = 20.0)]
    pub min_face: f32,
}

/// The detectors `mfn-cli` knows.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorKind {
    /// MTCNN (facenet-pytorch weights): the more precise landmarks.
    Mtcnn,
    /// RetinaFace-MobileNet-0.25: faster on large photos.
    Retinaface,
}

impl DetectorArgs {
    /// A face aligner for crops of `size` (width, height) in the ArcFace layout.
    pub fn aligner(&self, size: [u32; 2]) -> Result<mfn_data::face::FaceAligner> {
        let device = Device::Cpu;
        let detector = match self.detector {
            DetectorKind::Mtcnn => {
                let dir = asset_or(
                    self.detector_weights.clone(),
                    "models/mtcnn",
                    "--detector-weights",
                )?;
                mfn_data::detect::Detector::mtcnn(&dir, &device)
            }
            DetectorKind::Retinaface => {
                let path = asset_or(
                    self.detector_weights.clone(),
                    "models/retinaface-mnet025/mobilenet0.25_Final.pth",
                    "--detector-weights",
                )?;
                mfn_data::detect::Detector::retinaface(&path, &device)
            }
        }
        .context("loading the face detector")?;
        let template = template_for(size)?;
        Ok(mfn_data::face::FaceAligner {
            detector,
            options: mfn_data::detect::DetectorOptions {
                min_face: self.min_face,
                ..Default::default()
            },
            template,
            size,
        })
    }
}

/// The landmark template for a crop size: ArcFace's (scaled as insightface does), or
/// SphereFace's for 96x112.
pub fn template_for(size: [u32; 2]) -> Result<mfn_data::align::Landmarks> {
    use mfn_data::align::{template, Template};
    let kind = if size == [96, 112] {
        Template::Sphereface
    } else {
        Template::Arcface
    };
    Ok(template(kind, [size[0] as usize, size[1] as usize])?)
}
