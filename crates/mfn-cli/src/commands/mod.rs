//! One module per subcommand, plus the argument handling they share.

pub mod align;
pub mod args;
pub mod convert;
pub mod embed;
pub mod eval;
pub mod gallery;
pub mod pack_bin;
pub mod quantize;
pub mod train;
pub mod verify;

use std::path::{Path, PathBuf};

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
        Some(root) if root.join(rel).exists() => Ok(root.join(rel)),
        Some(root) if !root.is_dir() => bail!(
            "no {flag} given, and {ASSETS_ENV}={} is not a folder: pass {flag} PATH, or set \
             {ASSETS_ENV} to an assets folder that holds {rel}",
            root.display()
        ),
        Some(root) => bail!(
            "no {flag} given, and the assets folder {ASSETS_ENV}={} holds no {rel}: pass {flag} \
             PATH, or set {ASSETS_ENV} to an assets folder that holds {rel}",
            root.display()
        ),
        None => bail!(
            "no {flag} given and {ASSETS_ENV} is not set: pass {flag} PATH, or set {ASSETS_ENV} \
             to an assets folder that holds {rel}"
        ),
    }
}

/// The pinned sources and where they are found (assets folder, cache, download).
pub fn hub() -> Result<mfn_hub::Hub> {
    mfn_hub::Hub::from_env().context("reading the registry of pinned sources")
}

/// The pinned file `name`, found through [`hub`], with a note on stderr when it is
/// downloaded.
pub fn pinned_file(hub: &mfn_hub::Hub, name: &str) -> Result<PathBuf> {
    let entry = hub.registry.get(name)?;
    note_download(hub, entry);
    Ok(hub
        .resolver
        .resolve(entry)
        .with_context(|| format!("getting `{name}`"))?
        .path)
}

/// Tells the user, before a download, what comes from where and how big it is.
fn note_download(hub: &mfn_hub::Hub, entry: &mfn_hub::Entry) {
    let r = &hub.resolver;
    let in_assets = match (&r.assets, &entry.assets) {
        (Some(root), Some(rel)) => root.join(rel).is_file(),
        _ => false,
    };
    if in_assets || r.cache_path(entry).is_file() || r.offline.is_some() {
        return;
    }
    if let Some(note) = &r.assets_note {
        eprintln!("note: {note}");
    }
    eprintln!(
        "note: downloading `{}` ({:.1} MB) from {} into {}",
        entry.name,
        entry.size as f64 / 1e6,
        r.url(entry),
        r.cache_path(entry).display()
    );
}

/// Writes `bytes` to `path` through a temporary file beside it, synced and renamed into
/// place, so that a failed write leaves the old file (or none) and no partial one (see
/// [`mfn_train::atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    mfn_train::atomic::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// [`write_atomic`] for writers that take a path (image encoders, plots, model files):
/// `write` creates the file at the temporary path it is given, which has the extension of
/// `path`.
pub fn write_atomic_with<E>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<()>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    mfn_train::atomic::write_with(path, write)
        .with_context(|| format!("writing {}", path.display()))
}

/// Checks, before any long work, that `flag`'s output file `path` can be written: it
/// names a file, not a folder, in a folder that exists and takes new files.
pub fn check_output(path: &Path, flag: &str) -> Result<()> {
    if path.file_name().is_none() || path.is_dir() {
        bail!("{flag} {}: names a folder, not a file", path.display());
    }
    let dir = mfn_train::atomic::folder(path);
    if !dir.is_dir() {
        bail!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    mfn_train::atomic::check_writable(&dir).with_context(|| {
        format!(
            "{flag} {}: cannot create files in {}",
            path.display(),
            dir.display()
        )
    })
}

/// The model `mfn-cli` uses when `--model` is not given: a registry name.
pub const DEFAULT_MODEL: &str = mfn_hub::DEFAULT_MODEL;

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
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Where the network runs.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Precision of the network's inference path; f16 and bf16 need `--device cuda` (the
    /// CPU engine computes in f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// What the CPU engine computes its 1x1 convs and embedding layer in: `f32`, or `int8`
    /// (the model's own int8 half, from `mfn-cli quantize`, or one calibrated now on
    /// `--calib`) [default: int8 for a model with an int8 half, else f32].
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// With `--precision int8`: calibrate on this folder of aligned faces now, rather than
    /// use the model's int8 half.
    #[arg(long, value_name = "DIR")]
    pub calib: Option<PathBuf>,
    /// Faces of `--calib` to calibrate on.
    #[arg(long, default_value_t = mfn_model::quant::DEFAULT_CALIBRATION_IMAGES,
          value_parser = args::count(1, 1_000_000))]
    pub calib_images: usize,
}

/// `--precision`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionArg {
    /// f32 throughout.
    F32,
    /// int8 1x1 convs and embedding layer (the CPU engine).
    Int8,
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
        if self.calib.is_some() && self.precision != Some(PrecisionArg::Int8) {
            bail!("--calib: only with --precision int8");
        }
        if self.precision == Some(PrecisionArg::Int8) && self.device != DeviceKind::Cpu {
            bail!("--precision int8: the int8 path is the CPU engine's; drop --device");
        }
        open_device(self.device)
    }

    /// Opens the device, loads `model` and builds it in the precision asked for:
    /// quantised on `--calib` now, or with its int8 half dropped for `--precision f32`.
    pub fn load(&self, model: Option<PathBuf>) -> Result<(Device, Checkpoint, MobileFaceNet)> {
        let device = self.open()?;
        let (mut ckpt, mut net) = load_model_on(model, None, &device, self.dtype.dtype())?;
        match (self.precision, &self.calib) {
            (Some(PrecisionArg::F32), _) => {
                ckpt.int8 = None;
                net = net.dequantized()?;
            }
            (Some(PrecisionArg::Int8), Some(dir)) => {
                let bar = progress(self.calib_images, "calibrating");
                let (quantized, int8) = mfn_data::calibration::quantize(
                    &net,
                    dir,
                    self.calib_images,
                    mfn_model::quant::QuantizeOptions::default(),
                    |done, total| {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    },
                )
                .with_context(|| format!("--calib: calibrating on {}", dir.display()))?;
                bar.finish_and_clear();
                net = quantized;
                ckpt.int8 = Some(int8);
            }
            (Some(PrecisionArg::Int8), None) if ckpt.int8.is_none() => bail!(
                "--precision int8: {} has no int8 half; make one with `mfn-cli quantize \
                 --calib DIR`, or give --calib DIR to calibrate now",
                ckpt.source.display()
            ),
            _ => {}
        }
        Ok((device, ckpt, net))
    }
}

/// [`load_model`] on `device`, with the inference path in `dtype`.
pub fn load_model_on(
    model: Option<PathBuf>,
    preset: Option<&str>,
    device: &Device,
    dtype: DType,
) -> Result<(Checkpoint, MobileFaceNet)> {
    let config = match preset {
        Some(name) => Some(Config::preset(name).with_context(|| {
            format!(
                "unknown preset `{name}`; known: {}",
                Config::PRESETS.join(", ")
            )
        })?),
        None => None,
    };
    let ckpt = load_checkpoint(model, config.as_ref())?;
    let path = ckpt.source.clone();
    let model = ckpt
        .build_with_dtype(device, dtype)
        .with_context(|| format!("building model from {}", path.display()))?;
    Ok((ckpt, model))
}

/// A model by `--model`: a file (native, MXNet, ONNX, PyTorch), or the name of a model in
/// the registry, converted on first use; [`DEFAULT_MODEL`] when `None`.
pub fn load_checkpoint(model: Option<PathBuf>, config: Option<&Config>) -> Result<Checkpoint> {
    let name = match &model {
        None => Some(DEFAULT_MODEL.to_string()),
        // A bare word that is no file is a registry name.
        Some(p) if !p.exists() && p.components().count() == 1 && p.extension().is_none() => {
            Some(p.display().to_string())
        }
        Some(_) => None,
    };
    if let Some(name) = name {
        let hub = hub()?;
        let entry = hub
            .registry
            .get_kind(&name, mfn_hub::Kind::Model)
            .with_context(|| {
                format!("--model {name}: neither a model file nor a registry model")
            })?;
        note_download(&hub, entry);
        for c in entry.model.iter().flat_map(|m| &m.companions) {
            note_download(&hub, hub.registry.get(c)?);
        }
        let pretrained = hub
            .model(&name)
            .with_context(|| format!("loading the registry model `{name}`"))?;
        return Ok(pretrained.checkpoint);
    }
    let path = model.unwrap_or_default();
    Checkpoint::load(&path, config, &Device::Cpu)
        .with_context(|| format!("loading model {}", path.display()))
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
pub const THRESHOLD_KEY: &str = mfn_hub::pretrained::THRESHOLD_KEY;

/// Which face detector to use, where its weights are, and which face of a photo counts.
#[derive(clap::Args, Debug, Clone)]
pub struct DetectorArgs {
    /// Face detector.
    #[arg(long, value_enum, default_value_t = DetectorChoice::Scrfd)]
    pub detector: DetectorChoice,
    /// Detector weights: SCRFD's `.onnx`, RetinaFace's `mobilenet0.25_Final.pth`, or
    /// MTCNN's folder (`pnet.pt`, `rnet.pt`, `onet.pt`) [default: the registry's pinned
    /// copies, from $MFN_ASSETS, the cache or their public sources].
    #[arg(long)]
    pub detector_weights: Option<PathBuf>,
    /// MTCNN and RetinaFace: smallest face to look for, in pixels (0..=10000) [default: 20].
    #[arg(long, allow_negative_numbers = true, value_parser = args::face_size)]
    pub min_face: Option<f32>,
    /// SCRFD: how photos are sized for the network: `fit:N` scales photos whose longer
    /// side exceeds N down to N and pads to a multiple of 32, never up; `letterbox:N` is
    /// insightface's (longer side scaled to N, up or down, on an NxN canvas)
    /// [default: fit:640].
    #[arg(long, value_parser = args::det_size)]
    pub det_size: Option<mfn_detect::scrfd::InputSize>,
    /// Which face of a photo counts: `central` (insightface's rank: box area less twice
    /// the squared distance of its centre from the photo's), `largest`, or `all`.
    #[arg(long, value_enum, default_value_t = PickArg::Central)]
    pub pick: PickArg,
}

/// The detectors `mfn-cli` knows.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorChoice {
    /// SCRFD-500M with keypoints (insightface's `det_500m`, as in `buffalo_s`).
    Scrfd,
    /// MTCNN (facenet-pytorch weights).
    Mtcnn,
    /// RetinaFace-MobileNet-0.25.
    Retinaface,
}

impl DetectorChoice {
    /// The library's name for it.
    pub fn kind(self) -> mfn_detect::DetectorKind {
        match self {
            Self::Scrfd => mfn_detect::DetectorKind::Scrfd,
            Self::Mtcnn => mfn_detect::DetectorKind::Mtcnn,
            Self::Retinaface => mfn_detect::DetectorKind::RetinaFace,
        }
    }
}

/// `--pick`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickArg {
    /// insightface's `max_num=1` rank: the subject a photo is framed on.
    Central,
    /// The largest box.
    Largest,
    /// Every face.
    All,
}

impl PickArg {
    /// The library's rule.
    pub fn pick(self) -> mfn_detect::Pick {
        match self {
            Self::Central => mfn_detect::Pick::Central,
            Self::Largest => mfn_detect::Pick::Largest,
            Self::All => mfn_detect::Pick::All,
        }
    }
}

impl DetectorArgs {
    /// A pipeline builder with these choices and the environment's registry.
    pub fn builder(&self) -> Result<mfn_detect::PipelineBuilder> {
        if self.detector != DetectorChoice::Scrfd {
            if let Some(size) = &self.det_size {
                bail!(
                    "--det-size {size:?}: sizes SCRFD's input; --detector {} sizes its own",
                    self.detector.kind()
                );
            }
        } else if self.min_face.is_some() {
            bail!("--min-face: SCRFD has no smallest-face setting (its score threshold decides); use it with --detector mtcnn or retinaface");
        }
        let mut b = mfn_detect::Pipeline::builder()
            .hub(hub()?)
            .detector(self.detector.kind())
            .pick(self.pick.pick());
        if let Some(p) = &self.detector_weights {
            b = b.detector_weights(p);
        }
        if let Some(m) = self.min_face {
            b = b.min_face(m);
        }
        if let Some(size) = self.det_size {
            b = b.scrfd_input(size);
        }
        Ok(b)
    }

    /// Finds and aligns faces for crops of `size` (width, height).
    pub fn aligner(&self, size: [u32; 2]) -> Result<mfn_detect::pipeline::FaceAligner> {
        self.builder()?
            .build_aligner(size)
            .context("loading the face detector")
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

/// A progress bar with a rate and ETA on standard error, for `len` items of `what`;
/// hidden when standard error is not a terminal.
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{wide_bar}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}, {{per_sec}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
